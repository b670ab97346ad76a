"""Store format 2's top-level file and what it says (``State``).

The top-level file is the one thing replaced (atomically) by a commit. It holds the piece maps
(``/segments/<family>``), the category names of coded columns, the backbones' fingerprints, and
external links to a *view* file inside the segments folder, whose virtual datasets present every
column as one dataset to plain h5py readers. The view names its segments as siblings, so a store
moved or copied with its folder reads the same; renamed, the top-level file's links name a folder
that is not there and plain h5py fails loudly (never fill values) until penult relinks it.
"""

from __future__ import annotations

import copy
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from penult.core.errors import PenultError
from penult.core.files import atomic_path, file_identity, fsync_dir
from penult.features.format2.files import (
    STR,
    Column,
    Piece,
)
from penult.features.hdf5 import FORMAT, attributes, backbone_attr_problems, decode

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
SEGMENT_ROWS = 1_000_000
TABLE, SIZE, ERROR = "table", "size", "error"
NON_FINITE = "the network gave a non-finite embedding (NaN or inf)"
TABLE_COLUMNS = {
    "key": Column(np.dtype(np.uint64), (2,)),
    "path": Column(STR),
    "root": Column(np.dtype(np.int32)),
    "sha256": Column(np.dtype(np.uint8), (32,)),
    "nbytes": Column(np.dtype(np.int64)),
    "mtime_ns": Column(np.dtype(np.int64)),
}
SIZE_COLUMNS = {"width": Column(np.dtype(np.int32)), "height": Column(np.dtype(np.int32))}
ERROR_COLUMNS = {"error": Column(np.dtype(np.int32))}
LABEL_COLUMNS = {"code": Column(np.dtype(np.int32))}
# a label level's provenance (see features/review.py): status 0 is "never recorded" (read as
# validated where there is a label), who and source index the names "who" and "source"
REVIEW_COLUMNS = {
    "status": Column(np.dtype(np.int8)),
    "who": Column(np.dtype(np.int32)),
    "when": Column(np.dtype(np.int64)),
    "source": Column(np.dtype(np.int32)),
}

# a model's top 3 labels per image for one level (``penult annotate``): labels index the names
# "pred:<level>", model the names "model"
PRED_COLUMNS = {
    "labels": Column(np.dtype(np.int32), (3,)),
    "scores": Column(np.dtype(np.float32), (3,), np.nan),
    "model": Column(np.dtype(np.int32)),
}


def segment_dir(path: Path) -> Path:
    return path.with_name(path.name + ".segments")


def label_family(col: str) -> str:
    return "label:" + col


def review_family(col: str) -> str:
    return "review:" + col


def pred_family(col: str) -> str:
    return "pred:" + col


def backbone_family(name: str) -> str:
    return "backbone:" + name


@dataclass
class State:
    """Everything the top-level file says, in memory (small: no per-row data)."""

    attrs: dict[str, Any]
    maps: dict[str, list[Piece]] = field(default_factory=dict)
    index: list[tuple[str, int]] = field(default_factory=list)  # (file, rows) oldest first
    history: list[tuple[str, int]] = field(default_factory=list)  # (file, entries) oldest first
    names: dict[str, list[str]] = field(default_factory=dict)  # "root", "error", "label:<c>"
    backbones: dict[str, dict[str, Any]] = field(default_factory=dict)
    view: str | None = None  # the view file (in the segments folder) the top-level file links to

    def copy(self) -> State:
        """A copy a commit may change: every container copied, the pieces (frozen) shared."""
        return State(
            copy.deepcopy(self.attrs), {k: list(v) for k, v in self.maps.items()},
            list(self.index), list(self.history), {k: list(v) for k, v in self.names.items()},
            copy.deepcopy(self.backbones), self.view,
        )  # fmt: skip

    @property
    def rows(self) -> int:
        return int(self.attrs["rows"])

    @property
    def block(self) -> int:
        return int(self.attrs["segment_rows"])

    @property
    def labels(self) -> list[str]:
        return sorted(k[len("label:") :] for k in self.names if k.startswith("label:"))

    @property
    def predicted(self) -> list[str]:
        """The label columns a model's predictions are stored for."""
        return sorted(k[len("pred:") :] for k in self.maps if k.startswith("pred:"))

    @property
    def reviewed(self) -> list[str]:
        """The label columns with recorded provenance."""
        return sorted(k[len("review:") :] for k in self.maps if k.startswith("review:"))

    def columns(self, family: str) -> dict[str, Column]:
        if family == TABLE:
            return TABLE_COLUMNS
        if family == SIZE:
            return SIZE_COLUMNS
        if family == ERROR:
            return ERROR_COLUMNS
        if family.startswith("label:"):
            return LABEL_COLUMNS
        if family.startswith("review:"):
            return REVIEW_COLUMNS
        if family.startswith("pred:"):
            return PRED_COLUMNS
        meta = self.backbones[family[len("backbone:") :]]
        dt = np.dtype(meta["dtype"])
        return {
            "embeddings": Column(dt, (int(meta["dim"]),), np.nan),
            "valid": Column(np.dtype(bool), (), False),
        }

    def files(self) -> set[str]:
        out = {p.file for ps in self.maps.values() for p in ps}
        return out | {f for f, _ in self.index} | {f for f, _ in self.history}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class Orphan(PenultError):
    """A shard refers to something a damaged (set-aside) shard should have created."""


