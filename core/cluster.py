"""Running penult's work on Dask (the engine we chose, never a home-made scheduler): a client
for ``local[:N]``, ``tcp://HOST:PORT`` or ``slurm[:JOBS]``, tasks run with retries under one
progress bar, and what a task needs to know of its worker. Torch-free, so both stages use it:
extract/ for extraction, classify/ for scoring and index shards.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from penult.core.errors import PenultError

__all__ = [
    "CORES_ENV",
    "ClusterStart",
    "ClusterError",
    "JobWatch",
    "ONE_AT_A_TIME",
    "PROGRESS_TOPIC",
    "balanced_size",
    "client_for",
    "close",
    "cores_here",
    "freeze_at_exit",
    "report_progress",
    "resubmit_lost_jobs",
    "run_tasks",
]


ONE_AT_A_TIME = threading.Lock()  # a worker with several Dask threads still embeds one task at
# a time: the model, its threads and the GPU are the worker's, not the task's


class ClusterError(PenultError):
    """The cluster spec is wrong, or Dask is not installed."""


def client_for(spec: str):
    """A ``dask.distributed.Client`` for ``local[:N]``, ``tcp://HOST:PORT`` or ``slurm[:JOBS]``."""
    kind, n = _parse(spec)
    import dask
    from dask.distributed import Client, LocalCluster

    if not logging.getLogger().isEnabledFor(logging.INFO):  # Dask's start-up chatter only with -v
        logging.getLogger("distributed").setLevel(logging.WARNING)
    if kind == "local":
        share = max(1, cores_here() // n)  # each worker's part of this machine
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
    from dask_jobqueue import SLURMCluster

    cluster = SLURMCluster()  # queue, cores, memory, ... from ~/.config/dask/jobqueue.yaml
    cluster.scale(jobs=n)
    return Client(cluster)


def _parse(spec: str) -> tuple[str, int]:
    """(kind, workers or jobs) of a cluster spec, once its Dask packages are known importable."""
    kind, _, arg = spec.partition(":")
    if kind not in ("local", "tcp", "slurm"):
        raise ClusterError(f"--cluster {spec!r}: use local[:N], tcp://HOST:PORT or slurm[:JOBS]")
    n = _count(arg, spec) if arg and kind != "tcp" else (_local_workers() if kind == "local" else 1)
    try:
        import dask  # noqa: F401
        import distributed  # noqa: F401
    except ImportError:
        raise ClusterError(
            "--cluster needs Dask: pip install 'penult[dask]' (and 'penult[slurm]' for SLURM)"
        ) from None
    if kind == "slurm":
        try:
            import dask_jobqueue  # noqa: F401
        except ImportError:
            raise ClusterError(
                "--cluster slurm needs dask-jobqueue: pip install 'penult[slurm]'"
            ) from None
        _check_jobqueue(spec)
    if kind == "local" and n > (most := max(8, 4 * cores_here())):
        raise ClusterError(
            f"--cluster {spec!r}: {n:,} local workers on {cores_here()} cores; each loads the "
            f"network and competes for the same cores: use local:N with N at most {most}"
        )
    if kind == "tcp":
        _check_address(spec)
    return kind, n


def _check_address(spec: str) -> None:
    """``tcp://HOST:PORT`` of a running Dask scheduler, checked before anything starts."""
    from urllib.parse import urlsplit

    try:
        u = urlsplit(spec)
        host, port = u.hostname, u.port
    except ValueError:
        host, port = None, None
    if not host or port is None or not 0 < port < 65536:
        raise ClusterError(
            f"--cluster {spec!r}: give the scheduler's address as tcp://HOST:PORT "
            "(e.g. tcp://10.0.0.5:8786, as `dask scheduler` prints it)"
        )


def _check_jobqueue(spec: str) -> None:
    """SLURM jobs need cores and memory per job from dask-jobqueue's configuration."""
    import dask

    missing = [k for k in ("cores", "memory") if not dask.config.get(f"jobqueue.slurm.{k}", None)]
    if missing:
        raise ClusterError(
            f"--cluster {spec!r}: no SLURM job size configured ({' and '.join(missing)} missing); "
            "set jobqueue: slurm: cores, memory (and queue, walltime) in "
            "~/.config/dask/jobqueue.yaml, see the dask-jobqueue documentation"
        )


class ClusterStart:
    """:func:`client_for` begun in a background thread, so a LocalCluster's workers spawn and
    import torch while the driver plans (3 s of a small run here). The spec is checked at once,
    so a wrong one fails before any planning. As a context manager it closes the cluster on
    leaving, used or not; a start that failed is raised by :meth:`client` only (unused, it
    cost nothing)."""

    def __init__(self, spec: str) -> None:
        _parse(spec)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="penult-cluster")
        self._future = self._pool.submit(client_for, spec)
        self._pool.shutdown(wait=False)

    def client(self):
        return self._future.result()

    def __enter__(self) -> ClusterStart:
        return self

    def __exit__(self, *exc) -> None:
        try:
            client = self._future.result()
        except Exception:  # noqa: BLE001 -- raised by client() where it mattered
            return
        close(client)


def freeze_at_exit() -> None:
    """At this process's exit, keep the interpreter's final garbage collections off the objects
    alive then (``gc.freeze``). With torch and a model loaded those collections cost 1-2 s per
    process (a CLI command, a Dask worker being closed); the objects are still freed, atexit
    handlers still run, and files are closed by their ``with`` blocks long before."""
    atexit.unregister(gc.freeze)  # once per process, however often it is called
    atexit.register(gc.freeze)


