"""Store format 2, write side: journal shards replayed over a state into new segment files.

A commit writes the new rows (cost: what is new), compacts the blocks it touched, publishes a
new top-level file (``state.save``) and only then deletes segments no map refers to any more.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from penult.core.errors import FingerprintMismatchError, StoreError
from penult.features import journal
from penult.features.format2.files import (
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
from penult.features.format2.state import (
    ERROR,
    NON_FINITE,
    SEGMENT_ROWS,
    SIZE,
    TABLE,
    TABLE_COLUMNS,
    Orphan,
    State,
    backbone_family,
    collect_garbage,
    encoded,
    label_family,
    load,
    new_state,
    now,
    pred_family,
    review_family,
    save,
    segment_dir,
)
from penult.features.types import (
    DUBIOUS,
    HISTORY_COLUMNS,
    IMPORT_PROVENANCE,
    PREDICTED,
    UNLABELLED,
    VALIDATED,
    Fingerprint,
    sha_raw,
)

log = logging.getLogger(__name__)


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
        self.seq = 0  # the shard being replayed: a review batch's id
        self.history: list[dict[str, np.ndarray]] = []  # this commit's label changes

    # --- looking things up (stored values overlaid with this commit's pending writes) ---
    def runs(self) -> list[KeyRun]:
        if self._runs is None:
            self._runs = [read_run(self.reader, n) for n, _ in self.s.index]
        return self._runs

    def find(self, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
        keys = path_keys(paths, int(self.s.attrs["key_seed"]))
        return keys, self.find_keys(keys)

    def find_keys(self, keys: np.ndarray) -> np.ndarray:
        """The row of each path key, stored or added by this commit (-1: absent)."""
        return find_keys([*self.runs(), *self.new_keys], keys)

    def add_keys(self, run: KeyRun) -> None:
        """Rows this commit adds, by path key (written as one run of the path index)."""
        self.new_keys.append(run)

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
            self.add_keys(KeyRun.sort(keys[new], rows[new]))
            self.n += int(new.sum())
        shas = a["sha256"].tolist()
        values = {
            "key": keys,
            "path": encoded(paths),
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
                if col in IMPORT_PROVENANCE and meta.get("origin"):
                    diff &= ~self._person_reviewed(col, rows)
                    self._review(col, rows[diff], codes[diff], None, meta["who"],
                                 "file:" + meta["origin"], int(meta["when"]), history="relabel")  # fmt: skip
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
            add_precision(have, fp["precision"])
            return
        self.s.backbones[name] = backbone_meta(fp, meta["dim"], meta["dtype"])
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
        if self.s.maps.get(review_family(meta["column"])):  # status follows the new label
            z = np.zeros(int(keep.sum()))
            self.put(review_family(meta["column"]), rows[keep], {
                "status": z.astype(np.int8), "who": z.astype(np.int32),
                "when": z.astype(np.int64), "source": z.astype(np.int32),
            })  # fmt: skip

    def _apply_review(self, meta: dict, a: dict[str, np.ndarray]) -> None:
        for col in meta["columns"]:
            _, rows = self.find(a[f"path__{col}"].tolist())
            keep = rows >= 0  # checked when written; a row can only be missing after a repair
            if meta.get("note_only"):  # history only: the labels stay as they are
                self._note(col, rows[keep], meta)
                continue
            codes = self.codes(label_family(col), a[f"value__{col}"][keep].tolist())
            status = a[f"status__{col}"][keep]
            r = rows[keep]
            moved = self.current(label_family(col), "code", r) != codes
            self._review(col, r, codes, status, meta["who"], meta["source"], int(meta["when"]))
            if moved.any():  # validating changes the status alone: the labels stay untouched
                self.put(label_family(col), r[moved], {"code": codes[moved]})

    def _note(self, col: str, rows: np.ndarray, meta: dict) -> None:
        """A history entry per row that changes nothing (a rejected proposal)."""
        fam, n = label_family(col), len(rows)
        cur = self.current(fam, "code", rows)
        names = np.asarray(self.s.names.get(fam, [""]), dtype=object)
        st = self._status(col, rows, cur)
        self.history.append({
            "batch": np.full(n, self.seq, np.int64), "row": rows.astype(np.int64),
            "column": np.full(n, col, dtype=object), "old": names[cur], "new": names[cur],
            "old_status": st, "new_status": st, "who": np.full(n, meta["who"], dtype=object),
            "when": np.full(n, int(meta["when"]), np.int64),
            "source": np.full(n, meta["source"], dtype=object),
        })  # fmt: skip

    def _apply_predictions(self, meta: dict, a: dict[str, np.ndarray]) -> None:
        """A model's top labels for images; those without a validated or dubious label become
        ``predicted`` (the label itself stays empty: predictions never train a model)."""
        _, rows = self.find(a["path"].tolist())
        keep = rows >= 0
        rows, col = rows[keep], meta["column"]
        if not len(rows):
            return
        top = a["labels"][keep]
        codes = self.codes(pred_family(col), top.ravel().tolist()).reshape(top.shape)
        model = self.codes("model", [meta["model"]])[0]
        self.put(pred_family(col), rows, {
            "labels": codes, "scores": a["scores"][keep].astype(np.float32),
            "model": np.full(len(rows), model, np.int32),
        })  # fmt: skip
        self.s.maps.setdefault(pred_family(col), [])
        old = self.current(label_family(col), "code", rows)
        open_ = ~np.isin(self._status(col, rows, old), (VALIDATED, DUBIOUS))
        if open_.any():
            r, n = rows[open_], int(open_.sum())
            self.put(review_family(col), r, {
                "status": np.full(n, PREDICTED, np.int8),
                "who": np.full(n, self.codes("who", [meta["who"]])[0], np.int32),
                "when": np.full(n, int(meta["when"]), np.int64),
                "source": np.full(n, self.codes("source", ["model:" + meta["model"]])[0], np.int32),
            })  # fmt: skip
            self.s.maps.setdefault(review_family(col), [])

    def _person_reviewed(self, col: str, rows: np.ndarray) -> np.ndarray:
        """Rows whose label ``col`` a person (not a file) last set: an import keeps them."""
        if not self.s.maps.get(review_family(col)):
            return np.zeros(len(rows), bool)
        src = self.current(review_family(col), "source", rows)
        names = np.asarray(self.s.names.get("source", [""]), dtype=object)
        return (src != 0) & ~np.char.startswith(names[src].astype(str), "file:")

    def _status(self, col: str, rows: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """The status of label ``codes`` of ``rows`` (never recorded: validated where labelled)."""
        names = np.asarray(self.s.names.get(label_family(col), [""]), dtype=object)
        derived = np.where(names[codes] != "", VALIDATED, UNLABELLED).astype(np.int8)
        if not self.s.maps.get(review_family(col)):
            return derived
        stored = self.current(review_family(col), "status", rows)
        return np.where(stored == 0, derived, stored).astype(np.int8)

    def _review(
        self, col: str, rows: np.ndarray, codes: np.ndarray, status: np.ndarray | None,
        who: str, source: str, when: int, *, history: str = "all",
    ) -> None:  # fmt: skip
        """Record new labels ``codes`` of ``rows`` with their provenance, and the change in the
        history (``history="relabel"``: only a label that replaces another, as an import's);
        ``status`` None derives it (validated where labelled)."""
        if not len(rows):
            return
        fam, n = label_family(col), len(rows)
        old = self.current(fam, "code", rows)
        old_status = self._status(col, rows, old)
        if status is None:
            names = np.asarray(self.s.names[fam], dtype=object)
            status = np.where(names[codes] != "", VALIDATED, UNLABELLED).astype(np.int8)
        self.put(review_family(col), rows, {
            "status": np.asarray(status, np.int8),
            "who": np.full(n, self.codes("who", [who])[0], np.int32),
            "when": np.full(n, when, np.int64),
            "source": np.full(n, self.codes("source", [source])[0], np.int32),
        })  # fmt: skip
        self.s.maps.setdefault(review_family(col), [])
        self.s.maps.setdefault(fam, [])
        names = np.asarray(self.s.names[fam], dtype=object)
        k = np.ones(n, bool) if history == "all" else (names[old] != "") & (old != codes)
        if k.any():
            m = int(k.sum())
            self.history.append({
                "batch": np.full(m, self.seq, np.int64), "row": rows[k].astype(np.int64),
                "column": np.full(m, col, dtype=object), "old": names[old[k]],
                "new": names[codes[k]], "old_status": old_status[k],
                "new_status": np.asarray(status, np.int8)[k], "who": np.full(m, who, dtype=object),
                "when": np.full(m, when, np.int64), "source": np.full(m, source, dtype=object),
            })  # fmt: skip

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
        self._write_history()
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

    def _write_history(self) -> None:
        """This commit's label changes as one new history file (append-only); many small
        files are merged size-tiered, like the path index."""
        if self.history:
            cols = {k: np.concatenate([h[k] for h in self.history]) for k in self.history[0]}
            name = write_segment(self.reader.folder, "history", cols, store=self.store)
            self.s.history.append((name, len(cols["row"])))
        for i, j in reversed(index_merges([k for _, k in self.s.history])):
            parts = [read_history(self.reader, n) for n, _ in self.s.history[i:j]]
            cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            name = write_segment(self.reader.folder, "history", cols, store=self.store)
            self.s.history[i:j] = [(name, len(cols["row"]))]

    def rebuild_index(self) -> None:
        """The path index made again from the table's key column (``check --repair``)."""
        key = self.reader.span(self.s.maps.get(TABLE, []), TABLE_COLUMNS["key"], "key", 0, self.n)
        run = KeyRun.sort(key, np.arange(self.n, dtype=np.int64))
        self.s.index = [(write_run(self.reader.folder, run, self.store), len(run.row))]
        self.reader.close()
        save(self.path, self.s)
        collect_garbage(self.path, self.s)


def backbone_meta(fp: dict[str, Any], dim: int, dtype: str) -> dict[str, Any]:
    """A backbone's entry in the state (its attributes in the top-level file) from the
    fingerprint it was registered with."""
    attrs = {
        k: v if isinstance(v, str | int | float) else json.dumps(v, sort_keys=True)
        for k, v in fp.items()
    }
    return {**attrs, "fingerprint": json.dumps(fp, sort_keys=True), "dim": int(dim),
            "dtype": np.dtype(dtype).name, "created_at": now()}  # fmt: skip


def add_precision(entry: dict[str, Any], precision: str) -> None:
    """Record that rows of a backbone entry were also made in ``precision`` (comma-separated
    tags: rows of agreeing engines share one entry)."""
    have = set(str(entry.get("precision", "")).split(",")) | set(str(precision).split(","))
    entry["precision"] = ",".join(sorted(p for p in have if p))


def read_history(
    reader: Reader,
    name: str,
    columns: Sequence[str] = HISTORY_COLUMNS,
    batch: int | None = None,
    *,
    cached: bool = True,
) -> dict[str, np.ndarray]:
    """One history file's ``columns`` (strings as str objects), all entries or one batch's.
    A history file is never changed (a merge writes a new one), so what was read is kept: an
    undo in a running server reads dozens of files, about 4 ms each to open (``cached=False``:
    read from the file, as a check must)."""
    want = list(columns) if batch is None else list(dict.fromkeys(["batch", *columns]))
    with _HISTORY_LOCK:  # a server reads the history from several threads
        got = {k: _HISTORY.get((str(reader.folder), name, k)) if cached else None for k in want}
    missing = [k for k, v in got.items() if v is None]
    if missing:
        f = reader.file(name)
        try:
            for k in missing:
                ds = f[k]
                got[k] = ds.asstr()[()] if ds.dtype.kind == "O" else ds[()]
        except (KeyError, OSError, ValueError) as e:
            raise StoreError(f"history segment {reader.folder / name} is damaged ({e})") from None
        with _HISTORY_LOCK:
            for k in missing:
                _HISTORY[(str(reader.folder), name, k)] = got[k]
                _HISTORY.move_to_end((str(reader.folder), name, k))
            while sum(len(v) for v in _HISTORY.values()) > HISTORY_CACHE and len(_HISTORY) > 1:
                _HISTORY.popitem(last=False)
    if batch is None:
        return {k: got[k] for k in columns}
    keep = got["batch"] == batch
    return {k: got[k][keep] for k in columns}


HISTORY_CACHE = 4_000_000  # history entries (per column) kept in memory across reads
_HISTORY: OrderedDict[tuple[str, str, str], np.ndarray] = OrderedDict()
_HISTORY_LOCK = threading.Lock()


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


def publish_journal(path: Path, *, segment_rows: int = SEGMENT_ROWS) -> int:
    """Publish committed journal shards as segments; return how many were merged.

    Shards that cannot be read are renamed ``*.damaged`` and reported, the rest are merged: the
    images they held are simply extracted again. Caller must hold the write lock.
    """
    journal.remove_stale_temporaries(path)
    for stale in path.parent.glob(f".{path.name}.top-*"):
        stale.unlink(missing_ok=True)
    if path.exists():
        with h5py.File(path, "r") as f:
            state = load(f)
    else:
        state = new_state(segment_rows)
    collect_garbage(path, state)  # segments of a commit killed before it published
    shards = journal.list_shards(path)
    done = int(state.attrs.get("journal_seq", 0))
    fresh = [s for s in shards if journal.seq_of(s) > done]
    if not fresh and path.exists():
        for s in shards:  # published before a kill, not yet deleted
            s.unlink(missing_ok=True)
        return 0
    c = Commit(path, state)
    damaged = []
    for shard in fresh:
        try:
            c.seq = journal.seq_of(shard)
            meta, arrays = journal.read_shard(shard)
            c.apply(meta, arrays)
        except (journal.DamagedShardError, Orphan) as e:
            damaged.append(shard)
            log.warning("journal shard %s set aside: %s", shard.name, e)
    c.finish(max([journal.seq_of(s) for s in shards], default=done))
    for shard in shards:
        if shard in damaged:
            journal.set_aside(shard)
        else:
            shard.unlink(missing_ok=True)
    return len(fresh) - len(damaged)
