"""Likely mislabelled images: a ranking of the labelled images by how likely their label is wrong.

Two signals from the stored features, each computed so that an image never votes on itself:

- **self-confidence** (confident learning's ranking, Northcutt et al. 2021): the probability that a
  classifier fitted on the other folds gives the image's own label (default the calibrated linear
  SVM: its probabilities rank planted noise better than the logistic regression's, see
  docs/BENCHMARKS.md);
- **neighbour margin**: how much closer the image is to its nearest images of *other* labels than to
  its nearest images of its *own* label (PCA-reduced, cosine), as a human reviewer would look at it.

A wrong label usually fails both; an image that is merely hard fails one. The two are combined by
rank (each turned into its share of the images that look less suspicious), so neither scale
dominates. `benchmarks/mistakes_bench.py` measures the ranking against planted label noise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from penult.classify.csvout import SafeWriter, open_csv
from penult.classify.data import DataError, load_dataset
from penult.classify.heads import make_head
from penult.classify.options import MistakeOptions
from penult.classify.train import default_backbones
from penult.core import atomic_path, check_out_folder
from penult.features import FeatureStore

__all__ = ["MistakeOptions", "Ranking", "find_mistakes", "rank_labels", "write_mistakes"]


@dataclass
class Ranking:
    """Per image (in the input order): ``score`` in [0, 1] (higher: the label is more likely
    wrong), its two signals, and the label the out-of-fold model suggests instead."""

    score: np.ndarray  # (n,) float; NaN where the label cannot be checked (its class's only image)
    self_confidence: np.ndarray  # (n,) out-of-fold probability of the image's own label
    neighbour_margin: np.ndarray  # (n,) similarity to other labels minus to its own (higher: worse)
    suggested: np.ndarray  # (n,) str: the out-of-fold model's top label
    suggested_p: np.ndarray  # (n,) its probability
    notes: list[str] = field(default_factory=list)

    def order(self) -> np.ndarray:
        """Positions, most suspicious first (unchecked images last)."""
        s = np.where(np.isnan(self.score), -1.0, self.score)
        return np.argsort(-s, kind="stable")


def rank_labels(X: np.ndarray, y: np.ndarray, opts: MistakeOptions = MistakeOptions()) -> Ranking:  # noqa: B008
    """Rank images ``X`` (n, d) by how likely their labels ``y`` (n,) are wrong."""
    y = np.asarray(y).astype(str)
    classes, inv, counts = np.unique(y, return_inverse=True, return_counts=True)
    checkable = counts[inv] >= 2
    notes = []
    if (~checkable).any():
        notes.append(
            f"{int((~checkable).sum())} images are the only one of their label: nothing to check "
            "them against (left unscored)"
        )
    if len(np.unique(inv[checkable])) < 2:
        raise DataError("checking labels needs at least two labels with two images each")
    n = len(y)
    conf, sugg, sugg_p = np.full(n, np.nan), np.full(n, "", dtype=object), np.full(n, np.nan)
    idx = np.flatnonzero(checkable)
    P, cls = _out_of_fold(X[idx], y[idx], opts)
    own = np.searchsorted(cls, y[idx])
    conf[idx] = P[np.arange(len(idx)), own]
    sugg[idx], sugg_p[idx] = cls[P.argmax(1)], P.max(1)
    margin = np.full(n, np.nan)
    margin[idx] = neighbour_margin(X[idx], y[idx], opts)
    score = np.full(n, np.nan)
    score[idx] = (_share(-conf[idx]) + _share(margin[idx])) / 2
    return Ranking(score, conf, margin, sugg.astype(str), sugg_p, notes)


def _share(v: np.ndarray) -> np.ndarray:
    """Each value's share of the values below it (ties share their mean rank): in [0, 1]."""
    from scipy.stats import rankdata

    return (rankdata(v) - 1) / max(len(v) - 1, 1)


def _out_of_fold(
    X: np.ndarray, y: np.ndarray, opts: MistakeOptions
) -> tuple[np.ndarray, np.ndarray]:
    from penult.classify.quantify import OutOfFold

    oof = OutOfFold.of(
        make_head(opts.head), X, y, folds=opts.folds, seed=opts.seed, n_jobs=opts.n_jobs
    )
    return oof.posteriors, oof.classes


def neighbour_margin(X: np.ndarray, y: np.ndarray, opts: MistakeOptions) -> np.ndarray:
    """(n,) mean cosine similarity of each image's ``neighbours`` nearest images of other
    labels minus that of its nearest of its own label (itself excluded), in a standardised
    PCA space. Exact, a block of rows at a time (memory: block x n)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler, normalize

    Z = StandardScaler().fit_transform(X)
    if opts.pca and opts.pca < min(Z.shape):
        Z = PCA(opts.pca, svd_solver="randomized", random_state=opts.seed).fit_transform(Z)
    Z = normalize(Z).astype(np.float32)
    codes = np.unique(y, return_inverse=True)[1]
    m = opts.neighbours
    out = np.empty(len(y))
    step = max(1, (64 << 20) // (4 * len(y)))  # about 64 MiB of similarities at a time
    for a in range(0, len(y), step):
        S = Z[a : a + step] @ Z.T
        S[np.arange(len(S)), np.arange(a, a + len(S))] = -np.inf  # not itself
        same = codes[a : a + step, None] == codes[None, :]
        out[a : a + step] = _top_mean(np.where(same, -np.inf, S), m) - _top_mean(
            np.where(same, S, -np.inf), m
        )
    return out


def _top_mean(S: np.ndarray, m: int) -> np.ndarray:
    """Mean of each row's ``m`` largest finite values (fewer where the row has fewer)."""
    m = min(m, S.shape[1])
    top = -np.partition(-S, m - 1, axis=1)[:, :m]
    finite = np.isfinite(top)
    return np.where(finite, top, 0).sum(1) / np.maximum(finite.sum(1), 1)


@dataclass
class MistakesResult:
    paths: list[str]
    labels: np.ndarray
    ranking: Ranking


def find_mistakes(
    store_path: str | os.PathLike[str], opts: MistakeOptions | None = None
) -> MistakesResult:
    """Rank a store's labelled images (validated labels: dubious ones are already flagged)."""
    opts = opts or MistakeOptions()
    store = FeatureStore(store_path)
    data = load_dataset(store_path, default_backbones(store, opts.backbones), label=opts.label)
    y = data.column(opts.label)
    r = rank_labels(data.X, y, opts)
    r.notes[:0] = data.notes
    return MistakesResult(data.paths, y, r)


FIELDS = (
    "rank",
    "path",
    "label",
    "score",
    "self_confidence",
    "neighbour_margin",
    "suggested",
    "suggested_p",
)


def write_mistakes(
    result: MistakesResult, out: str | os.PathLike[str], *, top: int | None = None
) -> int:
    """CSV of the images, most suspicious first (``top`` of them); returns the rows written."""
    out = Path(out)
    check_out_folder(out)
    r = result.ranking
    order = r.order()[: top or None]
    with atomic_path(out) as tmp, open_csv(tmp) as f:
        w = SafeWriter(f)
        w.writerow(FIELDS)
        for i, k in enumerate(order, 1):
            w.writerow([
                i, result.paths[k], result.labels[k], _num(r.score[k]), _num(r.self_confidence[k]),
                _num(r.neighbour_margin[k]), r.suggested[k], _num(r.suggested_p[k]),
            ])  # fmt: skip
    return len(order)


def _num(v: float) -> str:
    return "" if np.isnan(v) else f"{v:.4f}"