def _count(arg: str, spec: str) -> int:
    try:
        n = int(arg)
    except ValueError:
        n = 0
    if n < 1:
        raise ClusterError(f"--cluster {spec!r}: the count must be a positive integer")
    return n


CORES_ENV = "PENULT_WORKER_CORES"


def cores_here() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _local_workers() -> int:
    """One worker per GPU where there are GPUs, else two (the loader takes the other cores).
    GPUs are counted from the driver's own list, so this module needs no torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]) or 2
    gpus = "/proc/driver/nvidia/gpus"
    return len(os.listdir(gpus)) if os.path.isdir(gpus) else 2


def balanced_size(n: int, size: int, workers: int) -> int:
    """Images per partition: ``size``, or fewer when a small job would otherwise leave workers
    idle (at least 4 partitions per worker, so the last ones finish close together)."""
    return max(1, min(size, -(-n // (4 * max(1, workers)))))


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
    resubmitting: set[str] = set()
    watch = JobWatch()
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
            gone = set(resubmit_lost_jobs(client, watch))
            for job in sorted(gone - resubmitting):  # said once, while its new job starts
                tqdm.write(
                    f"penult: job {job} ended before its work did; a new job is submitted "
                    "in its place",
                    file=sys.stderr,
                )
            resubmitting = gone
    finally:
        client.unsubscribe_topic(PROGRESS_TOPIC)
        bar.close()


# What SLURM says of a job that ended (``squeue -t all``); a job gone from squeue ended too
_ENDED = frozenset(
    "BOOT_FAIL CANCELLED COMPLETED DEADLINE FAILED NODE_FAIL OUT_OF_MEMORY PREEMPTED TIMEOUT".split()
)
SQUEUE_EVERY = 5.0  # seconds between asks about jobs whose worker has not joined yet


@dataclass
class JobWatch:
    """The batch jobs (dask-jobqueue: SLURM) of a run: names seen submitted, job ids seen joined
    (a worker of theirs in the scheduler), and when squeue was last asked about the others."""

    started: set[str] = field(default_factory=set)
    joined: set[str] = field(default_factory=set)  # (a job put in another's place has its name)
    asked: float = 0.0


def resubmit_lost_jobs(client, watch: JobWatch) -> list[str]:
    """Submit a new job for each batch-system job (dask-jobqueue: SLURM) that ended, and name
    them. A job ends under ``scancel``, its walltime or a node failure, and dask-jobqueue does
    not replace it: it only forgets a lost worker's job after
    ``distributed.deploy.lost-worker-timeout`` (so a worker that reconnects keeps its job), and
    a job that ends before its worker joined is never known to Dask as lost at all: squeue is
    asked about those. Scaling back to the jobs asked for then submits the missing ones
    (SpecCluster's own state correction). A ``LocalCluster``'s nanny restarts its workers
    itself."""
    cluster = getattr(client, "cluster", None)
    if cluster is None or not hasattr(cluster, "job_script"):  # not a jobqueue cluster
        return []
    names = [str(n) for n in dict(cluster.worker_spec)]
    jobs = {str(n): str(getattr(j, "job_id", "") or "") for n, j in dict(cluster.workers).items()}
    watch.started |= set(jobs)
    here = {str(d.get("name")) for d in client.scheduler_info()["workers"].values()}
    watch.joined |= {i for n, i in jobs.items() if i and _has_worker(n, here)}
    lost = [n for n in names if n in watch.started and n not in jobs]
    waiting = {n: i for n, i in jobs.items() if i and i not in watch.joined}
    if waiting and time.monotonic() - watch.asked >= SQUEUE_EVERY:
        watch.asked = time.monotonic()
        ended = _ended_jobs(waiting)
        if ended:
            cluster.sync(_forget_jobs, cluster, ended)
            lost += ended
    if lost:
        cluster.scale(jobs=len(names))  # the same number of jobs: only the missing start
    return sorted(lost)


def _has_worker(job: str, workers: set[str]) -> bool:
    """Whether a worker of ``job`` is in the scheduler (a job of several processes names its
    workers ``<job>-<i>``)."""
    return job in workers or any(w.startswith(job + "-") for w in workers)


def _ended_jobs(ids: dict[str, str]) -> list[str]:
    """The names (of ``ids``: name -> SLURM job id) whose jobs squeue says ended, or no longer
    knows; none when squeue cannot be asked (then only Dask's own view counts)."""
    import getpass
    import subprocess

    try:
        r = subprocess.run(
            ["squeue", "-h", "-t", "all", "-o", "%i %T", "-u", getpass.getuser()],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return []
    if r.returncode:
        return []
    state = dict(ln.split(None, 1) for ln in r.stdout.splitlines() if len(ln.split()) == 2)
    return sorted(n for n, i in ids.items() if state.get(i, "GONE").strip() in _ENDED | {"GONE"})


async def _forget_jobs(cluster, names: list[str]) -> None:
    """Drop jobs that ended without a worker from the cluster's jobs, on its event loop (the
    next state correction submits new ones in their place)."""
    for n in names:
        cluster.workers.pop(n, None)


PROGRESS_TOPIC = "penult-progress"


def report_progress(n: int) -> None:
    """From inside a task: ``n`` more images done (for the driver's bar)."""
    from distributed import get_worker
    from distributed.worker import thread_state

    key = getattr(thread_state, "key", None)
    if key is not None:
        get_worker().log_event(PROGRESS_TOPIC, {"key": key, "n": n})
