"""`penult evaluate` and `penult compare`: saved or freshly trained heads scored on a store's split."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from penult.classify.csvout import SafeWriter, open_csv
from penult.classify.data import DataError, eval_mask, load_dataset
from penult.classify.model import Model, Predictions, resolve_backbones
from penult.classify.predict import csv_header, csv_rows
from penult.classify.report import write_report
from penult.classify.train import TrainOptions, TrainResult, score, scored, summary, train
from penult.core import SAMPLE, coded_sample_columns, sample_columns
from penult.features import FeatureStore

__all__ = [
    "Evaluation",
    "compare",
    "compare_table",
    "evaluate",
    "out_of_fold",
    "refit_here",
    "write_evaluation",
    "write_predictions",
    "write_training_report",
]


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    split: str
    n: int
    report_dir: Path | None = None
    paths: list[str] | None = None  # the scored images (store keys), in the predictions' order
    truth: np.ndarray | None = None  # their true labels


def evaluate(
    model: Model,
    store_path: str | os.PathLike[str],
    *,
    split: str | None = None,
    report_dir: str | os.PathLike[str] | None = None,
    top_k: int = 5,
) -> Evaluation:
    """Score ``model`` on the held-out split of a store whose backbone fingerprints match."""
    _refuse_refit_store(model, store_path)
    store = FeatureStore(store_path)
    names = resolve_backbones(model, store)
    m, trained = model.manifest, model.manifest.trained_on
    if trained is None:
        raise DataError(
            f"{store_path}: the model does not say which split it was trained with (it was not "
            "made by `penult train`); score it with `penult predict` instead"
        )
    data = load_dataset(store_path, names, label=m.label)
    column = trained.split_column
    if column not in data.labels:
        raise DataError(
            f"{store_path}: no {column!r} column; train on this store first to make the split"
        )
    mask, name = eval_mask(data.labels[column], split or trained.eval_split)
    sub = data.subset(mask)
    truth = set(sub.column(m.label).tolist())
    known = truth & set(model.classes.tolist())
    if not known:
        raise DataError(
            f"{store_path}: none of the {len(truth)} labels in its {name} split (e.g. {sorted(truth)[0]!r}) "
            f"is a class of this model (e.g. {str(model.classes[0])!r}); is this the right store?"
        )
    scores = score(model, sub)
    if len(known) < len(truth):
        scores["notes"] = [
            f"{len(truth) - len(known)} labels of the {name} split are not classes of the model"
        ]
    out, y_true = None, sub.column(m.label)
    if report_dir is not None:
        title = f"{m.kind} {m.head} on {' + '.join(names)}: {name} split"
        info = [
            f"store {store_path}, split column {column!r}, {len(sub)} images",
            f"model trained on {trained.store} ({sum((m.train_counts or {}).values())} training "
            f"images, {len(model.classes)} classes)",
        ]
        carried = {c: list(sub.labels[c]) for c in sample_columns(sub.labels)}
        out = write_evaluation(
            report_dir, model, scores, sub.paths, y_true, title, info, top_k, carried,
            stored_files(store_path, sub.paths),
        )  # fmt: skip
    return Evaluation(scores, name, len(sub), out, list(sub.paths), y_true)


def write_evaluation(
    folder: str | os.PathLike[str],
    model: Model,
    metrics: dict[str, Any],
    paths: list[str],
    truth: np.ndarray,
    title: str,
    info: list[str],
    top_k: int = 5,
    carried: dict[str, list[str]] | None = None,
    files: list[str] | None = None,
) -> Path:
    """The one report of a scored model: report.md/.html, plots and metrics.json from
    ``metrics`` (with its ``predictions``), and predictions.csv (the images ``paths``, with
    their ``carried`` columns: samples and sample metadata)."""
    out = write_report(folder, title, metrics, info, truth, metrics["predictions"], paths, files)
    write_predictions(out, model, paths, metrics["predictions"], truth, top_k, carried)
    return out


def stored_samples(store_path: str | os.PathLike[str], paths: list[str]) -> dict[str, list[str]]:
    """The sample column and its metadata (``core.sample_columns``) of the stored ``paths``."""
    store = FeatureStore(store_path)
    if not len(store) or SAMPLE not in store.label_columns():
        return {}
    coded = store.labels()  # codes, 4 bytes a row a column: never the table as strings
    names = coded_sample_columns(coded)
    rows = store.find(list(paths))
    out = {}
    for c in names:
        codes, values = coded[c]
        got = np.asarray(values, dtype=object)[codes[np.maximum(rows, 0)]]
        out[c] = np.where(rows >= 0, got, "").tolist()
    return out


def stored_files(store_path: str | os.PathLike[str], paths: list[str]) -> list[str]:
    """The image file of each stored path (its root joined; an IFCB ROI's key, read from its
    bin), "" for a path not in the store: what a report's thumbnails are made from."""
    store = FeatureStore(store_path)
    rows = store.find(list(paths))
    uniq = np.unique(rows[rows >= 0])
    t = store.images(uniq.tolist())
    where = {int(r): os.path.join(t.root[i], t.path[i]) for i, r in enumerate(uniq)}
    return [where.get(int(r), "") for r in rows]


