"""Resize mode x flips x backbone x head, one table per data set (issue 12's summary tables).

    .venv/bin/python benchmarks/resize_bench.py && .venv/bin/python benchmarks/frozen_bench.py
    .venv/bin/python benchmarks/heads_table.py [--only cub|plankton|hymenoptera]

Reads the entries those benchmarks stored in bench-out/resize/ (hymenoptera's three are extracted
here when missing) and fits every head on each: flat LR, LR with class-balanced weights, linear
SVM, MLP, and the hierarchical LR (coarse level first) where the data set has coarse labels.
cub100 and ndsb_plankton are scored on their stored split; hymenoptera (397 photos) by 10-fold
CV, mean +- sd. Fine-tuned entries (``@ft-...``) in the plankton store are included.
Results: bench-out/heads_table.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks_common import cpu_flags  # noqa: E402
from penult.classify import TrainOptions, train  # noqa: E402
from penult.extract import ExtractOptions, extract, list_images  # noqa: E402
from penult.features import FeatureStore  # noqa: E402

DATA = Path(os.environ.get("PENULT_DATA", ROOT.parent / "shared" / "data"))
OUT = ROOT / "bench-out" / "resize"
LITE01 = ("efficientnet_lite0@whole@flip", "efficientnet_lite1@whole@flip")
# data set -> (store name, coarse levels, rows as (row label, entries fused), CV folds or None)
SETS = {
    "cub": ("cub100", ("family", "genus"), [
        ("Lite0 crop", ("efficientnet_lite0",)),
        ("Lite0 whole", ("efficientnet_lite0@whole",)),
        ("Lite0 whole + flips", ("efficientnet_lite0@whole@flip",)),
        ("Lite1 whole + flips", ("efficientnet_lite1@whole@flip",)),
        ("Lite2 whole + flips", ("efficientnet_lite2@whole@flip",)),
        ("Lite0 + Lite1 whole + flips", LITE01),
    ], None),
    "plankton": ("ndsb_plankton", ("name_group",), [
        ("Lite0 crop", ("efficientnet_lite0",)),
        ("Lite0 whole", ("efficientnet_lite0@whole",)),
        ("Lite0 pad", ("efficientnet_lite0@pad",)),
        ("Lite0 pad + flips", ("efficientnet_lite0@pad@flip",)),
    ], None),
    "hymenoptera": ("hymenoptera", (), [
        ("Lite0 crop", ("efficientnet_lite0",)),
        ("Lite0 whole", ("efficientnet_lite0@whole",)),
        ("Lite0 pad", ("efficientnet_lite0@pad",)),
    ], 10),
}  # fmt: skip


def heads(levels: tuple[str, ...]) -> dict[str, TrainOptions]:
    out = {
        "LR": TrainOptions(levels=levels),
        "LR balanced": TrainOptions(levels=levels, class_weight="balanced"),
        "SVM": TrainOptions(head="svm", levels=levels),
        "MLP": TrainOptions(head="mlp", levels=levels),
    }
    if levels:
        out["hierarchical LR"] = TrainOptions(levels=levels, hierarchical=True)
    return out


def ensure_hymenoptera(store: Path) -> None:
    for mode in ("crop", "whole", "pad"):
        opts = ExtractOptions(resize=mode, progress=False)
        extract(store, list_images(str(DATA / "hymenoptera")), opts)  # skips what is stored


def fine_tuned(store: Path) -> list[tuple[str, tuple[str, ...]]]:
    names = sorted(n for n in FeatureStore(store).backbones() if "@ft-" in n)
    return [(f"Lite0 fine-tuned ({n.split('@ft-')[1]})", (n,)) for n in names]


def bench(key: str) -> list[dict]:
    name, levels, rows, folds = SETS[key]
    store = OUT / f"{name}.h5"
    if key == "hymenoptera":
        ensure_hymenoptera(store)
    if key == "plankton":
        rows = rows + fine_tuned(store)
    out = []
    for label, entries in rows:
        for head, opts in heads(levels).items():
            t = time.perf_counter()
            r = train(store, replace(opts, backbones=entries, cv=folds))
            m = r.cv["mean"] if folds else r.metrics
            row = {"row": label, "head": head, "top1": m["top1"],
                   "balanced": m["balanced_accuracy"], "seconds": time.perf_counter() - t,
                   "sd": r.cv["std"]["top1"] if folds else None,
                   "rare_top1": None if folds else (r.metrics.get("rare") or {}).get("top1")}  # fmt: skip
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def table(rows: list[dict]) -> str:
    """One line per backbone row, one column per head: top-1 (balanced accuracy, or +- sd)."""
    order = list(dict.fromkeys(r["head"] for r in rows))
    lines = ["| features | " + " | ".join(order) + " |", "|---|" + "---|" * len(order)]
    for label in dict.fromkeys(r["row"] for r in rows):
        cells = []
        for h in order:
            r = next(x for x in rows if x["row"] == label and x["head"] == h)
            extra = f"+- {r['sd']:.3f}" if r["sd"] is not None else f"({r['balanced']:.3f})"
            cells.append(f"{r['top1']:.3f} {extra}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", choices=list(SETS), action="append")
    args = ap.parse_args()
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"flags: {cpu_flags()}", flush=True)  # fmt: skip
    path = ROOT / "bench-out" / "heads_table.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for key in args.only or list(SETS):
        results[key] = bench(key)
        path.write_text(json.dumps(results, indent=1))
    for key, rows in results.items():
        print(f"\n{SETS[key][0]}\n{table(rows)}")


if __name__ == "__main__":
    main()