def new_state(block: int = SEGMENT_ROWS) -> State:
    attrs = dict(
        format=FORMAT,
        schema_version=SCHEMA_VERSION,
        created_at=now(),
        rows=0,
        segment_rows=int(block),
        key_seed=secrets.randbits(63),
        journal_seq=0,
    )
    names = {"root": [], "error": [""], "who": [""], "source": [""], "model": [""]}
    return State(attrs, names=names)


_LOADED: dict[tuple[int, ...], State] = {}  # a few top-level files' states, by file identity


def load(f: h5py.File) -> State:
    """The state an open top-level file says (a copy: commits change it). A top-level file is
    never edited, only replaced, so its state is cached by the open file's identity (device,
    inode, size, change time): one review action opens the store a dozen times."""
    try:
        key = file_identity(os.fstat(f.id.get_vfd_handle()))
    except (OSError, TypeError, ValueError):  # a driver without a file descriptor
        return _load(f)
    hit = _LOADED.get(key)
    if hit is None:
        hit = _load(f)
        if len(_LOADED) >= 8:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = hit
    return hit.copy()


def _load(f: h5py.File) -> State:
    s = State(attributes(f))
    for fam, g in f["segments"].items():
        s.maps[fam] = [
            Piece(int(a), int(b), n.decode(), int(o))
            for a, b, n, o in zip(
                g["lo"][()], g["hi"][()], g["file"][()], g["offset"][()], strict=True
            )
        ]
    ix = f["index"]
    s.index = [(n.decode(), int(r)) for n, r in zip(ix["file"][()], ix["rows"][()], strict=True)]
    s.names["root"] = decode(f["images/root_names"][()])
    s.names["error"] = decode(f["images/error_names"][()])
    for col, g in f["images/labels"].items():
        s.names[label_family(col)] = decode(g["names"][()])
    rv = f.get("review")  # absent in stores written before labels had provenance
    for k in ("who", "source", "model"):
        s.names[k] = decode(rv[f"{k}_names"][()]) if rv is not None and f"{k}_names" in rv else [""]
    if rv is not None and "predictions" in rv:
        for col, g in rv["predictions"].items():
            s.names[pred_family(col)] = decode(g["names"][()])
    if rv is not None:
        h = rv["history"]
        s.history = [
            (n.decode(), int(k)) for n, k in zip(h["file"][()], h["entries"][()], strict=True)
        ]
    for name, g in f["backbones"].items():
        s.backbones[name] = attributes(g)
    link = f.get("images/path", getlink=True)
    if isinstance(link, h5py.ExternalLink):
        s.view = link.filename.rsplit("/", 1)[-1]
    return s


def save(path: Path, s: State, *, segments: Path | None = None) -> None:
    """Write a new view file into the segments folder, then the top-level file (to a temporary
    name, fsynced, renamed over ``path``) with links to it. ``s.view`` names the new view."""
    folder = segments or segment_dir(path)
    s.view = _write_view(folder, s)
    with atomic_path(path, tmp=path.with_name(f".{path.name}.top-{os.getpid()}")) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(s.attrs)
            seg = f.create_group("segments")
            for fam, ps in s.maps.items():
                g = seg.create_group(fam)
                g["lo"] = np.array([p.lo for p in ps], np.int64)
                g["hi"] = np.array([p.hi for p in ps], np.int64)
                g["offset"] = np.array([p.offset for p in ps], np.int64)
                g.create_dataset("file", data=encoded([p.file for p in ps]), dtype=STR)
            ix = f.create_group("index")
            ix.create_dataset("file", data=encoded([n for n, _ in s.index]), dtype=STR)
            ix["rows"] = np.array([r for _, r in s.index], np.int64)
            rv = f.create_group("review")
            for k in ("who", "source", "model"):
                rv.create_dataset(f"{k}_names", data=encoded(s.names.get(k, [""])), dtype=STR)
            pg = rv.create_group("predictions")
            for col in s.predicted:
                g = pg.create_group(col)
                g.create_dataset("names", data=encoded(s.names[pred_family(col)]), dtype=STR)
            h = rv.create_group("history")
            h.create_dataset("file", data=encoded([n for n, _ in s.history]), dtype=STR)
            h["entries"] = np.array([k for _, k in s.history], np.int64)
            target = f"{folder.name}/{s.view}"
            for name in _columns(f, s):
                f[name] = h5py.ExternalLink(target, f"/{name}")


