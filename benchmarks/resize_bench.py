"""Resize modes (crop, whole, pad) and flip test-time augmentation, measured on cub100 and
ndsb_plankton with EfficientNet-Lite0 (offline ImageNet weights) and a flat LR head.

    .venv/bin/python benchmarks/resize_bench.py                    # both data sets
    .venv/bin/python benchmarks/resize_bench.py --only plankton

Every mode is its own store entry (``efficientnet_lite0@pad``...) in one store per data set, so
they share one split. Flips are then measured on each data set's best mode, in the same store.
Extraction runs with ``--optimize inductor``; extraction seconds and rates are from this run, so
the flip cost is a ratio of two extractions on the same machine. Results: bench-out/resize.json.
"""

from __future__ import annotations

import argparse
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
OUT = ROOT / "bench-out" / "resize"
SETS = {"cub": ("cub100", ("family", "genus")), "plankton": ("ndsb_plankton", ("name_group",))}


def ensure(store: Path, data: Path, resize: str, tta: str) -> dict:
    """Extract one entry if missing; its extraction summary (kept beside the store)."""
    opts = ExtractOptions(resize=resize, tta=tta, optimize="inductor", progress=False)
    entry = (
        "efficientnet_lite0"
        + get_spec("efficientnet_lite0").preprocess(mode=resize, tta=tta).suffix()
    )
    side = Path(f"{store}.{entry}.extract.json")
    if store.exists() and entry in FeatureStore(store).backbones() and side.exists():
        return json.loads(side.read_text())
    s = extract(store, list_images(str(data)), opts)
    assert s.backbone == entry, s.backbone
    out = {"entry": entry, "seconds": s.seconds, "images": s.extracted,
           "img_per_s": s.images_per_s, "steady_img_per_s": s.steady_images_per_s}  # fmt: skip
    side.write_text(json.dumps(out))
    print(s.report(), flush=True)
    return out


def score(store: Path, entry: str, levels: tuple[str, ...]) -> dict:
    r = train(store, TrainOptions(backbones=(entry,), levels=levels))
    m = r.metrics
    row = {"top1": m["top1"], "balanced": m["balanced_accuracy"], "macro_f1": m["macro_f1"],
           "fit_seconds": r.fit_seconds,
           "rare_top1": (m.get("rare") or {}).get("top1"),
           **{lv: m["levels"]["accuracy"][lv] for lv in levels}}  # fmt: skip
    return row


def bench(key: str) -> list[dict]:
    name, levels = SETS[key]
    store = OUT / f"{name}.h5"
    rows = []
    for mode in ("crop", "whole", "pad"):
        ext = ensure(store, DATA / name, mode, "none")
        rows.append({"resize": mode, "tta": "none", **ext, **score(store, ext["entry"], levels)})
        print(f"{name} {mode:5s}: top1 {rows[-1]['top1']:.3f}", flush=True)
    best = max(rows, key=lambda r: r["top1"])["resize"]
    ext = ensure(store, DATA / name, best, "flip")
    rows.append({"resize": best, "tta": "flip", **ext, **score(store, ext["entry"], levels)})
    print(f"{name} {best}+flip: top1 {rows[-1]['top1']:.3f}", flush=True)
    return rows


def flip_cost(n: int = 640) -> dict:
    """End-to-end extraction of the same ``n`` cub100 images without and with flips, one after
    the other in this process (eager fp32: no compile in the timing), and the ratio."""
    import tempfile

    from penult.extract import Listing

    root = DATA / "cub100"
    paths = list_images(str(root)).paths[:n]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tta in ("none", "flip", "none", "flip"):  # twice each, interleaved: drift shows
            opts = ExtractOptions(tta=tta, optimize="eager", progress=False)
            s = extract(Path(tmp) / f"{tta}{len(out)}.h5", Listing(root=root, paths=paths), opts)
            out.setdefault(tta, []).append(s.steady_images_per_s)
            print(f"flip cost: tta={tta} {s.steady_images_per_s:.1f} img/s steady", flush=True)
    best = {k: max(v) for k, v in out.items()}
    return {"images": n, "img_per_s": out, "ratio": best["flip"] / best["none"]}


def table(rows: list[dict], levels: tuple[str, ...]) -> str:
    head = ["resize", "flips", "top-1", "balanced", "macro-F1", *levels, "rare top-1",
            "extract s", "img/s", "fit s"]  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rare = "" if r["rare_top1"] is None else f"{r['rare_top1']:.3f}"
        cells = [r["resize"], r["tta"], f"{r['top1']:.3f}", f"{r['balanced']:.3f}",
                 f"{r['macro_f1']:.3f}", *(f"{r[lv]:.3f}" for lv in levels), rare,
                 f"{r['seconds']:.0f}", f"{r['img_per_s']:.1f}", f"{r['fit_seconds']:.1f}"]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", choices=[*SETS, "cost"], action="append")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    print(
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, flags: {cpu_flags()}"
    )
    path = OUT.parent / "resize.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for key in args.only or [*SETS, "cost"]:
        results[key] = flip_cost() if key == "cost" else bench(key)
        path.write_text(json.dumps(results, indent=1))
    for key, rows in results.items():
        if key in SETS:
            print(f"\n{SETS[key][0]}\n{table(rows, SETS[key][1])}")
    if "cost" in results:
        print(f"\nflips cost: {results['cost']}")


if __name__ == "__main__":
    main()
