"""From per-image posteriors to class proportions in a sample, corrected for prior shift.

A classifier trained on one class mix and applied to a sample with another (every real sample)
over-counts rare classes and under-counts common ones when its answers are simply counted
("classify and count", CC). The quantification literature corrects this from what training can
measure: adjusted classify-and-count (ACC) and its probabilistic form (PACC) invert the rates at
which each class is taken for each other, measured on out-of-fold predictions of the training
images; EM prior adjustment (EMQ, Saerens-Latinne-Decaestecker) re-weights the posteriors from
the training prior to the sample's. The adjustments are QuaPy's; penult hands it the posteriors
and the :class:`Calibration` that training measured.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from penult.core.errors import OptionError

__all__ = ["METHODS", "Calibration", "Estimate", "OutOfFold", "Tally", "proportions"]

METHODS = ("cc", "pcc", "acc", "pacc", "emq")


@dataclass
class Calibration:
    """What a quantifier needs from training, in the model's class order: the training
    prior, and from out-of-fold predictions P(predicted i | true j) (``hard_rates``) and the
    mean posterior of class i over images of class j (``soft_rates``)."""

    classes: list[str]
    prior: np.ndarray  # (c,)
    hard_rates: np.ndarray  # (c, c): [i, j] = P(predicted i | true j)
    soft_rates: np.ndarray  # (c, c): [i, j] = mean posterior of i over images of class j
    folds: int
    images: int

    def to_json(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "prior": np.round(self.prior, 8).tolist(),
            "hard_rates": np.round(self.hard_rates, 6).tolist(),  # 121 classes: 0.3 MB of JSON
            "soft_rates": np.round(self.soft_rates, 6).tolist(),
            "folds": self.folds,
            "images": self.images,
        }

    def coarsen(self, groups: Sequence[str], names: Sequence[str]) -> Calibration:
        """The calibration at a coarser level: class i belongs to group ``groups[i]``, one of
        ``names`` (the new class order). Rates are summed over the classes of the predicted
        group and averaged, weighted by the training prior, over those of the true group."""
        col = {g: k for k, g in enumerate(names)}
        G = np.zeros((len(self.classes), len(names)))
        G[np.arange(len(self.classes)), [col[g] for g in groups]] = 1.0
        prior = G.T @ self.prior
        share = np.where(prior > 0, prior, 1.0)

        def rates(r: np.ndarray) -> np.ndarray:
            return (G.T @ (r * self.prior) @ G) / share  # [g, h]: P(predicted g | true h)

        return Calibration(
            classes=list(names),
            prior=prior,
            hard_rates=rates(self.hard_rates),
            soft_rates=rates(self.soft_rates),
            folds=self.folds,
            images=self.images,
        )

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Calibration:
        return cls(
            classes=[str(c) for c in d["classes"]],
            prior=np.asarray(d["prior"], float),
            hard_rates=np.asarray(d["hard_rates"], float),
            soft_rates=np.asarray(d["soft_rates"], float),
            folds=int(d["folds"]),
            images=int(d["images"]),
        )


@dataclass
class OutOfFold:
    """Each training image's posteriors from a fold model that did not see it, in the order of
    ``classes``; ``truth`` indexes ``classes``. What calibrates counts, the msp open-set
    threshold and per-class thresholds."""

    posteriors: np.ndarray  # (n, c)
    truth: np.ndarray  # (n,)
    classes: np.ndarray
    folds: int

    @classmethod
    def of(
        cls,
        estimator: Any,
        X: np.ndarray,
        y: np.ndarray,
        *,
        folds: int = 5,
        seed: int = 0,
        n_jobs: int | None = None,
    ) -> OutOfFold:
        """Out-of-fold posteriors of clones of ``estimator`` (an unfitted scikit-learn
        classifier with ``predict_proba``) on the training images ``X``, ``y``: stratified
        folds, fewer where a class has fewer images, fitted in parallel."""
        from sklearn.model_selection import StratifiedKFold, cross_validate

        classes, counts = np.unique(np.asarray(y).astype(str), return_counts=True)
        k = int(min(folds, counts.min()))
        if k < 2:
            raise OptionError(
                f"quantifier calibration needs two images of every class; "
                f"{str(classes[counts.argmin()])!r} has one"
            )
        split = StratifiedKFold(k, shuffle=True, random_state=seed)
        # cross_validate, not cross_val_predict: that one hands the estimator integer-coded
        # labels, which a hierarchical head cannot look up in its taxonomy
        fitted = cross_validate(
            estimator, X, y, cv=split, n_jobs=n_jobs, scoring=_no_score,
            return_estimator=True, return_indices=True,
        )  # fmt: skip
        post = np.zeros((len(y), len(classes)))
        for est, test in zip(fitted["estimator"], fitted["indices"]["test"], strict=True):
            cols = np.searchsorted(classes, np.asarray(est.classes_).astype(str))
            post[np.ix_(test, cols)] = est.predict_proba(X[test])
        truth = np.searchsorted(classes, np.asarray(y).astype(str))
        return cls(post, truth, classes, k)

    def calibration(self) -> Calibration:
        c = len(self.classes)
        counts = np.bincount(self.truth, minlength=c)
        hard = np.zeros((c, c))
        soft = np.zeros((c, c))
        np.add.at(hard, (self.posteriors.argmax(1), self.truth), 1.0)
        for j in range(c):
            soft[:, j] = self.posteriors[self.truth == j].mean(0)
        return Calibration(
            classes=self.classes.tolist(),
            prior=counts / counts.sum(),
            hard_rates=hard / counts,
            soft_rates=soft,
            folds=self.folds,
            images=len(self.truth),
        )


def _no_score(estimator: Any, X: np.ndarray, y: np.ndarray) -> float:
    return 0.0  # the folds are kept for their posteriors, not scored


def proportions(
    posteriors: np.ndarray, method: str, calibration: Calibration | None = None
) -> np.ndarray:
    """The class proportions of one sample (sums to 1) from its images' (n, c) posteriors,
    by ``method``: cc, pcc (no calibration needed), acc, pacc or emq. QuaPy, which EMQ runs
    on, is imported on its first use: it loads torch (seconds)."""
    check_method(method, calibration)
    post = np.asarray(posteriors, float)
    if len(post) == 0:
        return np.full(post.shape[1], np.nan)
    cc = np.bincount(post.argmax(1), minlength=post.shape[1]) / len(post)
    return estimate(method, cc, post.mean(0), post, calibration)


def check_method(method: str, calibration: Calibration | None) -> None:
    if method not in METHODS:
        raise OptionError(f"quantification method {method!r} not one of {', '.join(METHODS)}")
    if method not in ("cc", "pcc") and calibration is None:
        raise OptionError(f"--method {method} needs the model's quantifier calibration")


def estimate(
    method: str,
    cc: np.ndarray,
    pcc: np.ndarray,
    posteriors: np.ndarray | None,
    calibration: Calibration | None,
) -> np.ndarray:
    """The proportions from what a sample's images sum to: the share the classifier gives each
    class (``cc``), the mean posterior (``pcc``), and for emq the (n, c) posteriors."""
    if method == "cc":
        return cc
    if method == "pcc":
        return pcc
    c = len(cc)
    if len(calibration.classes) != c:
        raise OptionError(
            f"the calibration has {len(calibration.classes)} classes, the posteriors {c}"
        )
    if method == "emq":
        from quapy.method.aggregative import EMQ

        return EMQ.EM(calibration.prior, np.asarray(posteriors, float))[0]
    rates, q = (calibration.hard_rates, cc) if method == "acc" else (calibration.soft_rates, pcc)
    return adjust(rates, q)


def adjust(rates: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The proportions p on the simplex that best explain the observed shares q = rates @ p
    (least squares, p >= 0, sum 1). The objective of QuaPy's ``ACC.solve_adjustment(...,
    solver="minimize")``, solved by scipy's non-negative least squares with the sum as a heavily
    weighted extra row: 1.4 ms instead of 190-630 ms for 121 classes (the bootstrap solves it
    hundreds of times per sample); the answers agree to 1e-4."""
    from scipy.optimize import nnls

    c = len(q)
    w = 100.0
    p, _ = nnls(np.vstack([rates, np.full(c, w)]), np.append(q, w))
    total = p.sum()
    return p / total if total > 0 else np.asarray(q, float)


