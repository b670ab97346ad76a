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
    "PLOTS",
    "headline_rows",
    "html_page",
    "markdown",
    "plots",
    "write_report",
]

PLOTS = ("confusion.png", "per_class.png", "reliability.png")


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


def _pair_rows(m: dict[str, Any]) -> list[list[str]]:
    """The most confused pairs by name (the matrix is unreadable beyond ~20 classes)."""
    return [
        [p["true"], p["predicted"], str(p["count"]), f"{p['share']:.0%}"]
        for p in m.get("confused", [])
    ]


def markdown(title: str, m: dict[str, Any], info: list[str]) -> str:
    lines = [f"# {title}", "", *[f"- {i}" for i in info], "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in headline_rows(m)]
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


def html_page(title: str, m: dict[str, Any], info: list[str]) -> str:
    items = "".join(f"<li>{html.escape(i)}</li>" for i in info)
    imgs = "".join(f'<img src="{p}" alt="{p}" style="max-width:48%">' for p in PLOTS)
    style = (
        "body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1><ul>{items}</ul>"
        + _table(["metric", "value"], [list(r) for r in headline_rows(m)])
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
        + "</body></html>\n"
    )


def plots(out: Path, m: dict[str, Any], y_true: np.ndarray, pred: Predictions) -> None:
    """confusion.png, per_class.png (recall per class, sorted) and reliability.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    classes = list(pred.classes)
    cm = confusion_matrix(
        y_true.astype(str), pred.label.astype(str), labels=classes, normalize="true"
    )
    k = len(classes)
    fig, ax = plt.subplots(figsize=(min(4 + k * 0.12, 16),) * 2)
    ax.imshow(np.nan_to_num(cm), cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        ax.set_xticks(range(k), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(k), classes, fontsize=7)
    ax.set(
        xlabel="predicted", ylabel="true", title=f"confusion matrix (rows normalised, {k} classes)"
    )
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=100)
    plt.close(fig)

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


def write_report(
    out_dir: str | os.PathLike[str],
    title: str,
    metrics: dict[str, Any],
    info: list[str],
    y_true: np.ndarray,
    pred: Predictions,
) -> Path:
    """Write report.md, report.html, metrics.json and the PNG plots into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(exist_ok=True)  # its folder must exist: a typo should not create directories
    m = {k: v for k, v in metrics.items() if k != "predictions"}
    (out / "metrics.json").write_text(json.dumps({"title": title, "info": info, **m}, indent=1))
    (out / "report.md").write_text(
        markdown(title, m, info), encoding="utf-8", errors="backslashreplace"
    )
    (out / "report.html").write_text(
        html_page(title, m, info), encoding="utf-8", errors="backslashreplace"
    )
    plots(out, m, y_true, pred)
    return out
