"""Does `penult count` stay flat in memory as samples grow (issue 31, part 3)?

A synthetic store (no images: 32-d Gaussian clusters of 10 classes, a made-up backbone) holds
one big sample of ``--big`` images and ``--many`` samples of 10 images each; a logistic
regression trained on 5,000 labelled rows of it counts the store (`count_store`: every sample,
EMQ with 50 bootstrap resamples). Each size runs in a fresh process and reports its peak
resident memory, so growth with the images is seen directly.

    .venv/bin/python benchmarks/count_scale.py                   # 10,000 and 100,000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

FP = {
    "architecture": "bench:gauss",
    "weights_sha256": "cd" * 32,
    "preprocessing": {"crop": 1},
    "layer": "x",
    "dim": 32,
    "precision": "fp32",
}


def build(path: Path, big: int, many: int, seed: int = 0) -> None:
    from penult.features import StoreWriter

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, 32)) * 2
    labelled = 5000
    n = labelled + big + 10 * many
    y = rng.integers(0, 10, n)
    x = (centres[y] + rng.normal(size=(n, 32))).astype(np.float32)
    sample = ["" if i < labelled else "big" if i < labelled + big else f"s{(i - labelled - big) // 10:05d}"
              for i in range(n)]  # fmt: skip
    label = [f"c{y[i]}" if i < labelled else "" for i in range(n)]
    paths = [f"img/{i:07d}.png" for i in range(n)]
    sha = [f"{i + 1:064x}" for i in range(n)]
    with StoreWriter(path) as w:
        step = 50_000
        w.register_backbone("gauss", FP)
        for s in range(0, n, step):
            sl = slice(s, s + step)
            k = len(paths[sl])
            w.upsert_images(paths[sl], ["/r"] * k, sha[sl], np.zeros(k), np.zeros(k),
                            {"label": label[sl], "sample": sample[sl]})  # fmt: skip
            w.append("gauss", paths[sl], sha[sl], x[sl], width=np.ones(k), height=np.ones(k))


def one(big: int, many: int) -> dict:
    """Build, train and count in this process; peak memory of the count alone is measured as
    the growth of the peak over what training (and importing QuaPy, which loads torch) left."""
    from penult.classify import CountOptions, TrainOptions, count_store, train

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "s.h5"
        build(store, big, many)
        model = train(store, TrainOptions(unknown_score="none")).model
        import quapy.method.aggregative  # noqa: F401 - EMQ's library loads torch: a fixed cost

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t = time.perf_counter()
        s = count_store(model, store, Path(tmp) / "c.csv", CountOptions(bootstrap=50, plot=False),
                        progress=False)  # fmt: skip
        seconds = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"images": s.scored, "samples": s.samples, "seconds": round(seconds, 1),
            "peak_mb_before": round(before), "peak_mb_after": round(after)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000:1000,100000:10000", help="BIG:MANY,...")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        big, many = map(int, args.one.split(":"))
        print(json.dumps(one(big, many)))
        return
    from benchmarks_common import cpu_flags

    print(f"cpu flags: {cpu_flags()}  ({os.cpu_count()} cores)")
    for size in args.sizes.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", size], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        r = json.loads(out.strip().splitlines()[-1])
        big, many = size.split(":")
        print(
            f"one sample of {big} + {many} samples of 10: counted {r['images']} images in "
            f"{r['samples']} samples in {r['seconds']} s; peak memory {r['peak_mb_before']} MB "
            f"after training, {r['peak_mb_after']} MB after counting"
        )


if __name__ == "__main__":
    main()
