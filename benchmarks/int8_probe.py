"""Does int8 keep accuracy? The gate of `--precision int8` (issue 15): a linear probe on the
stored split must stay within 0.5 points of fp32, on cub100 and on ndsb_plankton.

    .venv/bin/python benchmarks/resize_bench.py        # once: the fp32 entries in bench-out/resize
    .venv/bin/python benchmarks/int8_probe.py

Embeds every image of each store again as an int8 entry (ONNX Runtime static quantization,
calibrated on 256 of the store's images), then fits the same flat logistic regression
(`penult train` defaults) on the fp32 and the int8 entry and scores both on the test split.
Also prints the int8 embeddings' cosine to fp32 (median, lowest) and the extraction rates.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks_common import cpu_flags  # noqa: E402

from classify import TrainOptions, train  # noqa: E402
from extract import ExtractOptions, extract  # noqa: E402
from extract.sources import Listing  # noqa: E402
from features import FeatureStore  # noqa: E402

OUT = ROOT / "bench-out" / "resize"
# data set -> (store, fp32 entry, its resize mode)
SETS = {
    "cub100": ("cub100.h5", "efficientnet_lite0", "crop"),
    "ndsb_plankton": ("ndsb_plankton.h5", "efficientnet_lite0@pad", "pad"),
}
GATE = 0.005


def main() -> None:
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"flags: {cpu_flags()}", flush=True)  # fmt: skip
    print("| data set | fp32 top-1 | int8 top-1 | difference | gate (0.5 pts) | cosine to fp32, "
          "median / lowest | int8 extraction |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, (file, entry, resize) in SETS.items():
        store = OUT / file
        t = FeatureStore(store).images()
        root = sorted(set(t.root))[0]
        paths = [p for p, r in zip(t.path, t.root, strict=True) if r == root]
        s = extract(
            store, Listing(root=Path(root), paths=paths),
            ExtractOptions(resize=resize, precision="int8", int8_trial=True, progress=False),
        )  # fmt: skip
        int8 = s.backbone
        fs = FeatureStore(store)
        a, b = fs.embeddings(entry), fs.embeddings(int8)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        top1 = {
            e: train(store, TrainOptions(backbones=(e,))).metrics["top1"] for e in (entry, int8)
        }
        d = top1[int8] - top1[entry]
        print(
            f"| {name} | {top1[entry]:.3f} | {top1[int8]:.3f} | {100 * d:+.1f} pts | "
            f"{'pass' if d >= -GATE else 'FAIL'} | {np.median(cos):.3f} / {cos.min():.3f} | "
            f"{s.extracted} images, {s.images_per_s:.0f} img/s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
