"""Nearest-neighbour search over a store's embeddings with faiss (faiss is imported only here and
in ``knn.py``, the k-NN head).

An index is saved beside its store as ``STORE.<backbone>.<metric>.faiss`` plus a JSON manifest
(backbone fingerprint, index kind, row count) and ``.rows.npy`` (the store rows it holds, which
are also its faiss ids). Opening it checks that the store still has that backbone with the same
fingerprint and the same images in those rows; otherwise it is refused as stale, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from penult.classify.options import KINDS, METRICS
from penult.core.errors import PenultError
from penult.core.files import atomic_path, fsync_file, temporary_name, write_text
from penult.features import FeatureStore

__all__ = [
    "CHUNK_BYTES",
    "DISK_MIN_ROWS",
    "FLAT_MAX_ROWS",
    "NeighborIndexError",
    "IndexPlan",
    "KINDS",
    "METRICS",
    "NeighborIndex",
    "REFINE",
    "RERANK_BYTES",
    "SHARD_ROWS",
    "add_shard",
    "build_index",
    "ensure_index",
    "finish_save",
    "index_path",
    "open_index",
    "plan_index",
]

log = logging.getLogger(__name__)

FLAT_MAX_ROWS = 200_000  # exact search stays above ~100 queries/s per core up to here (1,280-d)
REFINE = 10  # refined indexes re-rank the best REFINE x k candidates exactly
CHUNK_BYTES = 16 * 2**20  # embeddings read from the store at a time: bounds memory while adding
DISK_MIN_ROWS = 20_000_000  # from here the inverted lists live on disk (memory-mapped), not in RAM
SHARD_ROWS = 1_000_000  # rows per shard of an on-disk index: bounds the memory of a build
RERANK_BYTES = 32 * 2**20  # candidate vectors gathered at once when re-ranking a query batch


class NeighborIndexError(PenultError, ValueError):
    """An index is missing, stale, or made for another backbone or metric."""


@dataclass(frozen=True)
class IndexPlan:
    kind: str
    factory: str  # faiss index_factory string
    nlist: int = 0
    nprobe: int = 0
    pq_m: int = 0
    train_rows: int = 0
    note: str = ""

    def describe(self, n: int, dim: int) -> str:
        return f"{self.kind} ({self.factory}) over {n:,} x {dim} vectors: {self.note}"


def plan_index(
    n: int, dim: int, kind: str = "auto", *, nlist: int | None = None, pq_m: int | None = None
) -> IndexPlan:
    """Choose the index by size: exact while fast enough, then IVF (PQ or HNSW quantiser at scale)."""
    if kind not in KINDS:
        raise NeighborIndexError(f"index kind {kind!r} unknown; choose from {', '.join(KINDS)}")
    if kind == "auto":
        kind = "flat" if n <= FLAT_MAX_ROWS else ("ivf" if n <= 5_000_000 else "ivf-hnsw")
        kind = "ivf-disk" if n >= DISK_MIN_ROWS else kind
    if kind == "flat":
        return IndexPlan("flat", "Flat", note="exact search, recall 1.0")
    # about sqrt(n) lists: fewer than faiss's 4 sqrt(n) rule, because on 2 cores the k-means training
    # and the assignment of every vector cost O(nlist) each (1M x 1,280: 4,096 lists took >10 min)
    lists = nlist or int(2 ** round(math.log2(max(16.0, math.sqrt(n)))))
    lists = max(1, min(lists, n // 39 or 1))  # faiss wants ~39 training points per list
    train = min(n, max(40 * lists, 10_000), 200_000)  # faiss k-means samples 39-256 points per list
    nprobe = max(1, min(lists, max(16, lists // 32)))
    if kind == "ivf" and dim % 2 == 0:
        # IVF-Flat scans 4 bytes per dimension per candidate and is memory-bound (92 queries/s at
        # recall 0.95 on 1M x 1,280 here); 4-bit fast-scan PQ scans 1/16 of that, and the best
        # REFINE x k candidates are re-ranked exactly against the raw vectors kept beside the codes.
        return IndexPlan("ivf", f"IVF{lists},PQ{dim // 2}x4fs,RFlat", lists, nprobe, dim // 2, train,
                         note=f"nprobe {nprobe}, fast-scan PQ + exact re-ranking, about 1.07x the raw vectors; recall in docs/BENCHMARKS.md")  # fmt: skip
    if kind == "ivf":
        return IndexPlan(
            "ivf", f"IVF{lists},Flat", lists, nprobe, train_rows=train, note=f"nprobe {nprobe}"
        )
    if kind == "ivf-hnsw":
        return IndexPlan("ivf-hnsw", f"IVF{lists}_HNSW32,Flat", lists, nprobe, train_rows=train,
                         note=f"HNSW coarse quantiser, nprobe {nprobe}")  # fmt: skip
    if kind == "ivf-disk":
        m = pq_m or _pq_m_disk(dim)
        return IndexPlan("ivf-disk", f"IVF{lists},PQ{m}x4", lists, nprobe * 2, m, train,
                         note=f"inverted lists on disk (memory-mapped), {(m + 1) // 2} bytes per vector; the best {REFINE} x k candidates re-ranked exactly from the store")  # fmt: skip
    m = pq_m or _pq_m(dim)
    return IndexPlan("ivfpq", f"IVF{lists},PQ{m}x4fs", lists, nprobe * 2, m, train,
                     note=f"4-bit fast-scan PQ, {m // 2} bytes per vector ({8 * dim / m:.0f}x smaller than float32); lossy, see recall in docs/BENCHMARKS.md")  # fmt: skip


def _pq_m(dim: int) -> int:
    """4-bit PQ sub-quantisers, 4 dims each: 1 bit per dimension, 32x smaller than float32."""
    m = max(2, dim // 4)
    return m if dim % m == 0 and m % 2 == 0 else dim


def _pq_m_disk(dim: int) -> int:
    """4-bit PQ sub-quantisers of about 4 dims each (a divisor of ``dim``): dim / 8 bytes a vector.
    (8-bit codebooks trained far slower here: PQ16 on 2,000 x 1,280 took 43 s, PQ160x4fs 0.6 s.)"""
    return next(m for m in range(max(1, dim // 4), 0, -1) if dim % m == 0)


def _prepare(x: np.ndarray, metric: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if metric == "cosine":
        faiss.normalize_L2(x)
    return x


def _faiss_metric(metric: str) -> int:
    if metric not in METRICS:
        raise NeighborIndexError(f"metric {metric!r} unknown; choose cosine or l2")
    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def _digest(store: FeatureStore, rows: np.ndarray, block: int = 65536) -> str:
    """SHA-256 of the rows' content hashes as hex, concatenated in index order (vectorised, a
    block of rows at a time: the hex of every row at once was 170 bytes a row)."""
    h = hashlib.sha256()
    for s in range(0, len(rows), block):
        uniq, inv = np.unique(rows[s : s + block], return_inverse=True)
        raw = store.hashes(uniq)[inv]
        h.update(np.stack([_HEX[raw >> 4], _HEX[raw & 15]], -1).tobytes())
    return h.hexdigest()


def _block_digests(
    store: FeatureStore, backbone: str, rows: np.ndarray, keep: dict[str, list[str]] | None = None
) -> dict[str, list[str]]:
    """Per block of the store: [segment id, digest of the indexed rows in it]. Blocks in ``keep``
    whose segment id has not moved are taken as they are (their segments are immutable), so a
    check or an update reads only the hashes of blocks that changed."""
    block, ids = store.segment_ids(backbone)
    out = {}
    blocks = rows // block
    for k in np.unique(blocks).tolist():
        sid = ids[k] if k < len(ids) else ""
        old = (keep or {}).get(str(k))
        if old is not None and old[0] == sid:
            out[str(k)] = old
        else:
            out[str(k)] = [sid, _digest(store, rows[blocks == k])]
    return out


def index_path(store: str | os.PathLike[str], backbone: str, metric: str) -> Path:
    return Path(f"{store}.{backbone.replace('@', '_')}.{metric}.faiss")


@dataclass
class NeighborIndex:
    index: Any  # faiss.Index
    meta: dict[str, Any]
    rows: np.ndarray  # store rows held, in the order added (their faiss ids)
    path: Path
    store: FeatureStore | None = None  # for exact re-ranking of on-disk (PQ) candidates

    @property
    def metric(self) -> str:
        return self.meta["metric"]

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, k) scores and store rows (-1 where fewer than k exist). Cosine: similarity, higher is
        closer; l2: squared distance, lower is closer."""
        if x.ndim != 2 or x.shape[1] != self.index.d:
            raise NeighborIndexError(f"queries must be (n, {self.index.d}), got {x.shape}")
        if self.meta.get("nprobe"):
            faiss.extract_index_ivf(self.index).nprobe = int(self.meta["nprobe"])
        if "RFlat" in self.meta.get("factory", ""):
            faiss.downcast_index(self.index).k_factor = REFINE
        q = _prepare(x, self.metric)
        if self.meta.get("kind") == "ivf-disk" and self.store is not None:
            return self._reranked(q, k)
        scores, pos = self.index.search(q, k)
        return scores, np.where(pos >= 0, self.rows[np.maximum(pos, 0)], -1)

    def _reranked(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """PQ candidates (REFINE x k), re-ranked by exact scores on the store's embeddings."""
        _, pos = self.index.search(q, REFINE * k)
        rows = np.where(pos >= 0, self.rows[np.maximum(pos, 0)], -1)
        uniq = np.unique(rows[rows >= 0])
        vec = _prepare(self.store.embeddings(self.meta["backbone"], uniq), self.metric)
        at = np.searchsorted(uniq, np.maximum(rows, 0))
        exact = np.empty(rows.shape, np.float32)
        step = max(1, RERANK_BYTES // (4 * rows.shape[1] * vec.shape[1]))
        for s in range(0, len(q), step):  # candidates gathered for a block of queries at a time
            cand = vec[at[s : s + step]]  # (queries, REFINE k, d)
            if self.metric == "cosine":
                exact[s : s + step] = np.einsum("nd,ncd->nc", q[s : s + step], cand)
            else:
                exact[s : s + step] = ((cand - q[s : s + step, None, :]) ** 2).sum(-1)
        sign = -1.0 if self.metric == "cosine" else 1.0  # higher is closer for cosine
        exact[rows < 0] = -sign * np.inf
        order = np.argsort(sign * exact, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(rows, order, axis=1)
        return np.take_along_axis(exact, order, axis=1), best

    def save(self) -> None:
        """Index, rows and manifest replaced as one: each is written to a temporary name and
        fsynced, a redo list of the renames is committed, then the renames are done (a kill
        part-way is finished by the next reader), so a kill never mixes old and new files."""
        _check_writable(self.path)
        tmp = temporary_name(self.path)
        faiss.write_index(self.index, str(tmp))
        np.save(f"{tmp}.rows.npy", self.rows)
        Path(f"{tmp}.json").write_text(json.dumps(self.meta, indent=1))
        for f in (str(tmp), f"{tmp}.rows.npy", f"{tmp}.json"):
            fsync_file(f)
        renames = [
            [f"{tmp}.rows.npy", f"{self.path}.rows.npy"],
            [str(tmp), str(self.path)],
            [f"{tmp}.json", f"{self.path}.json"],
        ]
        _write_json(_redo_path(self.path), {"renames": renames})
        finish_save(self.path)


def writable(path: Path) -> bool:
    """Whether the index files at ``path`` can be written (a store on a read-only share cannot)."""
    folder = path.parent if str(path.parent) else Path(".")
    return os.access(folder, os.W_OK | os.X_OK) and all(
        os.access(f, os.W_OK) for f in (path, Path(f"{path}.json")) if f.exists()
    )


def _check_writable(path: Path) -> None:
    if not writable(path):
        raise NeighborIndexError(
            f"cannot write the index {path.name} beside the store: {path.parent or '.'} is not "
            "writable (a read-only share?); `penult serve` and `penult neighbors` build the index "
            "in memory there, or copy the store to a writable folder"
        )


def _redo_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.commit")


def finish_save(path: Path) -> None:
    """Finish the renames of a save that a kill interrupted (nothing to do when none was)."""
    redo = _redo_path(path)
    if not redo.exists():
        return
    for src, dst in json.loads(redo.read_text())["renames"]:
        if os.path.exists(src):
            os.replace(src, dst)
    redo.unlink()


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    write_text(path, json.dumps(obj, indent=1))


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """faiss's on-disk code prints notes with printf; keep them off penult's output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _read_index(path: Path, meta: dict[str, Any]):
    """faiss.read_index; an on-disk index finds its lists beside the index file (so the store's
    folder can move)."""
    if meta.get("kind") != "ivf-disk":
        return faiss.read_index(str(path))
    with _quiet_stdout():
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)


def _add_on_disk(
    store: FeatureStore,
    backbone: str,
    rows: np.ndarray,
    metric: str,
    plan: IndexPlan,
    index,
    path: Path,
    *,
    first_id: int = 0,
    existing=None,
    cluster: str | None = None,
) -> Path:
    """Fill the trained, empty ``index`` with ``rows`` (faiss ids from ``first_id``), its inverted
    lists in a new file beside ``path``: shards of SHARD_ROWS built in memory one at a time (or
    as parallel Dask tasks with ``cluster``, each from the same trained quantiser), then merged
    on disk after the lists of ``existing`` (an on-disk index being extended). The lists of an
    earlier file are copied, never changed in place, so a kill leaves the old index whole."""
    work = path.with_name(f".{path.name}.shards-{os.getpid()}")
    work.mkdir(exist_ok=True)
    try:
        starts = range(0, len(rows), SHARD_ROWS)
        jobs = [
            (
                str(store.path),
                backbone,
                rows[s : s + SHARD_ROWS],
                metric,
                plan.pq_m,
                f"{path}.trained",
                first_id + s,
                str(work / f"{k:05d}.index"),
            )
            for k, s in enumerate(starts)
        ]
        if cluster:
            from penult.core.cluster import client_for, close, run_tasks

            client = client_for(cluster)
            try:
                sizes = [len(j[2]) for j in jobs]
                for _ in run_tasks(client, add_shard, jobs, sizes, "index (cluster)", True):
                    pass
            finally:
                close(client)
        else:
            for job in jobs:
                add_shard(*job, trained=index)
        ivfdata = path.with_name(f"{path.name}.{time.time_ns()}.ivfdata")
        _merge_lists(
            index, ([existing] if existing is not None else []), [j[-1] for j in jobs], ivfdata
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ivfdata


def add_shard(
    store_path: str,
    backbone: str,
    rows: np.ndarray,
    metric: str,
    pq_m: int,
    trained_path: str,
    first_id: int,
    out: str,
    *,
    trained=None,
) -> str:
    """One shard of an on-disk index: ``rows`` added (ids from ``first_id``) to a copy of the
    trained index, written to ``out`` (temporary name, then renamed: a retried task just
    writes it again)."""
    if trained is None:
        trained = faiss.read_index(trained_path)
    shard, at = faiss.clone_index(trained), first_id
    for part, x in _chunks(FeatureStore(store_path), backbone, rows, metric, pq_m):
        shard.add_with_ids(x, np.arange(at, at + len(part), dtype=np.int64))
        at += len(part)
    with atomic_path(out) as tmp:
        faiss.write_index(shard, str(tmp))
    return out


def _merge_lists(index, indexes: list, shard_files: list[str], ivfdata: Path) -> None:
    """Give ``index`` (trained, empty) on-disk lists holding the lists of ``indexes`` and of the
    shard files, in that order (faiss.contrib.ondisk.merge_ondisk, with indexes in memory too)."""
    keep = list(indexes)  # the sources must outlive the merge
    with _quiet_stdout():
        keep += [faiss.read_index(f, faiss.IO_FLAG_MMAP) for f in shard_files]
        sources = faiss.InvertedListsPtrVector()
        for src in keep:
            ivf = faiss.extract_index_ivf(src)
            sources.push_back(ivf.invlists)
        target = faiss.extract_index_ivf(index)
        lists = faiss.OnDiskInvertedLists(target.nlist, target.code_size, str(ivfdata))
        total = lists.merge_from_multiple(sources.data(), sources.size(), False)
    index.ntotal = target.ntotal = total
    target.replace_invlists(lists, True)
    lists.this.disown()
    with open(ivfdata, "rb+") as fh:  # the lists were written through a memory map
        os.fsync(fh.fileno())


def _write_trained(index, path: Path) -> None:
    """The trained, empty index (quantiser and codebooks, small): what an update starts from."""
    with atomic_path(f"{path}.trained") as tmp:
        faiss.write_index(index, str(tmp))


def _remove_other_ivfdata(path: Path, keep: str | None) -> None:
    """Lists files of earlier builds of this index (replaced, or left by a killed build)."""
    for f in path.parent.glob(f"{path.name}.*.ivfdata"):
        if f.name != keep:
            f.unlink(missing_ok=True)


def _chunks(store: FeatureStore, backbone: str, rows: np.ndarray, metric: str, pq_m: int = 0):
    """(rows, prepared vectors) a few MiB at a time, so memory does not grow with the store.

    PQ encoding makes a float table of pq_m x 16 per vector inside faiss, so chunks shrink with it.
    """
    per_row = max(4 * store.backbone(backbone).dim, 4 * 16 * pq_m)
    step = max(256, CHUNK_BYTES // per_row)
    for start in range(0, len(rows), step):
        part = rows[start : start + step]
        yield part, _prepare(store.embeddings(backbone, part), metric)


def _sample(store: FeatureStore, backbone: str, rows: np.ndarray, metric: str) -> np.ndarray:
    """The training sample, filled chunk by chunk into one array (no temporary copies of it)."""
    out = np.empty((len(rows), store.backbone(backbone).dim), np.float32)
    at = 0
    for part, x in _chunks(store, backbone, rows, metric):
        out[at : at + len(part)] = x
        at += len(part)
    return out


def build_index(
    store_path: str | os.PathLike[str],
    backbone: str,
    *,
    metric: str = "cosine",
    kind: str = "auto",
    nlist: int | None = None,
    pq_m: int | None = None,
    seed: int = 0,
    cluster: str | None = None,
    save: bool = True,
) -> tuple[NeighborIndex, IndexPlan]:
    """Build and save an index over every valid row, streaming the store in chunks; with
    ``cluster`` (a Dask spec, ivf-disk only), the shards are added by parallel tasks. Without
    ``save`` it is kept in memory only (not for on-disk indexes, which live in their files)."""
    if save:
        _check_writable(index_path(store_path, backbone, metric))
    store = FeatureStore(store_path)
    entry = store.backbone(backbone)
    rows = np.flatnonzero(store.valid(backbone))
    if len(rows) == 0:
        raise NeighborIndexError(f"{store_path}: backbone {backbone!r} has no embeddings to index")
    plan = plan_index(len(rows), entry.dim, kind, nlist=nlist, pq_m=pq_m)
    _check_cluster(cluster, plan.kind)
    if not save and plan.kind == "ivf-disk":
        raise NeighborIndexError(
            f"{store_path}: {len(rows):,} rows need an on-disk index, which cannot be written "
            "beside this store; run `penult index` on a writable copy of it"
        )
    index = faiss.index_factory(entry.dim, plan.factory, _faiss_metric(metric))
    t0 = time.perf_counter()
    if plan.train_rows:
        sample = np.sort(np.random.default_rng(seed).choice(rows, plan.train_rows, replace=False))
        index.train(_sample(store, backbone, sample, metric))
    path = index_path(store_path, backbone, metric)
    ivfdata = None
    if plan.kind == "ivf-disk":
        _write_trained(index, path)
        ivfdata = _add_on_disk(
            store, backbone, rows, metric, plan, index, path, cluster=cluster
        ).name
    else:
        for _part, x in _chunks(store, backbone, rows, metric, plan.pq_m):
            index.add(x)  # faiss ids are positions in ``rows``
    meta = {
        "format": "penult-index",
        "backbone": backbone,
        "fingerprint": entry.fingerprint,
        "metric": metric,
        **asdict(plan),
        "rows": int(len(rows)),
        "blocks": _block_digests(store, backbone, rows),
        "build_seconds": time.perf_counter() - t0,
        **({"ivfdata": ivfdata} if ivfdata else {}),
    }
    ni = NeighborIndex(index, meta, rows, path, store)
    if save:
        ni.save()
        _remove_other_ivfdata(path, ivfdata)
    return ni, plan


def open_index(
    store_path: str | os.PathLike[str],
    backbone: str,
    *,
    metric: str = "cosine",
    update: bool = False,
    cluster: str | None = None,
    save: bool = True,
) -> tuple[NeighborIndex, int]:
    """Load the saved index, refusing a stale or mismatched one; with ``update``, add new rows
    (and save them, unless ``save`` is false: then they are added in memory only).

    Returns the index and how many rows were added. Rows added to the store since the build make
    the index incomplete: without ``update`` that is refused too.
    """
    path = index_path(store_path, backbone, metric)
    store = FeatureStore(store_path)
    meta, rows = _checked_meta(path, store, backbone, metric)
    ni = NeighborIndex(_read_index(path, meta), meta, rows, path, store)
    new = np.setdiff1d(np.flatnonzero(store.valid(backbone)), rows)
    if len(new) and not update:
        raise NeighborIndexError(
            f"{path} lacks {len(new)} rows added to the store since it was built; run `penult index` again to add them"
        )
    if len(new):
        if save:
            _check_writable(path)
        elif meta.get("kind") == "ivf-disk":
            raise NeighborIndexError(
                f"{path} lacks {len(new)} rows added since it was built, and cannot be updated "
                "here (not writable); run `penult index` on a writable copy of the store"
            )
        _add_rows(ni, backbone, new, metric, cluster, save=save)
    return ni, len(new)


def _checked_meta(path: Path, store: FeatureStore, backbone: str, metric: str):
    """(meta, rows) of the saved index at ``path``, refused when missing, built from other
    embeddings, stale (rows changed or removed in the store) or without its inverted lists."""
    finish_save(path)
    if not path.exists() or not Path(f"{path}.json").exists():
        raise NeighborIndexError(
            f"no {metric} index for {backbone!r} beside {store.path}; run `penult index {store.path} --backbone {backbone}`"
        )
    meta = json.loads(Path(f"{path}.json").read_text())
    entry = store.backbone(backbone)
    if not entry.fingerprint.same_as(meta["fingerprint"]):
        raise NeighborIndexError(
            f"{path} was built from other {backbone!r} embeddings (fingerprint differs); rebuild it with `penult index --rebuild`"
        )
    rows = np.load(f"{path}.rows.npy", allow_pickle=False)
    valid = store.valid(backbone)
    if (
        len(rows) != meta["rows"]
        or rows.max(initial=-1) >= len(valid)
        or not valid[rows].all()
        or not _fresh(store, backbone, rows, meta)
    ):
        raise NeighborIndexError(
            f"{path} is stale: images it holds were changed or removed in the store; rebuild it with `penult index --rebuild`"
        )
    if meta.get("ivfdata") and not path.with_name(meta["ivfdata"]).exists():
        raise NeighborIndexError(
            f"{path}: its inverted lists {meta['ivfdata']} are missing; rebuild it with `penult index --rebuild`"
        )
    return meta, rows


def _add_rows(
    ni: NeighborIndex, backbone: str, new, metric: str, cluster: str | None, save: bool = True
) -> None:
    """Add store rows ``new`` to the index and save it (an ivf-disk index gets a new lists file)."""
    meta, path, store, rows = ni.meta, ni.path, ni.store, ni.rows
    _check_cluster(cluster, meta.get("kind", ""))
    if meta.get("kind") == "ivf-disk":  # a new lists file: old lists + new rows
        trained = faiss.read_index(f"{path}.trained")
        plan = IndexPlan(**{k: meta[k] for k in IndexPlan.__dataclass_fields__})
        ivfdata = _add_on_disk(
            store, backbone, new, metric, plan, trained, path, first_id=len(rows),
            existing=ni.index, cluster=cluster,
        )  # fmt: skip
        ni.index, meta["ivfdata"] = trained, ivfdata.name
    else:
        for _part, x in _chunks(store, backbone, new, metric, int(meta.get("pq_m", 0))):
            ni.index.add(x)
    ni.rows = np.concatenate([rows, new])
    blocks = _block_digests(store, backbone, ni.rows, meta.get("blocks"))
    meta.update(rows=int(len(ni.rows)), blocks=blocks)
    meta.pop("rows_sha256", None)
    if not save:
        return
    ni.save()
    if meta.get("ivfdata"):
        _remove_other_ivfdata(path, meta["ivfdata"])


def _check_cluster(cluster: str | None, kind: str) -> None:
    if cluster and kind != "ivf-disk":
        raise NeighborIndexError(
            f"--cluster builds on-disk indexes (--kind ivf-disk); a {kind} index is built in "
            "one process"
        )


def _fresh(store: FeatureStore, backbone: str, rows: np.ndarray, meta: dict[str, Any]) -> bool:
    """Whether the indexed rows still hold the images they held at build time."""
    if "blocks" not in meta:  # an index saved before per-block digests
        return _digest(store, rows) == meta.get("rows_sha256")
    now = _block_digests(store, backbone, rows, meta["blocks"])
    return {k: v[1] for k, v in now.items()} == {k: v[1] for k, v in meta["blocks"].items()}


def ensure_index(
    store_path: str | os.PathLike[str],
    backbone: str,
    *,
    metric: str = "cosine",
    save: bool | str = True,
) -> NeighborIndex:
    """The saved index with any new rows added, or a new one with the automatic plan. With
    ``save="if-writable"``, a store whose folder cannot be written (a read-only share) gets its
    index built, or brought up to date, in memory instead of refused."""
    path = index_path(store_path, backbone, metric)
    keep = writable(path) if save == "if-writable" else bool(save)
    if keep:
        finish_save(path)
    if path.exists() and (keep or not _redo_path(path).exists()):
        try:
            return open_index(store_path, backbone, metric=metric, update=True, save=keep)[0]
        except NeighborIndexError:
            if keep:
                raise  # a stale saved index is rebuilt on purpose, by `penult index --rebuild`
    return build_index(store_path, backbone, metric=metric, save=keep)[0]