def write_training_report(
    folder: str | os.PathLike[str], result: TrainResult, store_path: str | os.PathLike[str]
) -> Path:
    """The report of what ``penult train`` scored (held out, pooled folds, or streamed), from
    its own predictions: the model is not scored again."""
    model = result.scored or result.model
    m = model.manifest
    if result.cv:
        how = "pooled out-of-fold predictions"
    elif m.out_of_core:
        how = f"{result.eval_split} split, scored block by block (out of core)"
    else:
        column = m.trained_on.split_column if m.trained_on else "split"
        how = f"{result.eval_split} split (column {column!r})"
    title = f"{m.kind} {m.head} on {' + '.join(model.backbones)}: {result.eval_split}"
    info = [
        f"store {store_path}, {result.n_eval} labelled images, {how}",
        f"model trained on {result.n_train} images, {len(model.classes)} classes",
    ]
    metrics = {**result.metrics, "cv": result.cv} if result.cv else result.metrics
    return write_evaluation(
        folder, model, metrics, result.paths, result.truth, title, info,
        carried=stored_samples(store_path, result.paths),
        files=stored_files(store_path, result.paths) if result.paths else None,
    )  # fmt: skip


def refit_here(model: Model, store_path: str | os.PathLike[str]) -> bool:
    """Whether ``model`` was refit on every labelled image of this very store."""
    trained = model.manifest.trained_on.store if model.manifest.trained_on else None
    if not model.manifest.refit_all or not trained:
        return False
    try:
        return os.path.samefile(trained, store_path)
    except OSError:
        return os.path.abspath(trained) == os.path.abspath(store_path)


def out_of_fold(model: Model, store_path: str | os.PathLike[str], folds: int = 5) -> Evaluation:
    """A model refit on every labelled image of a store, scored there honestly: its recipe (the
    unfitted estimator: same head, settings and taxonomy) fitted on ``folds`` stratified folds,
    each image predicted by the fit that did not see it (what `serve --model` shows for it)."""
    from penult.classify.quantify import OutOfFold

    m = model.manifest
    names = resolve_backbones(model, FeatureStore(store_path))
    data = load_dataset(store_path, names, label=m.label)
    y = np.asarray(data.column(m.label)).astype(str)
    classes, counts = np.unique(y, return_counts=True)
    keep = np.isin(y, classes[counts >= folds])  # a class needs an image in every fold
    X, y = data.X[keep], y[keep]
    oof = OutOfFold.of(model.estimator, X, y, folds=folds)  # clones, fitted fold by fold
    cls = np.asarray(model.classes).astype(str)
    col = {c: i for i, c in enumerate(cls)}
    P = np.zeros((len(y), len(cls)))
    P[:, [col[str(c)] for c in oof.classes]] = oof.posteriors
    metrics = scored(model, y, Predictions(cls[P.argmax(1)], P, cls))
    if (~keep).any():
        metrics["notes"] = [
            f"{int((~keep).sum())} images of classes with fewer than {folds} left out"
        ]
    paths = [p for p, k in zip(data.paths, keep, strict=True) if k]
    return Evaluation(metrics, f"{folds}-fold out-of-fold", len(y), None, paths, y)


