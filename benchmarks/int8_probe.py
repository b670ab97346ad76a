"""Does int8 keep accuracy? The gate of `--precision int8` (issue 15): a linear probe on the
stored split must stay within 0.5 points of fp32, on cub100 and on ndsb_plankton.

    .venv/bin/python benchmarks/int8_probe.py

Embeds every image of each data set into a store of its own (bench-out/int8), once in fp32
(`--engine auto`) and once as an int8 entry (OpenVINO NNCF, calibrated on 256 of the images),
then fits the same flat logistic regression (`penult train` defaults) on both entries and
scores both on the store's test split. Also prints the int8 embeddings' cosine to fp32 (median,
lowest) and both extraction rates, measured in this one run.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks_common import cpu_flags, remove_store  # noqa: E402

from classify import TrainOptions, train  # noqa: E402
from extract import ExtractOptions, extract, list_images  # noqa: E402
from features import FeatureStore  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench-out" / "int8"
SETS = {"cub100": "crop", "ndsb_plankton": "pad"}  # data set -> resize (what --resize auto picks)
GATE = 0.005


def main() -> None:
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"flags: {cpu_flags()}", flush=True)  # fmt: skip
    print("| data set | fp32 top-1 | int8 top-1 | difference | gate (0.5 pts) | cosine to fp32, "
          "median / lowest | fp32 extraction | int8 extraction |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    OUT.mkdir(parents=True, exist_ok=True)
    for name, resize in SETS.items():
        store = OUT / f"{name}.h5"
        remove_store(store)
        listing = list_images(str(DATA / name))
        f32 = extract(store, listing, ExtractOptions(resize=resize, progress=False))
        entry = f32.backbone
        s = extract(store, listing, ExtractOptions(resize=resize, precision="int8", progress=False))
        int8 = s.backbone
        fs = FeatureStore(store)
        a, b = fs.embeddings(entry), fs.embeddings(int8)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        top1 = {
            e: train(store, TrainOptions(backbones=(e,))).metrics["top1"] for e in (entry, int8)
        }
        d = top1[int8] - top1[entry]
        print(
            f"| {name} | {top1[entry]:.3f} | {top1[int8]:.3f} | {100 * d:+.2f} pts | "
            f"{'pass' if d >= -GATE else 'FAIL'} | {np.median(cos):.3f} / {cos.min():.3f} | "
            f"{f32.engine}, {f32.images_per_s:.0f} img/s | {s.extracted} images, "
            f"{s.images_per_s:.0f} img/s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
