"""The feature store: an image table and one embedding set per backbone, in HDF5.

Format 2 (written by this penult) is a small top-level HDF5 file over immutable segment files in
``STORE.segments/`` (see ``format2/``); it presents every column as one (virtual) dataset::

    /                        attrs: format="penult-feature-store", schema_version=2, rows, created_at
    /images/path             (N,) str    relative POSIX path (the row key; a name that is not valid
                                         UTF-8 is kept as its raw bytes: decode with surrogateescape)
    /images/root             (N,) int32  index into /images/root_names (absolute image folders)
    /images/sha256           (N, 32) uint8  content hash of the file bytes (zeros: not hashed)
    /images/nbytes, mtime_ns (N,) int64;  /images/width, height (N,) int32 (0 until decoded)
    /images/error            (N,) int32  index into /images/error_names (0 is "": no error)
    /images/labels/<column>/codes (N,) int32, index into /images/labels/<column>/names
    /backbones/<name>/embeddings  (N, D) float32|float16, NaN where not valid
    /backbones/<name>/valid       (N,) bool
    /backbones/<name>        attrs: fingerprint (JSON) and its fields, dim, dtype, created_at

Format 1 (one file rewritten by every commit) is still read; ``penult check --upgrade`` converts it.
Each format is a backend (``backends.py``); this module never asks which one a store has.
Writes go through :class:`StoreWriter`, which journals them (see ``journal.py``) and publishes
them by replacing the top-level file atomically, so a kill at any moment leaves a store that opens.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from penult.core.errors import FingerprintMismatchError, StoreError, StoreLockedError
from penult.features import journal
from penult.features.backends import StoreBackend, backend_for
from penult.features.format2.commit import publish_journal
from penult.features.format2.state import SEGMENT_ROWS
from penult.features.hdf5 import attributes
from penult.features.types import (
    HISTORY_COLUMNS,
    STATUSES,
    BackboneEntry,
    Chunk,
    HashIndex,
    History,
    ImageTable,
    Predicted,
    Provenance,
    TableView,
)

log = logging.getLogger(__name__)


@contextlib.contextmanager
def store_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """The store's single-writer lock, without opening it for writing (repairs, upgrades,
    relinking); StoreLockedError while another process writes."""
    lock = StoreWriter(path)
    lock._acquire_lock()
    try:
        yield
    finally:
        lock._release_lock()


def _relink(backend: StoreBackend) -> None:
    """A store renamed or copied under a new name has links that still name the old segments
    folder: plain h5py fails (or reads the original's view). The first penult command that
    opens it writes its view and top-level file again with its own folder's name
    (under the writer's lock; skipped while another process writes, whose commit does the same,
    and where the store cannot be written)."""
    try:
        with store_lock(backend.path):
            backend.relink()
    except (OSError, StoreLockedError):  # a read-only store: penult reads it all the same
        return
    log.info("%s: relinked to its own segments", backend.path)


class FeatureStore:
    """Read-only view of a store. Safe to use while a writer runs (files are never edited in place)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = real_path(path)
        if not self.path.exists():
            raise StoreError(f"{path}: no such feature store")
        try:
            with h5py.File(self.path, "r") as f:
                kind = backend_for(f, self.path)
                problems = kind.layout_problems(f, self.path)
                stale = not problems and kind.needs_relink(f, self.path)
        except OSError as e:
            raise StoreError(f"{self.path}: cannot open as HDF5 ({e})") from None
        if problems:
            more = (
                f" (and {len(problems) - 1} more; see `penult check`)" if len(problems) > 1 else ""
            )
            raise StoreError(f"{self.path}: malformed store: {problems[0]}{more}")
        self._seen: set[str] = set()
        self._b: StoreBackend = kind(self.path)
        if stale:
            _relink(self._b)

    @property
    def version(self) -> int:
        """The store format (shown by ``penult info``; nothing branches on it)."""
        return self._b.version

    @property
    def read_only(self) -> str:
        """Why penult does not write this store and what converts it; "" where it does."""
        return self._b.read_only.format(path=self.path) if self._b.read_only else ""

    @property
    def backend(self) -> StoreBackend:
        return self._b

    @property
    def attrs(self) -> dict[str, Any]:
        with h5py.File(self.path, "r") as f:
            return attributes(f)

    def __len__(self) -> int:
        return self._b.rows()

    def images(self, rows: Iterable[int] | None = None) -> ImageTable:
        """The whole table as Python lists (convenient for small stores; large ones use
        :meth:`table_view`, :meth:`find` and :meth:`label_codes`), or only the sorted unique
        ``rows`` (a page's worth, read without the rest)."""
        return self._b.table(None if rows is None else np.asarray(list(rows), np.int64))

    def table_view(self) -> TableView:
        return self._b.view()

    def find(self, paths: list[str]) -> np.ndarray:
        """The row of each path, -1 where it is not stored (a sorted key index: no table in RAM)."""
        return self._b.find(paths if isinstance(paths, list) else list(paths))

    def hashes(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), 32) uint8 content hashes of sorted ``rows`` (zeros: not hashed)."""
        return self._b.hashes(np.asarray(rows, np.int64))

    def paths(self, rows: np.ndarray) -> list[str]:
        """The paths of sorted unique ``rows`` (without reading the whole table)."""
        return self._b.paths(np.asarray(rows, np.int64))

    def segment_ids(self, backbone: str) -> tuple[int, list[str]]:
        """(block rows, one id per block): a block's id changes whenever the image table or this
        backbone's embeddings change in it (segments are immutable), so a cache built from the
        store (the faiss index) re-checks only the blocks whose id moved."""
        return self._b.segment_ids(self._known(backbone))

    def label_versions(self, column: str) -> dict[str, str]:
        """An id per part of a label column ("label": the labels, "review": their provenance,
        "pred": stored predictions) that changes whenever that part changes (segments are
        immutable): a reader that caches a part re-reads it only when its id moved."""
        return self._b.label_versions(column)

    def label_columns(self) -> list[str]:
        """The label-like columns stored with the images (label, split, taxonomy, sample, ...)."""
        return self._b.label_columns()

    def label_codes(
        self, column: str, rows: Iterable[int] | None = None
    ) -> tuple[np.ndarray, list[str]]:
        """(N,) int32 codes and their names for one label column ("" is unlabelled); of sorted
        unique ``rows`` only, when given (without reading the whole column)."""
        r = None if rows is None else np.asarray(_listed(rows), np.int64)
        return self._b.label_codes(self._column(column), r)

    def _column(self, column: str) -> str:
        """``column``, or a StoreError naming the label columns there are (nothing read)."""
        have = self._b.label_columns()
        if column not in have:
            raise StoreError(f"{self.path} has no label column {column!r} (it has: {have})")
        return column

    def labels(
        self, columns: Sequence[str] | None = None
    ) -> dict[str, tuple[np.ndarray, list[str]]]:
        """Several label columns' (codes, names) from one snapshot (default: all of them)."""
        have = self._b.label_columns()
        cols = have if columns is None else list(columns)
        for c in cols:
            if c not in have:
                raise StoreError(f"{self.path} has no label column {c!r} (it has: {have})")
        return self._b.labels(cols)

    def provenance(self, column: str = "label", rows: Iterable[int] | None = None) -> Provenance:
        """Status, who, when and source of each image's label ``column`` (all rows, or sorted
        unique ``rows``). Labels never reviewed read as validated by their file."""
        self._column(column)
        r = None if rows is None else np.asarray(_listed(rows), np.int64)
        return self._b.provenance(column, r)

    def statuses(self, column: str = "label", rows: Iterable[int] | None = None) -> np.ndarray:
        """(N,) int8 status codes of ``column``'s labels (as :meth:`provenance`'s, read alone)."""
        self._column(column)
        r = None if rows is None else np.asarray(_listed(rows), np.int64)
        return self._b.statuses(column, r)

    def predictions(self, column: str = "label", rows: Iterable[int] | None = None) -> Predicted:
        """A model's stored top 3 labels and scores for ``column`` (``penult annotate``): all
        rows, or sorted unique ``rows``; "" and NaN where none is stored."""
        self._column(column)
        r = None if rows is None else np.asarray(rows, np.int64)
        return self._b.predictions(column, r)

    def history(self, columns: Sequence[str] | None = None, *, batch: int | None = None) -> History:
        """Every recorded label change, oldest first (append-only: undo adds, never removes):
        only some ``columns`` (strings are what is slow to read), only one ``batch``."""
        bad = sorted(set(columns or ()) - set(HISTORY_COLUMNS))
        if bad:
            raise ValueError(f"no history column {bad[0]!r} (there are: {HISTORY_COLUMNS})")
        return self._b.history(columns, batch)

    def backbones(self) -> dict[str, BackboneEntry]:
        return self._b.backbones()

    def backbone(self, name: str) -> BackboneEntry:
        return self.backbones()[self._known(name)]

    def backbone_names(self) -> list[str]:
        """The backbones' names (without reading how many rows each has)."""
        return self._b.backbone_names()

    def _known(self, name: str) -> str:
        if name in self._seen:  # a backbone is never removed from a store
            return name
        have = self._b.backbone_names()
        self._seen |= set(have)
        if name not in have:
            names = ", ".join(sorted(have)) or "none"
            raise StoreError(
                f"{self.path} has no backbone {name!r} (it has: {names}); run `penult extract` first"
            )
        return name

    def valid(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Whether each row (all N, or sorted unique ``rows`` alone) holds an embedding."""
        return self._b.valid(
            self._known(name), None if rows is None else np.asarray(rows, np.int64)
        )

    def embeddings(self, name: str, rows: Iterable[int] | None = None) -> np.ndarray:
        """(len(rows), D) float32 embeddings; all N rows (NaN where not valid) when rows is None."""
        name = self._known(name)
        if rows is None:
            return self._b.embeddings(name, None)
        rows = np.asarray(rows if isinstance(rows, np.ndarray) else list(rows), dtype=np.int64)
        if (
            len(rows) < 2 or (np.diff(rows) > 0).all()
        ):  # sorted and unique already (the common case)
            return self._b.embeddings(name, rows)
        uniq, inv = np.unique(rows, return_inverse=True)
        return self._b.embeddings(name, uniq)[inv]

    def fused_rows(self, backbones: Sequence[str]) -> tuple[list[np.ndarray], int]:
        """Per backbone, the table row holding each image's embedding (aligned), and how many of
        the first backbone's rows were dropped because another backbone lacks them.

        Images are joined by the SHA-256 of the file, so an image embedded under another path (or
        a copy) still lines up; the first row of each hash wins.
        """
        if not backbones:
            raise StoreError("name at least one backbone")
        if len(set(backbones)) != len(backbones):
            raise StoreError(f"backbone listed twice: {list(backbones)}")
        valid = [np.flatnonzero(self.valid(b)) for b in backbones]
        if len(backbones) == 1:
            return valid, 0
        sha = self.table_view().sha256
        found = [HashIndex(sha, v).find(sha[valid[0]]) for v in valid[1:]]
        ok = np.logical_and.reduce([f >= 0 for f in found])
        rows = [valid[0][ok]] + [f[ok] for f in found]
        return rows, int(len(valid[0]) - ok.sum())

    def hash_index(self, name: str) -> HashIndex:
        """The rows backbone ``name`` holds, found by their files' content hash."""
        return HashIndex(self.table_view().sha256, np.flatnonzero(self.valid(name)))

    def fused_embeddings(self, backbones: Sequence[str], rows: Sequence[np.ndarray]) -> np.ndarray:
        """(k, sum of dims) float32: backbone ``i``'s embeddings of ``rows[i]``, side by side."""
        if len(backbones) == 1:  # no copy
            return self.embeddings(backbones[0], rows[0])
        return np.concatenate(
            [self.embeddings(b, r) for b, r in zip(backbones, rows, strict=True)], axis=1
        )

    def iter_chunks(
        self,
        backbones: Sequence[str],
        *,
        columns: Sequence[str] = ("label",),
        memory_mb: int = 64,
    ) -> Iterator[Chunk]:
        """Every image embedded by all ``backbones``, a chunk of rows at a time (about
        ``memory_mb`` of features each), with its label ``columns``: never the whole matrix."""
        rows, _ = self.fused_rows(backbones)
        cols = {}
        for c in columns:
            codes, names = self.label_codes(c)
            cols[c] = (codes, np.asarray(names, dtype=str))
        dim = sum(self.backbone(b).dim for b in backbones)
        step = max(1, (memory_mb << 20) // (4 * dim))
        for s in range(0, len(rows[0]), step):
            part = [r[s : s + step] for r in rows]
            yield Chunk(
                part[0],
                self.fused_embeddings(backbones, part),
                {c: names[codes[part[0]]] for c, (codes, names) in cols.items()},
            )

    def features(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, (n, D) float32) for the rows that have a valid embedding."""
        rows = np.flatnonzero(self.valid(name))
        return rows, self.embeddings(name, rows)

    def pending_shards(self) -> list[Path]:
        return journal.list_shards(self.path)


def publish(path: str | os.PathLike[str]) -> int:
    """Publish what the journal holds (review actions journaled with ``publish=False``) under
    the writer's lock; returns the shards published. StoreLockedError while another process
    writes (which publishes them itself)."""
    with StoreWriter(path, publish=False) as w:
        n = publish_journal(w.path)
    return n


def commit_key(path: str | os.PathLike[str]) -> tuple:
    """What changes when the store changes for a reader: its top-level file replaced by a
    commit, or a review action journaled (read at once, published later). One stat and one
    listing of the journal folder."""
    st = os.stat(path)
    shards = journal.list_shards(real_path(path))
    journaled = tuple(p.name for p in shards if journal.kind_of(p) == "review")
    return st.st_ino, st.st_mtime_ns, st.st_size, journaled


def real_path(path: str | os.PathLike[str]) -> Path:
    """The store's real file: a symlinked store is written through its link, and the journal and
    lock sit beside the real file, so two spellings of one store share one lock."""
    return Path(os.path.realpath(os.fspath(path)))


_LOCKED_HERE: dict[str, int] = {}  # store lock -> the thread holding it in this process
_LOCKED_CHANGED = threading.Condition()
IN_PROCESS_WAIT = 60.0  # seconds a thread waits for another thread of this process to finish


def current_user() -> str:
    """Who is working: the login name (what provenance records by default)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (a container without a passwd entry)
        return "unknown"


class Writes:
    """The write methods of a store writer, each checked before anything is journaled; a
    subclass says where the journal shards go (``_put``) and gives ``store`` to check against."""

    path: Path
    store: FeatureStore
    _registered: dict[str, dict[str, Any]]

    _lock_fh: Any = None
    _seq: int = 0

    def _write(self, kind: str, meta: dict[str, Any], **arrays: np.ndarray) -> None:
        if self._lock_fh is None:
            raise StoreError(f"{type(self).__name__} must be used as a context manager")
        self._put(self._seq, kind, meta, arrays)
        self._seq += 1

    def _put(
        self, seq: int, kind: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]
    ) -> None:
        raise NotImplementedError

    def upsert_images(
        self,
        paths: list[str],
        roots: list[str],
        sha256: list[str],
        nbytes: np.ndarray,
        mtime_ns: np.ndarray,
        labels: dict[str, list[str]],
        *,
        origin: str = "",
    ) -> None:
        """Add or update image rows (keyed by path). A row whose hash changed loses its
        embeddings. ``origin`` (the folder or manifest) records its ``label`` as validated by
        that file; a label a person reviewed is then kept over the file's."""
        if len(set(paths)) != len(paths):
            raise StoreError("upsert_images: duplicate paths in one call")
        arrays = {f"label__{k}": np.array(v, dtype=str) for k, v in labels.items()}
        meta = {"origin": origin, "who": current_user(), "when": int(time.time())} if origin else {}
        self._write(
            "images",
            meta,
            path=np.array(paths, dtype=str),
            root=np.array(roots, dtype=str),
            sha256=np.array(sha256, dtype=str),
            nbytes=np.asarray(nbytes, np.int64),
            mtime_ns=np.asarray(mtime_ns, np.int64),
            **arrays,
        )

    def register_backbone(
        self, name: str, fingerprint: dict[str, Any], *, dtype: str = "float32"
    ) -> None:
        """Declare the backbone; refuses a name already used with another fingerprint or dtype."""
        if "/" in name or not name:
            raise StoreError(f"backbone name {name!r} must be non-empty and contain no '/'")
        if np.dtype(dtype) not in (np.dtype("float32"), np.dtype("float16")):
            raise StoreError(f"embedding dtype {dtype!r} not supported; use float32 or float16")
        existing = self.store.backbones().get(name)
        if existing is not None:
            diff = existing.fingerprint.differences(fingerprint)
            if diff:
                raise FingerprintMismatchError(
                    f"{self.path} already holds backbone {name!r} made with different {', '.join(diff)}; "
                    "use another --name or another store"
                )
            if existing.dtype != np.dtype(dtype).name:
                raise StoreError(
                    f"backbone {name!r} is stored as {existing.dtype}, not {dtype}; use --dtype {existing.dtype}"
                )
        self._write(
            "backbone",
            {"name": name, "fingerprint": fingerprint, "dim": fingerprint["dim"], "dtype": dtype},
        )
        self._registered[name] = fingerprint

    def append(
        self,
        name: str,
        paths: list[str],
        sha256: list[str],
        embeddings: np.ndarray,
        *,
        width: np.ndarray | None = None,
        height: np.ndarray | None = None,
    ) -> None:
        """Journal embeddings (n, D) for images already in the table, checked before anything is written."""
        if name not in self._registered:
            raise StoreError(f"register_backbone({name!r}, ...) before append")
        x = np.asarray(embeddings)
        dim = int(self._registered[name]["dim"])
        if x.ndim != 2 or x.shape != (len(paths), dim):
            raise StoreError(
                f"append to {name!r}: expected ({len(paths)}, {dim}) embeddings, got {x.shape}"
            )
        if not np.issubdtype(x.dtype, np.floating):
            raise StoreError(
                f"append to {name!r}: embeddings must be floating point, got {x.dtype}"
            )
        if not np.isfinite(x).all():
            raise StoreError(f"append to {name!r}: embeddings contain NaN or inf")
        if len(set(paths)) != len(paths):
            raise StoreError(f"append to {name!r}: duplicate paths in one batch")
        extra = {}
        if width is not None and height is not None:
            extra = {"width": np.asarray(width, np.int32), "height": np.asarray(height, np.int32)}
        self._write(
            "embeddings",
            {"name": name},
            path=np.array(paths, dtype=str),
            sha256=np.array(sha256, dtype=str),
            embeddings=x.astype(np.float32, copy=False),
            **extra,
        )

    def set_labels(self, column: str, paths: list[str], values: list[str]) -> None:
        """Set one label column (e.g. a stored split) for images already in the table, keyed by path."""
        if not column or "/" in column:
            raise StoreError(f"label column {column!r} must be non-empty and contain no '/'")
        if len(paths) != len(values):
            raise StoreError(f"set_labels({column!r}): {len(paths)} paths but {len(values)} values")
        self._write(
            "labels",
            {"column": column},
            path=np.array(paths, dtype=str),
            value=np.array(values, dtype=str),
        )

    def review(
        self,
        changes: dict[str, tuple[Sequence[str], Sequence[str], Sequence[int]]],
        *,
        who: str,
        source: str,
        when: int | None = None,
        note_only: bool = False,
    ) -> None:
        """Set label levels of stored images with their status, who set them and from what
        (``person``, ``model:<hash>``, ``undo:<batch>``). ``changes`` maps a level (column) to
        (paths, labels, statuses). One call is one batch of the history, which one undo takes
        back; everything is checked before anything is journaled. ``note_only`` records the
        batch in the history and changes nothing (a rejected proposal, ``reject:<label>``)."""
        if not changes:
            raise StoreError("review: no label level to set")
        arrays = {}
        for col, (paths, values, status) in changes.items():
            if not col or "/" in col:
                raise StoreError(f"label column {col!r} must be non-empty and contain no '/'")
            st = np.asarray(status, np.int8)
            if len(values) != len(paths) or len(st) != len(paths):
                raise StoreError(f"review {col!r}: {len(paths)} images but {len(values)} labels")
            if len(set(paths)) != len(paths):
                raise StoreError(f"review {col!r}: an image is named twice in one batch")
            if len(st) and (st.min() < 1 or st.max() >= len(STATUSES)):
                raise StoreError(f"review {col!r}: a status is not one of {STATUSES[1:]}")
            arrays[f"path__{col}"] = np.array(list(paths), dtype=str)
            arrays[f"value__{col}"] = np.array(list(values), dtype=str)
            arrays[f"status__{col}"] = st
        every = sorted({p for paths, _, _ in changes.values() for p in paths})
        rows = self.store.find(every)  # one lookup for all levels
        if (rows < 0).any():
            missing = [p for p, r in zip(every, rows, strict=True) if r < 0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise StoreError(f"{self.path} has no image {missing[0]!r}{more}")
        meta = {"columns": list(changes), "who": who, "source": source, "note_only": note_only,
                "when": int(time.time() if when is None else when)}  # fmt: skip
        self._write("review", meta, **arrays)

    def predictions(
        self, column: str, paths: list[str], labels: np.ndarray, scores: np.ndarray, *, model: str
    ) -> None:
        """Store a model's top labels (n, k <= 3) and scores for stored images; those without a
        validated (or dubious) label become ``predicted`` by ``model:<model>``."""
        labels, scores = np.asarray(labels, dtype=str), np.asarray(scores, np.float32)
        if labels.ndim != 2 or labels.shape != scores.shape or len(labels) != len(paths):
            raise StoreError(
                f"predictions: {len(paths)} images but labels {labels.shape}, scores {scores.shape}"
            )
        if labels.shape[1] > 3:
            raise StoreError("predictions: at most the top 3 labels are stored")
        pad = 3 - labels.shape[1]
        labels = np.pad(labels, ((0, 0), (0, pad)), constant_values="")
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=np.nan)
        meta = {"column": column, "model": model, "who": current_user(), "when": int(time.time())}
        self._write(
            "predictions", meta, path=np.array(paths, dtype=str), labels=labels, scores=scores
        )

    def record_failures(self, paths: list[str], sha256: list[str], reasons: list[str]) -> None:
        """Mark images as unusable with the reason (shown by `penult info`, skipped by later runs)."""
        if paths:
            self._write(
                "failures",
                {},
                path=np.array(paths, dtype=str),
                sha256=np.array(sha256, dtype=str),
                reason=np.array(reasons, dtype=str),
            )


class StoreWriter(Writes):
    """The single writer of a store: holds an exclusive lock, journals every write, commits atomically.

    Use as a context manager. Whatever was journaled is committed on exit, also after an exception,
    so finished work is never lost; after a kill it is committed by the next writer.

    ``publish=False`` (review actions only, as `penult serve --annotate` writes them): the
    shards stay in the journal, durable and read by every reader at once (see
    ``format2/overlay.py``), and are published by the next publishing writer or
    :func:`publish`. Publishing rewrites whole blocks; an action then costs what it writes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        segment_rows: int = SEGMENT_ROWS,
        publish: bool = True,
    ):
        if int(segment_rows) < 1:
            raise StoreError(f"segment_rows must be at least 1, got {segment_rows!r}")
        self.path = real_path(path)
        self.segment_rows = int(segment_rows)
        self.publish = publish
        self._lock_fh = None
        self._seq = 0
        self._registered: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> StoreWriter:
        if not self.path.parent.is_dir():
            raise StoreError(f"{self.path}: folder {self.path.parent} does not exist")
        if self.path.exists():
            why = FeatureStore(self.path).read_only  # validates it too
            if why:
                raise StoreError(f"{self.path} {why}")
        elif not self.publish:
            raise StoreError(f"{self.path}: no such feature store")
        self._acquire_lock()
        try:
            if self.publish:
                merged = publish_journal(self.path, segment_rows=self.segment_rows)
                if merged:
                    log.info("merged %d journal shards", merged)
            self._refresh()
        except BaseException:
            self._release_lock()
            raise
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        try:
            if not self.publish:  # the shards are durable; the next publish merges them
                return
            if exc is None:
                self.commit()
            else:  # keep what was journaled, but never hide the error that stopped the run
                try:
                    self.commit()
                except Exception as e:  # noqa: BLE001 - e.g. the disk is still full
                    log.info(
                        "%s: the journal was kept unmerged (%s); `penult check --repair` merges it",
                        self.path,
                        e,
                    )
        finally:
            self._release_lock()

    def _acquire_lock(self) -> None:
        """POSIX record lock: released by the kernel when this process dies, and (unlike flock) not
        inherited by forked loader workers, which may outlive a killed writer for a moment."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        key = str(lock_path.resolve())
        me = threading.get_ident()
        with _LOCKED_CHANGED:  # record locks do not conflict within one process: wait here
            if _LOCKED_HERE.get(key) == me:
                raise StoreLockedError(f"{self.path} is already being written by this thread")
            if not _LOCKED_CHANGED.wait_for(lambda: key not in _LOCKED_HERE, IN_PROCESS_WAIT):
                raise StoreLockedError(
                    f"{self.path} is being written by another thread of this process; "
                    f"it did not finish in {IN_PROCESS_WAIT:.0f} s"
                )
            _LOCKED_HERE[key] = me
        fh = None
        try:
            fh = open(lock_path, "a+")  # noqa: SIM115 - held for the writer's lifetime
            fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = "unknown"
            if fh is not None:
                fh.seek(0)
                holder = fh.read().strip() or "unknown"
                fh.close()
            self._forget(key)
            raise StoreLockedError(
                f"{self.path} is being written by another process ({holder}); wait for it to finish"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._lock_fh, self._lock_key = fh, key

    @staticmethod
    def _forget(key: str) -> None:
        with _LOCKED_CHANGED:
            _LOCKED_HERE.pop(key, None)
            _LOCKED_CHANGED.notify_all()

    def _release_lock(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()  # closing releases the record lock
            self._lock_fh = None
            self._forget(self._lock_key)

    def _put(
        self, seq: int, kind: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]
    ) -> None:
        if not self.publish and kind != "review":  # readers see pending review shards alone
            raise StoreError(f"{self.path}: a {kind!r} write must be published (publish=True)")
        journal.write_shard(self.path, seq, kind, meta, **arrays)

    def commit(self) -> None:
        """Merge the journal into the store file (atomic replace) and refresh ``self.store``
        (a writer made with ``publish=False`` leaves it to :func:`publish`)."""
        if not self.publish:
            return
        try:
            publish_journal(self.path)
        except OSError as e:  # e.g. no room for the new file: the old file and journal are intact
            if e.errno == errno.ENOSPC:
                raise
            raise StoreError(
                f"{self.path}: could not merge the journal into the store ({e.strerror or e}); "
                f"the finished work is kept in {journal.journal_dir(self.path)}, and "
                f"`penult check --repair {self.path}` merges it once the cause is fixed"
            ) from None
        self._refresh()

    def adopt(self, shard: Path) -> None:
        """Take a committed shard written elsewhere (a part of ``extract --shard``) into the
        journal, after everything journaled so far; the next commit publishes it."""
        journal.adopt(self.path, self._seq, shard)
        self._seq += 1

    def refresh(self) -> None:
        """Read the store again after a commit made beside this writer (under its lock)."""
        self._refresh()

    def _refresh(self) -> None:
        self.store = FeatureStore(self.path)
        done = int(self.store.attrs.get("journal_seq", 0))
        self._seq = max(journal.next_seq(self.path), done + 1)


def _listed(rows: Iterable[int]) -> np.ndarray | list[int]:
    """``rows`` as an array, without a Python list of ten million ints when it is one."""
    return rows if isinstance(rows, np.ndarray) else list(rows)
