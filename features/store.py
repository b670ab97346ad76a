"""The HDF5 feature store: one file, an image table and one embedding group per backbone.

Layout (readable with plain h5py; strings are UTF-8)::

    /                       attrs: format="penult-feature-store", schema_version, created_at, created_by
    /images/path            (N,) str   relative POSIX path (the row key; a name that is not valid
                                       UTF-8 is kept as its raw bytes: decode with surrogateescape)
    /images/root            (N,) str   absolute folder the path is relative to
    /images/sha256          (N,) str   content hash of the file bytes
    /images/nbytes          (N,) int64 file size; /images/mtime_ns (N,) int64
    /images/width, height   (N,) int32 decoded size (0 until decoded)
    /images/error           (N,) str   "" or why the image could not be used
    /images/labels/<column> (N,) str   label, coarse levels (genus, family, ...), split, ...
    /backbones/<name>/embeddings (N, D) float32|float16, chunked, resizable; NaN where not valid
    /backbones/<name>/valid      (N,) bool
    /backbones/<name>       attrs: fingerprint (JSON) and its fields, dim, dtype, created_at

Writes go through :class:`StoreWriter`, which journals them (see ``journal.py``) and replaces the
file atomically on commit, so a kill at any moment leaves a file that opens.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from features import journal

log = logging.getLogger(__name__)

FORMAT = "penult-feature-store"
SCHEMA_VERSION = 1
_STR = h5py.string_dtype("utf-8")
_INT_COLUMNS = {"nbytes": np.int64, "mtime_ns": np.int64, "width": np.int32, "height": np.int32}
_STR_COLUMNS = ("path", "root", "sha256", "error")
# Fingerprint fields that make two backbones the same; precision is recorded but may vary.
IDENTITY_FIELDS = ("architecture", "weights_sha256", "preprocessing", "layer", "dim")


class StoreError(Exception):
    """The store is missing, not a penult store, or inconsistent."""


class StoreLockedError(StoreError):
    """Another process is writing the store."""


class FingerprintMismatchError(StoreError):
    """The store holds a backbone of this name made with other weights or preprocessing."""


@dataclass
class ImageTable:
    """The image table in memory: equal-length columns, row i describes image i."""

    path: list[str] = field(default_factory=list)
    root: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    error: list[str] = field(default_factory=list)
    nbytes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    mtime_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    width: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    height: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    labels: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.path)

    def index(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.path)}

    def label_array(self, column: str = "label") -> np.ndarray:
        if column not in self.labels:
            raise KeyError(f"no label column {column!r}; the store has {sorted(self.labels)}")
        return np.asarray(self.labels[column], dtype=str)


@dataclass
class Chunk:
    """Rows of the store read together by :meth:`FeatureStore.iter_chunks`."""

    rows: np.ndarray  # (k,) table rows (of the first backbone)
    X: np.ndarray  # (k, sum of dims) float32, backbones side by side in the order asked
    labels: dict[str, np.ndarray]  # (k,) str per label column asked for


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    fingerprint: dict[str, Any]
    dim: int
    dtype: str
    count: int
    created_at: str


def same_backbone(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in IDENTITY_FIELDS)


def _decode(values: np.ndarray) -> list[str]:
    """Stored strings back to str; bytes that are not UTF-8 come back surrogate-escaped (lossless)."""
    return [
        v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v) for v in values
    ]


def _encode(values: list[str]) -> np.ndarray:
    """str to stored bytes. A file name that is not valid UTF-8 (Python holds it surrogate-escaped)
    is stored as its original bytes, so it round-trips instead of aborting the write."""
    out = np.empty(len(values), dtype=object)
    out[:] = [v.encode("utf-8", "surrogateescape") for v in values]
    return out


def _read_table(f: h5py.File) -> ImageTable:
    g = f["images"]
    t = ImageTable(**{c: _decode(g[c][()]) for c in _STR_COLUMNS})
    for c, dt in _INT_COLUMNS.items():
        setattr(t, c, np.asarray(g[c][()], dtype=dt))
    t.labels = {k: _decode(g["labels"][k][()]) for k in g["labels"]}
    return t


def _write_table(f: h5py.File, t: ImageTable) -> None:
    if "images" in f:
        del f["images"]
    g = f.create_group("images")
    chunk = (max(1, min(len(t), 4096)),)
    for c in _STR_COLUMNS:
        g.create_dataset(
            c,
            data=_encode(getattr(t, c)),
            dtype=_STR,
            maxshape=(None,),
            chunks=chunk,
        )
    for c, dt in _INT_COLUMNS.items():
        g.create_dataset(
            c, data=np.asarray(getattr(t, c), dtype=dt), maxshape=(None,), chunks=chunk
        )
    lg = g.create_group("labels")
    for k, v in t.labels.items():
        lg.create_dataset(k, data=_encode(v), dtype=_STR, maxshape=(None,), chunks=chunk)


def _check_root(f: h5py.File, path: Path) -> None:
    if f.attrs.get("format") != FORMAT:
        raise StoreError(f"{path} is an HDF5 file but not a penult feature store")
    version = int(f.attrs.get("schema_version", -1))
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema version {version}, newer than this penult ({SCHEMA_VERSION}); upgrade penult"
        )


def structure_problems(f: h5py.File) -> list[str]:
    """What is missing or inconsistent in the layout (shapes and attributes only: cheap)."""
    out: list[str] = []
    g = f.get("images")
    if not isinstance(g, h5py.Group):
        return ["no /images group"]
    n = None
    for c in (*_STR_COLUMNS, *_INT_COLUMNS):
        ds = g.get(c)
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 1:
            out.append(f"/images/{c} is missing or not a 1-d dataset")
        elif n is None:
            n = ds.shape[0]
        elif ds.shape[0] != n:
            out.append(f"/images/{c} has {ds.shape[0]} rows, /images/path has {n}")
    labels = g.get("labels")
    if not isinstance(labels, h5py.Group):
        out.append("no /images/labels group")
    else:
        for k, ds in labels.items():
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 1:
                out.append(f"label column {k!r} is not a 1-d dataset")
            elif n is not None and ds.shape[0] != n:
                out.append(f"label column {k!r} has {ds.shape[0]} rows for {n} images")
    bb = f.get("backbones")
    if not isinstance(bb, h5py.Group):
        return [*out, "no /backbones group"]
    for name, b in bb.items():
        out += [f"backbone {name!r}: {p}" for p in _backbone_problems(b, n)]
    return out


def _backbone_problems(b: h5py.Group | h5py.Dataset, n: int | None) -> list[str]:
    if not isinstance(b, h5py.Group):
        return ["not a group"]
    out = []
    try:
        fp = json.loads(b.attrs["fingerprint"])
        if not isinstance(fp, dict):
            raise ValueError("not a JSON object")
        dim = int(b.attrs["dim"])
        np.dtype(str(b.attrs["dtype"]))
    except KeyError as e:
        return [f"attribute {e} is missing"]
    except (TypeError, ValueError) as e:
        return [f"fingerprint/dim/dtype attributes are malformed ({e})"]
    if "dim" in fp and fp["dim"] != dim:
        out.append(f"fingerprint dim {fp['dim']} but dim attribute {dim}")
    emb, valid = b.get("embeddings"), b.get("valid")
    if not isinstance(emb, h5py.Dataset) or emb.ndim != 2:
        out.append("embeddings missing or not 2-d")
    elif emb.shape[1] != dim:
        out.append(f"embeddings are {emb.shape[1]}-d but the dim attribute says {dim}")
    elif n is not None and emb.shape[0] != n:
        out.append(f"{emb.shape[0]} embedding rows for {n} images")
    if not isinstance(valid, h5py.Dataset) or valid.ndim != 1:
        out.append("valid flags missing or not 1-d")
    elif n is not None and valid.shape[0] != n:
        out.append(f"{valid.shape[0]} valid flags for {n} images")
    return out


def _entry(name: str, g: h5py.Group) -> BackboneEntry:
    fp = json.loads(g.attrs["fingerprint"])
    return BackboneEntry(
        name=name,
        fingerprint=fp,
        dim=int(g.attrs["dim"]),
        dtype=str(g.attrs["dtype"]),
        count=int(np.count_nonzero(g["valid"][()])),
        created_at=str(g.attrs.get("created_at", "")),
    )


class FeatureStore:
    """Read-only view of a store file. Safe to use while a writer runs (the file is never edited in place)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = real_path(path)
        if not self.path.exists():
            raise StoreError(f"{path}: no such feature store")
        try:
            with h5py.File(self.path, "r") as f:
                _check_root(f, self.path)
                problems = structure_problems(f)
        except OSError as e:
            raise StoreError(f"{self.path}: cannot open as HDF5 ({e})") from None
        if problems:
            more = (
                f" (and {len(problems) - 1} more; see `penult check`)" if len(problems) > 1 else ""
            )
            raise StoreError(f"{self.path}: malformed store: {problems[0]}{more}")

    def _open(self) -> h5py.File:
        return h5py.File(self.path, "r")

    @property
    def attrs(self) -> dict[str, Any]:
        with self._open() as f:
            return {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}

    def images(self) -> ImageTable:
        with self._open() as f:
            return _read_table(f)

    def backbones(self) -> dict[str, BackboneEntry]:
        with self._open() as f:
            return {n: _entry(n, g) for n, g in f["backbones"].items()}

    def backbone(self, name: str) -> BackboneEntry:
        with self._open() as f:
            return _entry(name, self._group(f, name))

    def _group(self, f: h5py.File, name: str) -> h5py.Group:
        """The backbone's group, or a StoreError naming the backbones the store has."""
        if name not in f["backbones"]:
            have = ", ".join(sorted(f["backbones"])) or "none"
            raise StoreError(
                f"{self.path} has no backbone {name!r} (it has: {have}); run `penult extract` first"
            )
        return f["backbones"][name]

    def valid(self, name: str) -> np.ndarray:
        with self._open() as f:
            return np.asarray(self._group(f, name)["valid"][()], dtype=bool)

    def embeddings(self, name: str, rows: Iterable[int] | None = None) -> np.ndarray:
        """(len(rows), D) float32 embeddings; all N rows (NaN where not valid) when rows is None."""
        with self._open() as f:
            ds = self._group(f, name)["embeddings"]
            if rows is None:
                return np.asarray(ds[()], dtype=np.float32)
            rows = np.asarray(rows if isinstance(rows, np.ndarray) else list(rows), dtype=np.int64)
            if len(rows) == 0:
                return np.zeros((0, ds.shape[1]), np.float32)
            order = np.argsort(rows, kind="stable")
            uniq, inv = np.unique(rows[order], return_inverse=True)
            lo, hi = int(uniq[0]), int(uniq[-1]) + 1
            if hi - lo <= 4 * len(uniq):  # dense: contiguous reads beat a point selection
                out = np.empty((len(uniq), ds.shape[1]), np.float32)
                step = max(len(uniq), 1024)  # never hold more than the rows asked for (or 1024)
                for a in range(lo, hi, step):
                    i, j = np.searchsorted(uniq, [a, a + step])
                    if j > i:
                        out[i:j] = ds[a : min(a + step, hi)][uniq[i:j] - a]
                out = out[inv]
            else:
                out = np.asarray(ds[uniq], dtype=np.float32)[inv]
            result = np.empty_like(out)
            result[order] = out
            return result

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
        sha = np.asarray(self.images().sha256, dtype=object)
        per = [{sha[r]: int(r) for r in v[::-1]} for v in valid[1:]]
        keep = np.array([r for r in valid[0] if all(sha[r] in m for m in per)], dtype=np.int64)
        rows = [keep] + [np.array([m[sha[r]] for r in keep], dtype=np.int64) for m in per]
        return rows, len(valid[0]) - len(keep)

    def fused_embeddings(self, backbones: Sequence[str], rows: Sequence[np.ndarray]) -> np.ndarray:
        """(k, sum of dims) float32: backbone ``i``'s embeddings of ``rows[i]``, side by side."""
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
        labels = self.images().labels
        missing = [c for c in columns if c not in labels]
        if missing:
            raise StoreError(
                f"{self.path} has no label column {missing[0]!r} (it has: {sorted(labels)})"
            )
        cols = {c: np.asarray(labels[c], dtype=str) for c in columns}
        dim = sum(self.backbone(b).dim for b in backbones)
        step = max(1, (memory_mb << 20) // (4 * dim))
        for s in range(0, len(rows[0]), step):
            part = [r[s : s + step] for r in rows]
            yield Chunk(
                part[0],
                self.fused_embeddings(backbones, part),
                {c: v[part[0]] for c, v in cols.items()},
            )

    def features(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, (n, D) float32) for the rows that have a valid embedding."""
        rows = np.flatnonzero(self.valid(name))
        return rows, self.embeddings(name, rows)

    def pending_shards(self) -> list[Path]:
        return journal.list_shards(self.path)


def real_path(path: str | os.PathLike[str]) -> Path:
    """The store's real file: a symlinked store is written through its link, and the journal and
    lock sit beside the real file, so two spellings of one store share one lock."""
    return Path(os.path.realpath(os.fspath(path)))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class _Orphan(Exception):
    """A shard refers to something a damaged (set-aside) shard should have created."""


class _Compactor:
    """Replays journal shards over the current file into a new file, then swaps it in atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.compact-{os.getpid()}")
        self.damaged: list[Path] = []

    def run(self, shards: list[Path]) -> None:
        old = h5py.File(self.path, "r") if self.path.exists() else None
        try:
            with h5py.File(self.tmp, "w") as new:
                self._start(old, new)
                for shard in shards:
                    try:
                        meta, arrays = journal.read_shard(shard)
                    except journal.DamagedShardError as e:
                        self.damaged.append(shard)
                        log.warning("journal shard set aside, it cannot be read: %s", e)
                        continue
                    try:
                        getattr(self, "_apply_" + meta["kind"])(new, meta, arrays)
                    except _Orphan as e:
                        self.damaged.append(shard)
                        log.warning("journal shard %s set aside: %s", shard.name, e)
                self._finish(new)
            with open(self.tmp, "rb") as fh:
                os.fsync(fh.fileno())
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        finally:
            if old is not None:
                old.close()
        os.replace(self.tmp, self.path)
        journal.fsync_dir(self.path.parent)
        for shard in shards:
            if shard in self.damaged:
                journal.set_aside(shard)
            else:
                shard.unlink(missing_ok=True)

    def _start(self, old: h5py.File | None, new: h5py.File) -> None:
        if old is not None:
            _check_root(old, self.path)
            for k, v in old.attrs.items():
                new.attrs[k] = v
            self.table = _read_table(old)
            new.create_group("backbones")
            for name in old["backbones"]:
                old.copy(old["backbones"][name], new["backbones"], name=name)
        else:
            new.attrs.update(format=FORMAT, schema_version=SCHEMA_VERSION, created_at=_now())
            self.table = ImageTable()
            new.create_group("backbones")
        new.attrs["schema_version"] = SCHEMA_VERSION
        self.index = self.table.index()
        self.valid = {n: np.asarray(g["valid"][()], bool) for n, g in new["backbones"].items()}

    def _apply_images(self, new: h5py.File, meta: dict, a: dict[str, np.ndarray]) -> None:
        t, n_new = self.table, 0
        label_cols = [k[len("label__") :] for k in a if k.startswith("label__")]
        for c in label_cols:
            t.labels.setdefault(c, [""] * len(t))
        for j, p in enumerate(a["path"].tolist()):
            i = self.index.get(p)
            if i is None:
                i = self.index[p] = len(t)
                n_new += 1
                for c in _STR_COLUMNS:
                    getattr(t, c).append("")
                for col in t.labels.values():
                    col.append("")
            elif t.sha256[i] != a["sha256"][j]:
                for v in self.valid.values():
                    if i < len(v):
                        v[i] = False
                t.error[i] = ""
            t.path[i], t.root[i], t.sha256[i] = p, str(a["root"][j]), str(a["sha256"][j])
            for c in label_cols:
                t.labels[c][i] = str(a["label__" + c][j])
        for c in _INT_COLUMNS:
            col = getattr(t, c)
            col = np.concatenate([col, np.zeros(n_new, col.dtype)])
            setattr(t, c, col)
        rows = np.array([self.index[p] for p in a["path"].tolist()], dtype=np.int64)
        t.nbytes[rows] = a["nbytes"]
        t.mtime_ns[rows] = a["mtime_ns"]
        for name in self.valid:
            self.valid[name] = np.concatenate(
                [self.valid[name], np.zeros(len(t) - len(self.valid[name]), bool)]
            )

    def _rows_matching(self, a: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the shard whose path is in the table with the same hash (others are stale)."""
        rows, keep = [], []
        for j, (p, h) in enumerate(zip(a["path"].tolist(), a["sha256"].tolist(), strict=True)):
            i = self.index.get(p)
            if i is not None and self.table.sha256[i] == h:
                rows.append(i)
                keep.append(j)
        return np.array(rows, np.int64), np.array(keep, np.int64)

    def _apply_backbone(self, new: h5py.File, meta: dict, a: dict[str, np.ndarray]) -> None:
        name, fp = meta["name"], meta["fingerprint"]
        bb = new["backbones"]
        if name in bb:
            have = json.loads(bb[name].attrs["fingerprint"])
            if not same_backbone(have, fp):
                raise FingerprintMismatchError(
                    f"journal registers backbone {name!r} with another fingerprint"
                )
            precisions = set(str(bb[name].attrs["precision"]).split(",")) | {fp["precision"]}
            bb[name].attrs["precision"] = ",".join(sorted(precisions))
            return
        g = bb.create_group(name)
        dim, dtype = int(meta["dim"]), np.dtype(meta["dtype"])
        chunk_rows = max(1, (1 << 20) // (dim * dtype.itemsize))
        g.create_dataset(
            "embeddings",
            shape=(0, dim),
            maxshape=(None, dim),
            dtype=dtype,
            chunks=(chunk_rows, dim),
            fillvalue=np.nan,
        )
        g.create_dataset("valid", shape=(0,), maxshape=(None,), dtype=bool)
        for k, v in fp.items():  # each field also as its own attribute, for plain-h5py readers
            g.attrs[k] = v if isinstance(v, str | int | float) else json.dumps(v, sort_keys=True)
        g.attrs.update(
            fingerprint=json.dumps(fp, sort_keys=True), dim=dim, dtype=dtype.name, created_at=_now()
        )
        self.valid[name] = np.zeros(len(self.table), bool)

    def _apply_embeddings(self, new: h5py.File, meta: dict, a: dict[str, np.ndarray]) -> None:
        name = meta["name"]
        if name not in new["backbones"]:
            raise _Orphan(f"embeddings for backbone {name!r}, which was never registered")
        rows, keep = self._rows_matching(a)
        if len(rows) == 0:
            return
        ds = new["backbones"][name]["embeddings"]
        if ds.shape[0] < len(self.table):
            ds.resize(len(self.table), axis=0)
        x = a["embeddings"][keep]
        uniq, last = np.unique(rows[::-1], return_index=True)  # last write of a row wins
        ds[uniq] = x[::-1][last].astype(ds.dtype)
        self.valid[name][uniq] = True
        for i in uniq.tolist():
            self.table.error[i] = ""
        if "width" in a:
            self.table.width[rows] = a["width"][keep]
            self.table.height[rows] = a["height"][keep]

    def _apply_labels(self, new: h5py.File, meta: dict, a: dict[str, np.ndarray]) -> None:
        col = self.table.labels.setdefault(meta["column"], [""] * len(self.table))
        for p, v in zip(a["path"].tolist(), a["value"].tolist(), strict=True):
            i = self.index.get(p)
            if i is not None:
                col[i] = str(v)

    def _apply_failures(self, new: h5py.File, meta: dict, a: dict[str, np.ndarray]) -> None:
        rows, keep = self._rows_matching(a)
        for i, j in zip(rows.tolist(), keep.tolist(), strict=True):
            self.table.error[i] = str(a["reason"][j])

    def _finish(self, new: h5py.File) -> None:
        _write_table(new, self.table)
        for name, g in new["backbones"].items():
            v = self.valid[name]
            if g["embeddings"].shape[0] != len(v):
                g["embeddings"].resize(len(v), axis=0)
            g["valid"].resize(len(v), axis=0)
            g["valid"][...] = v


def compact(path: Path) -> int:
    """Merge committed journal shards into the store file; return how many were merged.

    Shards that cannot be read are renamed ``*.damaged`` and reported, the rest are merged: the
    images they held are simply extracted again. Caller must hold the write lock.
    """
    journal.remove_stale_temporaries(path)
    for stale in path.parent.glob(f".{path.name}.compact-*"):
        stale.unlink(missing_ok=True)
    shards = journal.list_shards(path)
    if shards or not path.exists():
        c = _Compactor(path)
        c.run(shards)
        return len(shards) - len(c.damaged)
    return 0


_LOCKED_HERE: set[str] = set()


class StoreWriter:
    """The single writer of a store: holds an exclusive lock, journals every write, commits atomically.

    Use as a context manager. Whatever was journaled is committed on exit, also after an exception,
    so finished work is never lost; after a kill it is committed by the next writer.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = real_path(path)
        self._lock_fh = None
        self._seq = 0
        self._registered: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> StoreWriter:
        if not self.path.parent.is_dir():
            raise StoreError(f"{self.path}: folder {self.path.parent} does not exist")
        if self.path.exists():
            FeatureStore(self.path)  # validates format before we touch anything
        self._acquire_lock()
        try:
            merged = compact(self.path)
            if merged:
                log.info("merged %d journal shards left by an interrupted run", merged)
            self._seq = journal.next_seq(self.path)
            self.store = FeatureStore(self.path)
        except BaseException:
            self._release_lock()
            raise
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        try:
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
        fh = open(lock_path, "a+")  # noqa: SIM115 - held for the writer's lifetime
        try:
            if key in _LOCKED_HERE:  # record locks do not conflict within one process
                raise BlockingIOError
            fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise StoreLockedError(
                f"{self.path} is being written by another process ({holder}); wait for it to finish"
            ) from None
        _LOCKED_HERE.add(key)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._lock_fh, self._lock_key = fh, key

    def _release_lock(self) -> None:
        if self._lock_fh is not None:
            _LOCKED_HERE.discard(self._lock_key)
            self._lock_fh.close()  # closing releases the record lock
            self._lock_fh = None

    def _write(self, kind: str, meta: dict[str, Any], **arrays: np.ndarray) -> None:
        if self._lock_fh is None:
            raise StoreError("StoreWriter must be used as a context manager")
        journal.write_shard(self.path, self._seq, kind, meta, **arrays)
        self._seq += 1

    def commit(self) -> None:
        """Merge the journal into the store file (atomic replace) and refresh ``self.store``."""
        try:
            compact(self.path)
        except OSError as e:  # e.g. no room for the new file: the old file and journal are intact
            if e.errno == errno.ENOSPC:
                raise
            raise StoreError(
                f"{self.path}: could not merge the journal into the store ({e.strerror or e}); "
                f"the finished work is kept in {journal.journal_dir(self.path)}, and "
                f"`penult check --repair {self.path}` merges it once the cause is fixed"
            ) from None
        self._seq = journal.next_seq(self.path)
        self.store = FeatureStore(self.path)

    def upsert_images(
        self,
        paths: list[str],
        roots: list[str],
        sha256: list[str],
        nbytes: np.ndarray,
        mtime_ns: np.ndarray,
        labels: dict[str, list[str]],
    ) -> None:
        """Add or update image rows (keyed by path). A row whose hash changed loses its embeddings."""
        if len(set(paths)) != len(paths):
            raise StoreError("upsert_images: duplicate paths in one call")
        arrays = {f"label__{k}": np.array(v, dtype=str) for k, v in labels.items()}
        self._write(
            "images",
            {},
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
            if not same_backbone(existing.fingerprint, fingerprint):
                diff = [
                    k for k in IDENTITY_FIELDS if existing.fingerprint.get(k) != fingerprint.get(k)
                ]
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
