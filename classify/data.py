"""Labelled feature matrices from a store: several backbones fused by content hash, a kept split.

Only ``features`` touches HDF5; this module turns what it returns into the arrays heads train on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from penult.classify.options import STATUS_CHOICES
from penult.core.errors import PenultError
from penult.core.labels import TEST, VAL
from penult.core.split import ensure_split as _stored_split
from penult.features import VALIDATED, FeatureStore, sha_hex

__all__ = [
    "CodedColumn",
    "DataError",
    "Dataset",
    "EVAL_SPLITS",
    "StoredStrings",
    "StreamingData",
    "ensure_split",
    "eval_mask",
    "fused_rows",
    "load_dataset",
    "stream_dataset",
]


log = logging.getLogger(__name__)

EVAL_SPLITS = (TEST, VAL)


class DataError(PenultError, ValueError):
    """The store cannot give a labelled data set as asked (missing backbone, label column, split...)."""


@dataclass
class Dataset:
    """Rows of the image table with features from every requested backbone.

    ``X`` is (n, sum of dims) float32, backbones concatenated in the order given. ``labels`` holds
    every label column restricted to these rows.
    """

    X: np.ndarray
    paths: list[str]
    sha256: list[str]
    labels: dict[str, np.ndarray]
    backbones: tuple[str, ...]
    fingerprints: dict[str, dict[str, Any]]
    dropped: int = 0  # labelled rows without features from every backbone
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(self.X.shape[1])

    def column(self, name: str) -> np.ndarray:
        if name not in self.labels:
            raise DataError(
                f"no label column {name!r}; the store has {', '.join(sorted(self.labels))}"
            )
        return self.labels[name]

    def classes(self, name: str, which: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(classes, images of each) of label column ``name`` over the rows ``which`` (a mask
        or positions; all rows when None), sorted as ``np.unique`` sorts them."""
        y = self.column(name)
        return np.unique(y if which is None else y[which], return_counts=True)

    def subset(self, mask: np.ndarray) -> Dataset:
        idx = np.flatnonzero(mask)
        return Dataset(
            X=self.X[idx],
            paths=[self.paths[i] for i in idx],
            sha256=[self.sha256[i] for i in idx],
            labels={k: v[idx] for k, v in self.labels.items()},
            backbones=self.backbones,
            fingerprints=self.fingerprints,
            notes=self.notes,
        )


def fused_rows(
    store: FeatureStore, backbones: list[str] | tuple[str, ...]
) -> tuple[list[np.ndarray], int]:
    """See :meth:`features.FeatureStore.fused_rows`; a bad backbone list is a DataError."""
    if not backbones or len(set(backbones)) != len(backbones):
        raise DataError(f"name each backbone once (got {list(backbones)}: one listed twice?)")
    return store.fused_rows(backbones)


def load_dataset(
    store_path: str | os.PathLike[str],
    backbones: list[str] | tuple[str, ...],
    *,
    label: str = "label",
    status: str = "validated",
) -> Dataset:
    """Every image with a non-empty ``label`` (validated, or any with ``status="all"``) and
    features from all ``backbones``, in memory."""
    s = stream_dataset(store_path, backbones, label=label, status=status)
    X = s.store.fused_embeddings(s.backbones, s.rows)
    return Dataset(
        X=X,
        paths=list(s.paths),
        sha256=list(s.sha256),
        labels={k: np.asarray(v) for k, v in s.labels.items()},  # in memory: as strings
        backbones=s.backbones,
        fingerprints=s.fingerprints,
        dropped=s.dropped,
        notes=s.notes,
    )


class StoredStrings(Sequence[str]):
    """The paths (or content hashes) of a data set's images, read from the store when asked,
    ``BLOCK`` rows at a time: a training set of ten million images never holds them all as
    Python strings (about 100 bytes each). ``take`` reads many at once."""

    BLOCK = 65536

    def __init__(self, store: FeatureStore, rows: np.ndarray, what: str):
        self.store, self.rows, self.what = store, rows, what

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        return self.take(np.asarray([i]))[0]

    def __iter__(self) -> Iterator[str]:
        for s in range(0, len(self), self.BLOCK):
            yield from self.take(np.arange(s, min(len(self), s + self.BLOCK)))

    def take(self, idx: Sequence[int] | np.ndarray) -> list[str]:
        """The strings at data-set positions ``idx``, in that order."""
        idx = np.asarray(idx, np.int64)
        out: list[str] = [""] * len(idx)
        for s in range(0, len(idx), self.BLOCK):
            part = idx[s : s + self.BLOCK]
            uniq, inv = np.unique(self.rows[part], return_inverse=True)
            got = self._read(uniq)
            for j, k in enumerate(inv.tolist()):
                out[s + j] = got[k]
        return out

    def _read(self, rows: np.ndarray) -> list[str]:
        if self.what == "path":
            return self.store.paths(rows)
        return sha_hex(self.store.hashes(rows))


class CodedColumn:
    """A label column kept as the store's codes (4 bytes a row) and its names: indexing decodes
    only the rows asked for, so a streamed training set of ten million images never holds its
    labels as strings (36 bytes a row for a nine-letter name). ``np.asarray`` decodes it all."""

    def __init__(self, codes: np.ndarray, names: np.ndarray):
        self.codes, self.names = codes, names

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i):
        return self.names[self.codes[i]]

    def __iter__(self) -> Iterator[str]:
        for s in range(0, len(self), StoredStrings.BLOCK):
            yield from self[s : s + StoredStrings.BLOCK].tolist()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.names[self.codes]
        return out if dtype is None else out.astype(dtype)

    @property
    def dtype(self) -> np.dtype:
        return self.names.dtype


