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
import os
import sys
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from features.errors import PenultError

log = logging.getLogger(__name__)


class ClusterError(PenultError):
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
        share = max(1, _cores() // n)  # each worker's part of this machine
        # Dask's workers are daemonic by default, and daemonic processes cannot start the
        # DataLoader's worker processes: run them as ordinary processes. Dask also starts them
        # with MALLOC_TRIM_THRESHOLD_=65536, which returns every freed tensor to the kernel
        # and makes the next batch fault its memory in again. Set for the whole process, not
        # in a `with` block: a nanny reads both again when it restarts a worker that died
        environ = {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1}
        dask.config.set(
            {"distributed.worker.daemon": False, "distributed.nanny.pre-spawn-environ": environ}
        )
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            env={CORES_ENV: str(share)},
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


CORES_ENV = "PENULT_WORKER_CORES"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
ONE_AT_A_TIME = threading.Lock()  # a worker with several Dask threads still embeds one task at
# a time: the model, its threads and the GPU are the worker's, not the task's


def for_this_worker(o):
    """``o`` (ExtractOptions) fitted to this Dask worker's share of its machine: torch threads
    and loader workers from its cores (``PENULT_WORKER_CORES`` for a LocalCluster, else the
    worker's Dask threads), and on a machine with several GPUs the GPU of its number. Dask
    starts workers with OMP_NUM_THREADS=1, which alone would leave a CPU worker one core."""
    from dataclasses import replace

    import torch

    try:
        from distributed import get_worker

        worker = get_worker()
        cores, name = int(os.environ.get(CORES_ENV, 0)) or worker.state.nthreads, worker.name
    except (ImportError, ValueError):  # not inside a Dask worker
        cores, name = _cores(), None
    torch.set_num_threads(cores)
    cuda = o.device in ("auto", "cuda") and torch.cuda.is_available()
    changes: dict[str, Any] = {}
    if o.workers is None:  # on one core, decoding in the task beats starting loader processes
        changes["workers"] = min(8, cores) if cuda else (0 if cores <= 1 else min(4, cores))
    if cuda and torch.cuda.device_count() > 1 and isinstance(name, int):
        changes["device"] = f"cuda:{name % torch.cuda.device_count()}"
    return replace(o, **changes)


def run_partition(store: str, part: Partition, opts: dict[str, Any]) -> TaskResult:
    """Embed one partition into its part (on a worker). Resumes what an earlier attempt wrote."""
    from extract.run import ExtractOptions

    with ONE_AT_A_TIME:
        return _run_partition(store, part, for_this_worker(ExtractOptions(**opts)))


def _run_partition(store: str, part: Partition, o) -> TaskResult:
    from extract.run import ExtractSummary, _run, build_embedder
    from extract.sources import Listing
    from features.parts import PartWriter

    key = repr(o)
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


def balanced_size(n: int, size: int, workers: int) -> int:
    """Images per partition: ``size``, or fewer when a small job would otherwise leave workers
    idle (at least 4 partitions per worker, so the last ones finish close together)."""
    return max(1, min(size, -(-n // (4 * max(1, workers)))))


def run_on_cluster(
    w, store: str, listing, sha: list[str], todo: list[int], opts, spec: str, s
) -> None:
    """Embed ``todo`` (listing indices) on the cluster, then publish the parts through ``w``
    (the driver's :class:`StoreWriter`)."""
    from features.parts import adopt_parts

    o = {k: v for k, v in asdict(opts).items() if k not in ("cluster", "shard", "partition_size")}
    o.update(progress=False)
    client = client_for(spec)
    try:
        size = balanced_size(
            len(todo), opts.partition_size, len(client.scheduler_info()["workers"])
        )
        parts = partitions(
            str(listing.root), [listing.paths[i] for i in todo], [sha[i] for i in todo], size
        )
        for i, r in run_tasks(
            client,
            run_partition,
            [(store, p, o) for p in parts],
            [len(p.paths) for p in parts],
            "extract (cluster)",
            opts.progress,
        ):
            s.extracted += r.extracted
            s.failed += r.failed
            adopt_parts(w, {parts[i].name})  # published while the other tasks run
    finally:
        close(client)


def close(client) -> None:
    """Close the client and the cluster it started (a LocalCluster or SLURM jobs)."""
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


def run_tasks(client, fn, args: list[tuple], sizes: list[int], desc: str, progress: bool):
    """Run ``fn(*a)`` for each of ``args`` on the cluster with retries; yield (position in
    ``args``, result) as tasks finish. A task that fails all its retries raises. One bar counts
    images over all workers (tasks report each batch with :func:`report_progress`); a worker
    that leaves while tasks run gets a line of its own (Dask runs its tasks again elsewhere).
    A finished task's future is dropped at once, so Dask never runs it again."""
    from dask.distributed import wait
    from tqdm.auto import tqdm

    futures = client.map(fn, *zip(*args, strict=True), retries=3, pure=False)
    index = {f.key: i for i, f in enumerate(futures)}
    counted = [0] * len(args)
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
    del futures
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
