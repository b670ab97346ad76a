"""Reports a person can read (Markdown and HTML with PNG plots) and a JSON with the same numbers."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from penult.classify.model import Predictions

__all__ = [
    "GLOSSARY",
    "PLOTS",
    "confusion_figure",
    "headline_rows",
    "mistakes_gallery",
    "html_page",
    "markdown",
    "plots",
    "write_report",
]

PLOTS = ("confusion.png", "per_class.png", "reliability.png")

# what each headline number means, one line each (the README's glossary says the same)
GLOSSARY = {
    "images evaluated": "held-out images scored (each predicted by a model that did not see it)",
    "top-1 accuracy": "share whose first guess is the true class",
    "top-5 accuracy": "share whose true class is among the first five guesses",
    "balanced accuracy": "mean of the classes' recalls: a rare class counts as much as a common one",
    "macro-F1": "mean over classes of F1, the harmonic mean of precision and recall",
    "expected calibration error": "gap between stated probability and how often it is right "
    "(0.02: a 0.80 is right 78-82% of the time)",
    "mean per-class ROC-AUC": "how well each class's probability ranks its images above the "
    "others (1 perfect, 0.5 chance)",
    "predicted unknown": "share flagged 'not one of my classes'",
    "accuracy when a class is given": "top-1 over the images not flagged unknown",
    "below their class's threshold": "share whose winning class is below its tuned threshold",
    "rare classes": "classes with at most half the median training count, scored apart",
    "accuracy at level": "top-1 counted at a coarser level of the taxonomy",
    "mean tree distance of mistakes": "levels up to where true and predicted classes meet "
    "(1: same genus)",
}


def meaning(row: str) -> str:
    """The glossary line of a headline row ("" for none)."""
    return next((v for k, v in GLOSSARY.items() if row.startswith(k)), "")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def headline_rows(m: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        ("images evaluated", str(m["n"])),
        ("top-1 accuracy", _pct(m["top1"])),
        *([("top-5 accuracy", _pct(m.get("top5")))] if m["n_classes"] > 5 else []),
        ("balanced accuracy", _pct(m["balanced_accuracy"])),
        ("macro-F1", f"{m['macro_f1']:.3f}"),
        ("expected calibration error", f"{m['ece']:.3f}"),
        (
            "mean per-class ROC-AUC",
            "n/a" if m.get("macro_auc") is None else f"{m['macro_auc']:.4f}",
        ),
    ]
    if "unknown_rate" in m:
        rows += [
            ("predicted unknown", _pct(m["unknown_rate"])),
            ("accuracy when a class is given", _pct(m["accuracy_when_known"])),
        ]
    if "below_threshold_rate" in m:
        rows.append(("below their class's threshold", _pct(m["below_threshold_rate"])))
    rare = m.get("rare")
    if rare:
        rows.append(
            (
                f"rare classes ({len(rare['classes'])}, <= {rare['max_train_images']} training images)",
                f"top-1 {_pct(rare['top1'])}, balanced {_pct(rare['balanced_accuracy'])} on {rare['n']} images",
            )
        )
    lv = m.get("levels")
    if lv:
        rows += [(f"accuracy at level {k}", _pct(v)) for k, v in lv["accuracy"].items()]
        rows.append(
            ("mean tree distance of mistakes", f"{lv['mean_tree_distance_of_mistakes']:.2f} levels")
        )
    return rows


def _class_rows(m: dict[str, Any]) -> list[list[str]]:
    """Per-class table, worst recall first (rare and hard classes are not hidden in an average)."""
    items = sorted(m["per_class"].items(), key=lambda kv: (kv[1]["recall"], kv[0]))
    return [
        [c, str(v["train"]), str(v["support"]), f"{v['precision']:.2f}", f"{v['recall']:.2f}", f"{v['f1']:.2f}",
         "n/a" if v["auc"] is None else f"{v['auc']:.3f}"]
        for c, v in items
    ]  # fmt: skip


_CLASS_HEAD = ["class", "train", "test", "precision", "recall", "F1", "ROC-AUC"]
_THRESHOLD_HEAD = ["class", "threshold", "precision", "recall", "images counted"]


def _threshold_rows(m: dict[str, Any]) -> list[list[str]]:
    """Per-class thresholds and what they gave on the out-of-fold posteriors they were tuned on."""

    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    return [
        [c, f"{t['threshold']:.3f}", num(t["precision"]), num(t["recall"]), str(t["counted"])]
        for c, t in sorted(m.get("class_thresholds", {}).items())
    ]


_PAIR_HEAD = ["true class", "taken for", "images", "share of the class"]


_FOLD_HEAD = ["fold", "images", "top-1", "balanced accuracy", "macro-F1"]
_FOLD_TITLE = "Folds (how much the score moves with the images held out)"


def _fold_rows(m: dict[str, Any]) -> list[list[str]]:
    """``--cv``: each fold's headline numbers, then their mean and standard deviation."""
    cv = m.get("cv") or {}
    rows = [
        [str(i + 1), str(f.get("n", "")), _pct(f.get("top1")), _pct(f.get("balanced_accuracy")),
         f"{f['macro_f1']:.3f}" if "macro_f1" in f else "n/a"]
        for i, f in enumerate(cv.get("per_fold", []))
    ]  # fmt: skip
    mean, sd = cv.get("mean", {}), cv.get("std", {})
    if rows and mean:
        rows.append([
            "mean +- sd", "",
            *[f"{100 * mean[k]:.1f} +- {100 * sd[k]:.1f}%" for k in ("top1", "balanced_accuracy")],
            f"{mean['macro_f1']:.3f} +- {sd['macro_f1']:.3f}",
        ])  # fmt: skip
    return rows


