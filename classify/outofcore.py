"""Training on stores whose feature matrix does not fit in memory (`penult train --out-of-core`).

Features are read a block of rows at a time (a few hundred MB at most) and never as one matrix:

- ``lr``: standardisation learned in one pass (``StandardScaler.partial_fit``), then multinomial
  logistic regression (log loss, softmax) trained with ``partial_fit`` over several passes of
  shuffled blocks. Its L2 penalty is the in-memory head's ``C`` carried over, so the two heads
  optimise the same objective.
- ``centroid``: class means of the L2-normalised features summed block by block.
- every other head (and one-vs-rest, hierarchies, PCA, search) trains in memory on a seeded
  stratified subsample of the training split whose size the user sets.

Evaluation streams too: the held-out split is scored block by block (at most ``max_eval`` images,
a seeded sample beyond that).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator

import numpy as np
from penult.classify.data import StreamingData, stream_dataset
from penult.classify.model import Model, Predictions
from penult.classify.novelty import fit_novelty
from penult.classify.options import StreamOptions
from penult.classify.train import (
    TrainOptions,
    TrainResult,
    counted,
    default_backbones,
    model_manifest,
    prepare,
    scored,
    summary,
)
from penult.core import OptionError
from penult.features import FeatureStore
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.utils.validation import check_is_fitted, validate_data

__all__ = [
    "StreamOptions",
    "StreamingCentroid",
    "shuffle_buffers",
    "train_out_of_core",
]


class StreamingCentroid(ClassifierMixin, BaseEstimator):
    """Nearest class mean, learned block by block with ``partial_fit``.

    Probabilities are a softmax of ``-||x - mean_c||^2 / (2 s^2)`` with ``s^2`` the pooled
    within-class variance per feature, as a diagonal shared-covariance Gaussian model gives.
    """

    def partial_fit(self, X, y, classes=None) -> StreamingCentroid:
        first = not hasattr(self, "classes_")
        X, y = validate_data(self, X, y, reset=first, dtype=np.float64)
        if first:
            if classes is None:
                raise ValueError("classes must be given on the first partial_fit call")
            self.classes_ = np.asarray(classes)
            k = len(self.classes_)
            self.count_ = np.zeros(k)
            self.sum_ = np.zeros((k, X.shape[1]))
            self.sumsq_ = np.zeros((k, X.shape[1]))
        idx = np.searchsorted(self.classes_, y)
        if np.any(idx >= len(self.classes_)) or np.any(self.classes_[idx] != y):
            raise ValueError("partial_fit got a label not in classes")
        np.add.at(self.count_, idx, 1)
        np.add.at(self.sum_, idx, X)
        np.add.at(self.sumsq_, idx, X * X)
        return self

    def fit(self, X, y) -> StreamingCentroid:
        for attr in ("classes_", "count_", "sum_", "sumsq_"):
            self.__dict__.pop(attr, None)
        return self.partial_fit(X, y, classes=np.unique(y))

    def _stats(self) -> tuple[np.ndarray, np.ndarray]:
        check_is_fitted(self)
        n = np.maximum(self.count_, 1)[:, None]
        means = self.sum_ / n
        within = (self.sumsq_ - n * means**2).sum(axis=0) / max(self.count_.sum() - len(n), 1)
        return means, np.maximum(within, 1e-12)

    @property
    def centroids_(self) -> np.ndarray:
        return self._stats()[0]

    def predict_proba(self, X) -> np.ndarray:
        means, var = self._stats()
        X = validate_data(self, X, reset=False, dtype=np.float64)
        w = 1.0 / var
        d2 = (X * X) @ w[:, None] - 2 * X @ (means * w).T + (means * means) @ w
        score = -0.5 * d2
        score -= score.max(axis=1, keepdims=True)
        p = np.exp(score)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        means, _ = self._stats()
        X = validate_data(self, X, reset=False, dtype=np.float64)
        d2 = (X * X).sum(1)[:, None] - 2 * X @ means.T + (means * means).sum(1)
        return self.classes_[np.argmin(d2, axis=1)]


def _streams(opts: TrainOptions) -> bool:
    plain = not (opts.ovr or opts.hierarchical or opts.search or opts.pca or opts.whiten)
    return plain and opts.head in ("lr", "centroid") and not opts.params


def _block_rows(data: StreamingData, memory_mb: int, parts: int) -> int:
    return max(256, int(memory_mb * 2**20 / (4 * data.dim * parts)))


def shuffle_buffers(
    data: StreamingData, idx: np.ndarray, y: np.ndarray, block: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(X, y) shuffle buffers of ``_MIX`` storage blocks visited in random order, rows shuffled:
    an ImageFolder store is sorted by class, so one block alone would hold few classes."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for pos, X in data.blocks(idx, block_rows=block, order=rng.permutation):
        xs.append(X)
        ys.append(y[pos])
        if len(xs) == _MIX:
            yield _shuffled(xs, ys, rng)
            ys = []
    if xs:
        yield _shuffled(xs, ys, rng)


_MIX = 4


def _shuffled(
    xs: list[np.ndarray], ys: list[np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The blocks as one buffer, rows shuffled in place (no second copy of the buffer)."""
    X, y = np.concatenate(xs), np.concatenate(ys)
    xs.clear()
    state = rng.bit_generator.state
    rng.shuffle(X)
    rng.bit_generator.state = state  # the same permutation for the labels
    rng.shuffle(y)
    return X, y


