"""Classification-stage benchmark: heads on cub100 and ndsb_plankton features, and batch scoring.

    .venv/bin/python benchmarks/classify_bench.py                 # everything (about 20 minutes here)
    .venv/bin/python benchmarks/classify_bench.py --only cub      # one part: cub, plankton, predict

Stores are extracted into bench-out/ when missing (their extraction time is kept in a sidecar
``<store>.extract.json`` for the train/extract ratio). Results go to bench-out/classify.json; the
tables printed are the ones in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from penult.classify import TrainOptions, train  # noqa: E402
from penult.classify.train import summary  # noqa: E402
from penult.extract import ExtractOptions, extract, list_images  # noqa: E402
from penult.features import FeatureStore  # noqa: E402

DATA = Path(os.environ.get("PENULT_DATA", ROOT.parent / "shared" / "data"))
OUT = ROOT / "bench-out"


def ensure_store(store: Path, data: Path, backbone: str, crop_pct: float | None = None) -> float:
    """Extract ``backbone`` into ``store`` if missing; returns the extraction seconds (measured once)."""
    entry = backbone + (f"@crop{round(100 * crop_pct)}" if crop_pct else "")
    side = Path(f"{store}.{entry}.extract.json")
    if store.exists() and entry in FeatureStore(store).backbones() and side.exists():
        return json.loads(side.read_text())["seconds"]
    opts = ExtractOptions(backbone=backbone, optimize="inductor", crop_pct=crop_pct)
    s = extract(store, list_images(data), opts)
    print(s.report())
    side.write_text(json.dumps({"seconds": s.seconds, "images": s.extracted, "report": s.report()}))
    return s.seconds


def run(store: Path, name: str, opts: TrainOptions, extract_s: float | None = None) -> dict:
    t = time.perf_counter()
    r = train(store, opts)
    row = {
        "name": name,
        "fit_seconds": r.fit_seconds,
        "train_call_seconds": time.perf_counter() - t,
        **summary(r.metrics),
    }
    row["per_class_recall"] = {c: v["recall"] for c, v in r.metrics["per_class"].items()}
    if extract_s:
        row["fit_over_extract"] = r.fit_seconds / extract_s
    print(f"  {name:42s} top1 {row['top1']:.3f}  fit {r.fit_seconds:5.1f} s", flush=True)
    return row


def cub(results: dict) -> None:
    store = OUT / "cub100.h5"
    data = DATA / "cub100"
    ext0 = ensure_store(store, data, "efficientnet_lite0")
    ext2 = ensure_store(store, data, "efficientnet_lite2")
    ext_full = ensure_store(store, data, "efficientnet_lite0", crop_pct=1.0)
    base = TrainOptions(backbones=("efficientnet_lite0",), levels=("family", "genus"))
    rows = [
        run(store, f"flat {h}", replace(base, head=h), ext0)
        for h in ("lr", "svm", "mlp", "knn", "centroid")
    ]
    rows.append(run(store, "flat lr, C by 3-fold CV", replace(base, search=True), ext0))
    rows.append(
        run(
            store,
            "hierarchical lr: genus > species",
            replace(base, levels=("genus",), hierarchical=True),
            ext0,
        )
    )
    rows.append(
        run(
            store,
            "hierarchical lr: family > genus > species",
            replace(base, hierarchical=True),
            ext0,
        )
    )
    rows.append(run(store, "one-vs-rest lr, F1 thresholds", replace(base, ovr=True), ext0))
    rows.append(
        run(store, "flat lr, Lite2 alone", replace(base, backbones=("efficientnet_lite2",)), ext2)
    )
    fused = ("efficientnet_lite0", "efficientnet_lite2")
    rows.append(
        run(store, "flat lr, fusion Lite0 + Lite2", replace(base, backbones=fused), ext0 + ext2)
    )
    full = replace(base, backbones=("efficientnet_lite0@crop100",))
    rows.append(run(store, "flat lr, Lite0 whole image (--crop-pct 1.0)", full, ext_full))
    rows.append(run(store, "flat svm, Lite0 whole image", replace(full, head="svm"), ext_full))
    # rarest species: the 10 with the fewest images in cub100 (training counts are 29-30 for all)
    table = FeatureStore(store).images()
    names, counts = np.unique(table.labels["label"], return_counts=True)
    rarest = names[np.argsort(counts, kind="stable")[:10]].tolist()
    for r in rows:
        r["rarest10_recall"] = float(np.mean([r["per_class_recall"][c] for c in rarest]))
    results["cub100"] = {
        "extract_seconds": {
            "efficientnet_lite0": ext0,
            "efficientnet_lite2": ext2,
            "efficientnet_lite0@crop100": ext_full,
        },
        "rarest10": rarest,
        "rows": rows,
    }
    print(table_md(rows, ["family", "genus"], rare_key="rarest10_recall"))


def plankton(results: dict) -> None:
    store = OUT / "plankton.h5"
    ext = ensure_store(store, DATA / "ndsb_plankton", "efficientnet_lite0")
    base = TrainOptions(backbones=("efficientnet_lite0",), levels=("name_group",))
    rows = [
        run(store, f"flat {h}", replace(base, head=h), ext)
        for h in ("lr", "svm", "mlp", "knn", "centroid")
    ]
    rows.append(
        run(store, "flat lr, balanced class weights", replace(base, class_weight="balanced"), ext)
    )
    rows.append(
        run(store, "hierarchical lr: name_group > class", replace(base, hierarchical=True), ext)
    )
    rows.append(run(store, "one-vs-rest lr, F1 thresholds", replace(base, ovr=True), ext))
    results["plankton"] = {"extract_seconds": ext, "rows": rows}
    print(table_md(rows, ["name_group"], rare_key="rare_top1"))


def predict(results: dict, n: int = 10_000) -> None:
    """`penult predict` on a folder of n images (cub100 then plankton, as symlinks): rate and peak RSS."""
    folder = OUT / "predict10k"
    if not folder.exists():
        files = sorted((DATA / "cub100").rglob("*.jpg")) + sorted(
            (DATA / "ndsb_plankton").rglob("*.jpg")
        )
        for i, f in enumerate(files[:n]):
            d = folder / f.parent.name
            d.mkdir(parents=True, exist_ok=True)
            os.symlink(f, d / f"{i:05d}{f.suffix}")
    model = OUT / "cub_lr.skops"
    subprocess.run([sys.executable, "-m", "cli", "train", str(OUT / "cub100.h5"), "--backbone", "efficientnet_lite0", "--out", str(model)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)  # fmt: skip
    small = (
        OUT / "predict2k.txt"
    )  # every fifth image: same mix, a fifth of the count (memory check)
    small.write_text("\n".join(str(p) for p in sorted(folder.rglob("*.jpg"))[::5]) + "\n")
    out = {}
    runs = (
        ("extract", folder, []),
        ("store", folder, ["--store", str(OUT / "cub100.h5")]),
        ("extract-2k", small, []),
    )
    for label, src, extra in runs:
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "cli", "predict", str(model), str(src), "--out", str(OUT / f"pred-{label}.csv"), "-q", *extra]  # fmt: skip
        t = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t
        rss = next(int(ln.split()[-1]) for ln in p.stderr.splitlines() if "Maximum resident" in ln)
        with open(OUT / f"pred-{label}.csv") as f:
            rows = sum(1 for _ in csv.reader(f)) - 1
        out[label] = {
            "images": rows,
            "wall_seconds": wall,
            "images_per_s": rows / wall,
            "peak_rss_mib": rss / 1024,
            "report": p.stdout.strip(),
        }
        print(
            f"  predict ({label}): {rows} images, {wall:.1f} s, {rows / wall:.1f} img/s, peak RSS {rss / 1024:.0f} MiB"
        )
    results["predict"] = out


def table_md(rows: list[dict], levels: list[str], rare_key: str) -> str:
    head = [
        "head",
        "top-1",
        "top-5",
        "balanced",
        "macro-F1",
        "ECE",
        *levels,
        "rare",
        "fit s",
        "fit/extract",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lv = [f"{r.get('level_accuracy', {}).get(k, float('nan')):.3f}" for k in levels]
        rare = r.get(rare_key)
        cells = [r["name"], f"{r['top1']:.3f}", f"{r['top5']:.3f}", f"{r['balanced_accuracy']:.3f}", f"{r['macro_f1']:.3f}",
                 f"{r['ece']:.3f}", *lv, "n/a" if rare is None else f"{rare:.3f}", f"{r['fit_seconds']:.1f}",
                 f"{100 * r.get('fit_over_extract', float('nan')):.1f}%"]  # fmt: skip
        if "unknown_rate" in r:
            cells[0] += (
                f" (unknown {100 * r['unknown_rate']:.1f}%, {r['accuracy_when_known']:.3f} when known)"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", choices=["cub", "plankton", "predict"], action="append")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    path = OUT / "penult.classify.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for part, fn in (("cub", cub), ("plankton", plankton), ("predict", predict)):
        if not args.only or part in args.only:
            print(f"== {part}", flush=True)
            fn(results)
            path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