def _refuse_refit_store(model: Model, store_path: str | os.PathLike[str]) -> None:
    """A model refit on every labelled image of a store has no held-out split there."""
    refit = model.manifest.refit_all
    if refit_here(model, store_path):
        m = model.manifest.metrics or {}
        named = (("top1", "top-1"), ("balanced_accuracy", "balanced accuracy"),
                 ("macro_f1", "macro-F1"))  # fmt: skip
        held = ", ".join(f"{w} {m[k]:.3f}" for k, w in named if isinstance(m.get(k), float))
        estimate = f": {held}" if held else ""
        raise DataError(
            f"{store_path}: this model was refit on all {refit.images} labelled images of this "
            f"store after it was scored, so none of them is held out; its held-out estimate "
            f"({refit.metrics_from}), recorded when it was trained, is{estimate} (`penult train "
            "--report` writes its report). Score it on another store, or train with --no-refit "
            "to keep the split model, which evaluate scores here"
        )


def write_predictions(
    folder: Path,
    model: Model,
    paths: list[str],
    pred: Predictions,
    truth: np.ndarray,
    top_k: int,
    carried: dict[str, list[str]] | None = None,
) -> Path:
    """``folder/predictions.csv``: the predict CSV's columns (``carried`` ones, the samples,
    after the path, as `penult predict` writes them) plus the true label."""
    k = max(1, min(top_k, len(model.classes)))
    carried = carried or {}
    header = csv_header(model, k)
    with open_csv(folder / "predictions.csv") as fh:
        w = SafeWriter(fh)
        w.writerow([header[0], *carried, *header[1:], "truth"])
        rows = csv_rows(paths, pred, model, k)
        for i, (row, t) in enumerate(zip(rows, truth, strict=True)):
            w.writerow([row[0], *(v[i] for v in carried.values()), *row[1:], t])
    return folder / "predictions.csv"


def compare(
    store_path: str | os.PathLike[str],
    heads: list[str],
    backbone_sets: list[tuple[str, ...]],
    base: TrainOptions = TrainOptions(),  # noqa: B008
) -> list[dict[str, Any]]:
    """Train every head on every backbone set on the same stored split; one summary row each."""
    rows = []
    for bbs in backbone_sets:
        for head in heads:
            t = time.perf_counter()
            # compared, not saved: no calibration of counts or open set (it would double each fit)
            plain = replace(
                base, head=head, backbones=bbs, quantifier_folds=0, unknown_score="none"
            )
            r = train(store_path, plain)
            rows.append(
                {"backbones": " + ".join(r.model.backbones), "head": head, "kind": r.model.manifest.kind,
                 "fit_seconds": r.fit_seconds, "seconds": time.perf_counter() - t,
                 "n_train": r.n_train, "n_eval": r.n_eval, **summary(r.metrics)}
            )  # fmt: skip
    return rows


def compare_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of comparison rows, best top-1 first."""
    levels = sorted({k for r in rows for k in r.get("level_accuracy", {})} - {"label"})
    head = [
        "backbones",
        "head",
        "kind",
        "top-1",
        "top-5",
        "balanced",
        "macro-F1",
        "ECE",
        *levels,
        "fit s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: -r["top1"]):
        lv = [
            f"{r['level_accuracy'][k]:.3f}" if k in r.get("level_accuracy", {}) else ""
            for k in levels
        ]
        cells = [r["backbones"], r["head"], r["kind"], f"{r['top1']:.3f}", f"{r.get('top5', np.nan):.3f}",
                 f"{r['balanced_accuracy']:.3f}", f"{r['macro_f1']:.3f}", f"{r['ece']:.3f}", *lv, f"{r['fit_seconds']:.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
