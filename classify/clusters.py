"""Labelling many unlabelled images at once: clusters, then growing each class (MorphoCluster's
way, Schröder et al. 2020).

1. **Clusters**: HDBSCAN (scikit-learn's) on the unlabelled images' embeddings, L2-normalised
   and PCA-reduced; clusters largest first, members most typical first (HDBSCAN's membership
   strength). A person names a cluster whose members are one taxon: one action labels all its
   members. Leaf clusters (the finest HDBSCAN keeps), not the default "excess of mass" ones:
   on cub100 the latter made a 366-image cluster whose 30 most typical members are one species
   and whose whole is 14% that species; leaf clusters are smaller and purer. A cluster is
   judged by ``spread`` members (from most to least typical), never by its core alone.
2. **Grow**: for a class, the unlabelled images nearest to its validated images (cosine, the
   nearest one counts) are proposed a batch at a time; a person accepts the batch or rejects it.
   A reject is kept in the label history (``reject:<class>``), so those images are not proposed
   for that class again.

`benchmarks/cluster_labelling.py` measures images labelled per action and the labels' precision
with a scripted reviewer on cub100 with its labels hidden.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from penult.classify.csvout import SafeWriter, open_csv
from penult.classify.data import DataError
from penult.classify.train import default_backbones
from penult.core import atomic_path, check_out_folder
from penult.features import (
    PREDICTED,
    UNLABELLED,
    VALIDATED,
    FeatureStore,
    StoreWriter,
    current_user,
    review,
)

__all__ = [
    "ClusterSet", "Proposal", "find_clusters", "grow", "is_open", "reject", "spread", "write_clusters",
    "write_proposal",
]  # fmt: skip


@dataclass
class ClusterSet:
    """Unlabelled images grouped: ``members[k]`` are cluster k's paths, most typical first
    (clusters largest first); ``strength`` the matching membership strengths."""

    members: list[list[str]]
    strength: list[np.ndarray]
    rows: list[np.ndarray]  # the members' table rows (rows are never renumbered)
    unclustered: int  # images HDBSCAN calls noise
    images: int  # unlabelled images looked at


def is_open(status: np.ndarray) -> np.ndarray:
    """Per status code: no validated or dubious label yet (unlabelled, or only predicted)."""
    return np.isin(status, (UNLABELLED, PREDICTED))


def _open_rows(store: FeatureStore, level: str, backbone: str) -> np.ndarray:
    """Table rows of images without a validated label (unlabelled or predicted) that have an
    embedding, sorted."""
    status = store.provenance(level).status if level in store.label_columns() else None
    valid = store.valid(backbone)
    keep = valid if status is None else valid & is_open(status)
    return np.flatnonzero(keep)


def _unit(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def find_clusters(
    store_path: str | os.PathLike[str],
    *,
    level: str = "label",
    backbone: str | None = None,
    min_size: int = 5,
    pca: int = 64,
    seed: int = 0,
    method: str = "leaf",
) -> ClusterSet:
    """HDBSCAN clusters of the store's unlabelled images (see the module docstring)."""
    from sklearn.cluster import HDBSCAN
    from sklearn.decomposition import PCA

    store = FeatureStore(store_path)
    name = default_backbones(store, (backbone,) if backbone else ())[0]
    rows = _open_rows(store, level, name)
    if len(rows) < 2 * min_size:
        raise DataError(f"{store.path}: {len(rows)} unlabelled images, too few to cluster")
    Z = _unit(store.embeddings(name, rows))
    if pca and pca < min(Z.shape):
        Z = _unit(PCA(pca, svd_solver="randomized", random_state=seed).fit_transform(Z))
    with warnings.catch_warnings():  # sklearn 1.8 warns that the default of copy will change
        warnings.simplefilter("ignore", FutureWarning)
        h = HDBSCAN(min_cluster_size=min_size, cluster_selection_method=method).fit(Z)
    paths = np.asarray(store.paths(rows), dtype=object)
    ids = h.labels_
    sizes = np.bincount(ids[ids >= 0]) if (ids >= 0).any() else np.zeros(0, int)
    members, strength, member_rows = [], [], []
    for k in np.argsort(-sizes, kind="stable"):
        m = np.flatnonzero(ids == k)
        m = m[np.argsort(-h.probabilities_[m], kind="stable")]
        members.append(paths[m].tolist())
        strength.append(h.probabilities_[m])
        member_rows.append(rows[m])
    return ClusterSet(members, strength, member_rows, int((ids < 0).sum()), len(rows))


