"""Feature-store scaling benchmark (issue 9): what a write, a relabel, a resume plan and a full read
cost as the store grows. Synthetic rows: 512-d float16 embeddings, paths like an imager's.

    .venv/bin/python benchmarks/store_bench.py                      # 100,000 and 1,000,000 rows
    .venv/bin/python benchmarks/store_bench.py --sizes 100000       # one size

This measures the store format penult has now (one HDF5 file rewritten by every commit); the
segmented format of issue 9 will be measured by the same script, side by side. Each size builds
its store once under bench-out/store/, then times:

- add 1,000 rows (upsert, append, commit), the median of 3;
- set a label column on every row;
- open the store and plan a resume over all its paths (a subprocess: time and peak RSS);
- read every embedding in blocks (MB/s), beside the disk's own sequential read rate (dd).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from features import FeatureStore, StoreWriter  # noqa: E402

OUT = ROOT / "bench-out" / "store"
DIM = 512
FP = {
    "architecture": "bench:synthetic",
    "weights_sha256": "0" * 64,
    "preprocessing": {},
    "layer": "x",
    "dim": DIM,
    "precision": "fp32",
}


def _rows(start: int, n: int) -> tuple[list[str], list[str]]:
    ids = range(start, start + n)
    return [f"2026/{i // 100_000:03d}/IFCB_{i:09d}.png" for i in ids], [f"{i:064x}" for i in ids]


def _add(w: StoreWriter, start: int, n: int, rng: np.random.Generator) -> None:
    paths, sha = _rows(start, n)
    labels = {"label": [f"class{i % 100}" for i in range(start, start + n)]}
    w.upsert_images(paths, ["/data"] * n, sha, np.full(n, 4096), np.arange(n), labels)
    w.register_backbone("net", FP, dtype="float16")
    w.append("net", paths, sha, rng.standard_normal((n, DIM), dtype=np.float32))


def build(path: Path, n: int) -> float:
    """A store of ``n`` rows (reused when it exists); returns the build seconds."""
    if path.exists() and len(FeatureStore(path).images()) == n:
        return 0.0
    path.unlink(missing_ok=True)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    with StoreWriter(path) as w:
        for s in range(0, n, 100_000):
            _add(w, s, min(100_000, n - s), rng)
    return time.perf_counter() - t


def add_1000(path: Path, n: int) -> float:
    times = []
    rng = np.random.default_rng(1)
    for k in range(3):
        t = time.perf_counter()
        with StoreWriter(path) as w:
            _add(w, n + 1000 * k, 1000, rng)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def relabel(path: Path) -> float:
    t = time.perf_counter()
    fs = FeatureStore(path)
    paths = fs.images().path
    with StoreWriter(path) as w:
        w.set_labels("split", paths, ["train" if i % 10 else "test" for i in range(len(paths))])
    return time.perf_counter() - t


PLAN = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from features import FeatureStore
    from extract.run import plan
    from extract.sources import Listing
    status = lambda key: int(open("/proc/self/status").read().split(key + ":")[1].split()[0])
    base = status("VmRSS")  # after the imports (torch comes with extract): not the table's cost
    t = time.perf_counter()
    fs = FeatureStore({path!r})
    table = fs.images()
    valid = fs.valid("net")
    listing = Listing(root="/data", paths=list(table.path))
    p = plan(listing, list(table.sha256), [""] * len(table), table, valid, retry_failed=False)
    secs = time.perf_counter() - t
    print(secs, p.skipped, status("VmHWM") - base)
""")


def open_and_plan(path: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MiB above the imports) to open the store and plan a resume over all
    its paths."""
    out = subprocess.run(
        [sys.executable, "-c", PLAN.format(root=str(ROOT), path=str(path))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return float(out[0]), int(out[2]) / 1024


def read_all(path: Path) -> float:
    """MB/s reading every embedding block by block (float16 on disk, float32 out)."""
    subprocess.run(["sync"], check=False)
    fs = FeatureStore(path)
    n = len(fs.images())
    t = time.perf_counter()
    nbytes = 0
    for s in range(0, n, 65536):
        x = fs.embeddings("net", np.arange(s, min(n, s + 65536)))
        nbytes += x.shape[0] * x.shape[1] * 2  # bytes stored (float16)
    return nbytes / 2**20 / (time.perf_counter() - t)


def dd_rate(path: Path) -> str:
    r = subprocess.run(
        ["dd", f"if={path}", "of=/dev/null", "bs=16M"], capture_output=True, text=True
    )
    return r.stderr.strip().splitlines()[-1] if r.stderr else "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    flags = [ln for ln in open("/proc/cpuinfo") if ln.startswith("model name")][:1]
    results: dict = {
        "cpu": flags[0].split(":", 1)[1].strip() if flags else "?",
        "format": "v1 (one file)",
        "sizes": {},
    }
    print(f"CPU: {results['cpu']}; store format: {results['format']}")
    for n in [int(s) for s in args.sizes.split(",")]:
        path = OUT / f"v1-{n}.h5"
        built = build(path, n)
        row = {"build_s": built, "add_1000_s": add_1000(path, n)}
        row["relabel_all_s"] = relabel(path)
        row["open_plan_s"], row["open_plan_peak_rss_mib"] = open_and_plan(path)
        row["read_mb_s"] = read_all(path)
        row["dd"] = dd_rate(path)
        row["file_gib"] = path.stat().st_size / 2**30
        results["sizes"][n] = row
        print(
            f"{n:>10,} rows ({row['file_gib']:.2f} GiB): add 1,000 {row['add_1000_s']:.2f} s | "
            f"label column {row['relabel_all_s']:.1f} s | open+plan {row['open_plan_s']:.1f} s, "
            f"{row['open_plan_peak_rss_mib']:.0f} MiB | read {row['read_mb_s']:.0f} MB/s (dd: {row['dd']})",
            flush=True,
        )
        path.unlink()  # the next run starts from a fresh build (add/relabel changed this one)
    (ROOT / "bench-out" / "store.json").write_text(json.dumps(results, indent=1))
    print(
        "peak RSS of this process:",
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "MiB",
    )


if __name__ == "__main__":
    main()