def encoded(values: list[str]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = [v.encode("utf-8", "surrogateescape") for v in values]
    return out


def _columns(f: h5py.File, s: State) -> dict[str, tuple[str, str]]:
    """The groups, names and attributes of the plain-h5py layout in ``f``; returns each column's
    dataset path with the (family, column) it shows."""
    out = {f"images/{c}": (TABLE, c) for c in TABLE_COLUMNS}
    out |= {f"images/{c}": (SIZE, c) for c in SIZE_COLUMNS}
    out["images/error"] = (ERROR, "error")
    images = f.create_group("images")
    images.create_dataset("root_names", data=encoded(s.names["root"]), dtype=STR)
    images.create_dataset("error_names", data=encoded(s.names["error"]), dtype=STR)
    labels = images.create_group("labels")
    for col in s.labels:
        g = labels.create_group(col)
        g.create_dataset("names", data=encoded(s.names[label_family(col)]), dtype=STR)
        out[f"images/labels/{col}/codes"] = (label_family(col), "code")
        if col in s.reviewed:
            for k in REVIEW_COLUMNS:
                out[f"images/labels/{col}/{k}"] = (review_family(col), k)
    for col in s.predicted:
        for k in PRED_COLUMNS:
            out[f"images/predictions/{col}/{k}"] = (pred_family(col), k)
    bb = f.create_group("backbones")
    for name, meta in s.backbones.items():
        bb.create_group(name).attrs.update(meta)
        out[f"backbones/{name}/embeddings"] = (backbone_family(name), "embeddings")
        out[f"backbones/{name}/valid"] = (backbone_family(name), "valid")
    return out


def _write_view(folder: Path, s: State) -> str:
    """The view file: one virtual dataset per column over the segments beside it (named as
    siblings, so the folder may be moved or renamed). Written whole under a new name."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"view-{secrets.token_hex(8)}.h5"
    with atomic_path(folder / name, tmp=folder / f".{name}.tmp") as tmp:
        with h5py.File(tmp, "w") as f:
            for path, (family, column) in _columns(f, s).items():
                col = s.columns(family)[column]
                layout = h5py.VirtualLayout(shape=(s.rows, *col.shape), dtype=col.dtype)
                for p in s.maps.get(family, []):
                    n = p.offset + p.hi - p.lo
                    layout[p.lo : p.hi] = h5py.VirtualSource(p.file, column, shape=(n, *col.shape))[
                        p.offset : n
                    ]
                fill = None if col.dtype is STR else col.fill
                f.create_virtual_dataset(path, layout, fillvalue=fill)
    return name


def stale_links(f: h5py.File, path: Path) -> bool:
    """Whether plain h5py would not read this store's own segments: the top-level file names
    another store's folder (renamed, or copied under a new name), its view file is gone, or it
    predates view files (virtual datasets that read fill values once the store is renamed)."""
    link = f.get("images/path", getlink=True)
    if link is None:
        return False
    if not isinstance(link, h5py.ExternalLink):
        return True
    folder, _, view = link.filename.partition("/")
    return folder != segment_dir(path).name or not (segment_dir(path) / view).is_file()


def relink(path: Path) -> None:
    """Write the view and the top-level file again (atomically, same state) so that they name
    this store's own segments folder, then collect what nothing names (the old view). The
    caller holds the writer's lock."""
    with h5py.File(path, "r") as f:
        s = load(f)
    save(path, s)
    collect_garbage(path, s)


def collect_garbage(path: Path, s: State) -> int:
    """Delete segment files no map refers to (superseded, or left by a killed writer)."""
    folder = segment_dir(path)
    if not folder.is_dir():
        return 0
    keep, n = s.files() | {s.view}, 0
    for p in folder.iterdir():
        if p.name not in keep:
            p.unlink(missing_ok=True)
            n += 1
    if n:
        fsync_dir(folder)
    return n


def structure_problems(f: h5py.File) -> list[str]:
    """What is missing or inconsistent in a top-level file (cheap: no segment is opened)."""
    for g in ("segments", "index", "images", "images/labels", "backbones"):
        if not isinstance(f.get(g), h5py.Group):
            return [f"no /{g} group"]
    try:
        s = load(f)
    except (KeyError, ValueError, TypeError, OSError) as e:
        return [f"top-level file is malformed ({type(e).__name__}: {e})"]
    out = []
    for fam, ps in s.maps.items():
        if fam.startswith("backbone:") and fam[len("backbone:") :] not in s.backbones:
            out.append(f"segments of {fam!r} but no such backbone")
        for p in ps:
            if not 0 <= p.lo < p.hi <= s.rows or p.offset < 0:
                out.append(f"{fam}: piece {p.lo}..{p.hi} lies outside the table's {s.rows} rows")
                break
    for name, g in f["backbones"].items():
        out += [f"backbone {name!r}: {m}" for m in backbone_attr_problems(g)]
    return out


def referenced_problems(path: Path, s: State) -> list[str]:
    """Segment files the maps name that are missing (cheap: a stat per file)."""
    folder = segment_dir(path)
    return [
        f"segment {folder / n} is missing" for n in sorted(s.files()) if not (folder / n).is_file()
    ]
