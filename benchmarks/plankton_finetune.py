"""Fine-tuning on ndsb_plankton (issue 12 part 3): a trial of the plankton recipe.

    .venv/bin/python benchmarks/resize_bench.py --only plankton   # makes the store and its split
    .venv/bin/python benchmarks/plankton_finetune.py [EPOCHS]

EfficientNet-Lite0, last 3 stages trained, `--resize pad`, `--augment plankton`, class-balanced
sampling, probe-initialised head; then the store is embedded with the result and a flat LR is
scored on the stored test split. Prints each epoch's curve row and the test scores.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classify import TrainOptions, train  # noqa: E402
from extract.finetune import FinetuneOptions, extract_finetuned, finetune  # noqa: E402

STORE = ROOT / "bench-out" / "resize" / "ndsb_plankton.h5"


def main() -> None:
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    out = ROOT / "bench-out" / f"ft_plankton_{epochs}.safetensors"
    opts = FinetuneOptions(epochs=epochs, unfreeze=3, lr_backbone=2e-4, resize="pad",
                           augment_style="plankton", progress=False)  # fmt: skip
    t = time.perf_counter()
    r = finetune(STORE, out, opts, on_epoch=lambda row: print(json.dumps(row), flush=True))
    print(f"fine-tuning {time.perf_counter() - t:.0f} s, best epoch {r.card.get('best_epoch')}")
    name = extract_finetuned(STORE, out, progress=False)
    m = train(STORE, TrainOptions(backbones=(name,), levels=("name_group",))).metrics
    rare = (m.get("rare") or {}).get("top1")
    print(f"{name}: test top-1 {m['top1']:.3f}, balanced {m['balanced_accuracy']:.3f}, rare {rare}")


if __name__ == "__main__":
    main()
