"""The picture of `penult count`'s table: the top taxa per sample, as a PNG and an HTML page.

Samples with a ``time`` each are drawn as lines over time (a time series is what a plankton
lab publishes); otherwise as stacked bars, one per sample. Where every sample has a volume the
y axis is the concentration (images per mL), else the share of the sample's images.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from penult.core import atomic_path

__all__ = ["plot_counts", "parse_times"]


def parse_times(times: Sequence[str]) -> np.ndarray | None:
    """The samples' times as numbers or datetimes, or None unless every one parses (ISO 8601
    dates and times, or plain numbers such as a day of the year)."""
    import pandas as pd

    if not len(times) or any(not str(t).strip() for t in times):
        return None
    num = pd.to_numeric(pd.Series(list(times)), errors="coerce")
    if not num.isna().any():
        return num.to_numpy(float)
    when = pd.to_datetime(pd.Series(list(times)), errors="coerce", format="ISO8601", utc=True)
    if when.isna().any():
        return None
    return when.dt.tz_localize(None).to_numpy()


def plot_counts(
    png: Path,
    page: Path,
    *,
    samples: list[str],
    shares: np.ndarray,
    images: Sequence[int],
    classes: list[str],
    volumes: Sequence[float | None],
    times: Sequence[str],
    top: int,
    title: str,
    info: list[str],
) -> None:
    """Write ``png`` and ``page`` (HTML with the same figure as SVG and the taxa's means)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have = ~np.isnan(shares).all(1)  # samples with at least one scored image
    values = np.nan_to_num(shares)
    ylabel = "share of the sample's images"
    if have.any() and all(volumes[i] is not None for i in np.flatnonzero(have)):
        per_ml = np.array([n / v if v else 0.0 for n, v in zip(images, volumes, strict=True)])
        values = values * per_ml[:, None]
        ylabel = "images per mL"
    *taxa, unclassified = range(len(classes))
    mean = values[have].mean(0) if have.any() else np.zeros(len(classes))
    best = sorted(taxa, key=lambda j: -mean[j])[:top]
    rest = [j for j in taxa if j not in best]
    series = [(classes[j], values[:, j]) for j in best]
    if rest:
        series.append((f"other ({len(rest)} taxa)", values[:, rest].sum(1)))
    if mean[unclassified] > 0:
        series.append((classes[unclassified], values[:, unclassified]))
    when = parse_times([times[i] for i in np.flatnonzero(have)])
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, 20))
    fig, ax = plt.subplots(figsize=(min(18, 6 + 0.25 * len(samples)), 5.5))
    if when is not None and have.sum() > 1:
        at = np.argsort(when)
        for k, (name, v) in enumerate(series):
            ax.plot(
                when[at], v[have][at], marker="o", ms=3, lw=1.3, color=colours[k % 20], label=name
            )
        ax.set_xlabel("time")
        fig.autofmt_xdate()
    else:
        x = np.arange(len(samples))
        bottom = np.zeros(len(samples))
        for k, (name, v) in enumerate(series):
            ax.bar(x, v, bottom=bottom, color=colours[k % 20], label=name, width=0.85)
            bottom += v
        if len(samples) <= 60:
            ax.set_xticks(x, samples, rotation=60, ha="right", fontsize=7)
        ax.set_xlabel(f"sample ({len(samples)})")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    svg = io.StringIO()
    fig.savefig(svg, format="svg")
    plt.close(fig)
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{np.mean(v[have]):.4g}</td>"
        f"<td>{int((v[have] > 0).sum())}</td></tr>"
        for name, v in series
    )
    body = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:left}"
        "svg{max-width:100%;height:auto}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><ul>"
        + "".join(f"<li>{html.escape(line)}</li>" for line in info)
        + "</ul>"
        + svg.getvalue()[svg.getvalue().index("<svg") :]
        + f"<h2>Taxa drawn</h2><table><tr><th>taxon</th><th>mean ({html.escape(ylabel)})</th>"
        f"<th>samples with it</th></tr>{rows}</table></body></html>\n"
    )
    with atomic_path(page) as tmp:
        tmp.write_text(body, encoding="utf-8")
