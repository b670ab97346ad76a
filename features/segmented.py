"""Store format 2: a small top-level HDF5 file over immutable segment files.

The top-level file is the one thing replaced (atomically) by a commit. It holds the piece maps
(``/segments/<family>``), the category names of coded columns, the backbones' fingerprints, and
external links to a *view* file inside the segments folder, whose virtual datasets present every
column as one dataset to plain h5py readers. The view names its segments as siblings, so a store
moved or copied with its folder reads the same; renamed, the top-level file's links name a folder
that is not there and plain h5py fails loudly (never fill values) until penult relinks it. A commit replays
the journal into new segment files (cost: the new rows), compacts the blocks it touched, writes
the new top-level file, and only then deletes segments no map refers to any more.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from penult.core.errors import FingerprintMismatchError, PenultError
from penult.core.files import atomic_path, fsync_dir
from penult.features.segments import (
    STR,
    Column,
    KeyRun,
    Piece,
    Reader,
    cut,
    find_keys,
    index_merges,
    path_keys,
    plan_runs,
    read_run,
    store_id,
    to_merge,
    write_run,
    write_segment,
)
from penult.features.types import Fingerprint, sha_raw

log = logging.getLogger(__name__)

FORMAT = "penult-feature-store"
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


def segment_dir(path: Path) -> Path:
    return path.with_name(path.name + ".segments")


def label_family(col: str) -> str:
    return "label:" + col


def backbone_family(name: str) -> str:
    return "backbone:" + name


@dataclass
class State:
    """Everything the top-level file says, in memory (small: no per-row data)."""

    attrs: dict[str, Any]
    maps: dict[str, list[Piece]] = field(default_factory=dict)
    index: list[tuple[str, int]] = field(default_factory=list)  # (file, rows) oldest first
    names: dict[str, list[str]] = field(default_factory=dict)  # "root", "error", "label:<c>"
    backbones: dict[str, dict[str, Any]] = field(default_factory=dict)
    view: str | None = None  # the view file (in the segments folder) the top-level file links to

    @property
    def rows(self) -> int:
        return int(self.attrs["rows"])

    @property
    def block(self) -> int:
        return int(self.attrs["segment_rows"])

    @property
    def labels(self) -> list[str]:
        return sorted(k[len("label:") :] for k in self.names if k.startswith("label:"))

    def columns(self, family: str) -> dict[str, Column]:
        if family == TABLE:
            return TABLE_COLUMNS
        if family == SIZE:
            return SIZE_COLUMNS
        if family == ERROR:
            return ERROR_COLUMNS
        if family.startswith("label:"):
            return LABEL_COLUMNS
        meta = self.backbones[family[len("backbone:") :]]
        dt = np.dtype(meta["dtype"])
        return {
            "embeddings": Column(dt, (int(meta["dim"]),), np.nan),
            "valid": Column(np.dtype(bool), (), False),
        }

    def files(self) -> set[str]:
        out = {p.file for ps in self.maps.values() for p in ps}
        return out | {f for f, _ in self.index}


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
    return State(attrs, names={"root": [], "error": [""]})


def attributes(obj: h5py.HLObject) -> dict[str, Any]:
    """An HDF5 object's attributes as plain Python values."""
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in obj.attrs.items()}


def decode(values: np.ndarray) -> list[str]:
    """Stored strings back to str; bytes that are not UTF-8 come back surrogate-escaped (lossless)."""
    return [
        v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v) for v in values
    ]


def load(f: h5py.File) -> State:
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
                g.create_dataset("file", data=_strs([p.file for p in ps]), dtype=STR)
            ix = f.create_group("index")
            ix.create_dataset("file", data=_strs([n for n, _ in s.index]), dtype=STR)
            ix["rows"] = np.array([r for _, r in s.index], np.int64)
            target = f"{folder.name}/{s.view}"
            for name in _columns(f, s):
                f[name] = h5py.ExternalLink(target, f"/{name}")


def _strs(values: list[str]) -> np.ndarray:
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
    images.create_dataset("root_names", data=_strs(s.names["root"]), dtype=STR)
    images.create_dataset("error_names", data=_strs(s.names["error"]), dtype=STR)
    labels = images.create_group("labels")
    for col in s.labels:
        g = labels.create_group(col)
        g.create_dataset("names", data=_strs(s.names[label_family(col)]), dtype=STR)
        out[f"images/labels/{col}/codes"] = (label_family(col), "code")
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