def spread(members: list, n: int) -> list:
    """``n`` members evenly spaced from the most typical to the least (all when fewer): what a
    person judges a cluster by, since a cluster's core can be one taxon and its rim another."""
    if len(members) <= n:
        return list(members)
    return [members[i] for i in np.unique(np.linspace(0, len(members) - 1, n).round().astype(int))]


def write_clusters(cs: ClusterSet, out: str | os.PathLike[str]) -> None:
    """CSV: cluster (1 = largest), size, rank in the cluster (1 = most typical), path, strength."""
    out = Path(out)
    check_out_folder(out)
    with atomic_path(out) as tmp, open_csv(tmp) as f:
        w = SafeWriter(f)
        w.writerow(("cluster", "size", "rank", "path", "strength"))
        for k, (paths, st) in enumerate(zip(cs.members, cs.strength, strict=True), 1):
            for i, (p, s) in enumerate(zip(paths, st, strict=True), 1):
                w.writerow((k, len(paths), i, p, f"{s:.4f}"))


@dataclass
class Proposal:
    label: str
    paths: list[str]
    distance: np.ndarray  # cosine distance to the class's nearest validated image
    left: int  # unlabelled images not yet rejected for this class


def write_proposal(p: Proposal, out: str | os.PathLike[str]) -> None:
    """CSV: rank (1 = nearest), path, the class proposed, cosine distance."""
    out = Path(out)
    check_out_folder(out)
    with atomic_path(out) as tmp, open_csv(tmp) as f:
        w = SafeWriter(f)
        w.writerow(("rank", "path", "label", "distance"))
        for i, (q, d) in enumerate(zip(p.paths, p.distance, strict=True), 1):
            w.writerow((i, q, p.label, f"{d:.4f}"))


def rejected_rows(store: FeatureStore, label: str, level: str = "label") -> np.ndarray:
    """Rows proposed for ``label`` and rejected (and not un-rejected by an undo)."""
    h = store.history(["batch", "row", "column", "source"])
    mine = (h["source"].astype(str) == f"reject:{label}") & (h["column"].astype(str) == level)
    mine &= ~np.isin(h["batch"], list(review.undone_batches(h)))
    return np.unique(h["row"][mine])


def grow(
    store_path: str | os.PathLike[str],
    label: str,
    *,
    n: int = 20,
    level: str = "label",
    backbone: str | None = None,
) -> Proposal:
    """The ``n`` unlabelled images nearest to ``label``'s validated images, not rejected for it."""
    store = FeatureStore(store_path)
    name = default_backbones(store, (backbone,) if backbone else ())[0]
    codes, names = store.label_codes(level)
    if label not in names:
        raise DataError(f"{store.path} has no image labelled {label!r} to grow from")
    status = store.provenance(level).status
    proto = np.flatnonzero(
        (codes == names.index(label)) & (status == VALIDATED) & store.valid(name)
    )
    if not len(proto):
        raise DataError(f"{store.path}: no validated image of {label!r} to grow from")
    rows = np.setdiff1d(_open_rows(store, level, name), rejected_rows(store, label, level))
    P = _unit(store.embeddings(name, proto))
    near = np.empty(len(rows))
    step = max(1, (32 << 20) // (4 * max(len(proto), 1)))
    for a in range(0, len(rows), step):
        X = _unit(store.embeddings(name, rows[a : a + step]))
        near[a : a + step] = 1.0 - (X @ P.T).max(1)
    pick = np.sort(np.argsort(near, kind="stable")[:n])
    order = np.argsort(near[pick], kind="stable")
    paths = np.asarray(store.paths(rows[pick]), dtype=object)[order]
    return Proposal(label, paths.tolist(), near[pick][order], len(rows))


def reject(
    store_path: str | os.PathLike[str],
    paths: list[str],
    label: str,
    *,
    level: str = "label",
    who: str | None = None,
    publish: bool = True,
) -> None:
    """Remember that ``paths`` are not ``label`` (a history entry each; no label changes;
    ``publish=False``: journaled, as :func:`penult.features.review.move` says)."""
    if not paths:
        return
    with StoreWriter(store_path, publish=publish) as w:
        n = len(paths)
        w.review({level: (paths, [""] * n, [UNLABELLED] * n)}, who=who or current_user(),
                 source=f"reject:{label}", note_only=True)  # fmt: skip
