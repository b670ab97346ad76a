"""Human-readable summary (`penult info`) and integrity check (`penult check`) of a store."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import h5py
import numpy as np
from penult.core.errors import StoreError
from penult.features import journal, segmented
from penult.features.segments import Reader, read_run, verify
from penult.features.store import FeatureStore, StoreWriter, check_root, real_path, store_lock


def _size(store: FeatureStore) -> int:
    folder = segmented.segment_dir(store.path)
    extra = sum(p.stat().st_size for p in folder.iterdir()) if folder.is_dir() else 0
    return store.path.stat().st_size + extra


def describe(path: str | Path, *, max_classes: int = 30, max_failed: int = 20) -> str:
    """Text report: backbones, counts, dims, fingerprints, labels per class, failed images, size."""
    store = FeatureStore(path)
    p = Path(path)
    t = store.images()
    attrs = store.attrs
    lines = [
        f"store      {p}  ({_size(store) / 2**20:.1f} MiB, schema v{attrs.get('schema_version')}, created {attrs.get('created_at')})",
        f"images     {len(t)} ({sum(1 for e in t.error if e)} failed)",
    ]
    if store.version < 2:
        lines.append(f"format     1 (read-only here; `penult check --upgrade {p}` converts it)")
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
    journal (damaged shards are set aside and listed) and drops segments that are missing or
    damaged where what they held can be made again (embeddings, sizes, failures, labels)."""
    p = real_path(path)
    if not p.exists():
        return [f"{path}: no such feature store"]
    try:
        with h5py.File(p, "r") as f:
            version = check_root(f, p)
    except (OSError, StoreError) as e:
        return [str(e) if isinstance(e, StoreError) else f"{p}: cannot open as HDF5 ({e})"]
    problems: list[str] = []
    found: list[str] = []  # damaged or missing segments, each named once
    if version >= 2:
        found, fixed = _segment_problems(p, repair=repair)
        problems += found
        if fixed:
            return [*problems, *fixed]
    try:
        store = FeatureStore(p)
    except StoreError as e:
        return [*problems, str(e)]
    if repair and journal.list_shards(p) and store.version >= 2:
        with StoreWriter(p):
            pass
    pending = journal.list_shards(p)
    if pending:
        problems.append(f"{len(pending)} journal shard(s) not merged; run `penult check --repair`")
    for d in journal.list_damaged(p):
        problems.append(
            f"damaged journal shard set aside: {d} (its images are extracted again by the next "
            "run; delete the file once you no longer need it)"
        )
    try:
        t = store.images()
    except StoreError as err:  # a damaged table or label segment, named above
        return problems if problems else [str(err)]
    dup = [k for k, c in Counter(t.path).items() if c > 1]
    if dup:
        problems.append(f"{len(dup)} duplicate paths in the image table, e.g. {dup[0]}")
    bad_hash = sum(1 for h, e in zip(t.sha256, t.error, strict=True) if len(h) != 64 and not e)
    if bad_hash:
        problems.append(f"{bad_hash} readable rows without a valid sha256")
    if store.version >= 2 and len(store.find(t.path[:1000])) and (store.find(t.path) < 0).any():
        if repair:
            _rebuild_index(p)
            problems.append("repaired: rebuilt the path index from the image table")
        else:
            problems.append("the path index misses rows; `penult check --repair` rebuilds it")
    try:
        for name, e in store.backbones().items():
            problems += _check_backbone(store, name, e.dim, len(t))
    except StoreError as err:  # a damaged segment: already named, where the segments were read
        if not found:
            problems.append(str(err))
    return problems


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


def _segment_problems(path: Path, *, repair: bool) -> tuple[list[str], list[str]]:
    """Every segment the maps name: present, readable, long enough. With ``repair``, pieces of
    rebuildable families that fail are dropped (their rows are simply made again later)."""
    with h5py.File(path, "r") as f:
        layout = segmented.structure_problems(f)
        if layout:
            return [f"{path}: malformed store: {m}" for m in layout], []
        s = segmented.load(f)
    bad: dict[str, str] = {}
    with Reader(segmented.segment_dir(path), s) as r:
        for fam, ps in s.maps.items():
            for piece in ps:
                for col in s.columns(fam):
                    try:
                        r.dataset(piece, col)
                    except StoreError as e:
                        bad.setdefault(piece.file, str(e))
        for name, _ in s.index:
            try:
                read_run(r, name)
            except (StoreError, KeyError) as e:
                bad.setdefault(name, str(e))
        for name in sorted({p.file for ps in s.maps.values() for p in ps} - set(bad)):
            try:
                verify(r, name)  # every chunk's checksum
            except StoreError as e:
                bad.setdefault(name, str(e))
    if not bad:
        return [], []
    found = [f"{path}: {why}" for why in bad.values()]
    if not repair:
        return found, []
    return found, _repair(path, s, set(bad))


def _rebuild_index(path: Path) -> None:
    """The path index made again from the table's keys, under the writer's lock."""
    with store_lock(path):
        with h5py.File(path, "r") as f:
            s = segmented.load(f)
        segmented.Commit(path, s).rebuild_index()


def _repair(path: Path, s: segmented.State, bad: set[str]) -> list[str]:
    with store_lock(path):
        done = []
        table_lost = [p for p in s.maps.get(segmented.TABLE, []) if p.file in bad]
        if table_lost:  # the rows themselves are gone: nothing else is worth changing
            return [
                f"cannot repair: image-table rows {p.lo}..{p.hi - 1} were in {p.file}; restore "
                "that file (or the store's whole .segments folder) from a backup, or extract "
                "into a new store; nothing was changed"
                for p in table_lost
            ]
        for fam in list(s.maps):
            if fam == segmented.TABLE:
                continue
            gone = [p for p in s.maps[fam] if p.file in bad]
            if gone:
                s.maps[fam] = [p for p in s.maps[fam] if p.file not in bad]
                rows = sum(p.hi - p.lo for p in gone)
                done.append(f"repaired: dropped {rows} rows of {fam} (made again by the next run)")
        if any(n in bad for n, _ in s.index):
            segmented.Commit(path, s).rebuild_index()
            done.append("repaired: rebuilt the path index from the image table")
        else:
            segmented.save(path, s)
        return done
