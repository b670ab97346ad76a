"""Human-readable summary (`penult info`) and integrity check (`penult check`) of a store."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import h5py
import numpy as np

from features import journal
from features.store import (
    FeatureStore,
    StoreError,
    StoreWriter,
    _check_root,
    _read_table,
    real_path,
    structure_problems,
)


def describe(path: str | Path, *, max_classes: int = 30, max_failed: int = 20) -> str:
    """Text report: backbones, counts, dims, fingerprints, labels per class, failed images, file size."""
    store = FeatureStore(path)
    p = Path(path)
    t = store.images()
    attrs = store.attrs
    lines = [
        f"store      {p}  ({p.stat().st_size / 2**20:.1f} MiB, schema v{attrs.get('schema_version')}, created {attrs.get('created_at')})",
        f"images     {len(t)} ({sum(1 for e in t.error if e)} failed)",
    ]
    pending = store.pending_shards()
    if pending:
        lines.append(
            f"journal    {len(pending)} shard(s) not yet merged (interrupted run); `penult check --repair` merges them"
        )
    for d in journal.list_damaged(store.path):
        lines.append(
            f"journal    damaged shard set aside: {d.name} (its images are extracted again)"
        )
    lines.append("backbones")
    entries = store.backbones()
    if not entries:
        lines.append("  (none yet)")
    for e in entries.values():
        fp = e.fingerprint
        lines.append(
            f"  {e.name}: {e.count}/{len(t)} embedded, dim {e.dim}, {e.dtype}, precision {fp.get('precision')}"
        )
        lines.append(f"    architecture {fp.get('architecture')}  layer {fp.get('layer')}")
        lines.append(
            f"    weights {fp.get('weights')}  sha256 {str(fp.get('weights_sha256'))[:16]}"
        )
        lines.append(f"    preprocessing {fp.get('preprocessing')}")
    for col, values in t.labels.items():
        counts = Counter(v for v in values if v)
        if not counts:
            continue
        lines.append(f"labels[{col}]  {len(counts)} distinct")
        if col in ("label", "split") or len(counts) <= max_classes:
            for k, n in sorted(counts.items())[:max_classes]:
                lines.append(f"  {n:6d}  {k}")
            if len(counts) > max_classes:
                lines.append(f"  ... {len(counts) - max_classes} more")
    failed = [(pth, e) for pth, e in zip(t.path, t.error, strict=True) if e]
    if failed:
        lines.append("failed images")
        for pth, e in failed[:max_failed]:
            lines.append(f"  {pth}: {e}")
        if len(failed) > max_failed:
            lines.append(f"  ... {len(failed) - max_failed} more")
    return "\n".join(lines)


def check(path: str | Path, *, repair: bool = False) -> list[str]:
    """Return a list of problems (empty when the store is sound). ``repair`` merges a left-over
    journal (damaged shards are set aside and listed)."""
    p = real_path(path)
    if not p.exists():
        return [f"{path}: no such feature store"]
    try:
        with h5py.File(p, "r") as f:
            _check_root(f, p)
            layout = structure_problems(f)
    except (OSError, StoreError) as e:
        return [str(e) if isinstance(e, StoreError) else f"{p}: cannot open as HDF5 ({e})"]
    if layout:
        return [f"{p}: malformed store: {m}" for m in layout]
    if repair and journal.list_shards(p):
        with StoreWriter(p):
            pass
    problems: list[str] = []
    pending = journal.list_shards(p)
    if pending:
        problems.append(f"{len(pending)} journal shard(s) not merged; run `penult check --repair`")
    for d in journal.list_damaged(p):
        problems.append(
            f"damaged journal shard set aside: {d} (its images are extracted again by the next "
            "run; delete the file once you no longer need it)"
        )
    with h5py.File(p, "r") as f:
        t = _read_table(f)
        dup = [k for k, c in Counter(t.path).items() if c > 1]
        if dup:
            problems.append(f"{len(dup)} duplicate paths in the image table, e.g. {dup[0]}")
        bad_hash = sum(1 for h, e in zip(t.sha256, t.error, strict=True) if len(h) != 64 and not e)
        if bad_hash:
            problems.append(f"{bad_hash} readable rows without a valid sha256")
        for name, g in f["backbones"].items():
            problems += _check_backbone(name, g, len(t))
    return problems


def _check_backbone(name: str, g: h5py.Group, n: int, chunk: int = 8192) -> list[str]:
    out = []
    ds, valid = g["embeddings"], g["valid"][()]
    if ds.shape[0] != n or valid.shape[0] != n:
        return [
            f"backbone {name}: {ds.shape[0]} embeddings / {valid.shape[0]} flags for {n} images"
        ]
    if ds.shape[1] != int(g.attrs["dim"]):
        out.append(f"backbone {name}: dim {ds.shape[1]} but fingerprint says {g.attrs['dim']}")
    bad = 0
    for s in range(0, n, chunk):
        x = ds[s : s + chunk]
        v = valid[s : s + chunk]
        bad += int((~np.isfinite(x[v])).any(axis=1).sum())
    if bad:
        out.append(f"backbone {name}: {bad} valid rows hold NaN/inf")
    return out
