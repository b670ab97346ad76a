"""Feature-store scaling benchmark (issue 9): what a write, a relabel, a resume plan and a full read
cost as the store grows. Synthetic rows: 512-d float16 embeddings, paths like an imager's.

    .venv/bin/python benchmarks/store_bench.py                           # both formats, 100k and 1M
    .venv/bin/python benchmarks/store_bench.py --sizes 100000,1000000,10000000 --old-sizes 100000,1000000

The segmented store (format 2, this tree) and the one-file store it replaced (format 1, taken with
`git archive` from --baseline, default 3ad48d5) are measured by the same code in the same run, each
(format, size) in a fresh subprocess. Each builds its store under bench-out/store/, then times:

- add 1,000 rows (a writer opened, upsert, append, commit), the median of 3;
- set a label column on every row (the writer, set_labels, commit);
- open the store and plan a resume over all its paths (a fresh subprocess: time and peak RSS
  above the imports; the listing of N paths and hashes is built before the clock starts);
- read every embedding in blocks (MB/s), beside the disk's own sequential read rate (dd).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


OUT = ROOT / "bench-out" / "store"
DATA = ROOT.parent / "shared" / "data"
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
    return [f"2026/{i // 100_000:03d}/IFCB_{i:09d}.png" for i in ids], [
        f"{i + 1:064x}" for i in ids
    ]


def _add(w, start: int, n: int, rng: np.random.Generator) -> None:
    paths, sha = _rows(start, n)
    labels = {"label": [f"class{i % 100}" for i in range(start, start + n)]}
    w.upsert_images(paths, ["/data"] * n, sha, np.full(n, 4096), np.arange(n), labels)
    w.register_backbone("net", FP, dtype="float16")
    w.append("net", paths, sha, rng.standard_normal((n, DIM), dtype=np.float32))


def _new_format() -> bool:
    from penult.features import FeatureStore

    return hasattr(FeatureStore, "table_view")


def build(path: Path, n: int) -> float:
    """A store of ``n`` rows; returns the build seconds (a commit per million rows)."""
    from penult.features import StoreWriter

    rng = np.random.default_rng(0)
    t = time.perf_counter()
    with StoreWriter(path) as w:
        for s in range(0, n, 100_000):
            _add(w, s, min(100_000, n - s), rng)
            if _new_format() and (s + 100_000) % 1_000_000 == 0:
                w.commit()
    return time.perf_counter() - t


def add_1000(path: Path, n: int) -> float:
    from penult.features import StoreWriter

    times = []
    rng = np.random.default_rng(1)
    for k in range(3):
        t = time.perf_counter()
        with StoreWriter(path) as w:
            _add(w, n + 1000 * k, 1000, rng)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def relabel(path: Path, n: int) -> float:
    from penult.features import StoreWriter

    paths = _rows(0, n)[0]
    values = ["train" if i % 10 else "test" for i in range(n)]
    t = time.perf_counter()
    with StoreWriter(path) as w:
        w.set_labels("split", paths, values)
    return time.perf_counter() - t


PLAN = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    sys.path.insert(1, {bench!r})
    from penult.features import FeatureStore
    from penult.extract import run
    from penult.extract.sources import Listing
    from store_bench import _rows
    status = lambda key: int(open("/proc/self/status").read().split(key + ":")[1].split()[0])
    paths, sha = _rows(0, {n})
    listing = Listing(root="/data", paths=paths)
    base = status("VmRSS")  # after the imports and the listing: the store's cost only
    t = time.perf_counter()
    fs = FeatureStore({path!r})
    if hasattr(fs, "table_view"):
        row, stored = fs.find(paths), fs.table_view()
        p = run.plan(sha, [""] * len(paths), row, stored, fs.valid("net"), retry_failed=False)
    else:
        table = fs.images()
        p = run.plan(listing, sha, [""] * len(paths), table, fs.valid("net"), retry_failed=False)
    secs = time.perf_counter() - t
    print(secs, p.skipped, status("VmHWM") - base)
""")


