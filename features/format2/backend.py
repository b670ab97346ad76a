"""Store format 2's backend: columns read through the piece maps of the top-level file, and the
format's own checks (layout, missing or damaged segments, the path index) and repairs."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import h5py
import numpy as np
from penult.core.errors import StoreError
from penult.features.format2.commit import Commit, read_history
from penult.features.format2.files import KeyRun, Reader, find_keys, path_keys, read_run, verify
from penult.features.format2.overlay import Overlay, identity, overlay, pending_review
from penult.features.format2.state import (
    ERROR,
    SIZE,
    TABLE,
    State,
    backbone_family,
    decode,
    label_family,
    load,
    pred_family,
    referenced_problems,
    relink,
    review_family,
    save,
    segment_dir,
    stale_links,
    structure_problems,
)
from penult.features.types import (
    HISTORY_COLUMNS,
    UNLABELLED,
    VALIDATED,
    BackboneEntry,
    Fingerprint,
    History,
    ImageTable,
    Predicted,
    Provenance,
    TableView,
    sha_hex,
)

T = TypeVar("T")


def to_float32(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float16 to float32 (into ``out`` when given) on two threads for large blocks (numpy
    converts about 1 GB/s a core, slower than the segments are read)."""
    if x.dtype == np.float32:
        return x
    if out is None:
        out = np.empty(x.shape, np.float32)
    if x.nbytes < (32 << 20):  # small blocks: threads (and their stacks) are not worth it
        np.copyto(out, x)
        return out
    half = len(x) // 2
    with ThreadPoolExecutor(2) as pool:  # copyto releases the GIL
        list(pool.map(lambda sl: np.copyto(out[sl], x[sl]), [np.s_[:half], np.s_[half:]]))
    return out


