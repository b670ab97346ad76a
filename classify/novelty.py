"""Open-set scores: "not one of my classes" for every model, with a calibrated threshold.

A closed-set classifier gives every image one of its classes, however unlike the training
images it is (a diatom chain from another imager scored as ``Tripos`` at 0.95). An open-set
score says how unlike, from the image's embedding (L2-normalised, reduced by PCA fitted on the
training images):

- ``mahalanobis`` (the default): the distance to the nearest class mean under the classes'
  shared covariance (Ledoit-Wolf shrinkage);
- ``knn``: the cosine distance to the k-th nearest training embedding (faiss);
- ``msp``: one minus the model's highest posterior.

Above a threshold the image is "unknown". The threshold is calibrated on held-out known images
to keep a target share of them (``--keep 0.95``): ``mahalanobis`` scores each training image
with means and covariance fitted on the other folds, ``knn`` against the other images (leave
one out), ``msp`` by the out-of-fold posteriors that calibrate the counts. On ndsb_plankton
with 20 classes never seen, at 95% of known images kept, they flagged 19%, 12% and 8% of the
unseen classes' images (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from penult.core.errors import OptionError

__all__ = ["DEFAULT_SCORE", "SCORES", "Novelty", "fit_novelty"]

SCORES = ("mahalanobis", "knn", "msp")
DEFAULT_SCORE = "mahalanobis"


@dataclass
class Novelty:
    """A fitted open-set score: images scoring above ``threshold`` are "not one of my
    classes"; ``keep`` is the share of held-out known images the threshold kept."""

    score: str
    threshold: float
    keep: float
    k: int = 10
    images: int = 0  # the held-out known images the threshold was set on
    center: np.ndarray | None = None  # knn: (d,) mean the PCA subtracts
    components: np.ndarray | None = None  # knn: (p, d)
    reference: np.ndarray | None = None  # knn: (n, p) float16, L2-normalised
    means: np.ndarray | None = None  # mahalanobis: (classes, p)
    precision: np.ndarray | None = None  # mahalanobis: (p, p) inverse shared covariance
    _index: Any = None

    def scores(self, X: np.ndarray, proba: np.ndarray) -> np.ndarray:
        """(n,) how unlike the training images each image is (higher: more novel)."""
        if self.score == "msp":
            return 1.0 - np.asarray(proba).max(1)
        if self.score == "mahalanobis":
            Z = _reduce(np.asarray(X, np.float32), self.center, self.components)
            return _nearest_mean(Z, self.means, self.precision)
        return 1.0 - self._similarity(self._project(X), self.k)

    def unknown(self, X: np.ndarray, proba: np.ndarray) -> np.ndarray:
        return self.scores(X, proba) > self.threshold

    def _project(self, X: np.ndarray) -> np.ndarray:
        return _project(np.asarray(X, np.float32), self.center, self.components)

    def _similarity(self, Z: np.ndarray, k: int) -> np.ndarray:
        """Cosine similarity of each row of ``Z`` to its k-th nearest reference row."""
        import faiss

        if self._index is None:
            ref = np.ascontiguousarray(self.reference, dtype=np.float32)
            self._index = faiss.IndexFlatIP(ref.shape[1])
            self._index.add(ref)
        k = min(k, self._index.ntotal)
        sims, _ = self._index.search(np.ascontiguousarray(Z, dtype=np.float32), k)
        return sims[:, k - 1]

    def payload(self) -> dict[str, Any]:
        """What the model file stores (plain values and arrays: nothing skops must trust)."""
        out: dict[str, Any] = {
            "score": self.score, "threshold": float(self.threshold), "keep": float(self.keep),
            "k": int(self.k), "images": int(self.images),
        }  # fmt: skip
        if self.score == "knn":
            out.update(center=self.center, components=self.components, reference=self.reference)
        if self.score == "mahalanobis":
            out.update(center=self.center, components=self.components, means=self.means,
                       precision=self.precision)  # fmt: skip
        return out

    def summary(self) -> dict[str, Any]:
        """What the manifest says about it (no arrays)."""
        out = {k: v for k, v in self.payload().items() if not isinstance(v, np.ndarray)}
        if self.components is not None:
            out["dims"] = int(self.components.shape[0])
        if self.reference is not None:
            out["reference"] = int(self.reference.shape[0])
        return out

    @classmethod
    def from_payload(cls, d: dict[str, Any]) -> Novelty:
        def arr(key: str, dtype: Any) -> np.ndarray | None:
            v = d.get(key)
            return None if v is None else np.asarray(v, dtype)

        return cls(
            score=str(d["score"]),
            threshold=float(d["threshold"]),
            keep=float(d["keep"]),
            k=int(d.get("k", 10)),
            images=int(d.get("images", 0)),
            center=arr("center", np.float32),
            components=arr("components", np.float32),
            reference=arr("reference", np.float16),
            means=arr("means", np.float64),
            precision=arr("precision", np.float64),
        )


def _reduce(X: np.ndarray, center: np.ndarray, components: np.ndarray) -> np.ndarray:
    """L2-normalise, then project onto the principal components."""
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return (X - center) @ components.T


