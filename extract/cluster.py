"""Extraction on a Dask cluster: the driver plans, workers embed partitions into parts, the
driver publishes the parts under the store's writer lock.

Dask (not a home-made scheduler) gives the task retries, the re-running of a partition whose
worker died, and one client API for a ``LocalCluster``, an existing scheduler and SLURM. A
partition's part is written like a ``--shard`` part (``features.parts``), so a retried
partition resumes what its dead worker finished and never duplicates a row.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class ClusterError(Exception):
    """The cluster spec is wrong, or Dask is not installed."""


def client_for(spec: str):
    """A ``dask.distributed.Client`` for ``local[:N]``, ``tcp://HOST:PORT`` or ``slurm[:JOBS]``."""
    try:
        import dask
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ClusterError(
            "--cluster needs Dask: pip install 'penult[dask]' (and 'penult[slurm]' for SLURM)"
        ) from None
    if not logging.getLogger().isEnabledFor(logging.INFO):  # Dask's start-up chatter only with -v
        logging.getLogger("distributed").setLevel(logging.WARNING)
    kind, _, arg = spec.partition(":")
    if kind == "local":
        n = _count(arg, spec) if arg else _local_workers()
        # Dask's worker processes are daemonic by default, and daemonic processes cannot start
        # the DataLoader's own worker processes: run them as ordinary processes
        with dask.config.set({"distributed.worker.daemon": False}):
            cluster = LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
            )
        return Client(cluster)
    if kind == "tcp":
        return Client(spec)
    if kind == "slurm":
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError:
            raise ClusterError(
                "--cluster slurm needs dask-jobqueue: pip install 'penult[slurm]'"
            ) from None
        cluster = SLURMCluster()  # queue, cores, memory, ... from ~/.config/dask/jobqueue.yaml
        cluster.scale(jobs=_count(arg, spec) if arg else 1)
        return Client(cluster)
    raise ClusterError(f"--cluster {spec!r}: use local[:N], tcp://HOST:PORT or slurm[:JOBS]")


def _count(arg: str, spec: str) -> int:
    try:
        n = int(arg)
    except ValueError:
        n = 0
    if n < 1:
        raise ClusterError(f"--cluster {spec!r}: the count must be a positive integer")
    return n


def _local_workers() -> int:
    """One worker per GPU where there are GPUs, else two (the loader takes the other cores)."""
    import torch

    return torch.cuda.device_count() or 2


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
    failed: list[tuple[str, str]] = field(default_factory=list)


_MODELS: dict[str, Any] = {}  # per worker process: the model is built once, not once per task


def run_partition(store: str, part: Partition, opts: dict[str, Any]) -> TaskResult:
    """Embed one partition into its part (on a worker). Resumes what an earlier attempt wrote."""
    from extract.run import ExtractOptions, ExtractSummary, _run, build_embedder
    from extract.sources import Listing
    from features.parts import PartWriter

    o = ExtractOptions(**opts)
    key = repr(sorted(opts.items()))
    if key not in _MODELS:
        _MODELS[key] = build_embedder(o)
    backbone, embedder, name, fingerprint = _MODELS[key]
    listing = Listing(root=part.root, paths=part.paths)
    s = ExtractSummary(store, name)
    with PartWriter(store, part.name) as w:
        w.register_backbone(name, fingerprint, dtype=o.dtype)
        done = w.done(name)
        todo = [
            i
            for i, (p, h) in enumerate(zip(part.paths, part.sha256, strict=True))
            if (p, h) not in done
        ]
        if todo:
            _run(
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
    return TaskResult(s.extracted, s.failed)


def run_on_cluster(
    w, store: str, listing, sha: list[str], todo: list[int], opts, spec: str, s
) -> None:
    """Embed ``todo`` (listing indices) on the cluster, then publish the parts through ``w``
    (the driver's :class:`StoreWriter`)."""
    from features.parts import adopt_parts

    parts = partitions(
        str(listing.root),
        [listing.paths[i] for i in todo],
        [sha[i] for i in todo],
        opts.partition_size,
    )
    o = {k: v for k, v in asdict(opts).items() if k not in ("cluster", "shard", "partition_size")}
    o.update(progress=False)
    client = client_for(spec)
    try:
        for _, r in run_tasks(
            client,
            run_partition,
            [(store, p, o) for p in parts],
            [len(p.paths) for p in parts],
            "extract (cluster)",
            opts.progress,
        ):
            s.extracted += r.extracted
            s.failed += r.failed
    finally:
        close(client)
    adopt_parts(w, {p.name for p in parts})


def close(client) -> None:
    """Close the client and the cluster it started (a LocalCluster or SLURM jobs)."""
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


def run_tasks(client, fn, args: list[tuple], sizes: list[int], desc: str, progress: bool):
    """Run ``fn(*a)`` for each of ``args`` on the cluster with retries; yield (position in
    ``args``, result) as tasks finish. A task that fails all its retries raises. One bar counts images over all workers (tasks report each batch
    with :func:`report_progress`); a worker that leaves while tasks run gets a line of its own
    (Dask runs its tasks again elsewhere)."""
    from dask.distributed import wait
    from tqdm.auto import tqdm

    futures = client.map(fn, *zip(*args, strict=True), retries=3, pure=False)
    index = {f.key: i for i, f in enumerate(futures)}
    counted = [0] * len(futures)
    bar = tqdm(total=sum(sizes), desc=desc, unit="img", disable=not progress, smoothing=0.1)

    def count(i: int, n: int) -> None:  # a retried task reports its images again: cap them
        n = min(n, sizes[i] - counted[i])
        counted[i] += n
        bar.update(n)

    def on_event(event: tuple[float, dict]) -> None:
        i = index.get(event[1].get("key"))
        if i is not None:
            count(i, int(event[1]["n"]))

    client.subscribe_topic(PROGRESS_TOPIC, on_event)
    workers = set(client.scheduler_info()["workers"])
    pending = set(futures)
    try:
        while pending:
            try:
                done, pending = wait(pending, timeout=1.0, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            for f in done:
                i = index[f.key]
                r = f.result()  # a task that failed its retries raises here
                count(i, sizes[i])
                yield i, r
            now = set(client.scheduler_info()["workers"])
            for lost in sorted(workers - now):
                tqdm.write(
                    f"penult: worker {lost} left the cluster; its tasks run again elsewhere",
                    file=sys.stderr,
                )
            workers = now
    finally:
        client.unsubscribe_topic(PROGRESS_TOPIC)
        bar.close()


PROGRESS_TOPIC = "penult-progress"


def report_progress(n: int) -> None:
    """From inside a task: ``n`` more images done (for the driver's bar)."""
    from distributed import get_worker
    from distributed.worker import thread_state

    key = getattr(thread_state, "key", None)
    if key is not None:
        get_worker().log_event(PROGRESS_TOPIC, {"key": key, "n": n})