@dataclass
class Estimate:
    """One sample's composition: per class, and last "unclassified", the images the classifier
    gave it (``counts``), the estimated share of the sample's scored images (``proportion``) and
    its 95% bootstrap interval (NaN without a bootstrap)."""

    images: int
    counts: np.ndarray  # (c + 1,)
    proportion: np.ndarray  # (c + 1,)
    low: np.ndarray
    high: np.ndarray
    notes: list[str] = field(default_factory=list)


class Tally:
    """One sample's images, streamed in (constant memory in their number): exact counts and
    posterior sums, plus a uniform random subset of at most ``keep`` images (reservoir sampling)
    for what needs images one by one: EM and the bootstrap. Up to ``keep`` images (the usual
    sample) that subset is every image and every estimate is exact; above it, EMQ runs on the
    subset (its sampling error is a fraction of the interval's width) and the bootstrap draws
    ``keep`` of ``n`` (an m-out-of-n bootstrap, the spread scaled by sqrt(keep / n))."""

    def __init__(self, classes: int, keep: int, rng: np.random.Generator, expected: int = 0):
        self.c, self.keep, self.rng = classes, keep, rng
        self.n = 0
        self.wins = np.zeros(classes + 1, np.int64)  # images counted per class; last: unclassified
        self.raw = np.zeros(classes + 1, np.int64)  # the same before class thresholds
        self.sums = np.zeros(classes)
        cap = min(keep, expected) if expected else min(keep, 1024)
        self._post = np.empty((cap, classes), np.float32)
        self._win = np.empty(cap, np.int32)

    @property
    def kept(self) -> int:
        return min(self.n, self.keep)

    def add(
        self, posteriors: np.ndarray, winners: np.ndarray, below: np.ndarray | None = None
    ) -> None:
        """(k, c) posteriors and each image's class index, -1 for "not one of my classes" (its
        posteriors are then not summed: it is left out of the classes' estimates); ``below``:
        the winner's posterior is under its class threshold (not counted for the class, nor
        by cc; the other methods, which correct for confusion themselves, still use it)."""
        win = np.asarray(winners, np.int32)
        post = np.asarray(posteriors, np.float32)
        known = win >= 0
        # the reservoir keeps both answers in one code: -2 - w for class w below its threshold
        code = win if below is None else np.where(known & below, -win - 2, win)
        self.raw += _counted(win, self.c)
        self.wins += _counted(code, self.c)
        self.sums += post[known].sum(0, dtype=np.float64)
        start, k = self.n, len(code)
        fill = max(0, min(k, self.keep - start))
        if fill:
            self._grow(start + fill)
            self._post[start : start + fill] = post[:fill]
            self._win[start : start + fill] = code[:fill]
        if fill < k:  # Algorithm R: image t replaces a random slot with probability keep / (t+1)
            t = start + np.arange(fill, k)
            slot = (self.rng.random(len(t)) * (t + 1)).astype(np.int64)
            hit = np.flatnonzero(slot < self.keep)
            if len(hit):  # a slot hit twice keeps the later image, as the sequential loop does
                last = len(hit) - 1 - np.unique(slot[hit][::-1], return_index=True)[1]
                self._post[slot[hit[last]]] = post[fill + hit[last]]
                self._win[slot[hit[last]]] = code[fill + hit[last]]
        self.n += k

    def _grow(self, rows: int) -> None:
        if rows > len(self._win):
            size = min(self.keep, max(rows, 2 * len(self._win)))
            post = np.empty((size, self.c), np.float32)
            win = np.empty(size, np.int32)
            post[: self.kept], win[: self.kept] = self._post[: self.kept], self._win[: self.kept]
            self._post, self._win = post, win

    def estimate(
        self, method: str, calibration: Calibration | None, bootstrap: int = 0
    ) -> Estimate:
        """The sample's composition by ``method``, with a 95% percentile interval from
        ``bootstrap`` resamples of its images (0: none), widened by one image either side."""
        c = self.c
        nan = np.full(c + 1, np.nan)
        if self.n == 0:
            return Estimate(0, self.wins.copy(), nan, nan.copy(), nan.copy())
        post, win = self._post[: self.kept], self._win[: self.kept]
        notes: list[str] = []
        known = self.n - int(self.raw[c])
        if method == "cc":  # exact: the images counted (above their class thresholds)
            point = self.wins / self.n
        elif method == "emq" or known == 0:
            point = _shares(post, win, method, calibration, c)
        else:  # exact, from every image's sums
            cc, pcc = self.raw[:c] / known, self.sums / known
            point = _with_unclassified(estimate(method, cc, pcc, None, calibration), known, self.n)
        if self.n > self.kept and method == "emq":
            notes.append(f"EM ran on a random {self.kept} of the sample's {self.n} images")
        if not bootstrap:
            return Estimate(self.n, self.wins.copy(), point, nan, nan.copy(), notes)
        reps = np.empty((bootstrap, c + 1))
        m = self.kept
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for b in range(bootstrap):
                idx = self.rng.integers(0, m, m)
                reps[b] = _shares(post[idx], win[idx], method, calibration, c)
        if any("converge" in str(w.message) for w in caught):
            notes.append("EM did not converge on some bootstrap resamples")
        low, high = np.percentile(reps, [2.5, 97.5], axis=0)
        if m < self.n:  # m-out-of-n: the spread of m-image estimates, scaled to n images
            centre = _shares(post, win, method, calibration, c)
            scale = np.sqrt(m / self.n)
            low, high = point + scale * (low - centre), point + scale * (high - centre)
            notes.append(f"interval from resamples of {m} of the sample's {self.n} images")
        # one image either side (a continuity correction): a class the sample shows in 0 or 1
        # images otherwise gets a zero-width interval that misses the truth whenever the
        # classifier confused one image (ndsb_plankton: 73% of intervals held it, 93% with it)
        low = np.clip(np.minimum(low, point) - 1 / self.n, 0, 1)
        high = np.clip(np.maximum(high, point) + 1 / self.n, 0, 1)
        return Estimate(self.n, self.wins.copy(), point, low, high, notes)


