"""Reviewing labels in the store: validate, move to another taxon, mark dubious, undo.

EcoTaxa's model: each image's label of each level (``label``, ``genus``, ...) has a status
(unlabelled, predicted, validated, dubious), who set it, when, and from what (a file, a person, a
model). Every change also goes into an append-only history, so nothing is lost: an undo is one
more change, which names the batch it takes back. Each action is one batch and one journal
commit under the store's single writer, so a second writer (an extract, another server) makes
it fail with a message and no damage, and a kill leaves the batch either whole or absent.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from penult.core.errors import StoreError
from penult.core.labels import SAMPLE
from penult.features.store import FeatureStore, StoreWriter, current_user
from penult.features.types import DUBIOUS, STATUSES, UNLABELLED, VALIDATED, History

__all__ = [
    "Batch",
    "check_label",
    "coarser_levels",
    "HISTORY_FIELDS",
    "history_table",
    "read_paths",
    "undone_batches",
    "mark_dubious",
    "move",
    "undo",
    "validate",
]

PERSON = "person"
_NOT_LEVELS = (SAMPLE, "split")


@dataclass
class Batch:
    """What one review action did: images changed per level, and those it left alone (why)."""

    action: str
    changed: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)

    def summary(self) -> str:
        done = ", ".join(f"{n} {lvl}" for lvl, n in self.changed.items()) or "nothing"
        out = f"{self.action}: {done} changed"
        if self.skipped:
            path, why = self.skipped[0]
            more = f" (and {len(self.skipped) - 1} more)" if len(self.skipped) > 1 else ""
            out += f"; {len(self.skipped)} left as they were: {path}: {why}{more}"
        return out


def check_label(name: str) -> str:
    """A label name as stored (surrounding spaces stripped), or a StoreError saying what is
    wrong: empty, control characters or path separators (labels become folder names)."""
    v = name.strip() if isinstance(name, str) else ""
    if not v:
        raise StoreError("a label name must not be empty")
    if any(unicodedata.category(c).startswith("C") for c in v):
        raise StoreError(f"label name {v!r} contains control characters")
    if "/" in v or "\\" in v or v in (".", ".."):
        raise StoreError(f"label name {v!r} contains a path separator")
    if len(v) > 200:
        raise StoreError(f"label name {v[:40]!r}... is longer than 200 characters")
    return v


def _rows(store: FeatureStore, paths: Sequence[str]) -> np.ndarray:
    if len(set(paths)) != len(paths):
        raise StoreError("an image is named twice")
    rows = store.find(list(paths))
    if (rows < 0).any():
        missing = [p for p, r in zip(paths, rows, strict=True) if r < 0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise StoreError(f"{store.path} has no image {missing[0]!r}{more}")
    return rows


class _Levels:
    """The store's label columns as an action needs them: one level's alone (validating reads
    nothing else), or all of them from one snapshot (a move's taxonomy)."""

    def __init__(self, store: FeatureStore):
        self.store = store
        self._all: dict[str, tuple[np.ndarray, list[str]]] | None = None
        self._one: dict[str, tuple[np.ndarray, list[str]] | None] = {}
        self._coarser: dict[str, dict[str, dict[str, str]]] = {}

    @property
    def cols(self) -> dict[str, tuple[np.ndarray, list[str]]]:
        if self._all is None:
            self._all = self.store.labels()
        return self._all

    def values(self, level: str, rows: np.ndarray) -> np.ndarray:
        if self._all is not None:
            got = self._all.get(level)
        elif level in self._one:
            got = self._one[level]
        else:
            have = self.store.label_columns()
            got = self._one[level] = self.store.label_codes(level) if level in have else None
        if got is None:
            raise StoreError(f"{self.store.path} has no label level {level!r} "
                             f"(it has: {self.store.label_columns()})")  # fmt: skip
        codes, names = got
        return np.asarray(names, dtype=object)[codes[rows]]

    def coarser(self, level: str) -> dict[str, dict[str, str]]:
        """The columns that are a function of ``level`` (genus, family, ... of a species):
        column -> {value of level -> its value}, learnt from the stored labels."""
        if level not in self._coarser:
            self._coarser[level] = self._find_coarser(level)
        return self._coarser[level]

    def _find_coarser(self, level: str) -> dict[str, dict[str, str]]:
        codes, names = self.cols[level]
        # compared as codes: an object array of a million names costs 50 ms a move
        empty = np.flatnonzero(np.asarray(names, dtype=object) == "")
        labelled = ~np.isin(codes, empty) if len(empty) else np.ones(len(codes), bool)
        a = codes[labelled]
        used = np.unique(a)
        out = {}
        for col, (c, cn) in self.cols.items():
            if col == level or col in _NOT_LEVELS:
                continue
            b = c[labelled]
            first = np.full(len(names), -1, np.int64)
            first[a] = b  # one value of the column per class (any one)
            if len(used) and (first[a] == b).all():  # every image agrees: a function of level
                if len(np.unique(first[used])) < len(used):  # coarser, not a renaming
                    out[col] = {names[k]: cn[first[k]] for k in used}
        return out


def coarser_levels(store: FeatureStore, level: str) -> dict[str, dict[str, str]]:
    """The label columns that are a function of ``level`` (its taxonomy: genus, family, ...):
    column -> {value of level -> value of the column}, learnt from the stored labels."""
    return _Levels(store).coarser(level)


def _commit(
    store_path: Path, changes: dict, source: str, who: str | None, publish: bool = True,
    note_only: bool = False,
) -> None:  # fmt: skip
    """One batch; ``publish=False`` journals it and leaves publishing to a later writer (readers
    see it at once: a server's actions then cost what they write, see format2/overlay.py)."""
    with StoreWriter(store_path, publish=publish) as w:  # StoreLockedError names who writes
        w.review(changes, who=who or current_user(), source=source, note_only=note_only)


def validate(
    store_path: str | Path,
    paths: Sequence[str],
    *,
    level: str = "label",
    who: str | None = None,
    publish: bool = True,
) -> Batch:
    """Mark the images' current ``level`` labels validated (a predicted image's: the model's
    first choice); images with neither are skipped."""
    store = FeatureStore(store_path)
    rows = _rows(store, paths)
    cur = _Levels(store).values(level, rows)
    if (cur == "").any():  # a predicted image is validated as its model's first choice
        order = np.argsort(rows)
        first = store.predictions(level, rows[order]).labels[:, 0]
        cur[order] = np.where(cur[order] == "", first, cur[order])
    ok = cur != ""
    b = Batch(
        "validate",
        skipped=[
            (p, "it has no label or prediction to validate") for p in np.asarray(paths, object)[~ok]
        ],
    )
    if ok.any():
        keep = [p for p, k in zip(paths, ok, strict=True) if k]
        changes = {level: (keep, cur[ok].tolist(), [VALIDATED] * len(keep))}
        _commit(store.path, changes, PERSON, who, publish)
        b.changed[level] = len(keep)
    return b


def mark_dubious(
    store_path: str | Path,
    paths: Sequence[str],
    *,
    level: str = "label",
    who: str | None = None,
    publish: bool = True,
) -> Batch:
    """Mark the images' ``level`` labels dubious (kept, but not trusted for training)."""
    store = FeatureStore(store_path)
    rows = _rows(store, paths)
    cur = _Levels(store).values(level, rows).tolist()
    _commit(store.path, {level: (list(paths), cur, [DUBIOUS] * len(cur))}, PERSON, who, publish)
    return Batch("dubious", {level: len(cur)})


def move(
    store_path: str | Path,
    paths: Sequence[str],
    to: str,
    *,
    level: str = "label",
    who: str | None = None,
    publish: bool = True,
) -> Batch:
    """Give the images label ``to`` at ``level``, validated. Coarser levels follow the store's
    taxonomy (empty, unlabelled, for a name it does not know); finer levels whose coarse
    value changes become unlabelled (a species cannot stay in another genus)."""
    to = check_label(to)
    store = FeatureStore(store_path)
    rows = _rows(store, paths)
    paths, lv = list(paths), _Levels(store)
    moved = lv.values(level, rows) != to
    changes = {level: (paths, [to] * len(paths), [VALIDATED] * len(paths))}
    for col, mapping in lv.coarser(level).items():
        v = mapping.get(to, "")
        changes[col] = (paths, [v] * len(paths), [VALIDATED if v else UNLABELLED] * len(paths))
    for col in lv.cols:
        if col in changes or col in _NOT_LEVELS or level not in lv.coarser(col):
            continue
        p = [q for q, m in zip(paths, moved, strict=True) if m]
        if p:
            changes[col] = (p, [""] * len(p), [UNLABELLED] * len(p))
    _commit(store.path, changes, PERSON, who, publish)
    return Batch(f"move to {to!r}", {c: len(v[0]) for c, v in changes.items()})


def undone_batches(h: History) -> set[int]:
    """The batches of history ``h`` an undo has taken back."""
    src = h["source"].astype(str)
    return {int(s[len("undo:") :]) for s in np.unique(src) if s.startswith("undo:")}


def undo(
    store_path: str | Path,
    batch: int | None = None,
    *,
    who: str | None = None,
    publish: bool = True,
) -> Batch:
    """Take back one batch (default: the newest not yet taken back, undos aside): each label it
    set returns to what it was, unless it changed again since (then it is left and named)."""
    store = FeatureStore(store_path)
    h = store.history(["batch", "source"])  # which batch; then that batch's entries alone
    src = h["source"].astype(str)
    done = undone_batches(h)
    mine = h["batch"][~np.char.startswith(src, "undo:")]
    candidates = np.setdiff1d(mine, np.asarray(sorted(done), np.int64)).tolist()
    if batch is None:
        if not candidates:
            raise StoreError(f"{store.path}: nothing to undo")
        batch = candidates[-1]
    elif batch not in candidates:
        why = "was already undone" if batch in done else "is not in the history"
        raise StoreError(f"{store.path}: batch {batch} {why}")
    e = store.history(batch=batch)
    b = Batch(f"undo of batch {batch}")
    changes, lv = {}, _Levels(store)
    for col in np.unique(e["column"].astype(str)):
        k = e.where(e["column"].astype(str) == col)
        order = np.argsort(k["row"], kind="stable")
        rows = k["row"][order]
        prov = store.provenance(col, rows)
        cur = lv.values(col, rows)
        same = (cur == k["new"][order]) & (prov.status == k["new_status"][order])
        paths = np.asarray(store.paths(rows), dtype=object)
        b.skipped += [(p, f"its {col} changed since batch {batch}") for p in paths[~same]]
        if same.any():
            changes[col] = (paths[same].tolist(), k["old"][order][same].tolist(),
                            k["old_status"][order][same].astype(int).tolist())  # fmt: skip
            b.changed[col] = int(same.sum())
    if changes:
        note = str(e["source"][0]).startswith("reject:")  # forgetting a reject changes no label
        _commit(store.path, changes, f"undo:{batch}", who, publish, note_only=note)
    return b


HISTORY_FIELDS = (
    "batch", "path", "level", "old", "new", "old_status", "new_status", "who", "when", "source"
)  # fmt: skip


def read_paths(path: str | Path, *, cluster: int | None = None) -> list[str]:
    """Image paths from a file: a CSV with a ``path`` column (``cluster``: only its rows whose
    ``cluster`` column is that number), or one path per line."""
    import csv

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise StoreError(f"{p}: cannot read the list of images ({e.strerror or e})") from None
    lines = text.splitlines()
    if lines and "path" in [h.strip().lower() for h in next(csv.reader([lines[0]]))]:
        rows = list(csv.DictReader(lines))
        key = next(h for h in rows[0] if h.strip().lower() == "path") if rows else "path"
        if cluster is not None:
            if rows and "cluster" not in rows[0]:
                raise StoreError(
                    f"{p}: --cluster needs a 'cluster' column (a `penult clusters` CSV)"
                )
            rows = [r for r in rows if r["cluster"].strip() == str(cluster)]
            if not rows:
                raise StoreError(f"{p}: no image of cluster {cluster}")
        return [r[key].strip() for r in rows if r.get(key, "").strip()]
    if cluster is not None:
        raise StoreError(f"{p}: --cluster needs a `penult clusters` CSV")
    return [ln.strip() for ln in lines if ln.strip()]


def history_table(store_path: str | Path) -> list[dict[str, str]]:
    """The history as rows for a CSV: batch, path, level, old and new label and status, who,
    when (ISO time, UTC) and source."""
    import time

    store = FeatureStore(store_path)
    h = store.history()
    if not len(h):
        return []
    uniq, inv = np.unique(h["row"], return_inverse=True)
    paths = np.asarray(store.paths(uniq), dtype=object)[inv]
    return [
        {
            "batch": str(h["batch"][i]),
            "path": paths[i],
            "level": str(h["column"][i]),
            "old": str(h["old"][i]),
            "new": str(h["new"][i]),
            "old_status": STATUSES[int(h["old_status"][i])],
            "new_status": STATUSES[int(h["new_status"][i])],
            "who": str(h["who"][i]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(h["when"][i]))),
            "source": str(h["source"][i]),
        }
        for i in range(len(h))
    ]
