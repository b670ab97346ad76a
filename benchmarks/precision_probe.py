"""Do the faster precisions keep accuracy? The gate of `--precision int8` and of bf16 on the
runtimes (issue 15): a linear probe on the stored split must stay within 0.5 points of fp32,
on cub100 and on ndsb_plankton.

    .venv/bin/python benchmarks/precision_probe.py [--try int8/openvino bf16/openvino bf16/torch]

Embeds every image of each data set into a store of its own (bench-out/precision): once in fp32
(`--engine auto --precision fp32`, the reference), then once per tried PRECISION/ENGINE as an
entry of its own name in the same store (so every entry shares the store's split). int8 is
OpenVINO NNCF, calibrated on 256 of the images; bf16 needs a CPU with native bf16. Then fits the
same flat logistic regression (`penult train` defaults) on every entry and scores it on the
store's test split. Also prints each entry's cosine to fp32 (median, lowest, how many images
under 0.999) and the extraction rates, all measured in this one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks_common import cpu_flags, remove_store  # noqa: E402
from penult.classify import TrainOptions, train  # noqa: E402
from penult.extract import ExtractOptions, extract, list_images  # noqa: E402
from penult.features import FeatureStore  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench-out" / "precision"
SETS = {"cub100": "crop", "ndsb_plankton": "pad"}  # data set -> resize (what --resize auto picks)
GATE = 0.005


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--try", dest="tries", nargs="+", default=["int8/openvino"],
                    metavar="PRECISION/ENGINE")  # fmt: skip
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    args = ap.parse_args()
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"flags: {cpu_flags()}", flush=True)  # fmt: skip
    print("| data set | tried | fp32 top-1 | its top-1 | difference | gate (0.5 pts) | cosine to "
          "fp32, median / lowest | images under 0.999 | fp32 extraction | its extraction |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.sets:
        resize = SETS[name]
        store = OUT / f"{name}.h5"
        remove_store(store)
        listing = list_images(str(DATA / name))
        ref = extract(
            store, listing, ExtractOptions(resize=resize, precision="fp32", progress=False)
        )
        entries = {}
        for t in args.tries:
            precision, engine = t.split("/")
            tag = f"{ref.backbone}@{precision}-{engine}"
            opts = ExtractOptions(resize=resize, precision=precision, engine=engine, name=tag,
                                  progress=False)  # fmt: skip
            entries[t] = extract(store, listing, opts)
        fs = FeatureStore(store)
        a = fs.embeddings(ref.backbone)
        top1 = {e: train(store, TrainOptions(backbones=(e,))).metrics["top1"]
                for e in [ref.backbone, *(s.backbone for s in entries.values())]}  # fmt: skip
        for s in entries.values():
            b = fs.embeddings(s.backbone)
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            d = top1[s.backbone] - top1[ref.backbone]
            print(
                f"| {name} | {s.precision}/{s.engine} | {top1[ref.backbone]:.4f} | "
                f"{top1[s.backbone]:.4f} | {100 * d:+.2f} pts | "
                f"{'pass' if d >= -GATE else 'FAIL'} | {np.median(cos):.4f} / {cos.min():.4f} | "
                f"{int((cos < 0.999).sum())} of {len(cos)} | {ref.engine}, "
                f"{ref.images_per_s:.0f} img/s | {s.images_per_s:.0f} img/s |",
                flush=True,
            )


if __name__ == "__main__":
    main()
