"""Review actions that are committed but not yet published, as every reader sees them.

A review action (validate, move, dubious, undo) is durable once its journal shard is renamed
into place; publishing it (replaying it into new segments, writing a new view and top-level file)
costs what rewriting a whole block costs, because a handful of rows scattered over a million
cannot be mapped piece by piece into the plain-h5py view. So `penult serve --annotate` journals
an action and answers, and publishes when idle (``StoreWriter(publish=False)``). Until then the
readers of this module's callers replay the pending review shards over the published state in
memory, exactly as a publish will (the same :class:`Commit` code), so a page shows the action at
once and an undo finds it. Only ``review`` shards are read here: the shards of an extract still
running (rows, embeddings) become visible when it commits, as before.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from penult.core.files import file_identity
from penult.features import journal
from penult.features.format2.commit import Commit
from penult.features.format2.state import State

__all__ = ["Overlay", "pending_review", "overlay", "identity"]

KIND = "review"


@dataclass(frozen=True)
class Overlay:
    """Pending review shards replayed over a published state: the state with the names they
    add, each family's pending (rows, values) in order, and their history entries."""

    key: str  # the shards' names: changes whenever one is added or published
    state: State
    pending: dict[str, list[tuple[np.ndarray, dict[str, np.ndarray]]]]
    history: list[dict[str, np.ndarray]]

    def apply(self, family: str, column: str, x: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
        """``x`` (a column read from the segments: all rows, or ``rows``) with the pending
        values written over it."""
        updates = self.pending.get(family)
        if not updates:
            return x
        if not x.flags.writeable:
            x = x.copy()
        for r, values in updates:
            v = values[column]
            if rows is None:
                keep = r < len(x)
                x[r[keep]] = v[keep]
            elif len(r) and len(rows):
                pos = np.minimum(np.searchsorted(r, rows), len(r) - 1)
                hit = r[pos] == rows
                x[hit] = v[pos[hit]]
        return x

    def entries(self, columns: list[str], batch: int | None) -> list[dict[str, np.ndarray]]:
        """The pending history entries (``columns`` of them; one batch's when asked)."""
        out = []
        for h in self.history:
            keep = np.ones(len(h["row"]), bool) if batch is None else h["batch"] == batch
            if keep.any():
                out.append({k: _plain(h[k][keep]) for k in columns})
        return out


def _plain(v: np.ndarray) -> np.ndarray:
    """History strings as the stored history gives them (str objects)."""
    if v.dtype == object:
        out = np.empty(len(v), dtype=object)
        out[:] = [str(x) for x in v]
        return out
    return v


def identity(path: Path) -> tuple[int, ...]:
    """What changes when a commit replaces the top-level file at ``path``."""
    return file_identity(os.stat(path))


def pending_review(path: Path, published: int) -> list[Path]:
    """Review shards in the journal committed after journal sequence ``published``."""
    shards = journal.list_shards(path)
    return [p for p in shards if journal.kind_of(p) == KIND and journal.seq_of(p) > published]


_CACHE: dict[tuple[str, tuple[int, ...]], tuple[tuple[str, ...], Overlay, Commit]] = {}
_LOCK = threading.Lock()


def overlay(path: Path, s: State, ident: tuple[int, ...], shards: list[Path]) -> Overlay:
    """The overlay of ``shards`` over published state ``s`` (the top-level file ``ident``).
    Kept per store: the next call with one more shard replays only that one. Raises
    FileNotFoundError when a shard is gone meanwhile (published by a concurrent writer: the
    caller reads the new state); a damaged shard is left out (the next publish sets it aside)."""
    names = tuple(p.name for p in shards)
    key = (str(path), ident)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] == names:
            return hit[1]
        base = hit if hit is not None and names[: len(hit[0])] == hit[0] else None
        if base is None:
            if hit is not None:
                hit[2].reader.close()
                del _CACHE[key]
            c, todo = Commit(path, s.copy()), shards
        else:
            old = base[2]
            c, todo = Commit(path, old.s.copy()), shards[len(base[0]) :]
            c.pending = {k: list(v) for k, v in old.pending.items()}
            c.history, c._runs = list(old.history), old._runs
            c.reader.close()
            c.reader = old.reader  # its segments' files stay open: the base state is the same
        try:
            for shard in todo:
                c.seq = journal.seq_of(shard)
                try:
                    meta, arrays = journal.read_shard(shard)
                except journal.DamagedShardError:
                    if not shard.exists():  # published and deleted meanwhile
                        raise FileNotFoundError(shard) from None
                    continue  # damaged: the next publish sets it aside
                c.apply(meta, arrays)
        except BaseException:
            c.reader.close()
            _CACHE.pop(key, None)
            raise
        ov = Overlay("|".join(names), c.s, c.pending, c.history)
        stale = [k for k in _CACHE if k[0] == str(path)] + list(_CACHE)[:-7]
        for k in dict.fromkeys(k for k in stale if k != key):
            _CACHE.pop(k)[2].reader.close()
        _CACHE[key] = (names, ov, c)
        return ov