def _project(X: np.ndarray, center: np.ndarray, components: np.ndarray) -> np.ndarray:
    """:func:`_reduce`, then L2-normalise again (for cosine similarity)."""
    Z = _reduce(X, center, components)
    return Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)


def _pca(X: np.ndarray, dims: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.decomposition import PCA

    Xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    # randomized SVD with 2 power iterations (not 7): 2x faster, fitted 11 times per train
    p = int(min(dims, Xn.shape[1], len(Xn) - 1))
    pca = PCA(p, svd_solver="randomized", iterated_power=2, random_state=seed).fit(Xn)
    return pca.mean_.astype(np.float32), pca.components_.astype(np.float32)


def _gaussian(Z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the precision of the covariance they share (Ledoit-Wolf)."""
    from sklearn.covariance import LedoitWolf

    classes, inv = np.unique(y, return_inverse=True)
    means = np.zeros((len(classes), Z.shape[1]))
    np.add.at(means, inv, Z)
    means /= np.bincount(inv)[:, None]
    precision = LedoitWolf().fit(Z - means[inv]).precision_
    return means, precision


def _nearest_mean(Z: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each row of ``Z`` to the nearest class mean (float64:
    the expanded form cancels large terms, and float32 left training images 'unknown')."""
    Z, means, precision = (np.asarray(a, np.float64) for a in (Z, means, precision))
    A = Z @ precision
    d = (A * Z).sum(1)[:, None] - 2 * A @ means.T + ((means @ precision) * means).sum(1)[None]
    return np.maximum(d.min(1), 0.0)


def fit_novelty(
    score: str,
    X: np.ndarray,
    keep: float,
    *,
    y: np.ndarray | None = None,
    out_of_fold: np.ndarray | None = None,
    k: int = 10,
    dims: int | None = None,
    reference: int = 20_000,
    folds: int = 10,
    seed: int = 0,
) -> Novelty:
    """The open-set score ``score`` for a model fitted on ``X`` (labels ``y``), its threshold
    set to keep ``keep`` of held-out known images (see the module docstring): ``msp`` needs the
    ``out_of_fold`` posteriors of ``X``. At most ``reference`` training images (a seeded random
    subset of larger sets) are used, reduced to ``dims`` dimensions (default: one per 20
    training images, 8 to 128: principal directions fitted on few images overfit them, and new
    images then score unlike the held-out folds the threshold was set on)."""
    if score not in SCORES:
        raise OptionError(f"unknown open-set score {score!r}: one of {', '.join(SCORES)}")
    if not 0 < keep < 1:
        raise OptionError(f"--keep {keep}: a share of known images between 0 and 1")
    if score == "msp":
        if out_of_fold is None:
            raise OptionError(
                "the msp open-set score is calibrated on out-of-fold posteriors; "
                "--quantifier-folds 0 leaves none"
            )
        s = 1.0 - np.asarray(out_of_fold).max(1)
        return Novelty("msp", float(np.quantile(s, keep)), keep, images=len(s))
    X = np.asarray(X, np.float32)
    if dims is None:
        dims = int(np.clip(min(len(X), reference) // 20, 8, 128))
    if len(X) > reference:
        take = np.sort(np.random.default_rng(seed).choice(len(X), reference, replace=False))
        X, y = X[take], (None if y is None else np.asarray(y)[take])
    if score == "knn":
        center, components = _pca(X, dims, seed)
        ref = _project(X, center, components).astype(np.float16)
        nov = Novelty("knn", 0.0, keep, k=k, center=center, components=components, reference=ref)
        # leave one out: the nearest hit of a training image is itself, so take the (k+1)-th
        s = 1.0 - nov._similarity(ref.astype(np.float32), k + 1)
        nov.threshold, nov.images = float(np.quantile(s, keep)), len(s)
        return nov
    if y is None:
        raise OptionError("the mahalanobis open-set score needs the training labels")
    if len(X) < 20:
        raise OptionError(f"{len(X)} training images are too few to set its threshold on")
    y = np.asarray(y).astype(str)
    center, components = _pca(X, dims, seed)
    means, precision = _gaussian(_reduce(X, center, components), y)
    s = _held_out_distances(X, y, dims, folds, seed)
    return Novelty(
        "mahalanobis", float(np.quantile(s, keep)), keep, images=len(s),
        center=center, components=components, means=means, precision=precision,
    )  # fmt: skip


def _held_out_distances(X: np.ndarray, y: np.ndarray, dims: int, folds: int, seed: int):
    """Each training image's distance to the nearest class mean, with the PCA, means and
    covariance fitted on the other folds (a class absent from those folds has no mean there)."""
    from sklearn.model_selection import KFold

    s = np.zeros(len(X))
    for fit, held in KFold(min(folds, len(X)), shuffle=True, random_state=seed).split(X):
        center, components = _pca(X[fit], dims, seed)
        means, precision = _gaussian(_reduce(X[fit], center, components), y[fit])
        s[held] = _nearest_mean(_reduce(X[held], center, components), means, precision)
    return s
