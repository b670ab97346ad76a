"""What calibrating a model's counts costs `penult train` (issue 31, part 2): train on a store
with and without ``--quantifier-folds`` (out-of-fold predictions over the training images, the
folds run in parallel), alternating, in one process.

    .venv/bin/python benchmarks/quantifier_cost.py            # ndsb_plankton, extracted if missing

Prints the CPU's flags, then seconds per run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from penult.classify import TrainOptions, train  # noqa: E402
from penult.extract import ExtractOptions, extract, list_images  # noqa: E402

DATA = Path(os.environ.get("PENULT_DATA", ROOT.parent / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA / "ndsb_plankton"))
    ap.add_argument("--store", default="bench-out/quantifier.h5")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    flags = open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0]
    print(
        "cpu flags:",
        " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags.split()),
    )
    store = Path(args.store)
    store.parent.mkdir(parents=True, exist_ok=True)
    if not store.exists():
        extract(store, list_images(args.data), ExtractOptions(progress=False))
    for _ in range(args.repeats):
        for folds in (0, 5):
            t = time.perf_counter()
            r = train(store, TrainOptions(quantifier_folds=folds))
            print(
                f"quantifier_folds={folds}: train {time.perf_counter() - t:.1f} s "
                f"(fit {r.fit_seconds:.1f} s), {r.n_train} training images, "
                f"{len(r.model.classes)} classes, top-1 {r.metrics['top1']:.3f}"
            )


if __name__ == "__main__":
    main()
