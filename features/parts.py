"""Part files: work done outside the store's single writer (``extract --shard I/N``), published
later by one ``merge`` under the writer's lock.

A part is a folder ``STORE.parts/<name>/`` of journal shards (the same committed ``.npz`` files
as the store's own journal: temporary name, fsync, rename), written by one process that holds the
part's lock. ``merge`` moves each part's shards, oldest first, into the store's journal and
publishes them with one commit; replaying is idempotent (rows are keyed by path and content
hash), so a merge killed at any moment is simply run again.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from penult.core.errors import PenultError, StoreError, StoreLockedError
from penult.core.files import set_aside
from penult.features import journal
from penult.features.format2 import sealed
from penult.features.store import FeatureStore, StoreWriter, Writes, real_path
from penult.features.types import Fingerprint

log = logging.getLogger(__name__)

__all__ = [
    "PartWriter",
    "Publishing",
    "adopt_parts",
    "ensure_store",
    "list_parts",
    "merge",
    "parts_dir",
]


def parts_dir(store: Path) -> Path:
    return store.with_name(store.name + ".parts")


def list_parts(store: str | os.PathLike[str]) -> list[Path]:
    """Part folders waiting to be merged (not those set aside as ``.rejected-<name>``)."""
    d = parts_dir(real_path(store))
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def part_problem(store: FeatureStore, part: Path) -> str:
    """Why a part cannot be merged ("" when it can), found by reading every shard of it before
    anything moves: a shard that does not read, a backbone registered with another fingerprint
    or dtype than the store's (or than the part's own earlier shard), embeddings of another
    width than their backbone, or arrays of unequal length."""

    have = store.backbones()
    seen: dict[str, dict[str, Any]] = {}
    for shard in journal.shards_in(part):
        try:
            meta, a = journal.read_shard(shard)
        except journal.DamagedShardError as e:
            return f"shard {shard.name} cannot be read ({e})"
        kind, name = meta["kind"], meta.get("name")
        if kind == "backbone":
            fp, dtype = meta.get("fingerprint"), str(meta.get("dtype"))
            if not isinstance(fp, dict) or int(meta.get("dim", -1)) != fp.get("dim"):
                return f"shard {shard.name} registers {name!r} with a malformed fingerprint"
            old = seen.get(name) or (
                {"fingerprint": have[name].fingerprint, "dtype": have[name].dtype}
                if name in have else None
            )  # fmt: skip
            if old is not None and not Fingerprint.of(old["fingerprint"]).same_as(fp):
                return (
                    f"it registers backbone {name!r} with another fingerprint than "
                    f"{'the store' if name in have else 'its earlier shard'} (other weights, "
                    "preprocessing or layer under one name)"
                )
            if old is not None and old["dtype"] != dtype:
                return f"it stores backbone {name!r} as {dtype}, the store as {old['dtype']}"
            seen[name] = {"fingerprint": fp, "dtype": dtype}
        elif kind == "embeddings":
            reg = seen.get(name) or (
                {"fingerprint": have[name].fingerprint} if name in have else None
            )
            if reg is None:
                return f"shard {shard.name} holds embeddings of {name!r}, never registered"
            x, dim = a.get("embeddings"), int(reg["fingerprint"]["dim"])
            if x is None or x.ndim != 2 or x.shape[1] != dim or x.dtype.kind != "f":
                shape = None if x is None else f"{x.shape} {x.dtype}"
                return f"shard {shard.name}: embeddings {shape} for {dim}-d backbone {name!r}"
        n = {len(v) for k, v in a.items() if k in ("path", "sha256", "embeddings", "reason")}
        if len(n) > 1:
            return f"shard {shard.name}: its arrays differ in length ({sorted(n)})"
    return ""


def ensure_store(path: Path, *, wait_s: float = 60.0) -> None:
    """Create an empty store if there is none (several shard processes may start at once)."""
    deadline = time.monotonic() + wait_s
    while not path.exists():
        try:
            with StoreWriter(path):
                pass
        except StoreLockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class PartWriter(Writes):
    """Writes like :class:`StoreWriter` (same methods, same checks) into a part folder instead
    of the store; the store is only read. Use as a context manager."""

    def __init__(self, store: str | os.PathLike[str], name: str, *, sealing: bool = True):
        if not name or "/" in name or name.startswith("."):
            raise StoreError(f"part name {name!r} must be non-empty, without '/' or a leading dot")
        self.path = real_path(store)
        self.folder = parts_dir(self.path) / name
        self._lock_fh = None
        self._registered: dict[str, dict[str, Any]] = {}
        self.sealing = sealing  # seal the part when it ends without an error

    def __enter__(self) -> PartWriter:
        ensure_store(self.path)
        self.store = FeatureStore(self.path)
        if self.store.read_only:
            raise StoreError(f"{self.path} {self.store.read_only}")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_fh = _try_lock(self.folder)
        if self._lock_fh is None:
            raise StoreLockedError(f"part {self.folder} is being written by another process")
        self._seq = journal.next_seq_in(self.folder)
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        try:
            if exc_type is None and self.sealing:
                self.seal()
        finally:
            if self._lock_fh is not None:
                self._lock_fh.close()
                self._lock_fh = None

    def seal(self) -> bool:
        """Seal the finished part for publishing without a copy (``format2/sealed.py``): the
        replay a merge would do, done here, beside the other parts' workers. A seal that fails
        is removed and logged: the part is then published by replay, as before."""
        try:
            return sealed.seal(self.path, self.folder)
        except (OSError, PenultError, ValueError, KeyError) as e:
            sealed.unseal(self.folder)
            log.warning("part %s not sealed (%s); the merge replays it", self.folder, e)
            return False

    def _put(
        self, seq: int, kind: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]
    ) -> None:
        journal.write_shard_to(self.folder, seq, kind, meta, **arrays)

    def done(self, backbone: str) -> set[tuple[str, str]]:
        """(path, sha256) of every image this part already embedded or recorded as failed, so a
        shard run again after a kill resumes instead of redoing its part."""
        out: set[tuple[str, str]] = set()
        for shard in journal.shards_in(self.folder):
            try:
                meta, arrays = journal.read_shard(shard)
            except journal.DamagedShardError:
                continue
            if meta["kind"] == "failures" or (
                meta["kind"] == "embeddings" and meta.get("name") == backbone
            ):
                out |= set(zip(arrays["path"].tolist(), arrays["sha256"].tolist(), strict=True))
        return out

    def not_done(
        self, backbone: str, paths: list[str], sha256: list[str], indices: list[int]
    ) -> list[int]:
        """The ``indices`` whose (path, sha256) this part has not done yet (see :meth:`done`)."""
        done = self.done(backbone)
        return [i for i in indices if (paths[i], sha256[i]) not in done]


def _try_lock(part: Path):
    """The part's lock file, locked; None when another process holds it (the part is being
    written). A POSIX record lock: the kernel releases it when its holder dies."""
    fh = open(part / ".lock", "a+")  # noqa: SIM115 - held while the part is written or merged
    try:
        fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        return None
    return fh


def adopt_parts(
    w: StoreWriter,
    names: set[str] | None = None,
    rejected: list[str] | None = None,
    report: Publishing | None = None,
) -> tuple[int, int]:
    """Publish every finished part (those in ``names`` when given) through ``w``; return
    (parts, shards). A part still being written is left for later. Sealed parts are taken in one
    commit by linking their segments (``format2/sealed.py``); the others, and a sealed part that
    cannot be taken as it is (said in ``report``), are replayed: their shards are moved into
    ``w``'s journal and published, a part at a time. A part is read whole before it is replayed:
    one that cannot be merged is set aside (``STORE.parts/.rejected-<name>``, its reason added to
    ``rejected``) and nothing of it enters the journal, so later runs are never jammed by it."""
    locked: list[tuple[Path, Any]] = []
    for part in list_parts(w.path):
        if names is not None and part.name not in names:
            continue
        fh = _try_lock(part)
        if fh is not None:
            locked.append((part, fh))
    n_parts = n_shards = 0
    try:
        ready = [p for p, _ in locked if sealed.is_sealed(p)]
        how = {}
        if ready:
            w.commit()  # the journal first: a seal is taken over the published state
            how = dict(zip(ready, sealed.take_sealed(w.path, ready), strict=True))
            w.refresh()
        report = report if report is not None else Publishing()
        for part, _ in locked:
            way = how.get(part)
            if way in ("linked", "copied", sealed.PUBLISHED):
                report.count(way)
                n_shards += len(journal.shards_in(part))
                _remove(part)
                n_parts += 1
                continue
            if way is not None:
                report.notes.append(f"part {part.name} replayed: {way}")
            got = _replay(w, part, rejected)
            if got is not None:
                report.count("replayed")
                n_shards += got
                n_parts += 1
    finally:
        for _, fh in locked:
            fh.close()
    folder = parts_dir(w.path)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return n_parts, n_shards


@dataclass
class Publishing:
    """How parts were published, for the summaries: sealed parts linked (or copied where no
    hard link can be made) into the store, others replayed, and why a sealed one was not taken."""

    ways: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def count(self, way: str) -> None:
        self.ways[way] = self.ways.get(way, 0) + 1

    def lines(self) -> list[str]:
        said = {"linked": "linked (no copy)", "copied": "copied (no hard link possible)",
                "replayed": "replayed", sealed.PUBLISHED: "published before a kill, removed"}  # fmt: skip
        out = [", ".join(f"{v} {said[k]}" for k, v in self.ways.items())] if self.ways else []
        return (
            out
            + self.notes[:10]
            + ([f"... and {len(self.notes) - 10} more"] if len(self.notes) > 10 else [])
        )


def _replay(w: StoreWriter, part: Path, rejected: list[str] | None) -> int | None:
    """Move ``part``'s shards into the journal and publish them; the shards moved, or None when
    the part was set aside."""
    journal.remove_stale_temporaries_in(part)
    why = part_problem(w.store, part)  # the writer's view, refreshed at each commit
    if why:
        dest = set_aside(part, "rejected")
        log.warning("%s: part %s set aside as %s: %s", w.path, part.name, dest.name, why)
        if rejected is not None:
            rejected.append(f"part {part.name} set aside as {dest}: {why}")
        return None
    n = 0
    for shard in journal.shards_in(part):
        w.adopt(shard)
        n += 1
    w.commit()
    _remove(part)
    return n


def _remove(part: Path) -> None:
    """Delete a published part: its seal first, the lock file last."""
    sealed.unseal(part)
    for p in sorted(part.iterdir(), key=lambda p: p.name == ".lock"):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    part.rmdir()


def merge(
    store: str | os.PathLike[str],
    rejected: list[str] | None = None,
    report: Publishing | None = None,
) -> tuple[int, int]:
    """Publish every finished part into the store; return (parts, shards) merged. A store with
    no parts beside it is refused (a mistyped name must not create an empty store)."""
    path = real_path(store)
    if not path.exists() and not list_parts(path):
        raise StoreError(
            f"{store}: no such feature store, and no parts ({parts_dir(path).name}/) to merge "
            "into one; check the name"
        )
    with StoreWriter(store) as w:
        return adopt_parts(w, rejected=rejected, report=report)
