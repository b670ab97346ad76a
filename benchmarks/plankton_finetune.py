"""Fine-tuning on ndsb_plankton (issue 12 part 3): the plankton recipe, then heads on its embeddings.

    .venv/bin/python benchmarks/resize_bench.py --only plankton   # makes the store and its split
    .venv/bin/python benchmarks/plankton_finetune.py --epochs 18 --unfreeze 4

EfficientNet-Lite0, `--resize pad`, `--augment plankton`, class-balanced sampling, a
probe-initialised head; then the store is embedded with the result and heads are scored on the
stored test split: flat LR, LR with class-balanced weights, and the hierarchical head (name group
first). Prints each epoch's curve row and the test scores; results in bench-out/ft_plankton.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks_common import cpu_flags  # noqa: E402
from penult.classify import TrainOptions, train  # noqa: E402
from penult.extract.finetune import FinetuneOptions, extract_finetuned, finetune  # noqa: E402

STORE = ROOT / "bench-out" / "resize" / "ndsb_plankton.h5"
HEADS = {
    "flat LR": TrainOptions(levels=("name_group",)),
    "flat LR, balanced weights": TrainOptions(levels=("name_group",), class_weight="balanced"),
    "hierarchical LR (name group first)": TrainOptions(levels=("name_group",), hierarchical=True),
}


def scores(entry: str) -> dict:
    """Each head's test scores on one entry of the store's stored split."""
    out = {}
    for label, opts in HEADS.items():
        r = train(STORE, replace(opts, backbones=(entry,)))
        m = r.metrics
        out[label] = {"top1": m["top1"], "balanced": m["balanced_accuracy"],
                      "rare_top1": (m.get("rare") or {}).get("top1"),
                      "fit_seconds": r.fit_seconds}  # fmt: skip
        print(f"{entry} {label}: {json.dumps(out[label])}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=18)
    ap.add_argument("--unfreeze", type=int, default=4)
    ap.add_argument("--lr-backbone", type=float, default=2e-4)
    ap.add_argument("--frozen", default="efficientnet_lite0@pad", help="entry to compare with")
    a = ap.parse_args()
    print(platform.processor() or platform.machine(), cpu_flags(), flush=True)
    out = ROOT / "bench-out" / f"ft_plankton_{a.epochs}e_u{a.unfreeze}.safetensors"
    opts = FinetuneOptions(epochs=a.epochs, unfreeze=a.unfreeze, lr_backbone=a.lr_backbone,
                           resize="pad", augment_style="plankton", progress=False)  # fmt: skip
    t = time.perf_counter()
    r = finetune(STORE, out, opts, on_epoch=lambda row: print(json.dumps(row), flush=True))
    train_s = time.perf_counter() - t
    print(f"fine-tuning {train_s:.0f} s, best epoch {r.card.get('best_epoch')}", flush=True)
    t = time.perf_counter()
    name = extract_finetuned(STORE, out, progress=False)
    embed_s = time.perf_counter() - t
    result = {"recipe": vars(a), "train_seconds": train_s, "embed_seconds": embed_s,
              "entry": name, "curve": r.curve,
              "fine_tuned": scores(name), "frozen": scores(a.frozen)}  # fmt: skip
    (ROOT / "bench-out" / "ft_plankton.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