def _shares(
    post: np.ndarray, code: np.ndarray, method: str, calibration: Calibration | None, c: int
) -> np.ndarray:
    """(c + 1,) shares of a set of images (last: unclassified): for cc the images counted,
    else the classes' proportions among the images of one of the classes, times their share.
    ``code``: the class, -1 for "not one of my classes", -2 - class below its threshold."""
    if method == "cc":
        return _counted(code, c) / len(code)
    win = np.where(code <= -2, -code - 2, code)
    known = win >= 0
    k = int(known.sum())
    if k == 0:
        return np.append(np.zeros(c), 1.0)
    p_known = post[known].astype(np.float64)
    cc = np.bincount(win[known], minlength=c) / k
    p = estimate(method, cc, p_known.mean(0), p_known, calibration)
    return _with_unclassified(p, k, len(win))


def _counted(code: np.ndarray, c: int) -> np.ndarray:
    """(c + 1,) images per class, the last those given none (any negative code)."""
    return np.bincount(np.where(code >= 0, code, c), minlength=c + 1)


def _with_unclassified(p: np.ndarray, known: int, n: int) -> np.ndarray:
    """(c + 1,) shares of ``n`` images: proportions ``p`` among the ``known`` ones, scaled to
    their share, then the share of the rest."""
    return np.append(p * (known / n), 1 - known / n)