def open_and_plan(path: Path, n: int) -> tuple[float, float, int]:
    """(seconds, peak RSS in MiB above imports and listing, rows planned as already stored)."""
    code = PLAN.format(
        root=os.environ["PYTHONPATH"], bench=str(ROOT / "benchmarks"), path=str(path), n=n
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    return float(out[0]), int(out[2]) / 1024, int(out[1])


def read_all(path: Path, n: int) -> float:
    """MB/s reading every embedding block by block (float16 on disk, float32 out)."""
    from penult.features import FeatureStore

    subprocess.run(["sync"], check=False)
    fs = FeatureStore(path)
    t = time.perf_counter()
    nbytes = 0
    for s in range(0, n, 65536):
        x = fs.embeddings("net", np.arange(s, min(n, s + 65536)))
        nbytes += x.shape[0] * x.shape[1] * 2  # bytes stored (float16)
    return nbytes / 2**20 / (time.perf_counter() - t)


def dd_rate(path: Path) -> str:
    seg = Path(f"{path}.segments")
    big = max(seg.iterdir(), key=lambda p: p.stat().st_size) if seg.is_dir() else path
    r = subprocess.run(
        ["dd", f"if={big}", "of=/dev/null", "bs=16M"], capture_output=True, text=True
    )
    return r.stderr.strip().splitlines()[-1] if r.stderr else "?"


def _size(path: Path) -> float:
    seg = Path(f"{path}.segments")
    extra = sum(p.stat().st_size for p in seg.iterdir()) if seg.is_dir() else 0
    return (path.stat().st_size + extra) / 2**30


EXTRACT = textwrap.dedent("""
    import csv, sys, time
    sys.path.insert(0, {root!r})
    from penult.extract import ExtractOptions, extract, list_images
    data = {data!r}
    rows = sorted(r["path"] for r in csv.DictReader(open(data + "/split.csv")))[: {n}]
    with open({manifest!r}, "w") as fh:
        fh.write("path,label\\n" + "".join(f"{{p}},{{p.split('/')[0]}}\\n" for p in rows))
    listing = list_images({manifest!r}, root=data)
    t = time.perf_counter()
    s = extract({store!r}, listing, ExtractOptions(progress=False, precision="fp32"))
    print(time.perf_counter() - t, s.extracted)
""")


def extract_time(fmt: str, tree: Path, n: int) -> tuple[float, int]:
    """Seconds to extract the first ``n`` cub100 images into an empty store, and images done."""
    store = OUT / f"extract-{fmt}.h5"
    shutil.rmtree(f"{store}.segments", ignore_errors=True)
    store.unlink(missing_ok=True)
    code = EXTRACT.format(
        root=str(tree), data=str(DATA / "cub100"), n=n, manifest=str(OUT / "cub.csv"),
        store=str(store),
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return float(out[0]), int(out[1])


def one(fmt: str, n: int) -> dict:
    """Every measurement for one format and size (run in its own process)."""
    path = OUT / f"{fmt}-{n}.h5"
    shutil.rmtree(f"{path}.segments", ignore_errors=True)
    path.unlink(missing_ok=True)
    row = {"build_s": build(path, n)}
    row["gib"] = _size(path)
    row["open_plan_s"], row["open_plan_peak_rss_mib"], row["planned_stored"] = open_and_plan(
        path, n
    )
    row["read_mb_s"] = read_all(path, n)
    row["dd"] = dd_rate(path)
    row["add_1000_s"] = add_1000(path, n)
    row["relabel_all_s"] = relabel(path, n + 3000)
    shutil.rmtree(f"{path}.segments", ignore_errors=True)
    path.unlink()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000", help="rows, segmented format")
    ap.add_argument("--old-sizes", default="100000,1000000", help="rows, one-file format")
    ap.add_argument("--baseline", default="3ad48d5", help="git revision with the one-file format")
    ap.add_argument("--extract", type=int, default=1000, help="cub100 images to extract (0: skip)")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # worker: FORMAT ROWS
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.one:
        print("RESULT " + json.dumps(one(args.one[0], int(args.one[1]))))
        return
    base = OUT / "baseline"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir()
    subprocess.run(
        f"git archive {args.baseline} features extract | tar -x -C {base}",
        shell=True, check=True, cwd=ROOT,
    )  # fmt: skip
    cpu = [ln for ln in open("/proc/cpuinfo") if ln.startswith("model name")][:1]
    results: dict = {"cpu": cpu[0].split(":", 1)[1].strip() if cpu else "?", "runs": []}
    print(f"CPU: {results['cpu']}")
    jobs = [("v2", int(n)) for n in args.sizes.split(",") if n]
    jobs += [("v1", int(n)) for n in args.old_sizes.split(",") if n]
    for fmt, n in jobs:
        env = {**os.environ, "PYTHONPATH": str(base if fmt == "v1" else ROOT)}
        out = subprocess.run(
            [sys.executable, __file__, "--one", fmt, str(n)],
            env=env, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        row = json.loads(out.split("RESULT ", 1)[1])
        results["runs"].append({"format": fmt, "rows": n, **row})
        print(
            f"{fmt} {n:>11,} rows ({row['gib']:.2f} GiB): add 1,000 {row['add_1000_s']:.2f} s | "
            f"label column {row['relabel_all_s']:.1f} s | open+plan {row['open_plan_s']:.1f} s, "
            f"{row['open_plan_peak_rss_mib']:.0f} MiB | read {row['read_mb_s']:.0f} MB/s "
            f"(dd: {row['dd']}) | build {row['build_s']:.0f} s",
            flush=True,
        )
    for _ in range(2 if args.extract else 0):  # alternate, twice: the disk cache warms for both
        for fmt, tree in (("v1", base), ("v2", ROOT)):
            secs, done = extract_time(fmt, tree, args.extract)
            results.setdefault("extract", []).append({"format": fmt, "images": done, "s": secs})
            print(
                f"extract {done} cub100 images into an empty {fmt} store: {secs:.1f} s", flush=True
            )
    (ROOT / "bench-out" / "store.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
