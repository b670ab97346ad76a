"""One-vs-rest with per-class decision thresholds and an "unknown" outcome.

Plankton samples always hold classes nobody labelled. A softmax head must pick one of the known
classes; here each class has its own binary model and threshold, and an image that passes no
threshold is reported as unknown instead of being forced into the nearest class.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

UNKNOWN = "unknown"


def best_f1_threshold(scores: np.ndarray, positive: np.ndarray) -> float:
    """The score threshold that maximises F1 of ``scores >= t`` against the boolean ``positive``."""
    order = np.argsort(-scores, kind="stable")
    s, pos = scores[order], positive[order].astype(np.int64)
    tp = np.cumsum(pos)
    k = np.arange(1, len(s) + 1)  # predicted positives when cutting after each rank
    f1 = 2 * tp / (k + pos.sum())
    last_of_tie = np.r_[s[1:] != s[:-1], True]  # a cut can only fall between distinct scores
    f1 = np.where(last_of_tie, f1, -1.0)
    return float(s[int(np.argmax(f1))]) if pos.any() else 1.0


def valid_threshold(t: object) -> bool:
    """'f1', or a probability strictly between 0 and 1 (outside it, all or no images pass)."""
    if isinstance(t, str):
        return t == "f1"
    try:
        return 0.0 < float(t) < 1.0  # NaN fails both comparisons
    except (TypeError, ValueError):
        return False


class ThresholdedOneVsRest(ClassifierMixin, BaseEstimator):
    """One binary ``estimator`` per class; predicts a class only if its score passes its threshold.

    Parameters
    ----------
    estimator : binary classifier with ``predict_proba`` (default: logistic regression).
    thresholds : "f1" picks each class's threshold to maximise its F1 on out-of-fold scores
        (``cv`` folds, one extra fit per fold); a float uses that probability for every class.
    unknown : the label predicted when no class passes.
    n_jobs : parallel binary fits (``OneVsRestClassifier``).
    """

    def __init__(
        self,
        estimator: BaseEstimator | None = None,
        *,
        thresholds: str | float = "f1",
        unknown: str = UNKNOWN,
        cv: int = 3,
        n_jobs: int | None = None,
    ):
        self.estimator = estimator
        self.thresholds = thresholds
        self.unknown = unknown
        self.cv = cv
        self.n_jobs = n_jobs

    def _ovr(self) -> OneVsRestClassifier:
        from sklearn.linear_model import LogisticRegression

        base = self.estimator if self.estimator is not None else LogisticRegression(C=0.1)
        return OneVsRestClassifier(clone(base), n_jobs=self.n_jobs)

    def fit(self, X, y) -> ThresholdedOneVsRest:
        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError(
                f"one-vs-rest needs at least 2 classes; got one class: {self.classes_.tolist()}"
            )
        if not valid_threshold(self.thresholds):
            raise ValueError(
                f"thresholds must be 'f1' or a probability strictly between 0 and 1, "
                f"not {self.thresholds!r} (outside it every image is 'unknown', or none is)"
            )
        self.ovr_ = self._ovr().fit(X, y)
        if self.thresholds == "f1":
            oof = self._out_of_fold_scores(X, y)
            self.thresholds_ = np.array(
                [best_f1_threshold(oof[:, k], y == c) for k, c in enumerate(self.classes_)]
            )
        else:
            self.thresholds_ = np.full(len(self.classes_), float(self.thresholds))
        return self

    def _out_of_fold_scores(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Scores of each training image from models that did not see it (for honest thresholds)."""
        _, counts = np.unique(y, return_counts=True)
        folds = max(2, min(self.cv, int(counts.min())))
        split = StratifiedKFold(folds, shuffle=True, random_state=0)
        if counts.min() < 2:
            split = KFold(folds, shuffle=True, random_state=0)
        oof = np.zeros((len(y), len(self.classes_)))
        for tr, te in split.split(X, y):
            if len(np.unique(y[tr])) < len(self.classes_):
                continue  # a class absent from this fold's training part: leave its scores at 0
            oof[te] = _raw_scores(self._ovr().fit(X[tr], y[tr]), X[te])
        return oof

    def scores(self, X) -> np.ndarray:
        """(n, n_classes) independent per-class probabilities (rows need not sum to one)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return _raw_scores(self.ovr_, X)

    def predict_proba(self, X) -> np.ndarray:
        """(n, n_classes) per-class scores normalised to sum to one (for top-k and calibration)."""
        s = self.scores(X)
        total = s.sum(axis=1, keepdims=True)
        return np.divide(s, total, out=np.full_like(s, 1 / s.shape[1]), where=total > 0)

    def predict(self, X) -> np.ndarray:
        """The best class that passes its threshold, else ``unknown``."""
        s = self.scores(X)
        passed = np.where(s >= self.thresholds_, s, -np.inf)
        best = np.argmax(passed, axis=1)
        known = np.isfinite(passed[np.arange(len(s)), best])
        out = self.classes_[best]
        if not known.all():
            out = out.astype(object)
            out[~known] = self.unknown
        return out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        return tags


def _raw_scores(ovr: OneVsRestClassifier, X: np.ndarray) -> np.ndarray:
    """Each binary model's own P(class), before OneVsRestClassifier renormalises them."""
    s = np.column_stack([e.predict_proba(X)[:, -1] for e in ovr.estimators_])
    return np.column_stack([1 - s[:, 0], s[:, 0]]) if s.shape[1] == 1 else s