def _pair_rows(m: dict[str, Any]) -> list[list[str]]:
    """The most confused pairs by name (the matrix is unreadable beyond ~20 classes)."""
    return [
        [p["true"], p["predicted"], str(p["count"]), f"{p['share']:.0%}"]
        for p in m.get("confused", [])
    ]


def markdown(title: str, m: dict[str, Any], info: list[str]) -> str:
    lines = [f"# {title}", "", *[f"- {i}" for i in info], ""]
    lines += ["| metric | value | what it means |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {meaning(k)} |" for k, v in headline_rows(m)]
    if folds := _fold_rows(m):
        lines += ["", f"## {_FOLD_TITLE}", ""]
        lines += ["| " + " | ".join(_FOLD_HEAD) + " |", "|" + "---|" * len(_FOLD_HEAD)]
        lines += ["| " + " | ".join(r) + " |" for r in folds]
    lines += ["", *[f"![{p}]({p})" for p in PLOTS], ""]
    if m.get("confused"):
        lines += ["## Most confused pairs", ""]
        lines += ["| " + " | ".join(_PAIR_HEAD) + " |", "|" + "---|" * len(_PAIR_HEAD)]
        lines += ["| " + " | ".join(r) + " |" for r in _pair_rows(m)] + [""]
    lines += ["## Per class (worst recall first)", ""]
    lines += ["| " + " | ".join(_CLASS_HEAD) + " |", "|" + "---|" * len(_CLASS_HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in _class_rows(m)]
    if m.get("class_thresholds"):
        lines += ["", "## Class thresholds (tuned on out-of-fold posteriors)", ""]
        lines += ["| " + " | ".join(_THRESHOLD_HEAD) + " |", "|" + "---|" * len(_THRESHOLD_HEAD)]
        lines += ["| " + " | ".join(r) + " |" for r in _threshold_rows(m)]
    return "\n".join(lines) + "\n"


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{th}</tr>{body}</table>"


def mistakes_gallery(
    out: Path, pred: Predictions, truth: np.ndarray, paths: list[str], files: list[str],
    limit: int = 48,
) -> str:  # fmt: skip
    """HTML of the misclassified images, the most confident mistakes first: a thumbnail of each
    (in ``out/mistakes/``) with its true and predicted class and the probability given."""
    from penult.classify.thumbs import FIGURE_CSS, figure

    label, truth = np.asarray(pred.label).astype(str), np.asarray(truth).astype(str)
    wrong = np.flatnonzero(label != truth)
    if not len(wrong):
        return ""
    col = {str(c): i for i, c in enumerate(pred.classes)}
    said = np.array([pred.proba[i, col[label[i]]] if label[i] in col else np.nan for i in wrong])
    order = np.argsort(-np.nan_to_num(said, nan=-1), kind="stable")[:limit]
    folder = out / "mistakes"
    folder.mkdir(exist_ok=True)
    cells = []
    for n, k in enumerate(order):
        i, p = wrong[k], said[k]
        lines = [
            f"<div>true <b>{html.escape(truth[i])}</b></div>",
            f"<div>predicted <b>{html.escape(label[i])}</b>"
            + ("" if np.isnan(p) else f" ({p:.2f})")
            + "</div>",
        ]
        cells.append(figure(files[i], folder, f"{n:03d}.jpg", paths[i], lines))
    style = f"<style>.gallery{{display:flex;flex-wrap:wrap;gap:10px}}{FIGURE_CSS}</style>"
    shown = f"the {len(order)} most confident shown" if len(order) < len(wrong) else "all shown"
    return (
        f"{style}<h2>Misclassified images ({len(wrong)}; {shown}, most confident first)</h2>"
        f'<div class="gallery">{"".join(cells)}</div>'
    )


def html_page(title: str, m: dict[str, Any], info: list[str], extra: str = "") -> str:
    folds = _fold_rows(m)
    items = "".join(f"<li>{html.escape(i)}</li>" for i in info)
    imgs = "".join(f'<img src="{p}" alt="{p}" style="max-width:48%">' for p in PLOTS)
    style = (
        "body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1><ul>{items}</ul>"
        + _table(
            ["metric", "value", "what it means"], [[k, v, meaning(k)] for k, v in headline_rows(m)]
        )
        + (f"<h2>{_FOLD_TITLE}</h2>{_table(_FOLD_HEAD, folds)}" if folds else "")
        + f"<p>{imgs}</p>"
        + (
            f"<h2>Most confused pairs</h2>{_table(_PAIR_HEAD, _pair_rows(m))}"
            if m.get("confused")
            else ""
        )
        + "<h2>Per class (worst recall first)</h2>"
        + _table(_CLASS_HEAD, _class_rows(m))
        + (
            "<h2>Class thresholds (tuned on out-of-fold posteriors)</h2>"
            + _table(_THRESHOLD_HEAD, _threshold_rows(m))
            if m.get("class_thresholds")
            else ""
        )
        + extra
        + "</body></html>\n"
    )


def plots(out: Path, m: dict[str, Any], y_true: np.ndarray, pred: Predictions) -> None:
    """confusion.png, per_class.png (recall per class, sorted) and reliability.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    classes = [str(c) for c in pred.classes]
    counts = confusion_matrix(y_true.astype(str), pred.label.astype(str), labels=classes)
    fig = confusion_figure(classes, counts)
    dpi = 100 if len(classes) <= 60 else 150  # small type for many classes stays sharp
    fig.savefig(out / "confusion.png", dpi=dpi, bbox_inches="tight")  # long names not cut
    plt.close(fig)
    k = len(classes)

    items = sorted(m["per_class"].items(), key=lambda kv: kv[1]["recall"])
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * k + 2), 4))
    ax.bar(range(k), [v["recall"] for _, v in items], color="tab:blue")
    if k <= 40:
        ax.set_xticks(range(k), [c for c, _ in items], rotation=90, fontsize=7)
    ax.set(ylabel="recall", ylim=(0, 1), title="recall per class (sorted)")
    fig.tight_layout()
    fig.savefig(out / "per_class.png", dpi=100)
    plt.close(fig)

    b = m["calibration"]
    edges, conf, acc, cnt = (np.array(b[x]) for x in ("edges", "confidence", "accuracy", "count"))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.bar(
        edges[:-1],
        np.where(cnt > 0, acc, 0),
        width=np.diff(edges),
        align="edge",
        edgecolor="k",
        label="accuracy",
    )
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(
        xlabel="confidence (top-1 probability)",
        ylabel="accuracy",
        title=f"reliability (ECE {m['ece']:.3f})",
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=100)
    plt.close(fig)


def confusion_figure(classes: list[str], counts: np.ndarray):
    """The confusion matrix as a person reads it: rows are true classes, shaded by the share of
    the class (a colour bar says how much), each cell's image count written in it where cells
    are big enough (up to 30 classes), every class named (smaller type for many classes)."""
    import matplotlib.pyplot as plt

    k = len(classes)
    rows = counts.sum(1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    side = min(max(6.0, 2.5 + 0.16 * k), 22.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of the true class's images")
    size = float(np.clip(700 / max(k, 1), 4, 9))
    ax.set_xticks(range(k), classes, rotation=90, fontsize=size)
    ax.set_yticks(range(k), classes, fontsize=size)
    if k <= 30:
        for (r, c), n in np.ndenumerate(counts):
            if n:
                ax.text(c, r, str(n), ha="center", va="center", fontsize=min(9, size + 1),
                        color="white" if share[r, c] > 0.5 else "black")  # fmt: skip
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix: {k} classes, {int(counts.sum())} images\n"
                 "(shade: share of the row; numbers: images)" if k <= 30 else
                 f"confusion matrix: {k} classes, {int(counts.sum())} images\n"
                 "(shade: share of the row)")  # fmt: skip
    return fig


def write_report(
    out_dir: str | os.PathLike[str],
    title: str,
    metrics: dict[str, Any],
    info: list[str],
    y_true: np.ndarray,
    pred: Predictions,
    paths: list[str] | None = None,
    files: list[str] | None = None,
) -> Path:
    """Write report.md, report.html, metrics.json and the PNG plots into ``out_dir``; with the
    images' ``files``, report.html ends with a gallery of the misclassified ones."""
    out = Path(out_dir)
    out.mkdir(exist_ok=True)  # its folder must exist: a typo should not create directories
    m = {k: v for k, v in metrics.items() if k != "predictions"}
    (out / "metrics.json").write_text(json.dumps({"title": title, "info": info, **m}, indent=1))
    (out / "report.md").write_text(
        markdown(title, m, info), encoding="utf-8", errors="backslashreplace"
    )
    extra = mistakes_gallery(out, pred, y_true, paths, files) if files and paths else ""
    (out / "report.html").write_text(
        html_page(title, m, info, extra), encoding="utf-8", errors="backslashreplace"
    )
    plots(out, m, y_true, pred)
    return out
