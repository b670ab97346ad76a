"""`penult demo`: the whole pipeline on an embedded default data set (or any folder with --data).

The default is the PyPI package elpv-dataset: 2,624 real 300x300 greyscale electroluminescence
images of solar cells, labelled with a defect probability (0, 1/3, 2/3, 1) and the module type
(mono/poly). It installs with penult, so the demo needs no download.
"""

from __future__ import annotations

import csv
from fractions import Fraction
from pathlib import Path

import numpy as np
from penult.extract import DEFAULT_BACKBONE, ExtractOptions, Listing, extract, list_images
from penult.features import describe


def elpv_listing() -> Listing:
    """The elpv images with labels: ``label`` = defect probability, ``module_type`` = mono/poly."""
    import elpv_dataset

    root = Path(elpv_dataset.__file__).parent / "data"
    paths, defect, mtype = [], [], []
    for line in (root / "labels.csv").read_text().splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        paths.append(parts[0])
        defect.append(str(Fraction(parts[1]).limit_denominator(3)))
        mtype.append(parts[2])
    # the hierarchy's leaves must be unique, so "defect level within a module type" is its own column
    both = [f"{m} {d}" for m, d in zip(mtype, defect, strict=True)]
    return Listing(
        root=root,
        paths=paths,
        labels={"label": defect, "module_type": mtype, "type_defect": both},
    )


def _train_and_report(store: Path, out_dir: Path, *, elpv: bool) -> list[str]:
    """Flat and hierarchical heads on the held-out split, a report, and their headline numbers."""
    from penult.classify import TrainOptions, evaluate, save_model, train
    from penult.classify.report import headline_rows

    lines = ["", "== train a flat head (logistic regression) on the stored features"]
    flat = train(store, TrainOptions())
    lines += [*flat.notes, f"  {flat.n_train} training images, fit {flat.fit_seconds:.1f} s; "
              f"{flat.eval_split} split ({flat.n_eval} images):"]  # fmt: skip
    lines += [f"  {k:32s} {v}" for k, v in headline_rows(flat.metrics)]
    model = save_model(flat.model, out_dir / "flat.skops")
    report = evaluate(flat.model, store, report_dir=out_dir / "report").report_dir
    lines.append(
        f"  model {model} (+ .json manifest); report {report}/report.md (.html, PNGs, JSON)"
    )
    hier_opts = (
        TrainOptions(label="type_defect", levels=("module_type",), hierarchical=True)
        if elpv
        else TrainOptions(levels=("auto",), hierarchical=True)
    )
    lines += [
        "",
        f"== train a hierarchical head ({' -> '.join(hier_opts.levels)} first, then per group)",
    ]
    try:
        hier = train(store, hier_opts)
    except ValueError as e:
        return [*lines, f"  skipped: {e}"], model
    acc = hier.metrics["levels"]["accuracy"]
    lines += [f"  accuracy at level {k}: {100 * v:.1f}%" for k, v in acc.items()]
    if elpv:  # the leaf is "<type> <defect>": its defect part compared with the flat head
        pred = np.array([s.split(" ", 1)[1] for s in hier.metrics["predictions"].label])
        truth = _eval_truth(store, hier)
        lines.append(
            f"  defect level from the hierarchical path: {100 * np.mean(pred == truth):.1f}% "
            f"(flat head: {100 * flat.metrics['top1']:.1f}%)"
        )
    save_model(hier.model, out_dir / "hierarchical.skops")
    return lines, model


def _eval_truth(store: Path, r) -> np.ndarray:
    from penult.classify import load_dataset

    d = load_dataset(store, r.model.backbones)
    return d.labels["label"][d.labels["split"] == r.eval_split]


def _score_a_few(model: Path, listing: Listing, out_dir: Path, n: int = 5) -> list[str]:
    from penult.classify import PredictOptions, load_model, predict_images

    files = out_dir / "to_score.txt"
    picks = listing.paths[:: max(1, len(listing) // n)][:n]
    files.write_text("\n".join(str(Path(listing.root) / p) for p in picks) + "\n")
    csv_out = out_dir / "predictions.csv"
    from penult.extract import Featuriser

    s = predict_images(
        load_model(model), [str(files)], csv_out, PredictOptions(progress=False, top_k=2),
        Featuriser(),
    )  # fmt: skip
    lines = [
        "",
        f"== score {len(picks)} images with the saved flat model (penult predict)",
        s.report(),
    ]
    with open(csv_out) as f:
        rows = list(csv.DictReader(f))
    truth = dict(zip(listing.paths, listing.labels.get("label", [""] * len(listing)), strict=True))
    for p, r in zip(picks, rows, strict=True):
        lines.append(
            f"  {Path(p).name:20s} -> {r['prediction']:5s} p={float(r['probability'] or 0):.2f}"
            f"  (runner-up {r['top2']} p={float(r['prob2'] or 0):.2f}; labelled {truth.get(p, '?')})"
        )
    return lines


def _neighbours(store: Path, listing: Listing, out_dir: Path, name: str, n: int = 3) -> list[str]:
    """Index the store (or add new rows to its index) and show the neighbours of a few images."""
    from penult.classify.lookup import contact_sheet, neighbors
    from penult.classify.neighbors import ensure_index

    ni = ensure_index(store, name)
    keys = listing.paths[len(listing) // (2 * n) :: max(1, len(listing) // n)][:n]
    results = neighbors(store, name, keys, k=4, index=ni)
    lines = [
        "",
        f"== nearest neighbours ({ni.meta['kind']} cosine index over {len(ni.rows):,} images)",
    ]
    for r in results:
        lines.append(f"  {r.query} [{r.label}]")
        lines += [f"      {h.score:.3f}  {h.path} [{h.label}]" for h in r.hits]
    sheet = contact_sheet(
        results, out_dir / "neighbors.html", title="penult demo: nearest neighbours"
    )
    lines.append(f"  contact sheet: {sheet}")
    return lines


def run_demo(
    *,
    data: str | None = None,
    out: str = "demo-out",
    backbone: str = DEFAULT_BACKBONE,
    progress: bool = True,
) -> str:
    """Extract, train flat and hierarchical heads, evaluate, report, score; return what happened."""
    listing = list_images(data) if data else elpv_listing()
    name = Path(data).resolve().name if data else "elpv"
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = out_dir / f"{name}.h5"
    header = [
        f"penult demo: {len(listing)} images from {listing.root}",
        f"  labels: {', '.join(listing.labels) or 'none'}; backbone {backbone}; store {store}",
        *(f"  {n}" for n in listing.notes),
        "",
        "== extract (frozen backbone, penultimate layer; re-running skips stored images)",
    ]
    summary = extract(store, listing, ExtractOptions(backbone=backbone, progress=progress))
    lines = [*header, summary.report(), "", "== store", describe(store, max_classes=10)]
    if "label" not in listing.labels:
        return "\n".join(
            [*lines, "", "no labels: nothing to train (use a folder of class folders)"]
        )
    trained, model = _train_and_report(store, out_dir, elpv=data is None)
    lines += trained
    lines += _score_a_few(model, listing, out_dir)
    lines += _neighbours(store, listing, out_dir, summary.backbone)
    return "\n".join(lines)
