"""``penult check --upgrade``: convert a format-1 store to format 2 in one pass.

The new top-level file is built beside the old one (``.STORE.upgrade``) and renamed over it at
the end, so a kill at any moment leaves the old store intact and a second run starts again.
Journal shards the old store had not merged stay in the journal; the next writer publishes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
from penult.core.errors import StoreError
from penult.core.files import atomic_path, set_aside
from penult.features.format1 import read_table
from penult.features.format2 import state as format2
from penult.features.format2.commit import Commit
from penult.features.store import FeatureStore, real_path, store_lock


def upgrade(path: str | os.PathLike[str], *, segment_rows: int = format2.SEGMENT_ROWS) -> str:
    """Convert the store at ``path``; return a one-line summary."""
    path = real_path(path)
    if path.is_dir():
        raise StoreError(f"{path} is a folder, not a feature store file")
    if not FeatureStore(path).read_only:
        return f"{path} is already store format {format2.SCHEMA_VERSION}; nothing to do"
    with store_lock(path):
        tmp = path.with_name(f".{path.name}.upgrade")
        tmp.unlink(missing_ok=True)
        folder = format2.segment_dir(path)
        marker = path.with_name(f".{path.name}.upgrading")  # says whose files the folder holds
        kept = ""
        if folder.is_dir() and marker.exists():  # segments of an upgrade that was killed
            for p in folder.iterdir():
                p.unlink()
        elif folder.is_dir() and any(folder.iterdir()):  # not ours: a format-2 store's segments
            aside = set_aside(folder, "before-upgrade")  # under a restored format-1 backup: kept
            kept = f"; the files already in {folder.name}/ were kept as {aside.name}/"
        marker.write_bytes(b"")
        with atomic_path(path, tmp=tmp) as t:
            rows = _convert(path, t, segment_rows)
        marker.unlink()
    return f"{path}: upgraded to store format {format2.SCHEMA_VERSION} ({rows} images){kept}"


def _convert(path: Path, tmp: Path, block: int) -> int:
    with h5py.File(path, "r") as f:
        t = read_table(f)
        c = Commit(path, format2.new_state(block))
        arrays = {
            "path": np.array(t.path, dtype=str),
            "root": np.array(t.root, dtype=str),
            "sha256": np.array(t.sha256, dtype=str),
            "nbytes": t.nbytes,
            "mtime_ns": t.mtime_ns,
            **{f"label__{k}": np.array(v, dtype=str) for k, v in t.labels.items()},
        }
        c.apply({"kind": "images"}, arrays)
        rows = np.arange(len(t), dtype=np.int64)
        c.put(format2.SIZE, rows, {"width": t.width, "height": t.height})
        failed = np.flatnonzero([bool(e) for e in t.error])
        c.put(format2.ERROR, failed, {"error": c.codes("error", [t.error[i] for i in failed])})
        names = list(f["backbones"])
        for name in names:
            g = f["backbones"][name]
            meta = {"kind": "backbone", "name": name, "dim": int(g.attrs["dim"])}
            meta.update(fingerprint=json.loads(g.attrs["fingerprint"]), dtype=str(g.attrs["dtype"]))
            c.apply(meta, {})
            c.s.backbones[name].update(
                precision=str(g.attrs.get("precision", "")),
                created_at=str(g.attrs.get("created_at", "")),
            )
        c.s.attrs["created_at"] = str(f.attrs.get("created_at", c.s.attrs["created_at"]))
        c.finish(0, target=tmp)
        for name in names:
            _copy_backbone(path, tmp, f["backbones"][name], name, len(t), block)
    return len(t)


def _copy_backbone(path: Path, tmp: Path, g: h5py.Group, name: str, n: int, block: int) -> None:
    """One block of embeddings at a time: memory stays bounded by the block."""
    fam = format2.backbone_family(name)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        valid = np.asarray(g["valid"][lo:hi], bool)
        if not valid.any():
            continue
        with h5py.File(tmp, "r") as top:
            state = format2.load(top)
        c = Commit(path, state)
        rows = np.arange(lo, hi)[valid]
        x = np.asarray(g["embeddings"][lo:hi])[valid]
        c.put(fam, rows, {"embeddings": x, "valid": np.ones(len(rows), bool)})
        c.finish(0, target=tmp)