@dataclass
class StreamingData:
    """A :class:`Dataset` without its feature matrix: features are read a block at a time,
    paths and hashes when asked (:class:`StoredStrings`), labels from their codes.

    ``rows[k]`` is the table row of each image in backbone ``k``'s embeddings (aligned).
    """

    store: FeatureStore
    rows: list[np.ndarray]
    paths: StoredStrings
    sha256: StoredStrings
    labels: dict[str, np.ndarray]
    backbones: tuple[str, ...]
    fingerprints: dict[str, dict[str, Any]]
    dropped: int = 0
    notes: list[str] = field(default_factory=list)
    # the store's codes of a label column (4 bytes a row) and its names: classes are counted
    # and sampled from them, never by sorting ten million strings
    coded: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows[0])

    def classes(self, name: str, which: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`Dataset.classes`; from the codes where the column has them."""
        if name not in self.coded:
            return Dataset.classes(self, name, which)  # type: ignore[arg-type]
        codes, names = self.coded[name]
        n = np.bincount(codes if which is None else codes[which], minlength=len(names))
        present = np.flatnonzero(n)
        order = np.argsort(names[present], kind="stable")
        return names[present][order], n[present][order]

    def codes(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(code of each image, names) of label column ``name``: from the store where it has
        them, else made here."""
        if name in self.coded:
            return self.coded[name]
        names, codes = np.unique(self.column(name), return_inverse=True)
        return codes.astype(np.int32), names

    @property
    def dim(self) -> int:
        return sum(int(self.fingerprints[b]["dim"]) for b in self.backbones)

    column = Dataset.column

    def blocks(
        self,
        idx: np.ndarray,
        *,
        block_rows: int,
        order: Callable[[int], Sequence[int]] | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions, (k, dim) float32) for the images at positions ``idx``, ``block_rows`` at a
        time. Blocks follow storage order (contiguous reads); ``order(n_blocks)`` visits them in
        another order (e.g. a random permutation)."""
        idx = np.asarray(idx, dtype=np.int64)
        idx = idx[np.argsort(self.rows[0][idx], kind="stable")]
        starts = range(0, len(idx), block_rows)
        seq = order(len(starts)) if order is not None else range(len(starts))
        for b in seq:
            pos = idx[starts[b] : starts[b] + block_rows]
            yield pos, self.store.fused_embeddings(self.backbones, [r[pos] for r in self.rows])


def stream_dataset(
    store_path: str | os.PathLike[str],
    backbones: list[str] | tuple[str, ...],
    *,
    label: str = "label",
    status: str = "validated",
) -> StreamingData:
    """Every image with a non-empty ``label`` and features from all ``backbones``, features
    unread. ``status="validated"`` leaves out labels a reviewer marked dubious (labels from
    folders and manifests count as validated); ``"all"`` keeps them."""
    if status not in STATUS_CHOICES:
        raise DataError(f"label status {status!r} is not one of {', '.join(STATUS_CHOICES)}")
    store = FeatureStore(store_path)
    entries = {b: store.backbone(b) for b in backbones}
    if label not in (columns := store.label_columns()):
        have = ", ".join(sorted(columns)) or "none"
        raise DataError(f"{store_path}: no label column {label!r} (it has: {have})")
    rows, dropped = fused_rows(store, list(backbones))
    coded = store.labels()  # codes (4 bytes a row per column), never the strings of every row
    codes, names = coded[label]
    labelled = (np.asarray(names, dtype=object) != "")[codes[rows[0]]]
    notes = (
        [f"{dropped} images lack features from some backbone and are left out"] if dropped else []
    )
    if status == "validated":
        trusted = store.statuses(label, rows[0]) == VALIDATED  # the status alone: 1 byte a row
        if (labelled & ~trusted).any():
            notes.append(
                f"{int((labelled & ~trusted).sum())} images whose {label!r} label is not validated "
                "(dubious) are left out; --status all keeps them"
            )
        labelled &= trusted
    labelled = np.flatnonzero(labelled)
    rows = [r[labelled] for r in rows]
    if len(labelled) == 0:
        raise DataError(f"{store_path}: no image has both a {status} {label!r} label and features")
    r0 = rows[0]
    y = CodedColumn(codes[r0], np.asarray(names, dtype=str))
    return StreamingData(
        store=store,
        rows=rows,
        paths=StoredStrings(store, r0, "path"),
        sha256=StoredStrings(store, r0, "sha256"),
        labels={
            k: y if k == label else np.asarray(n, dtype=str)[c[r0]] for k, (c, n) in coded.items()
        },
        backbones=tuple(backbones),
        fingerprints={b: e.fingerprint for b, e in entries.items()},
        dropped=dropped,
        notes=notes,
        coded={label: (y.codes, y.names)},
    )


def ensure_split(
    store_path: str | os.PathLike[str],
    data: Dataset,
    *,
    column: str = "split",
    label: str = "label",
    test_size: float = 0.3,
    seed: int = 0,
) -> np.ndarray:
    """The split for ``data`` (see :func:`penult.core.split.ensure_split`), kept in its labels."""
    split, note = _stored_split(
        store_path, data.paths, data.column(label), data.labels.get(column),
        column=column, test_size=test_size, seed=seed,
    )  # fmt: skip
    if note:
        data.notes.append(note)
    data.labels[column] = split
    return split


def eval_mask(split: np.ndarray, which: str | None = None) -> tuple[np.ndarray, str]:
    """Rows to evaluate on: ``which``, else 'test', else 'val'."""
    for name in [which] if which else EVAL_SPLITS:
        m = split == name
        if m.any():
            return m, name
    raise DataError(
        f"no images in the {which or 'test/val'} split (splits present: {', '.join(sorted(set(split)))})"
    )