class Format2:
    """The format-2 :class:`~penult.features.backends.StoreBackend`. Every call reads the current
    top-level file, so it sees each commit whole; a segment deleted by a concurrent commit
    between the two is retried once on the new state."""

    version = 2
    read_only = ""

    def __init__(self, path: Path):
        self.path = path

    @staticmethod
    def layout_problems(f: h5py.File, path: Path, *, files: bool = True) -> list[str]:
        """What is malformed in the top-level file, then (``files``) which segments are missing."""
        problems = structure_problems(f)
        return problems or (referenced_problems(path, load(f)) if files else [])

    @staticmethod
    def needs_relink(f: h5py.File, path: Path) -> bool:
        return stale_links(f, path)

    def relink(self) -> None:
        """Make the links name this store's own segments folder (the caller holds the lock)."""
        with h5py.File(self.path, "r") as f:
            if not stale_links(f, self.path):  # relinked by another process meanwhile
                return
        relink(self.path)

    def files(self) -> list[Path]:
        folder = segment_dir(self.path)
        return [self.path, *(folder.iterdir() if folder.is_dir() else [])]

    def backbone_names(self) -> list[str]:
        return list(self.state().backbones)

    def state(self) -> State:
        """The published state (what a writer builds on)."""
        with h5py.File(self.path, "r") as f:
            return load(f)

    def _snapshot(self) -> tuple[State, Overlay | None]:
        """The published state and the review actions journaled after it (see overlay.py),
        taken together: a publish between the two reads is seen and read again."""
        for _ in range(5):
            ident = identity(self.path)
            s = self.state()
            shards = pending_review(self.path, int(s.attrs.get("journal_seq", 0)))
            if not shards:
                return s, None
            try:
                ov = overlay(self.path, s, ident, shards)
            except (FileNotFoundError, StoreError):
                continue  # published (and its segments collected) meanwhile: read it again
            if identity(self.path) == ident:
                return ov.state, ov
        return self.state(), None  # a writer publishing without pause: its published state

    def _run(self, fn: Callable[[State, Reader, Overlay | None], T]) -> T:
        s, ov = self._snapshot()
        for attempt in (0, 1):
            with Reader(segment_dir(self.path), s) as r:
                try:
                    return fn(s, r, ov)
                except StoreError:
                    fresh, fov = self._snapshot()
                    if attempt or fresh.files() == s.files():
                        raise
                    s, ov = fresh, fov
        raise AssertionError("unreachable")

    def _columns(
        self,
        wanted: list[tuple[str, str]] | Callable[[State], list[tuple[str, str]]],
        rows: np.ndarray | None = None,
    ) -> tuple[State, list[np.ndarray]]:
        """The (family, column) pairs (or the pairs a function picks from the state), all read
        from one state (one commit's snapshot, with the review actions journaled after it)."""

        def read(s: State, r: Reader, ov: Overlay | None) -> tuple[State, list[np.ndarray]]:
            out = []
            for family, column in wanted(s) if callable(wanted) else wanted:
                col, ps = s.columns(family)[column], s.maps.get(family, [])
                x = (
                    r.span(ps, col, column, 0, s.rows)
                    if rows is None
                    else r.rows(ps, col, column, rows)
                )
                out.append(x if ov is None else ov.apply(family, column, x, rows))
            return s, out

        return self._run(read)

    def _column(self, family: str, column: str, rows: np.ndarray | None = None) -> np.ndarray:
        return self._columns([(family, column)], rows)[1][0]

    def rows(self) -> int:
        return self.state().rows

    def table(self, rows: np.ndarray | None = None) -> ImageTable:
        fixed = [(TABLE, c) for c in ("path", "root", "sha256", "nbytes", "mtime_ns")]
        fixed += [(ERROR, "error"), (SIZE, "width"), (SIZE, "height")]
        s, cols = self._columns(
            lambda s: fixed + [(label_family(c), "code") for c in s.labels], rows
        )
        labels = s.labels
        path, root, sha, nbytes, mtime, error, width, height, *codes = cols
        names = {k: np.asarray(v, dtype=object) for k, v in s.names.items()}
        t = ImageTable(
            path=decode(path),
            root=names["root"][root].tolist() if len(root) else [],
            sha256=sha_hex(sha),
            error=names["error"][error].tolist(),
            nbytes=nbytes,
            mtime_ns=mtime,
            width=width,
            height=height,
        )
        for col, c in zip(labels, codes, strict=True):
            t.labels[col] = names[label_family(col)][c].tolist()
        return t

    def view(self) -> TableView:
        _, (sha, nbytes, mtime, error) = self._columns(
            [(TABLE, "sha256"), (TABLE, "nbytes"), (TABLE, "mtime_ns"), (ERROR, "error")]
        )
        return TableView(sha256=sha, nbytes=nbytes, mtime_ns=mtime, failed=error != 0)

    def hashes(self, rows: np.ndarray) -> np.ndarray:
        return self._column(TABLE, "sha256", rows)

    def paths(self, rows: np.ndarray) -> list[str]:
        return decode(self._column(TABLE, "path", rows))

    def segment_ids(self, backbone: str) -> tuple[int, list[str]]:
        s = self.state()
        block = s.block
        fams = (s.maps.get(TABLE, []), s.maps.get(backbone_family(backbone), []))
        ids = []
        for k in range(-(-s.rows // block)):
            lo, hi = k * block, (k + 1) * block
            ids.append(
                ";".join(
                    f"{p.lo}:{p.hi}:{p.file}:{p.offset}"
                    for ps in fams
                    for p in ps
                    if p.lo < hi and p.hi > lo
                )
            )
        return block, ids

    def label_versions(self, column: str) -> dict[str, str]:
        s, ov = self._snapshot()
        out = {}
        for kind, fam in (("label", label_family(column)), ("review", review_family(column)),
                          ("pred", pred_family(column))):  # fmt: skip
            pieces = ";".join(f"{p.lo}:{p.hi}:{p.file}:{p.offset}" for p in s.maps.get(fam, []))
            journaled = ov.key if ov is not None and fam in ov.pending else ""
            out[kind] = f"{s.rows}|{len(s.names.get(fam, []))}|{pieces}|{journaled}"
        return out

    def find(self, paths: list[str]) -> np.ndarray:
        def read(s: State, r: Reader, _: Overlay | None) -> np.ndarray:
            runs: list[KeyRun] = [read_run(r, n) for n, _ in s.index]
            out = np.empty(len(paths), np.int64)
            step = 1 << 18  # keys of 262,144 paths at a time: memory stays bounded
            for i in range(0, len(paths), step):
                keys = path_keys(paths[i : i + step], int(s.attrs["key_seed"]))
                out[i : i + step] = find_keys(runs, keys)
            return out

        return self._run(read)

    def label_columns(self) -> list[str]:
        return self._snapshot()[0].labels

    def label_codes(
        self, column: str, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[str]]:
        return self.labels([column], rows)[column]

    def labels(
        self, columns: list[str], rows: np.ndarray | None = None
    ) -> dict[str, tuple[np.ndarray, list[str]]]:
        fams = [label_family(c) for c in columns]
        s, codes = self._columns([(f, "code") for f in fams], rows)
        return {c: (x, list(s.names[f])) for c, f, x in zip(columns, fams, codes, strict=True)}

    def provenance(self, column: str, rows: np.ndarray | None = None) -> Provenance:
        fam, rv = label_family(column), review_family(column)
        s, (code, status, who, when, source) = self._columns(
            [(fam, "code")] + [(rv, k) for k in ("status", "who", "when", "source")], rows
        )
        return Provenance(
            column, _status(s, fam, code, status), who, when, source,
            list(s.names.get("who", [""])), list(s.names.get("source", [""])),
        )  # fmt: skip

    def statuses(self, column: str, rows: np.ndarray | None = None) -> np.ndarray:
        fam, rv = label_family(column), review_family(column)
        s, (code, status) = self._columns([(fam, "code"), (rv, "status")], rows)
        return _status(s, fam, code, status)

    def predictions(self, column: str, rows: np.ndarray | None = None) -> Predicted:
        fam = pred_family(column)
        s, (labels, scores, model) = self._columns(
            [(fam, "labels"), (fam, "scores"), (fam, "model")], rows
        )
        names = np.asarray(s.names.get(fam, [""]), dtype=object)
        models = np.asarray(s.names.get("model", [""]), dtype=object)
        return Predicted(labels, names, scores, model, models)

    def history(self, columns: Sequence[str] | None = None, batch: int | None = None) -> History:
        cols = list(columns or HISTORY_COLUMNS)

        def read(s: State, r: Reader, ov: Overlay | None) -> History:
            parts = [read_history(r, n, cols, batch) for n, _ in s.history]
            parts += ov.entries(cols, batch) if ov is not None else []
            if not parts:
                return History({k: np.zeros(0) for k in cols})
            return History({k: np.concatenate([p[k] for p in parts]) for k in cols})

        return self._run(read)

    def backbones(self) -> dict[str, BackboneEntry]:
        s = self.state()
        return {n: self._entry(s, n) for n in s.backbones}

    def _entry(self, s: State, name: str) -> BackboneEntry:
        meta = s.backbones[name]
        return BackboneEntry(
            name=name,
            fingerprint=Fingerprint(json.loads(meta["fingerprint"])),
            dim=int(meta["dim"]),
            dtype=str(meta["dtype"]),
            count=int(np.count_nonzero(self.valid(name))),
            created_at=str(meta.get("created_at", "")),
        )

    def valid(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        return self._column(backbone_family(name), "valid", rows)

    def embeddings(self, name: str, rows: np.ndarray | None) -> np.ndarray:
        fam = backbone_family(name)

        def read(s: State, r: Reader, _: Overlay | None) -> np.ndarray:
            col, ps = s.columns(fam)["embeddings"], s.maps.get(fam, [])
            n = s.rows if rows is None else len(rows)
            # the float32 result first: a matrix too big for memory fails here as MemoryError,
            # not somewhere inside HDF5 halfway through the read
            out = np.empty((n, *col.shape), np.float32) if col.dtype != np.float32 else None
            x = (
                r.span(ps, col, "embeddings", 0, n)
                if rows is None
                else r.rows(ps, col, "embeddings", rows)
            )
            # converted by numpy: HDF5's own float16 conversion is several times slower
            return x if out is None else to_float32(x, out)

        return self._run(read)

    def damaged(self) -> dict[str, str]:
        """Every segment the maps name that is missing, unreadable, short or fails a chunk's
        checksum: file name -> why (each named once)."""
        s = self.state()
        bad: dict[str, str] = {}
        with Reader(segment_dir(self.path), s) as r:
            for name, why in r.problems(s):
                bad.setdefault(name, why)
            for name, _ in s.index:
                try:
                    read_run(r, name)
                except (StoreError, KeyError) as e:
                    bad.setdefault(name, str(e))
            for name, _ in s.history:
                try:
                    read_history(r, name, cached=False)
                except StoreError as e:
                    bad.setdefault(name, str(e))
            for name in sorted({p.file for ps in s.maps.values() for p in ps} - set(bad)):
                try:
                    verify(r, name)  # every chunk's checksum
                except StoreError as e:
                    bad.setdefault(name, str(e))
        return bad

    def repair(self, damaged: dict[str, str]) -> list[str]:
        """Drop the pieces of rebuildable families held in ``damaged`` files (their rows are
        made again by the next run) and rebuild a damaged path index; refuse, changing nothing,
        where image-table rows are lost. The caller holds the writer's lock."""
        s, bad = self.state(), set(damaged)
        table_lost = [p for p in s.maps.get(TABLE, []) if p.file in bad]
        if table_lost:  # the rows themselves are gone: nothing else is worth changing
            return [
                f"cannot repair: image-table rows {p.lo}..{p.hi - 1} were in {p.file}; restore "
                "that file (or the store's whole .segments folder) from a backup, or extract "
                "into a new store; nothing was changed"
                for p in table_lost
            ]
        done = []
        for fam in list(s.maps):
            gone = [p for p in s.maps[fam] if p.file in bad] if fam != TABLE else []
            if gone:
                s.maps[fam] = [p for p in s.maps[fam] if p.file not in bad]
                rows = sum(p.hi - p.lo for p in gone)
                done.append(f"repaired: dropped {rows} rows of {fam} (made again by the next run)")
        for name, n in [h for h in s.history if h[0] in bad]:  # the labels themselves stay
            s.history.remove((name, n))
            done.append(
                f"repaired: dropped {n} entries of the label history held in {name} (the labels "
                "are intact; those changes can no longer be undone)"
            )
        if any(n in bad for n, _ in s.index):
            Commit(self.path, s).rebuild_index()
            done.append("repaired: rebuilt the path index from the image table")
        else:
            save(self.path, s)
        return done

    def index_problems(self, missed: int, *, repair: bool) -> list[str]:
        """What to say of ``missed`` rows the path index does not find at their own row (the
        check reads the table); ``repair`` rebuilds it from the table's keys (the caller holds
        the writer's lock)."""
        if not missed:
            return []
        if not repair:
            return ["the path index misses rows; `penult check --repair` rebuilds it"]
        Commit(self.path, self.state()).rebuild_index()
        return ["repaired: rebuilt the path index from the image table"]


def _status(s: State, fam: str, code: np.ndarray, status: np.ndarray) -> np.ndarray:
    """Stored statuses, where none is stored (0) the one a label implies: validated by its file
    when there is one, else unlabelled."""
    names = s.names[fam]
    empty = names.index("") if "" in names else -1
    derived = np.where(code != empty, VALIDATED, UNLABELLED).astype(np.int8)
    return np.where(status == 0, derived, status).astype(np.int8)
