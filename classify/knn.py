"""A k-nearest-neighbour classifier on a faiss index: the neighbour search of `penult neighbors`
turned into a head that is trained, saved and evaluated like the others."""

from __future__ import annotations

import faiss
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data


class FaissKNeighborsClassifier(ClassifierMixin, BaseEstimator):
    """Vote of the ``n_neighbors`` nearest training vectors (exact faiss search).

    ``metric``: "cosine" (L2-normalised inner product) or "l2". ``weights``: "uniform", or
    "distance" (cosine: weight = similarity; l2: 1 / distance).
    """

    def __init__(self, n_neighbors: int = 1, *, metric: str = "cosine", weights: str = "uniform"):
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.weights = weights

    def _vectors(self, X: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(X, dtype=np.float32)
        if self.metric == "cosine":
            x = x.copy()
            faiss.normalize_L2(x)
        return x

    def fit(self, X, y) -> FaissKNeighborsClassifier:
        if self.metric not in ("cosine", "l2") or self.weights not in ("uniform", "distance"):
            raise ValueError(
                f"metric must be cosine or l2 and weights uniform or distance, not {self.metric!r}/{self.weights!r}"
            )
        if int(self.n_neighbors) < 1:
            raise ValueError(f"n_neighbors must be >= 1, got {self.n_neighbors}")
        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        self.classes_, self.y_ = np.unique(y, return_inverse=True)
        self.X_ = self._vectors(X)  # the index is rebuilt from these (a faiss object is not saved)
        return self

    def kneighbors(self, X) -> tuple[np.ndarray, np.ndarray]:
        """(n, k) scores and training-row indices of the nearest neighbours."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        index = (faiss.IndexFlatIP if self.metric == "cosine" else faiss.IndexFlatL2)(
            self.X_.shape[1]
        )
        index.add(self.X_)
        return index.search(self._vectors(X), min(int(self.n_neighbors), len(self.X_)))

    def predict_proba(self, X) -> np.ndarray:
        scores, idx = self.kneighbors(X)
        if self.weights == "uniform":
            w = np.ones_like(scores)
        elif self.metric == "cosine":
            w = np.clip(scores, 1e-6, None)
        else:
            w = 1.0 / np.maximum(np.sqrt(np.maximum(scores, 0)), 1e-6)
        proba = np.zeros((len(idx), len(self.classes_)))
        np.add.at(
            proba, (np.repeat(np.arange(len(idx)), idx.shape[1]), self.y_[idx].ravel()), w.ravel()
        )
        return proba / proba.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]
