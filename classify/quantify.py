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

from dataclasses import dataclass
from typing import Any

import numpy as np
from penult.core.errors import OptionError

__all__ = ["METHODS", "Calibration", "calibrate", "proportions"]

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


def calibrate(
    estimator: Any,
    X: np.ndarray,
    y: np.ndarray,
    *,
    folds: int = 5,
    seed: int = 0,
    n_jobs: int | None = None,
) -> Calibration:
    """Out-of-fold posteriors of clones of ``estimator`` (an unfitted scikit-learn classifier
    with ``predict_proba``) on the training images ``X``, ``y``: each image predicted by a
    model that did not see it (stratified folds, fewer where a class has fewer images)."""
    from sklearn.model_selection import StratifiedKFold, cross_validate

    classes, counts = np.unique(np.asarray(y).astype(str), return_counts=True)
    k = int(min(folds, counts.min()))
    if k < 2:
        raise OptionError(
            f"quantifier calibration needs two images of every class; {classes[counts.argmin()]!r} "
            "has one"
        )
    split = StratifiedKFold(k, shuffle=True, random_state=seed)
    # cross_validate, not cross_val_predict: that one hands the estimator integer-coded labels,
    # which a hierarchical head cannot look up in its taxonomy
    folds_fitted = cross_validate(
        estimator, X, y, cv=split, n_jobs=n_jobs, scoring=_no_score,
        return_estimator=True, return_indices=True,
    )  # fmt: skip
    c = len(classes)
    post = np.zeros((len(y), c))
    for est, test in zip(folds_fitted["estimator"], folds_fitted["indices"]["test"], strict=True):
        cols = np.searchsorted(classes, np.asarray(est.classes_).astype(str))
        post[np.ix_(test, cols)] = est.predict_proba(X[test])
    truth = np.searchsorted(classes, np.asarray(y).astype(str))
    hard = np.zeros((c, c))
    soft = np.zeros((c, c))
    np.add.at(hard, (post.argmax(1), truth), 1.0)
    for j in range(c):
        soft[:, j] = post[truth == j].mean(0)
    return Calibration(
        classes=classes.tolist(),
        prior=counts / counts.sum(),
        hard_rates=hard / counts,
        soft_rates=soft,
        folds=k,
        images=len(y),
    )


def _no_score(estimator: Any, X: np.ndarray, y: np.ndarray) -> float:
    return 0.0  # the folds are kept for their posteriors, not scored


def proportions(
    posteriors: np.ndarray, method: str, calibration: Calibration | None = None
) -> np.ndarray:
    """The class proportions of one sample (sums to 1) from its images' (n, c) posteriors,
    by ``method``: cc, pcc (no calibration needed), acc, pacc or emq. QuaPy, which the
    adjusted methods run on, is imported on their first use: it loads torch (seconds)."""
    if method not in METHODS:
        raise OptionError(f"quantification method {method!r} not one of {', '.join(METHODS)}")
    post = np.asarray(posteriors, float)
    c = post.shape[1]
    if len(post) == 0:
        return np.full(c, np.nan)
    cc = np.bincount(post.argmax(1), minlength=c) / len(post)
    if method == "cc":
        return cc
    pcc = post.mean(0)
    if method == "pcc":
        return pcc
    if calibration is None:
        raise OptionError(f"--method {method} needs the model's quantifier calibration")
    if len(calibration.classes) != c:
        raise OptionError(
            f"the calibration has {len(calibration.classes)} classes, the posteriors {c}"
        )
    from quapy.method.aggregative import ACC, EMQ

    if method == "emq":
        return EMQ.EM(calibration.prior, post)[0]
    rates, q = (calibration.hard_rates, cc) if method == "acc" else (calibration.soft_rates, pcc)
    p = ACC.solve_adjustment(rates, q, method="inversion", solver="minimize")
    p = np.clip(p, 0, None)
    return p / p.sum() if p.sum() > 0 else q