class Commit:
    """Replays journal shards over a state into new segments; ``finish`` publishes them."""

    def __init__(self, path: Path, state: State):
        self.path, self.s = path, state
        self.reader = Reader(segment_dir(path), state)
        self.store = store_id(state.attrs)
        self.n0 = state.rows
        self.n = state.rows
        self.pending: dict[str, list[tuple[np.ndarray, dict[str, np.ndarray]]]] = {}
        self.new_keys: list[KeyRun] = []
        self._runs: list[KeyRun] | None = None

    # --- looking things up (stored values overlaid with this commit's pending writes) ---
    def runs(self) -> list[KeyRun]:
        if self._runs is None:
            self._runs = [read_run(self.reader, n) for n, _ in self.s.index]
        return self._runs

    def find(self, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
        keys = path_keys(paths, int(self.s.attrs["key_seed"]))
        return keys, find_keys([*self.runs(), *self.new_keys], keys)

    def current(self, family: str, column: str, rows: np.ndarray) -> np.ndarray:
        uniq, inv = np.unique(rows, return_inverse=True)
        col = self.s.columns(family)[column]
        out = self.reader.rows(self.s.maps.get(family, []), col, column, uniq)
        for r, values in self.pending.get(family, []):
            pos = np.searchsorted(r, uniq)
            pos_c = np.minimum(pos, len(r) - 1)
            hit = (pos < len(r)) & (r[pos_c] == uniq)
            out[hit] = values[column][pos_c[hit]]
        return out[inv]

    def put(self, family: str, rows: np.ndarray, values: dict[str, np.ndarray]) -> None:
        if len(rows):
            self.pending.setdefault(family, []).append(_last_wins(rows, values))

    def codes(self, kind: str, values: list[str]) -> np.ndarray:
        names = self.s.names.setdefault(kind, [""])
        index = {v: i for i, v in enumerate(names)}
        out = np.empty(len(values), np.int32)
        for i, v in enumerate(values):
            c = index.get(v)
            if c is None:
                c = index[v] = len(names)
                names.append(v)
            out[i] = c
        return out

    # --- replaying shards ---
    def apply(self, meta: dict[str, Any], a: dict[str, np.ndarray]) -> None:
        getattr(self, "_apply_" + meta["kind"])(meta, a)

    def _apply_images(self, meta: dict, a: dict[str, np.ndarray]) -> None:
        paths = a["path"].tolist()
        keys, rows = self.find(paths)
        new = rows < 0
        rows[new] = np.arange(self.n, self.n + int(new.sum()))
        if new.any():
            self.new_keys.append(KeyRun.sort(keys[new], rows[new]))
            self.n += int(new.sum())
        shas = a["sha256"].tolist()
        values = {
            "key": keys,
            "path": _strs(paths),
            "root": self.codes("root", a["root"].tolist()),
            "sha256": sha_raw(shas),
            "nbytes": np.asarray(a["nbytes"], np.int64),
            "mtime_ns": np.asarray(a["mtime_ns"], np.int64),
        }
        changed, new_sha = new.copy(), new.copy()
        old = np.flatnonzero(~new)
        if len(old):
            for c in ("root", "sha256", "nbytes", "mtime_ns"):
                cur = self.current(TABLE, c, rows[old])
                differs = (cur != values[c][old]).reshape(len(old), -1).any(axis=1)
                changed[old[differs]] = True
                if c == "sha256":
                    new_sha[old[differs]] = True
        self.put(TABLE, rows[changed], {k: v[changed] for k, v in values.items()})
        self._invalidate(rows[new_sha & ~new])
        for k in a:
            if k.startswith("label__"):
                col = k[len("label__") :]
                codes = self.codes(label_family(col), a[k].tolist())
                fam = label_family(col)
                cur = self.current(fam, "code", rows) if self.s.maps.get(fam) else None
                diff = np.ones(len(rows), bool) if cur is None else (cur != codes) | new
                self.put(fam, rows[diff], {"code": codes[diff]})

    def _invalidate(self, rows: np.ndarray) -> None:
        """A file whose bytes changed: its embeddings and recorded failure no longer hold."""
        if not len(rows):
            return
        for name in self.s.backbones:
            fam = backbone_family(name)
            stale = rows[self.current(fam, "valid", rows)]
            cols = self.s.columns(fam)
            self.put(
                fam,
                stale,
                {
                    "embeddings": np.full((len(stale), *cols["embeddings"].shape), np.nan),
                    "valid": np.zeros(len(stale), bool),
                },
            )
        self._clear_errors(rows)

    def _clear_errors(self, rows: np.ndarray) -> None:
        if len(rows) and (self.s.maps.get(ERROR) or self.pending.get(ERROR)):
            failed = rows[self.current(ERROR, "error", rows) != 0]
            self.put(ERROR, failed, {"error": np.zeros(len(failed), np.int32)})

    def _matching(self, a: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the shard whose path is stored with the same hash (others are stale)."""
        _, rows = self.find(a["path"].tolist())
        keep = np.flatnonzero(rows >= 0)
        if len(keep):
            cur = self.current(TABLE, "sha256", rows[keep])
            keep = keep[(cur == sha_raw(a["sha256"][keep].tolist())).all(axis=1)]
        return rows[keep], keep

    def _apply_backbone(self, meta: dict, a: dict[str, np.ndarray]) -> None:
        name, fp = meta["name"], meta["fingerprint"]
        have = self.s.backbones.get(name)
        if have is not None:
            if not Fingerprint(json.loads(have["fingerprint"])).same_as(fp):
                raise FingerprintMismatchError(
                    f"journal registers backbone {name!r} with another fingerprint"
                )
            precisions = set(str(have.get("precision", "")).split(",")) | {fp["precision"]}
            have["precision"] = ",".join(sorted(p for p in precisions if p))
            return
        meta_attrs = {
            k: v if isinstance(v, str | int | float) else json.dumps(v, sort_keys=True)
            for k, v in fp.items()
        }
        dtype = np.dtype(meta["dtype"])
        self.s.backbones[name] = {
            **meta_attrs,
            "fingerprint": json.dumps(fp, sort_keys=True),
            "dim": int(meta["dim"]),
            "dtype": dtype.name,
            "created_at": now(),
        }
        self.s.maps.setdefault(backbone_family(name), [])

    def _apply_embeddings(self, meta: dict, a: dict[str, np.ndarray]) -> None:
        name = meta["name"]
        if name not in self.s.backbones:
            raise Orphan(f"embeddings for backbone {name!r}, which was never registered")
        rows, keep = self._matching(a)
        x = a["embeddings"][keep]
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():  # stored as failed with the reason, never as a valid row
            bad = rows[~finite]
            dim = self.s.columns(backbone_family(name))["embeddings"].shape
            self.put(backbone_family(name), bad, {
                "embeddings": np.full((len(bad), *dim), np.nan), "valid": np.zeros(len(bad), bool),
            })  # fmt: skip
            self.put(ERROR, bad, {"error": self.codes("error", [NON_FINITE] * len(bad))})
            rows, x, keep = rows[finite], x[finite], keep[finite]
        self.put(backbone_family(name), rows, {"embeddings": x, "valid": np.ones(len(rows), bool)})
        self._clear_errors(rows)
        if "width" in a:
            self.put(SIZE, rows, {"width": a["width"][keep], "height": a["height"][keep]})

    def _apply_labels(self, meta: dict, a: dict[str, np.ndarray]) -> None:
        _, rows = self.find(a["path"].tolist())
        keep = rows >= 0
        fam = label_family(meta["column"])
        codes = self.codes(fam, a["value"][keep].tolist())
        self.s.maps.setdefault(fam, [])
        self.put(fam, rows[keep], {"code": codes})

    def _apply_failures(self, meta: dict, a: dict[str, np.ndarray]) -> None:
        rows, keep = self._matching(a)
        self.put(ERROR, rows, {"error": self.codes("error", a["reason"][keep].tolist())})

    # --- publishing ---
    def finish(self, journal_seq: int, *, target: Path | None = None) -> None:
        """Write the new segments, compact, and publish the top-level file (at ``target``
        instead of the store's own path while an upgrade builds it)."""
        s = self.s
        s.attrs["rows"] = self.n
        for col in s.labels:
            s.maps.setdefault(label_family(col), [])
        for fam, updates in self.pending.items():
            self._write(fam, updates)
        block = s.block
        finished = range(self.n0 // block, self.n // block)  # blocks this commit filled up
        for fam, ps in s.maps.items():
            ks = {p.lo // block for p in ps}
            for k in sorted(ks):
                if fam in self.pending or k in finished:
                    for lo, hi in to_merge(ps, block, k, finished=k in finished):
                        self._rewrite(fam, lo, hi)
                        ps = s.maps[fam]
        self._write_index()
        s.attrs["journal_seq"] = max(int(s.attrs.get("journal_seq", 0)), journal_seq)
        self.reader.close()
        save(target or self.path, s, segments=segment_dir(self.path))
        collect_garbage(self.path, s)

    def _write(self, fam: str, updates: list[tuple[np.ndarray, dict[str, np.ndarray]]]) -> None:
        uniq, values = _last_wins(
            np.concatenate([r for r, _ in updates]),
            {k: np.concatenate([v[k] for _, v in updates]) for k in updates[0][1]},
        )
        cols = self.s.columns(fam)
        pieces, parts = [], {k: [] for k in cols}
        offset = 0
        for lo, hi in plan_runs(uniq, self.s.block):
            i, j = np.searchsorted(uniq, [lo, hi])
            for k, c in cols.items():
                span = self.reader.span(self.s.maps.get(fam, []), c, k, lo, hi)
                span[uniq[i:j] - lo] = values[k][i:j]
                parts[k].append(span)
            pieces.append((lo, hi, offset))
            offset += hi - lo
        if not pieces:
            return
        name = write_segment(
            self.reader.folder, fam, {k: _cat(v, cols[k]) for k, v in parts.items()},
            store=self.store,
        )  # fmt: skip
        self.s.maps[fam] = cut(
            self.s.maps.get(fam, []), [Piece(a, b, name, o) for a, b, o in pieces]
        )

    def _rewrite(self, fam: str, lo: int, hi: int) -> None:
        cols = self.s.columns(fam)
        ps = self.s.maps[fam]
        data = {k: self.reader.span(ps, c, k, lo, hi) for k, c in cols.items()}
        name = write_segment(self.reader.folder, fam, data, store=self.store)
        self.s.maps[fam] = cut(ps, [Piece(lo, hi, name, 0)])

    def _write_index(self) -> None:
        if self.new_keys:
            run = KeyRun.merge(self.new_keys)
            self.s.index.append((write_run(self.reader.folder, run, self.store), len(run.row)))
        for i, j in reversed(index_merges([r for _, r in self.s.index])):
            run = KeyRun.merge([read_run(self.reader, n) for n, _ in self.s.index[i:j]])
            self.s.index[i:j] = [(write_run(self.reader.folder, run, self.store), len(run.row))]

    def rebuild_index(self) -> None:
        """The path index made again from the table's key column (``check --repair``)."""
        key = self.reader.span(self.s.maps.get(TABLE, []), TABLE_COLUMNS["key"], "key", 0, self.n)
        run = KeyRun.sort(key, np.arange(self.n, dtype=np.int64))
        self.s.index = [(write_run(self.reader.folder, run, self.store), len(run.row))]
        self.reader.close()
        save(self.path, self.s)
        collect_garbage(self.path, self.s)


def _last_wins(
    rows: np.ndarray, values: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Sorted unique ``rows`` and their values, the last write of a repeated row winning."""
    uniq, last = np.unique(rows[::-1], return_index=True)
    idx = len(rows) - 1 - last
    return uniq, {k: v[idx] for k, v in values.items()}


def _cat(parts: list[np.ndarray], col: Column) -> np.ndarray:
    if col.dtype is STR:
        out = np.empty(sum(len(p) for p in parts), dtype=object)
        out[:] = [v for p in parts for v in p]
        return out
    return np.concatenate(parts)


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


def backbone_attr_problems(g: h5py.Group) -> list[str]:
    """Fingerprint, dim and dtype attributes of a backbone group (both formats)."""
    try:
        fp = json.loads(g.attrs["fingerprint"])
        if not isinstance(fp, dict):
            raise ValueError("not a JSON object")
        dim = int(g.attrs["dim"])
        np.dtype(str(g.attrs["dtype"]))
    except KeyError as e:
        return [f"attribute {e} is missing"]
    except (TypeError, ValueError) as e:
        return [f"fingerprint/dim/dtype attributes are malformed ({e})"]
    if "dim" in fp and fp["dim"] != dim:
        return [f"fingerprint dim {fp['dim']} but dim attribute {dim}"]
    return []


def referenced_problems(path: Path, s: State) -> list[str]:
    """Segment files the maps name that are missing (cheap: a stat per file)."""
    folder = segment_dir(path)
    return [
        f"segment {folder / n} is missing" for n in sorted(s.files()) if not (folder / n).is_file()
    ]
