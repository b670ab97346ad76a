"""Human-readable summary (`penult info`) and integrity check (`penult check`) of a store."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from penult.core.errors import StoreError
from penult.features import journal
from penult.features.backends import backend_for
from penult.features.store import FeatureStore, StoreWriter, real_path, store_lock


def _size(store: FeatureStore) -> int:
    return sum(p.stat().st_size for p in store.backend.files())


def describe(path: str | Path, *, max_classes: int = 30, max_failed: int = 20) -> str:
    """Text report: backbones, counts, dims, fingerprints, labels per class, failed images, size."""
    store = FeatureStore(path)
    p = Path(path)
    n = len(store)  # counts from codes and flags: never the table as Python strings
    failed_rows = np.flatnonzero(store.table_view().failed) if n else np.zeros(0, np.int64)
    attrs = store.attrs
    lines = [
        f"store      {p}  ({_size(store) / 2**20:.1f} MiB, format {store.version}, created {attrs.get('created_at')})",
        f"images     {n} ({len(failed_rows)} failed)",
    ]
    if store.read_only:
        lines.append(f"read-only  this store {store.read_only}")
    pending = store.pending_shards()
    review = [p for p in pending if journal.kind_of(p) == "review"]
    if review:
        lines.append(
            f"journal    {len(review)} review action(s) not yet published: every reader sees "
            "them already; `penult serve` publishes them when idle, or the next writer does"
        )
    if len(pending) > len(review):
        lines.append(
            f"journal    {len(pending) - len(review)} shard(s) not yet merged (a run in progress "
            "or interrupted); `penult check --repair` merges them"
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
            f"  {e.name}: {e.count}/{n} embedded, dim {e.dim}, {e.dtype}, precision {fp.get('precision')}"
        )
        lines.append(f"    architecture {fp.get('architecture')}  layer {fp.get('layer')}")
        lines.append(
            f"    weights {fp.get('weights')}  sha256 {str(fp.get('weights_sha256'))[:16]}"
        )
        lines.append(f"    preprocessing {fp.get('preprocessing')}")
    coded = store.labels() if n else {}
    for col, (codes, names) in coded.items():
        per = np.bincount(codes, minlength=len(names))
        counts = {names[i]: int(per[i]) for i in np.flatnonzero(per) if names[i]}
        if not counts:
            continue
        lines.append(f"labels[{col}]  {len(counts)} distinct")
        if col in ("label", "split") or len(counts) <= max_classes:
            for k, n in sorted(counts.items())[:max_classes]:
                lines.append(f"  {n:6d}  {k}")
            if len(counts) > max_classes:
                lines.append(f"  ... {len(counts) - max_classes} more")
    lines += _review_lines(store, list(coded))
    if len(failed_rows):
        lines.append("failed images")
        t = store.images(failed_rows[:max_failed].tolist())
        for pth, e in zip(t.path, t.error, strict=True):
            lines.append(f"  {pth}: {e}")
        if len(failed_rows) > max_failed:
            lines.append(f"  ... {len(failed_rows) - max_failed} more")
    return "\n".join(lines)


def _review_lines(store: FeatureStore, labels: list[str]) -> list[str]:
    """Images per label status (of ``label`` and of every level with a recorded change) and
    the size of the history."""
    h = store.history(["batch", "row", "column"])
    levels = [c for c in labels if c == "label" or c in set(h["column"].astype(str))]
    out = []
    for col in levels:
        counts = store.provenance(col).counts()
        shown = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
        out.append(f"status[{col}]  {shown}")
    if len(h):
        out.append(
            f"history    {len(h)} label changes in {len(np.unique(h['batch']))} batches "
            f"(`penult label {store.path} --history -` lists them)"
        )
    return out


def check(path: str | Path, *, repair: bool = False) -> list[str]:
    """Return a list of problems (empty when the store is sound). ``repair`` merges a left-over
    journal (damaged shards are set aside and listed) and drops segments that are missing or
    damaged where what they held can be made again (embeddings, sizes, failures, labels)."""
    p = real_path(path)
    if not p.exists():
        return [f"{path}: no such feature store"]
    try:
        with h5py.File(p, "r") as f:
            kind = backend_for(f, p)
            layout = kind.layout_problems(f, p, files=False)
    except (OSError, StoreError) as e:
        return [str(e) if isinstance(e, StoreError) else f"{p}: cannot open as HDF5 ({e})"]
    if layout:
        return [f"{p}: malformed store: {m}" for m in layout]
    backend = kind(p)
    # repairs hold the writer's lock from the first read, so no commit changes what they fix
    with store_lock(p) if repair and not backend.read_only else contextlib.nullcontext():
        damaged = backend.damaged()
        found = [f"{p}: {why}" for why in damaged.values()]
        if repair and damaged:
            return [*found, *backend.repair(damaged)]
    problems: list[str] = list(found)
    try:
        store = FeatureStore(p)
    except StoreError as e:
        return [*problems, str(e)]
    if repair and journal.list_shards(p) and not store.read_only:
        with StoreWriter(p):
            pass
    pending = [s for s in journal.list_shards(p) if journal.kind_of(s) != "review"]
    if pending:  # (review actions journaled by a server are read already: not a problem)
        problems.append(f"{len(pending)} journal shard(s) not merged; run `penult check --repair`")
    for d in journal.list_damaged(p):
        problems.append(
            f"damaged journal shard set aside: {d} (its images are extracted again by the next "
            "run; delete the file once you no longer need it)"
        )
    try:
        n = len(store)
        rows = _check_rows(store, n)
    except StoreError as err:  # a damaged table or label segment, named above
        return problems if problems else [str(err)]
    if rows.dup:
        problems.append(f"{rows.dup} duplicate paths in the image table, e.g. {rows.first_dup}")
    if rows.bad_hash:
        problems.append(f"{rows.bad_hash} readable rows without a valid sha256")
    with store_lock(p) if repair and not store.read_only else contextlib.nullcontext():
        problems += store.backend.index_problems(rows.missed, repair=repair)
    try:
        for name, e in store.backbones().items():
            problems += _check_backbone(store, name, e.dim, n)
    except StoreError as err:  # a damaged segment: already named, where the segments were read
        if not found:
            problems.append(str(err))
    return problems


CHECK_ROWS = 1 << 16  # rows of the image table checked at a time: memory bounded per piece


@dataclass
class _Rows:
    dup: int = 0
    first_dup: str = ""
    bad_hash: int = 0
    missed: int = 0  # rows the path index does not find at their own row


def _check_rows(store: FeatureStore, n: int) -> _Rows:
    """Every row of the image table, ``CHECK_ROWS`` at a time: a readable row without a valid
    hash, a path stored twice, a path the index misses. The index finds each path at one row, so
    a path whose index row is another row holding the same path is stored twice."""
    out = _Rows()
    for start in range(0, n, CHECK_ROWS):
        t = store.images(range(start, min(n, start + CHECK_ROWS)))
        out.bad_hash += sum(
            1 for h, e in zip(t.sha256, t.error, strict=True) if len(h) != 64 and not e
        )
        at = store.find(t.path)
        here = np.arange(start, start + len(t.path))
        out.missed += int((at < 0).sum())
        other = np.flatnonzero((at >= 0) & (at != here))
        if len(other):
            held = dict(
                zip(np.unique(at[other]).tolist(), store.paths(np.unique(at[other])), strict=True)
            )
            dups = [t.path[i] for i in other if held[int(at[i])] == t.path[i]]
            out.dup += len(dups)
            out.first_dup = out.first_dup or (dups[0] if dups else "")
            out.missed += len(other) - len(dups)
    return out


def _check_backbone(
    store: FeatureStore, name: str, dim: int, n: int, chunk: int = 65536
) -> list[str]:
    valid = store.valid(name)
    bad = 0
    for s in range(0, n, chunk):
        rows = np.flatnonzero(valid[s : s + chunk]) + s
        x = store.embeddings(name, rows)
        if x.shape[1] != dim:
            return [f"backbone {name}: dim {x.shape[1]} but fingerprint says {dim}"]
        bad += int((~np.isfinite(x)).any(axis=1).sum())
    return [f"backbone {name}: {bad} valid rows hold NaN/inf"] if bad else []
