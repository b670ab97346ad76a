"""Held-out metrics that do not hide rare classes: one dict of plain numbers per evaluation.

Everything is computed from true labels, the predicted labels and the (n, n_classes) probability
matrix, so the same function scores flat, one-vs-rest and hierarchical models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from penult.classify.hierarchy import tree_distance
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

ECE_BINS = 15


def calibration_bins(
    confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> dict[str, list[float]]:
    """Per equal-width confidence bin: count, mean confidence, accuracy (for ECE and the diagram)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(float)
    conf = np.bincount(which, weights=confidence, minlength=bins)
    acc = np.bincount(which, weights=correct.astype(float), minlength=bins)
    nz = count > 0
    conf[nz] /= count[nz]
    acc[nz] /= count[nz]
    return {
        "edges": edges.tolist(),
        "count": count.tolist(),
        "confidence": conf.tolist(),
        "accuracy": acc.tolist(),
    }


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Mean |accuracy - confidence| over confidence bins, weighted by how many images fall in each."""
    b = calibration_bins(confidence, correct)
    count = np.array(b["count"])
    gap = np.abs(np.array(b["accuracy"]) - np.array(b["confidence"]))
    return float((count * gap).sum() / max(count.sum(), 1))


def rare_classes(train_counts: Mapping[str, int]) -> list[str]:
    """Classes with at most half the median class's training images (none when counts are even)."""
    if not train_counts:
        return []
    cut = np.median(np.array(list(train_counts.values()))) / 2
    return sorted(c for c, n in train_counts.items() if n <= cut)


def classification_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    proba: np.ndarray,
    classes: np.ndarray,
    *,
    train_counts: Mapping[str, int] | None = None,
    paths: np.ndarray | None = None,
    levels: Sequence[str] = (),
    unknown: str | None = None,
) -> dict[str, Any]:
    """Top-1/top-5, balanced accuracy, macro-F1, per-class P/R/F1/AUC, ECE, rare-class and level scores.

    ``paths`` is the (n_classes, depth) taxonomy path of each class (coarse first, class last) with
    ``levels`` naming its columns; it adds per-level accuracy and tree distance of mistakes.
    ``unknown`` is the label a thresholded model gives when no class passes.
    """
    y_true = np.asarray(y_true).astype(str)
    y_pred = np.asarray(y_pred).astype(str)
    classes = np.asarray(classes).astype(str)
    col = {c: i for i, c in enumerate(classes)}
    known_truth = np.array([c in col for c in y_true])
    t_idx = np.array([col.get(c, -1) for c in y_true])
    out = _headline(y_true, y_pred, proba, classes, t_idx, known_truth)
    if unknown is not None:
        known = y_pred != unknown
        out["unknown_rate"] = float(1 - known.mean())
        out["accuracy_when_known"] = (
            float((y_pred[known] == y_true[known]).mean()) if known.any() else 0.0
        )
    out["per_class"] = _per_class(y_true, y_pred, proba, classes, t_idx, train_counts or {})
    aucs = [v["auc"] for v in out["per_class"].values() if v["auc"] is not None]
    out["macro_auc"] = float(np.mean(aucs)) if aucs else None
    rare = rare_classes(train_counts or {})
    if rare:
        m = np.isin(y_true, rare)
        out["rare"] = {
            "classes": rare,
            "max_train_images": int(max(train_counts[c] for c in rare)),
            "n": int(m.sum()),
            "top1": float((y_pred[m] == y_true[m]).mean()) if m.any() else None,
            "balanced_accuracy": float(
                np.mean([out["per_class"][c]["recall"] for c in rare if c in col])
            ),
        }
    if paths is not None and len(levels):
        out["levels"] = _level_metrics(y_true, y_pred, classes, paths, levels, known_truth)
    out["confused"] = confused_pairs(y_true, y_pred)
    return out


def confused_pairs(y_true: np.ndarray, y_pred: np.ndarray, top: int = 20) -> list[dict[str, Any]]:
    """The ``top`` most frequent mistakes as named pairs (true -> predicted), most images first,
    with the share of the true class they take: readable where a 100-class matrix is not."""
    y_true, y_pred = np.asarray(y_true).astype(str), np.asarray(y_pred).astype(str)
    wrong = y_true != y_pred
    if not wrong.any():
        return []
    pairs, counts = np.unique(
        np.stack([y_true[wrong], y_pred[wrong]], 1), axis=0, return_counts=True
    )
    support = dict(zip(*np.unique(y_true, return_counts=True), strict=True))
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], *pairs[i]))[:top]
    return [
        {"true": str(pairs[i][0]), "predicted": str(pairs[i][1]), "count": int(counts[i]),
         "share": float(counts[i] / support[pairs[i][0]])}
        for i in order
    ]  # fmt: skip


def _headline(y_true, y_pred, proba, classes, t_idx, known_truth) -> dict[str, Any]:
    """Accuracy (top-1, top-5, balanced), macro-F1 and calibration of the top score."""
    n, k = proba.shape
    order = np.argsort(-proba, axis=1)
    conf = proba[np.arange(n), order[:, 0]]
    right = classes[order[:, 0]] == y_true
    top5 = (order[:, : min(5, k)] == t_idx[:, None]).any(axis=1) & known_truth
    return {
        "n": int(n),
        "n_classes": int(k),
        "top1": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)
        ),
        "ece": expected_calibration_error(conf, right),
        "calibration": calibration_bins(conf, right),
        "top5": float(top5.mean()),
    }


def _per_class(y_true, y_pred, proba, classes, t_idx, train_counts) -> dict[str, dict]:
    """Precision, recall, F1, support, training images and one-vs-rest AUC of every class."""
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    auc = _per_class_auc(t_idx, proba)
    return {
        c: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(s[i]),
            "train": int(train_counts.get(c, 0)),
            "auc": auc[i],
        }
        for i, c in enumerate(classes)
    }


def _per_class_auc(t_idx: np.ndarray, proba: np.ndarray) -> list[float | None]:
    """One-vs-rest ROC-AUC per class; None where the evaluation set lacks positives or negatives."""
    out: list[float | None] = []
    for i in range(proba.shape[1]):
        pos = t_idx == i
        out.append(float(roc_auc_score(pos, proba[:, i])) if 0 < pos.sum() < len(pos) else None)
    return out


def _level_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    classes: np.ndarray,
    paths: np.ndarray,
    levels: Sequence[str],
    known_truth: np.ndarray,
) -> dict[str, Any]:
    """Accuracy at every level of the predicted path, and how many levels up mistakes meet the truth
    (tree distances over the images that got a class)."""
    col = {c: i for i, c in enumerate(classes)}
    ok = known_truth & np.array([c in col for c in y_pred])
    tp = paths[[col[c] for c in y_true[ok]]].astype(str)
    pp = paths[[col[c] for c in y_pred[ok]]].astype(str)
    dist = tree_distance(pp, tp)
    wrong = dist > 0
    return {
        # over all images: an "unknown" (or a class the model never saw) counts as wrong at every level
        "accuracy": {
            name: float((pp[:, j] == tp[:, j]).sum() / max(len(y_true), 1))
            for j, name in enumerate(levels)
        },
        "mean_tree_distance": float(dist.mean()),
        "mean_tree_distance_of_mistakes": float(dist[wrong].mean()) if wrong.any() else 0.0,
        "mistakes_by_distance": {int(d): int((dist == d).sum()) for d in np.unique(dist[wrong])},
    }
