"""Memory per stored row of each command that reads a store (issue 35, part 1): peak RSS above
the interpreter's, divided by the store's rows, and the command's time.

    .venv/bin/python benchmarks/command_memory.py                       # 200k and 1M rows
    .venv/bin/python benchmarks/command_memory.py --sizes 1000000,10000000

Each size gets one synthetic store (64-d float16 embeddings, paths like an imager's, a 100-class
`label` and a 90/10 `split` column, and 20 real cub100 photos among the rows so that
`predict --store` finds them by content). Each command then runs in a fresh process: the
modules it needs are imported first, the resident memory is read (the interpreter's), the
command runs, and the peak (VmHWM) above that is what the command cost. The per-row figure at
the larger size is the one that matters; the slope between sizes removes what does not grow.

Commands: open + plan a resume over every path (what `extract` does before embedding),
`train --out-of-core` (2 passes, --memory-mb 64), `index --kind ivf-disk`, `serve` start and
one browse page, `predict --store` of the 20 photos, and `check` (every row verified).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
from benchmarks_common import cpu_flags

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench-out" / "command-memory"
DATA = ROOT.parent / "shared" / "data"
DIM = 64
PHOTOS = 20
FP = {"architecture": "bench:synthetic", "weights_sha256": "0" * 64, "preprocessing": {},
      "layer": "x", "dim": DIM, "precision": "fp32"}  # fmt: skip


def _rows(start: int, n: int) -> tuple[list[str], list[str]]:
    """Paths like an imager's, and real SHA-256 digests (of the path): synthetic ones with
    leading zeros would all share their first 8 bytes, which no real files do."""
    import hashlib

    paths = [f"2026/{i // 100_000:03d}/IFCB_{i:09d}.png" for i in range(start, start + n)]
    return paths, [hashlib.sha256(p.encode()).hexdigest() for p in paths]


def build(path: Path, n: int) -> Path:
    """The store, and the folder of the photos it holds (by content) among its rows."""
    import hashlib

    from penult.features import StoreWriter

    photos = OUT / "photos"
    if not photos.is_dir():
        photos.mkdir(parents=True)
        for f in sorted((DATA / "cub100").rglob("*.jpg"))[:PHOTOS]:
            shutil.copyfile(f, photos / f.name)
    files = sorted(photos.iterdir())
    real = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    rng = np.random.default_rng(0)
    with StoreWriter(path) as w:
        w.register_backbone("net", FP, dtype="float16")
        for s in range(0, n, 200_000):
            k = min(200_000, n - s)
            paths, sha = _rows(s, k)
            if s == 0:  # the photos, by their own content
                paths[:PHOTOS] = [f"photos/{f.name}" for f in files]
                sha[:PHOTOS] = real
            labels = {
                "label": [f"class{i % 100}" for i in range(s, s + k)],
                "split": ["test" if i % 10 == 0 else "train" for i in range(s, s + k)],
            }
            w.upsert_images(paths, ["/data"] * k, sha, np.full(k, 4096), np.arange(k), labels)
            centre = (np.arange(s, s + k) % 100)[:, None] * 0.05
            x = rng.standard_normal((k, DIM), dtype=np.float32) + centre.astype(np.float32)
            w.append("net", paths, sha, x)
            if (s + k) % 1_000_000 == 0:
                w.commit()
    return photos


RUN = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {bench!r})
    status = lambda key: int(open("/proc/self/status").read().split(key + ":")[1].split()[0])
    {imports}
    base = status("VmRSS")
    t = time.perf_counter()
    {body}
    print("RESULT", time.perf_counter() - t, (status("VmHWM") - base) * 1024)
""")

CLI = "import numpy, h5py, torch, sklearn.linear_model, faiss, penult.cli as cli, penult.classify"
PLAN_IMPORTS = "from penult.features import FeatureStore; from penult.extract import run"
PLAN = """
from command_memory import _rows
paths, sha = _rows(0, {n})
err = [""] * len(paths)  # what hashing found: the listing's too
base = status("VmRSS")  # the listing is not the store's cost
fs = FeatureStore({store!r})
row, stored = fs.find(paths), fs.table_view()
p = run.plan(sha, err, row, stored, fs.valid("net"), retry_failed=False)
"""
SERVE_IMPORTS = (
    "from penult.classify.web import Site, make_app; from starlette.testclient import TestClient"
)
SERVE = """
site = Site({store!r}, "net")
site.warm()
c = TestClient(make_app(site), base_url="http://127.0.0.1")
r = c.get("/")
assert r.status_code == 200, r.text[:500]
"""


def commands(store: Path, photos: Path, n: int) -> dict[str, tuple[str, str]]:
    out = OUT / "run"
    s = str(store)

    def cli(*args: str) -> tuple[str, str]:
        return CLI, f"assert cli.main({list(args)!r}) == 0"

    return {
        "open + plan": (PLAN_IMPORTS, PLAN.format(n=n, store=s)),
        # two passes: the memory does not depend on them, the time does (20 by default)
        "train --out-of-core": cli(
            "train",
            s,
            "--out",
            f"{out}/m.skops",
            "--out-of-core",
            "--no-refit",
            "--memory-mb",
            "64",
            "--epochs",
            "2",
        ),  # fmt: skip
        "index (ivf-disk)": cli("index", s, "--kind", "ivf-disk"),
        "serve start + page": (SERVE_IMPORTS, SERVE.format(store=s)),
        "predict --store": cli(
            "predict", f"{out}/m.skops", str(photos), "--out", f"{out}/p.csv", "--store", s, "-q"
        ),  # fmt: skip
        "check": cli("check", s),
    }


def run_one(imports: str, body: str) -> tuple[float, int]:
    code = RUN.format(bench=str(ROOT / "benchmarks"), imports=imports, body=body.strip())
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")), None)
    if r.returncode or line is None:
        raise RuntimeError(f"failed:\n{code}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    _, secs, peak = line.split()
    return float(secs), int(peak)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="200000,1000000")
    ap.add_argument("--only", help="comma-separated command names to run")
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "run").mkdir(exist_ok=True)
    print("cpu:", cpu_flags())
    table: dict[str, dict[int, tuple[float, int]]] = {}
    sizes = [int(x) for x in a.sizes.split(",")]
    for n in sizes:
        store = OUT / f"s{n}.h5"
        for old in OUT.glob(f"s{n}.h5*"):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        t = time.perf_counter()
        photos = build(store, n)
        print(f"{n:,} rows built in {time.perf_counter() - t:.0f} s", flush=True)
        for name, (imports, body) in commands(store, photos, n).items():
            if a.only and name not in a.only.split(","):
                continue
            secs, peak = run_one(imports, body)
            table.setdefault(name, {})[n] = (secs, peak)
            print(f"  {name:22s} {secs:8.1f} s  peak {peak / 2**20:8.1f} MiB  "
                  f"{peak / n:7.1f} B/row", flush=True)  # fmt: skip
        for old in OUT.glob(f"s{n}.h5*"):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        print(f"\nslope {lo:,} -> {hi:,} rows (B per added row):")
        for name, by in table.items():
            if lo in by and hi in by:
                print(f"  {name:22s} {(by[hi][1] - by[lo][1]) / (hi - lo):7.1f}")
    (OUT / "result.json").write_text(
        json.dumps({k: {str(n): v for n, v in by.items()} for k, by in table.items()}, indent=1)
    )


if __name__ == "__main__":
    main()
