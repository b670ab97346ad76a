"""Open-set scores: "not one of my classes" for every model, with a calibrated threshold.

A closed-set classifier gives every image one of its classes, however unlike the training
images it is (a diatom chain from another imager scored as ``Tripos`` at 0.95). An open-set
score says how unlike: ``knn``, the cosine distance from the image's embedding to its k-th
nearest training embedding (faiss; the embeddings L2-normalised and reduced by PCA, stored in
the model), or ``msp``, one minus the model's highest posterior. Above a threshold the image is
"unknown". The threshold is calibrated on held-out known images to keep a target share of them
(``--keep 0.95``): for ``knn`` each training image scored against the others (leave one out),
for ``msp`` the out-of-fold posteriors that calibrate the counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from penult.core.errors import OptionError

__all__ = ["SCORES", "Novelty", "fit_novelty"]

SCORES = ("knn", "msp")


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
    _index: Any = None

    def scores(self, X: np.ndarray, proba: np.ndarray) -> np.ndarray:
        """(n,) how unlike the training images each image is (higher: more novel)."""
        if self.score == "msp":
            return 1.0 - np.asarray(proba).max(1)
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
        return out

    def summary(self) -> dict[str, Any]:
        """What the manifest says about it (no arrays)."""
        out = {k: v for k, v in self.payload().items() if not isinstance(v, np.ndarray)}
        if self.reference is not None:
            out["reference"] = list(self.reference.shape)
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
        )


def _project(X: np.ndarray, center: np.ndarray, components: np.ndarray) -> np.ndarray:
    """L2-normalise, project onto the principal components, L2-normalise again."""
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    Z = (X - center) @ components.T
    return Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)


def fit_novelty(
    score: str,
    X: np.ndarray,
    keep: float,
    *,
    out_of_fold: np.ndarray | None = None,
    k: int = 10,
    dims: int = 128,
    reference: int = 20_000,
    seed: int = 0,
) -> Novelty:
    """The open-set score ``score`` for a model fitted on ``X``, its threshold set to keep
    ``keep`` of held-out known images: ``msp`` needs the ``out_of_fold`` posteriors of ``X``;
    ``knn`` scores each training image against the others. At most ``reference`` training
    images (a seeded random subset of larger sets) are stored, ``dims`` dimensions each."""
    if score not in SCORES:
        raise OptionError(f"unknown score {score!r}: one of {', '.join(SCORES)}")
    if not 0 < keep < 1:
        raise OptionError(f"--keep {keep}: a share of known images between 0 and 1")
    if score == "msp":
        if out_of_fold is None:
            raise OptionError("the msp score is calibrated on out-of-fold posteriors (folds 0?)")
        s = 1.0 - np.asarray(out_of_fold).max(1)
        return Novelty("msp", float(np.quantile(s, keep)), keep, images=len(s))
    from sklearn.decomposition import PCA

    X = np.asarray(X, np.float32)
    if len(X) > reference:
        X = X[np.sort(np.random.default_rng(seed).choice(len(X), reference, replace=False))]
    Xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    p = int(min(dims, Xn.shape[1], len(Xn) - 1))
    pca = PCA(p, random_state=seed).fit(Xn)
    center, components = pca.mean_.astype(np.float32), pca.components_.astype(np.float32)
    ref = _project(X, center, components).astype(np.float16)
    nov = Novelty("knn", 0.0, keep, k=k, center=center, components=components, reference=ref)
    # leave one out: the nearest hit of a training image is itself, so take the (k+1)-th
    s = 1.0 - nov._similarity(ref.astype(np.float32), k + 1)
    nov.threshold, nov.images = float(np.quantile(s, keep)), len(s)
    return nov