def _fit_lr(
    data: StreamingData, idx: np.ndarray, y: np.ndarray, opts: TrainOptions, so: StreamOptions
) -> Pipeline:
    """Standardise (one pass), then multinomial logistic regression trained by Adam over shuffled
    buffers: an ``MLPClassifier`` without hidden layers is exactly softmax regression, and unlike
    ``SGDClassifier`` (one-vs-rest) it matches the in-memory head (docs/BENCHMARKS.md)."""
    block = _block_rows(data, so.memory_mb, _MIX)
    scaler = StandardScaler()
    for _, X in data.blocks(idx, block_rows=block):
        scaler.partial_fit(X)
    classes, counts = data.classes(opts.label, idx)
    weight = None
    if opts.class_weight == "balanced":
        weight = dict(zip(classes, len(idx) / (len(classes) * counts), strict=True))
    c = float(dict(opts.params).get("C", 0.1))
    clf = MLPClassifier(
        hidden_layer_sizes=(),
        alpha=_BATCH / (c * len(idx)),  # the logistic regression's L2 penalty, per mini-batch
        batch_size=_BATCH,
        learning_rate_init=3e-3,
        random_state=opts.seed,
    )
    rng = np.random.default_rng(opts.seed)
    # the buffer goes to the head in slices whose labels' one-hot encoding (float64, n x
    # classes, made by partial_fit) fits --memory-mb: for 100 classes a whole buffer's was 3x it
    step = max(_BATCH, int(so.memory_mb * 2**20 / (8 * len(classes))) // _BATCH * _BATCH)
    for _ in range(so.epochs):
        for X, yb in shuffle_buffers(data, idx, y, block, rng):
            for s in range(0, len(X), step):  # the buffer is shuffled: slices keep its mix
                xs, ys = scaler.transform(X[s : s + step]), yb[s : s + step]
                sw = None if weight is None else np.array([weight[v] for v in ys])
                clf.partial_fit(xs, ys, sample_weight=sw, classes=classes)
    return Pipeline([("scale", scaler), ("clf", clf)])


_BATCH = 256


def _fit_centroid(
    data: StreamingData, idx: np.ndarray, y: np.ndarray, label: str, so: StreamOptions
) -> Pipeline:
    l2, clf = Normalizer(), StreamingCentroid()
    classes = data.classes(label, idx)[0]
    for pos, X in data.blocks(idx, block_rows=_block_rows(data, so.memory_mb, 1)):
        clf.partial_fit(l2.fit_transform(X), y[pos], classes=classes)
    return Pipeline([("l2", l2), ("clf", clf)])


def _subsample(idx: np.ndarray, codes: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded sample of ``n`` positions, stratified by the class ``codes`` (each class keeps
    its share, rounded, and at least one image where it has one and ``n`` allows), sorted.
    Not scikit-learn's stratified split: on nine million rows it held 935 MiB (the labels as
    strings, int64 inverse codes, an argsort and a permutation a row); this holds 12 bytes a row."""
    if len(idx) <= n:
        return idx
    rng = np.random.default_rng(seed)
    c = codes[idx]
    order = np.argsort(c, kind="stable")  # positions grouped by class, 8 bytes a row
    counts = np.bincount(c, minlength=int(c.max()) + 1)
    take = np.floor(counts * (n / len(idx))).astype(np.int64)
    if n >= np.count_nonzero(counts):
        take = np.maximum(take, np.minimum(counts, 1))
    short = n - int(take.sum())  # the rounding's remainder: to the classes with the most left
    if short > 0:
        left = (counts * (n / len(idx))) - take
        for k in np.argsort(-left, kind="stable")[:short]:
            take[k] += 1 if take[k] < counts[k] else 0
    keep, start = [], 0
    for k, m in enumerate(counts.tolist()):
        if take[k]:
            keep.append(idx[order[start + rng.choice(m, int(take[k]), replace=False)]])
        start += m
    return np.sort(np.concatenate(keep))[:n] if keep else idx[:0]


def _read(data: StreamingData, idx: np.ndarray, memory_mb: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, features) of ``idx`` in storage order, as one in-memory matrix."""
    parts = list(data.blocks(idx, block_rows=_block_rows(data, memory_mb, 1)))
    return np.concatenate([p for p, _ in parts]), np.concatenate([x for _, x in parts])


def _predict(
    model: Model, data: StreamingData, idx: np.ndarray, memory_mb: int
) -> tuple[np.ndarray, Predictions]:
    """Positions (storage order) and the model's predictions for them, a block at a time: a
    block's features and its per-class scores (probabilities, the open-set score's distances:
    about 32 bytes a class) within ``memory_mb``."""
    per_row = 4 * data.dim + 32 * len(model.classes)
    block = max(256, int(memory_mb * 2**20 / per_row))
    pos, parts = [], []
    for p, X in data.blocks(idx, block_rows=block):
        pos.append(p)
        parts.append(model.predict(X))

    def joined(field: str) -> np.ndarray | None:
        got = [getattr(pr, field) for pr in parts]
        return None if got[0] is None else np.concatenate(got)

    pred = Predictions(
        label=joined("label"),
        proba=joined("proba"),
        classes=model.classes,
        path=joined("path"),
        unknown=joined("unknown"),
        novelty=joined("novelty"),
        below=joined("below"),
    )
    return np.concatenate(pos), pred


def _open_set(
    model: Model,
    data: StreamingData,
    tr: np.ndarray,
    y: np.ndarray,
    opts: TrainOptions,
    stream: StreamOptions,
    notes: list[str],
) -> None:
    """The open-set score, fitted on a seeded stratified sample of the training images (at most
    20,000, the most the score keeps, and as many as fit ``--memory-mb`` a few times over);
    counts stay classify-and-count (no out-of-fold models out of core)."""
    notes.append("counts by classify-and-count: out of core there is no count calibration")
    if opts.unknown_score == "none":
        return
    if opts.unknown_score == "msp":
        notes.append("no open-set score: msp is set on out-of-fold posteriors, none out of core")
        return
    rows = min(20_000, (stream.memory_mb << 20) // (16 * data.dim))  # a few copies fit the cap
    sub = _subsample(tr, data.codes(opts.label)[0], max(rows, 100), opts.seed)
    pos, X = _read(data, sub, stream.memory_mb)
    notes.append(f"open-set score fitted on a seeded sample of {len(sub)} training images")
    try:
        model.novelty = fit_novelty(opts.unknown_score, X, opts.keep, y=y[pos], seed=opts.seed)
        model.manifest.novelty = model.novelty.summary()
    except OptionError as e:
        notes.append(f"no open-set score ('not one of my classes'): {e}")


def train_out_of_core(
    store_path: str | os.PathLike[str],
    opts: TrainOptions = TrainOptions(),  # noqa: B008
    stream: StreamOptions = StreamOptions(),  # noqa: B008
) -> TrainResult:
    """Like :func:`classify.train`, reading the features a block at a time (see module docstring);
    the result's predictions, truth and paths feed the same report as in memory."""
    if opts.cv or opts.refit_all:
        raise OptionError("--cv and --refit-all train in memory; drop --out-of-core")
    if opts.class_thresholds:
        raise OptionError(
            "--class-thresholds are tuned on out-of-fold posteriors, which out of core has "
            "none of; drop --out-of-core"
        )
    store = FeatureStore(store_path)
    data = stream_dataset(
        store_path, default_backbones(store, opts.backbones), label=opts.label, status=opts.status
    )
    plan = prepare(store_path, data, opts)
    est, y, ev, ev_name, notes = plan.estimator, plan.y, plan.eval, plan.eval_split, plan.notes
    tr = np.flatnonzero(plan.train)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if _streams(opts) and opts.head == "lr":
            est = _fit_lr(data, tr, y, opts, stream)
            notes.append(f"streamed {len(tr)} training images, {stream.epochs} passes (log loss)")
        elif _streams(opts):
            est = _fit_centroid(data, tr, y, opts.label, stream)
            notes.append(f"streamed {len(tr)} training images (class means)")
        else:
            sub = _subsample(tr, data.codes(opts.label)[0], stream.subsample, opts.seed)
            pos, X = _read(data, sub, stream.memory_mb * 4)
            est.fit(X, y[pos])
            notes.append(
                f"head {opts.head!r} cannot stream: trained on a seeded sample of {len(sub)} of {len(tr)} training images"
            )
    fit_seconds = time.perf_counter() - t0
    model = Model(est, model_manifest(store, data, opts, plan.taxonomy, plan.levels, est, ev_name))
    _open_set(model, data, tr, y, opts, stream, notes)
    ev_idx = _subsample(np.flatnonzero(ev), data.codes(opts.label)[0], stream.max_eval, opts.seed)
    if len(ev_idx) < ev.sum():
        notes.append(f"scored a seeded sample of {len(ev_idx)} of {int(ev.sum())} {ev_name} images")
    pos, pred = _predict(model, data, ev_idx, stream.memory_mb)
    train_counts = counted(*data.classes(opts.label, tr))
    metrics = scored(model, y[pos], pred, train_counts)
    model.manifest.metrics = summary(metrics)
    model.manifest.train_counts = train_counts
    model.manifest.fit_seconds = fit_seconds
    model.manifest.out_of_core = {
        "memory_mb": stream.memory_mb,
        "epochs": stream.epochs,
        "subsample": stream.subsample,
    }
    r = TrainResult(model, metrics, fit_seconds, len(tr), len(pos), ev_name, None, notes)
    r.truth, r.paths = y[pos], data.paths.take(pos)
    return r
