"""Write-ahead journal of committed shards beside the HDF5 store.

HDF5 is not crash safe: a process killed while it writes can leave a file that no longer opens. So
the store file itself is only ever replaced by an atomic rename, and new work first lands here as
small ``.npz`` shards, each written to a temporary name, fsynced and renamed. A shard either exists
whole or not at all; replaying shards is idempotent (rows are keyed by path and content hash), so a
crash between "store replaced" and "shards deleted" is harmless.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from penult.core.errors import PenultError
from penult.core.files import TMP_PREFIX, atomic_path, fsync_dir

_SUFFIX = ".npz"
_DAMAGED = ".damaged"
KINDS = ("images", "backbone", "embeddings", "labels", "failures", "review", "predictions")


class DamagedShardError(PenultError):
    """A journal shard cannot be read (truncated or corrupted on disk)."""


def journal_dir(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + ".journal")


def list_shards(store_path: Path) -> list[Path]:
    """Committed shards in commit order (temporary files of a killed writer are not listed)."""
    return shards_in(journal_dir(store_path))


def shards_in(d: Path) -> list[Path]:
    """Committed shards of a journal folder (the store's, or a part's) in commit order."""
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.suffix == _SUFFIX and not p.name.startswith("."))


def seq_of(shard: Path) -> int:
    """A shard's commit number, from its name (``000000012-review.npz``: 12)."""
    return int(shard.name.split("-")[0])


def kind_of(shard: Path) -> str:
    """A shard's kind, from its name (``000000012-review.npz``: ``review``)."""
    return shard.stem.partition("-")[2]


def remove_stale_temporaries(store_path: Path) -> int:
    """Delete half-written shards left by a killed writer; they were never committed."""
    return remove_stale_temporaries_in(journal_dir(store_path))


def remove_stale_temporaries_in(d: Path) -> int:
    n = 0
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith(TMP_PREFIX):
                p.unlink(missing_ok=True)
                n += 1
    return n


def write_shard(
    store_path: Path, seq: int, kind: str, meta: dict[str, Any], **arrays: np.ndarray
) -> Path:
    """Atomically commit one shard. ``meta`` is JSON; arrays must be numeric or unicode (no objects)."""
    return write_shard_to(journal_dir(store_path), seq, kind, meta, **arrays)


def write_shard_to(
    d: Path, seq: int, kind: str, meta: dict[str, Any], **arrays: np.ndarray
) -> Path:
    """:func:`write_shard` into any journal folder (a part folder of ``extract --shard``)."""
    d.mkdir(exist_ok=True)
    final = d / f"{seq:09d}-{kind}{_SUFFIX}"
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    for k, v in payload.items():
        if v.dtype == object:
            raise TypeError(f"shard array {k!r} has dtype object; pass str or numeric arrays")
    payload["__meta__"] = np.array(json.dumps({"kind": kind, **meta}))
    with atomic_path(final) as tmp, open(tmp, "wb") as f:
        np.savez(f, **payload)
    return final


def read_shard(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Return (meta, arrays). Never unpickles: a shard is data only. Raises DamagedShardError."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("__meta__")))
        if not isinstance(meta, dict) or meta.get("kind") not in KINDS:
            raise ValueError(
                f"unknown shard kind {meta.get('kind') if isinstance(meta, dict) else meta!r}"
            )
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise DamagedShardError(f"{path}: {type(e).__name__}: {e}") from None
    return meta, arrays


def adopt(store_path: Path, seq: int, shard: Path) -> Path:
    """Move a committed shard from another folder into the store's journal as number ``seq``."""
    kind = kind_of(shard)
    d = journal_dir(store_path)
    d.mkdir(exist_ok=True)
    dest = d / f"{seq:09d}-{kind}{_SUFFIX}"
    os.replace(shard, dest)
    fsync_dir(d)
    fsync_dir(shard.parent)
    return dest


def set_aside(shard: Path) -> Path:
    """Rename a damaged shard out of the journal's way (kept for inspection, never replayed)."""
    dest = shard.with_name(shard.name + _DAMAGED)
    os.replace(shard, dest)
    fsync_dir(shard.parent)
    return dest


def list_damaged(store_path: Path) -> list[Path]:
    d = journal_dir(store_path)
    return sorted(d.glob(f"*{_DAMAGED}")) if d.is_dir() else []


def next_seq(store_path: Path) -> int:
    return next_seq_in(journal_dir(store_path))


def next_seq_in(d: Path) -> int:
    shards = shards_in(d)
    return seq_of(shards[-1]) + 1 if shards else 1
