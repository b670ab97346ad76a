"""Extraction on a Dask cluster: the driver plans, workers embed partitions into parts, the
driver publishes the parts under the store's writer lock.

Dask (not a home-made scheduler) gives the task retries, the re-running of a partition whose
worker died, and one client API for a ``LocalCluster``, an existing scheduler and SLURM. A
partition's part is written like a ``--shard`` part (``features.parts``), so a retried
partition resumes what its dead worker finished and never duplicates a row.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from penult.core.cluster import (
    CORES_ENV,
    ONE_AT_A_TIME,
    balanced_size,
    cores_here,
    freeze_at_exit,
    report_progress,
    run_tasks,
)


@dataclass
class Partition:
    name: str  # the part's folder: stable for the same images, so a rerun resumes it
    root: str
    paths: list[str]
    sha256: list[str]


def partitions(root: str, paths: list[str], sha: list[str], size: int) -> list[Partition]:
    out = []
    for s in range(0, len(paths), size):
        p, h = paths[s : s + size], sha[s : s + size]
        digest = hashlib.sha256("\n".join(f"{a}\t{b}" for a, b in zip(p, h, strict=True)).encode())
        out.append(Partition(f"task-{digest.hexdigest()[:20]}", root, p, h))
    return out


@dataclass
class TaskResult:
    extracted: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (the first ones)
    failed_count: int = 0


_MODELS: dict[str, Any] = {}  # per worker process: the model is built once, not once per task


def for_this_worker(o):
    """``o`` (ExtractOptions) fitted to this Dask worker's share of its machine: torch threads
    and loader workers from its cores (``PENULT_WORKER_CORES`` for a LocalCluster, else the
    worker's Dask threads), and on a machine with several GPUs the GPU of its number. Dask
    starts workers with OMP_NUM_THREADS=1, which alone would leave a CPU worker one core. Its
    loaders start from a fork server from then on (extract.loader.use_forkserver)."""
    from dataclasses import replace

    import torch

    try:
        from distributed import get_worker

        worker = get_worker()
        cores, name = int(os.environ.get(CORES_ENV, 0)) or worker.state.nthreads, worker.name
    except (ImportError, ValueError):  # not inside a Dask worker
        cores, name = cores_here(), None
    torch.set_num_threads(cores)
    freeze_at_exit()  # a worker being closed exits in a second less
    cuda = o.device in ("auto", "cuda") and torch.cuda.is_available()
    changes: dict[str, Any] = {}
    if o.workers is None:  # on one core, decoding in the task beats starting loader processes
        changes["workers"] = min(8, cores) if cuda else (0 if cores <= 1 else min(4, cores))
    if cuda and torch.cuda.device_count() > 1 and isinstance(name, int):
        changes["device"] = f"cuda:{name % torch.cuda.device_count()}"
    if changes.get("workers", o.workers):  # a loader per partition or chunk, beside the network
        from penult.extract.loader import use_forkserver

        use_forkserver()
    return replace(o, **changes)


def run_partition(store: str, part: Partition, opts: dict[str, Any]) -> TaskResult:
    """Embed one partition into its part (on a worker). Resumes what an earlier attempt wrote."""
    from penult.extract.options import ExtractOptions

    with ONE_AT_A_TIME:
        return _run_partition(store, part, for_this_worker(ExtractOptions(**opts)))


def _run_partition(store: str, part: Partition, o) -> TaskResult:
    from penult.extract.embed import build_embedder, embed_into
    from penult.extract.sources import Listing
    from penult.extract.summary import ExtractSummary
    from penult.features.parts import PartWriter

    key = repr(o)
    if key not in _MODELS:
        _MODELS[key] = build_embedder(o)
    backbone, embedder, name, fingerprint = _MODELS[key]
    listing = Listing(root=part.root, paths=part.paths)
    s = ExtractSummary(store, name)
    if _published(store, name, part):  # a stale attempt (its job cancelled, the task run
        return TaskResult()  # again elsewhere and published): no part made again
    with PartWriter(store, part.name) as w:
        w.register_backbone(name, fingerprint, dtype=o.dtype)
        todo = w.not_done(name, part.paths, part.sha256, list(range(len(part.paths))))
        if todo:
            embed_into(
                w,
                name,
                listing,
                part.sha256,
                todo,
                embedder,
                backbone.preprocess,
                o,
                s,
                on_batch=report_progress,
            )
    return TaskResult(s.extracted, s.failed, s.failed_count)


def _published(store: str, backbone: str, part: Partition) -> bool:
    """Whether the store already holds every image of ``part`` with this content and an
    embedding of ``backbone`` (a cancelled SLURM job's worker can still be finishing a task
    that was run again elsewhere and published meanwhile)."""
    import numpy as np
    from penult.features import FeatureStore, sha_raw

    if not os.path.exists(store):
        return False
    fs = FeatureStore(store)
    if backbone not in fs.backbone_names():
        return False
    rows = fs.find(part.paths)
    if (rows < 0).any():
        return False
    order = np.argsort(rows)  # read in row order, the partition's rows alone
    same = (fs.hashes(rows[order]) == sha_raw([part.sha256[i] for i in order])).all()
    return bool(same and fs.valid(backbone, rows[order]).all())


PUBLISH_IDLE = 3  # the driver waits this many times a publish's duration before the next:
# one commit takes every part finished meanwhile, so a store of many pieces (each commit
# rewrites its view, about 0.14 ms a piece) still publishes as fast as the workers make parts


def _publish(w, names: set[str], report) -> tuple[set[str], float]:
    """Publish the finished parts ``names``; the names still waiting (a part whose lock a stale
    attempt holds) and the seconds it took."""
    from penult.features.parts import adopt_parts, list_parts

    t = time.monotonic()
    if names:
        adopt_parts(w, names, report=report)
        names = names & {p.name for p in list_parts(w.path)}
    return names, time.monotonic() - t


def run_on_cluster(client, w, listing, sha: list[str], todo: list[int], opts, s) -> None:
    """Embed ``todo`` (listing indices) on the cluster of ``client``, then publish the parts
    through ``w`` (the driver's :class:`StoreWriter`)."""
    from penult.features.parts import Publishing

    w.commit()  # the images first: a worker seals its part over their stored rows
    o = {k: v for k, v in asdict(opts).items() if k not in ("cluster", "shard", "partition_size")}
    o.update(progress=False)
    store = str(w.path)
    size = balanced_size(len(todo), opts.partition_size, len(client.scheduler_info()["workers"]))
    parts = partitions(
        str(listing.root), [listing.paths[i] for i in todo], [sha[i] for i in todo], size
    )
    report, waiting, due = Publishing(), set(), 0.0
    for i, r in run_tasks(
        client,
        run_partition,
        [(store, p, o) for p in parts],
        [len(p.paths) for p in parts],
        "extract (cluster)",
        opts.progress,
    ):
        s.extracted += r.extracted
        s.add_failed(r.failed, r.failed_count)
        waiting.add(parts[i].name)
        if time.monotonic() >= due:  # published while the other tasks run, in batches
            waiting, took = _publish(w, waiting, report)
            due = time.monotonic() + PUBLISH_IDLE * took
    _publish(w, waiting, report)
    s.publishing = report.lines()
