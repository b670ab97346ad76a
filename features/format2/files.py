"""Segment files and the piece maps that stitch them into whole columns (store format 2).

A *family* is a set of columns written together (the image table, one backbone's embeddings and
valid flags, one label column, ...). Its rows live in immutable segment files; a *piece map* says
which file holds which rows: piece ``(lo, hi, file, offset)`` means table rows ``lo..hi-1`` are rows
``offset..`` of ``file``. A later write never edits a file: it writes a new one and the map is cut
so the new piece covers the old rows (an overlay). Rows no piece covers read as the column's fill
value (no embedding, no label). Compaction rewrites the pieces of one block of ``segment_rows``
rows into one file, so a finished block is one segment of about a million rows.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from penult.core.errors import StoreError
from penult.core.files import atomic_path

STR = h5py.string_dtype("utf-8")
GAP_FILL = 256  # updated rows closer than this share one piece (the rows between are copied)
TIER = 8  # this many neighbouring pieces of about the same size are merged into one
MAX_PIECES = 48  # a block with more pieces than this is rewritten as one
CHECKSUMS = True  # Fletcher-32 on every chunk (benchmarks/checksum_bench.py measures it)


@dataclass(frozen=True)
class Column:
    dtype: np.dtype | object  # a numpy dtype, or STR for variable-length strings
    shape: tuple[int, ...] = ()
    fill: object = 0


@dataclass(frozen=True)
class Piece:
    lo: int
    hi: int
    file: str
    offset: int


def cut(pieces: list[Piece], new: Sequence[Piece]) -> list[Piece]:
    """The map with ``new`` pieces laid over the old ones (old rows under a new piece are dropped)."""
    out = list(pieces)
    for n in new:
        kept = []
        for p in out:
            if p.hi <= n.lo or p.lo >= n.hi:
                kept.append(p)
                continue
            if p.lo < n.lo:
                kept.append(Piece(p.lo, n.lo, p.file, p.offset))
            if p.hi > n.hi:
                kept.append(Piece(n.hi, p.hi, p.file, p.offset + n.hi - p.lo))
        kept.append(n)
        out = sorted(kept, key=lambda p: p.lo)
    return out


def overlapping(pieces: list[Piece], lo: int, hi: int) -> Iterator[Piece]:
    for p in pieces:
        if p.lo < hi and p.hi > lo:
            yield p


class Reader:
    """Reads columns of one family through its piece map; files stay open until ``close``.

    A missing or truncated segment is a StoreError naming the file, never rows of fill values.
    With ``state`` (the store's state: ``attrs``, ``maps``, ``index``), each segment is checked
    when opened against what the state says it is: its family, its own name and the store it
    was written for (a segment of another store, or two segments swapped, is refused); a chunk
    whose bytes changed fails its Fletcher-32 checksum on read, also a StoreError.
    """

    def __init__(self, folder: Path, state=None):
        self.folder = folder
        self.state = state
        self._files: dict[str, h5py.File] = {}

    def file(self, name: str) -> h5py.File:
        f = self._files.get(name)
        if f is None:
            path = self.folder / name
            try:
                f = h5py.File(path, "r")
            except FileNotFoundError:
                raise StoreError(
                    f"segment {path} is missing; `penult check --repair` rebuilds what can be rebuilt"
                ) from None
            except OSError as e:
                raise StoreError(
                    f"segment {path} cannot be read (truncated or damaged: {e})"
                ) from None
            if self.state is not None and (why := self._foreign(name, f)):
                f.close()
                raise StoreError(
                    f"segment {path} is not the one this store wrote there ({why}); "
                    "`penult check --repair` sets it aside and its rows are made again"
                )
            self._files[name] = f
        return f

    def _foreign(self, name: str, f: h5py.File) -> str:
        """Why segment ``name`` is not what the state says it is ("" when it is)."""
        s = self.state
        family = "index" if any(n == name for n, _ in s.index) else next(
            (fam for fam, ps in s.maps.items() if any(p.file == name for p in ps)), None
        )  # fmt: skip
        a = f.attrs
        if family is not None and a.get("family") is not None and a["family"] != family:
            return f"it holds {a['family']!r}, the store's map says {family!r}"
        if "store" in a and str(a["store"]) != store_id(s.attrs):
            return "it was written for another store"
        if "name" in a and a["name"] != name:
            return f"it was written as {a['name']}"
        return ""

    def dataset(self, piece: Piece, column: str) -> h5py.Dataset:
        ds = self.file(piece.file).get(column)
        need = piece.offset + piece.hi - piece.lo
        if not isinstance(ds, h5py.Dataset) or ds.shape[0] < need:
            raise StoreError(
                f"segment {self.folder / piece.file} is truncated or damaged: column {column!r} "
                f"should hold {need} rows"
            )
        return ds

    def problems(self, state) -> Iterator[tuple[str, str]]:
        """(file, why) for every column of every piece of ``state``'s maps whose segment is
        missing, unreadable or shorter than the piece (metadata only: no data read)."""
        for fam, ps in state.maps.items():
            for piece in ps:
                for col in state.columns(fam):
                    try:
                        self.dataset(piece, col)
                    except StoreError as e:
                        yield piece.file, str(e)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def span(self, pieces: list[Piece], col: Column, name: str, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo..hi-1`` of one column (read straight into the output, piece by piece)."""
        with self._checked(pieces, name):
            return self._span(pieces, col, name, lo, hi)

    @contextmanager
    def _checked(self, pieces: list[Piece], name: str) -> Iterator[None]:
        """An HDF5 read error (a chunk's checksum, a damaged file) as a StoreError naming it."""
        try:
            yield
        except OSError as e:
            files = sorted({p.file for p in pieces if p.file in self._files}) or ["?"]
            raise StoreError(
                f"segment {self.folder / files[-1] if len(files) == 1 else self.folder} is "
                f"damaged: reading column {name!r} failed ({e}); `penult check` names the file, "
                "`penult check --repair` sets it aside"
            ) from None

    def _span(self, pieces: list[Piece], col: Column, name: str, lo: int, hi: int) -> np.ndarray:
        out = _empty(col, hi - lo)
        at = lo
        for p in overlapping(pieces, lo, hi):
            a, b = max(lo, p.lo), min(hi, p.hi)
            if a > at:
                out[at - lo : a - lo] = _fill(col)
            src = np.s_[p.offset + a - p.lo : p.offset + b - p.lo]
            if out.dtype == object:
                out[a - lo : b - lo] = self.dataset(p, name)[src]
            else:
                self.dataset(p, name).read_direct(out, src, np.s_[a - lo : b - lo])
            at = b
        if at < hi:
            out[at - lo :] = _fill(col)
        return out

    def rows(self, pieces: list[Piece], col: Column, name: str, rows: np.ndarray) -> np.ndarray:
        """The column at sorted, unique ``rows``."""
        with self._checked(pieces, name):
            return self._rows(pieces, col, name, rows)

    def _rows(self, pieces: list[Piece], col: Column, name: str, rows: np.ndarray) -> np.ndarray:
        out = _empty(col, len(rows))
        covered = np.zeros(len(rows), bool)
        if len(rows):
            for p in overlapping(pieces, int(rows[0]), int(rows[-1]) + 1):
                i, j = np.searchsorted(rows, [p.lo, p.hi])
                if i < j:
                    self._read(p, name, rows[i:j], out, i)
                    covered[i:j] = True
        if not covered.all():
            out[~covered] = _fill(col)
        return out

    def _read(self, p: Piece, name: str, rows: np.ndarray, out: np.ndarray, i: int) -> None:
        ds = self.dataset(p, name)
        local = rows - p.lo + p.offset
        a, b = int(local[0]), int(local[-1]) + 1
        n = len(rows)
        if b - a == n and out.dtype != object:  # contiguous: straight into the output
            ds.read_direct(out, np.s_[a:b], np.s_[i : i + n])
        elif b - a <= 4 * n or b - a <= 4096:  # dense: slabs beat a point selection
            step = 4096  # a bounded slab: memory stays near the rows asked for
            for s in range(a, b, step):
                u, v = np.searchsorted(local, [s, s + step])
                if v > u:
                    out[i + u : i + v] = ds[s : min(s + step, b)][local[u:v] - s]
        else:
            out[i : i + n] = ds[local]


def _strings_digest(v: np.ndarray) -> str:
    h = hashlib.sha256()
    for x in v:
        b = x if isinstance(x, bytes) else str(x).encode("utf-8", "surrogateescape")
        h.update(len(b).to_bytes(4, "little") + b)
    return h.hexdigest()


def verify(reader: Reader, name: str, slab: int = 64 << 20) -> None:
    """Read every chunk of every column of segment ``name`` (HDF5 checks each chunk's
    Fletcher-32 checksum as it reads; string columns are checked against their digest); a
    failure is a StoreError naming the file."""
    f = reader.file(name)
    k = ""
    try:
        for k, ds in f.items():
            if not isinstance(ds, h5py.Dataset) or not ds.shape or ds.chunks is None:
                continue
            if ds.dtype == object or h5py.check_string_dtype(ds.dtype):
                want = f.attrs.get(f"sha256:{k}")
                if want is not None and _strings_digest(ds[()]) != want:
                    raise OSError("its strings differ from their digest")
                continue
            row = max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64)))
            step = max(1, slab // row)
            for s in range(0, ds.shape[0], step):
                ds[s : s + step]
    except OSError as e:
        raise StoreError(
            f"segment {reader.folder / name} is damaged: column {k!r} fails its checksum ({e})"
        ) from None


def _empty(col: Column, n: int) -> np.ndarray:
    if col.dtype is STR:
        return np.empty(n, dtype=object)
    return np.empty((n, *col.shape), dtype=col.dtype)


def _fill(col: Column) -> object:
    """What a row no piece covers reads as."""
    return b"" if col.dtype is STR else col.fill


def store_id(attrs: dict) -> str:
    """The identity a store's segments carry: its random per-store key seed."""
    return str(attrs.get("key_seed", ""))


def write_segment(
    folder: Path,
    family: str,
    columns: dict[str, np.ndarray],
    *,
    contiguous: bool = False,
    store: str = "",
) -> str:
    """Write one immutable segment (temporary name, fsync, rename); return its file name. It
    records its family, its own name and ``store`` (the store's identity), checked when read."""
    folder.mkdir(exist_ok=True)
    name = f"{_safe(family)}-{uuid.uuid4().hex[:16]}.h5"
    with atomic_path(folder / name) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["family"] = family
        f.attrs["name"] = name
        if store:
            f.attrs["store"] = store
        for k, v in columns.items():
            if contiguous:  # for memory maps (the path index)
                f.create_dataset(k, data=v)
            else:
                _create(f, k, v)
    return name


def _create(f: h5py.File, name: str, v: np.ndarray) -> None:
    """A chunked column with a Fletcher-32 checksum per chunk (HDF5 verifies it on every read:
    changed bytes are an error, never other numbers)."""
    n = max(1, len(v))
    if v.dtype == object:  # HDF5 filters cannot take variable-length strings: a digest instead
        f.create_dataset(name, data=v, dtype=STR, chunks=(min(n, 16384),))
        if CHECKSUMS:
            f.attrs[f"sha256:{name}"] = _strings_digest(v)
        return
    row_bytes = max(1, v.itemsize * int(np.prod(v.shape[1:], dtype=np.int64)))
    rows = max(1, min(n, (1 << 20) // row_bytes))  # about 1 MiB chunks
    f.create_dataset(name, data=v, chunks=(rows, *v.shape[1:]), fletcher32=CHECKSUMS)


def _safe(family: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in family)[:60]


def plan_runs(rows: np.ndarray, block: int) -> list[tuple[int, int]]:
    """Row spans ``[lo, hi)`` that cover sorted unique ``rows``: neighbours closer than GAP_FILL
    share a span, no span crosses a block boundary, and a block with many spans becomes one."""
    if not len(rows):
        return []
    cuts = np.flatnonzero((np.diff(rows) > GAP_FILL) | (np.diff(rows // block) != 0)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(rows)]])
    spans = [(int(rows[s]), int(rows[e - 1]) + 1) for s, e in zip(starts, ends, strict=True)]
    out: list[tuple[int, int]] = []
    by_block: dict[int, list[tuple[int, int]]] = {}
    for s in spans:
        by_block.setdefault(s[0] // block, []).append(s)
    for group in by_block.values():
        out += [(group[0][0], group[-1][1])] if len(group) > 32 else group
    return sorted(out)


def to_merge(pieces: list[Piece], block: int, k: int, *, finished: bool) -> list[tuple[int, int]]:
    """Spans of block ``k`` to rewrite as one piece: the whole block when it was just finished
    (the tail rolls into a segment) or holds too many pieces, else runs of TIER neighbouring
    pieces of about the same size (size-tiered, so a row is rewritten a few times at most).

    A piece of at least :func:`standing` rows (a published part, a big commit) is never
    rewritten: merging it would copy its bytes to save one map entry. Only the runs of smaller
    pieces between such pieces are merged, so a block holds at most KEEP standing pieces."""
    lo, hi = k * block, (k + 1) * block
    big = standing(block)
    out: list[tuple[int, int]] = []
    runs: list[list[Piece]] = [[]]
    for p in overlapping(pieces, lo, hi):
        if p.hi - p.lo >= big:
            runs.append([])
        else:
            runs[-1].append(p)
    for ps in runs:
        if len(ps) > 1 and (finished or len(ps) > MAX_PIECES):
            out.append((ps[0].lo, ps[-1].hi))
            continue
        run: list[tuple[int, Piece]] = []
        for p in ps:
            tier = int(np.log(max(p.hi - p.lo, 1)) / np.log(TIER))
            if run and (tier != run[-1][0] or p.lo != run[-1][1].hi):
                run = []
            run.append((tier, p))
            if len(run) == TIER:
                out.append((run[0][1].lo, run[-1][1].hi))
                run = []
    return out


KEEP = 64  # standing pieces of a block at most: each at least 1/KEEP of it
MIN_STANDING = 4096  # rows: below this a piece is always merged (small blocks, tests)


def standing(block: int) -> int:
    """The fewest rows of a piece that compaction leaves as it is."""
    return max(block // KEEP, MIN_STANDING)


def path_keys(paths: Sequence[str], seed: int) -> np.ndarray:
    """(n, 2) uint64 keys of relative paths: two 64-bit multiply-xorshift lanes keyed by the
    store's random seed (so file names cannot be crafted to collide), vectorised over 8-byte words."""
    out = np.empty((len(paths), 2), np.uint64)
    step = 8192
    for s in range(0, len(paths), step):
        b = [p.encode("utf-8", "surrogateescape") for p in paths[s : s + step]]
        lens = np.fromiter(map(len, b), np.int64, len(b))
        width = max(8, -(-int(lens.max(initial=0)) // 8) * 8)
        words = np.frombuffer(np.array(b, dtype=f"S{width}").tobytes(), np.uint64)
        words = words.reshape(len(b), width // 8)
        for lane, mult in enumerate((0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F)):
            h = np.full(len(b), (seed * (lane + 3)) & (2**64 - 1), np.uint64) ^ lens.astype(
                np.uint64
            )
            m = np.uint64(mult)
            for j in range(words.shape[1]):
                live = lens > 8 * j
                x = (h ^ words[:, j]) * m
                h = np.where(live, x ^ (x >> np.uint64(31)), h)
            h = (h ^ (h >> np.uint64(33))) * np.uint64(0xFF51AFD7ED558CCD)
            out[s : s + len(b), lane] = h ^ (h >> np.uint64(29))
    return out


@dataclass
class KeyRun:
    """Path keys sorted (by first then second word) with the table row of each. Read from disk,
    the arrays are memory maps: a lookup touches the pages its binary searches visit, not the
    whole run, so adding rows to a large store does not read its whole index."""

    key0: np.ndarray  # (n,) uint64
    key1: np.ndarray  # (n,) uint64
    row: np.ndarray  # (n,) int64

    @staticmethod
    def sort(key: np.ndarray, row: np.ndarray) -> KeyRun:
        order = np.lexsort((key[:, 1], key[:, 0]))
        return KeyRun(key[order, 0], key[order, 1], row[order])

    @staticmethod
    def merge(runs: Sequence[KeyRun]) -> KeyRun:
        if not runs:
            return KeyRun(np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.int64))
        key = np.stack(
            [np.concatenate([r.key0 for r in runs]), np.concatenate([r.key1 for r in runs])], 1
        )
        return KeyRun.sort(key, np.concatenate([r.row for r in runs]))

    def columns(self) -> dict[str, np.ndarray]:
        return {"key0": self.key0, "key1": self.key1, "row": self.row}

    def find(self, q: np.ndarray, *, presorted: bool = False) -> np.ndarray:
        """Row of each query key, -1 where absent (``presorted``: ``q`` is sorted by its first
        word already, and is searched as it is)."""
        if not len(self.row) or not len(q):
            return np.full(len(q), -1, np.int64)
        if presorted:
            return self._find_sorted(q[:, 0], q[:, 1])
        order = np.argsort(q[:, 0])  # sorted queries walk the map's pages in order
        out = np.empty(len(q), np.int64)
        out[order] = self._find_sorted(q[order, 0], q[order, 1])
        return out

    def _find_sorted(self, q0: np.ndarray, q1: np.ndarray) -> np.ndarray:
        n = len(self.row)
        pos = np.searchsorted(self.key0, q0)
        p = np.minimum(pos, n - 1)
        first = (pos < n) & (self.key0[p] == q0)
        hit = first & (self.key1[p] == q1)
        found = np.full(len(q0), -1, np.int64)
        found[hit] = self.row[p[hit]]
        # first words equal but second not: another key with the same first word may follow
        for i in np.flatnonzero(first & ~hit).tolist():
            j = int(pos[i])
            while j < n and self.key0[j] == q0[i]:
                if self.key1[j] == q1[i]:
                    found[i] = self.row[j]
                    break
                j += 1
        return found


def find_keys(runs: Sequence[KeyRun], q: np.ndarray) -> np.ndarray:
    """Row of each query key in any of ``runs``, -1 where absent. The queries are sorted once
    for all the runs (a store has a dozen or more)."""
    found = np.full(len(q), -1, np.int64)
    if not len(q) or not runs:
        return found
    order = np.argsort(q[:, 0], kind="stable")
    qs = q[order]
    for r in runs:
        miss = np.flatnonzero(found < 0)
        if not len(miss):
            break
        found[miss] = r.find(qs[miss], presorted=True)
    del qs  # (a store of 100 M rows plans 16 bytes a row lighter)
    out = np.empty_like(found)
    out[order] = found
    return out


def write_run(folder: Path, run: KeyRun, store: str = "") -> str:
    return write_segment(folder, "index", run.columns(), contiguous=True, store=store)


def read_run(reader: Reader, name: str) -> KeyRun:
    """A run's arrays memory-mapped from its (contiguous, uncompressed) datasets."""
    f = reader.file(name)
    try:
        cols = {}
        for k, dt in (("key0", np.uint64), ("key1", np.uint64), ("row", np.int64)):
            ds = f[k]
            offset = ds.id.get_offset()
            if offset is None or ds.shape[0] == 0:  # nothing written: empty
                cols[k] = np.zeros(0, dt)
            else:
                cols[k] = np.memmap(reader.folder / name, dt, "r", offset, ds.shape)
        return KeyRun(**cols)
    except (KeyError, OSError, ValueError) as e:
        raise StoreError(f"index segment {reader.folder / name} is damaged ({e})") from None


def index_merges(sizes: list[int]) -> list[tuple[int, int]]:
    """Runs ``[i, j)`` of neighbouring index files to merge (size-tiered, like the pieces)."""
    if len(sizes) > MAX_PIECES:
        return [(0, len(sizes))]
    out, start = [], 0
    tiers = [int(np.log(max(s, 1)) / np.log(TIER)) for s in sizes]
    for i in range(1, len(sizes) + 1):
        if i == len(sizes) or tiers[i] != tiers[start]:
            if i - start >= TIER:
                out.append((start, i))
            start = i
    return out
