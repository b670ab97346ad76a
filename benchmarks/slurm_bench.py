"""What `--cluster slurm:JOBS` costs on a real SLURM (issue 35): a one-node cluster of Debian's
slurmctld, slurmd and munged on this machine, started the way the tests start it
(tests/slurm.py), and dask-jobqueue submitting real `sbatch` jobs to it.

    .venv/bin/python benchmarks/slurm_bench.py                # 240 cub100 images
    .venv/bin/python benchmarks/slurm_bench.py --images 480 --repeats 3

Measured in one run (the images read once before the clocks start), EfficientNet-Lite0 with
its offline weights, fp32 on ONNX Runtime (pinned: every run the same engine):

- a bare job: `sbatch --wrap true` until SLURM has run it (the queue's own cost);
- a Dask job: `slurm:1` asked for until its worker has joined the scheduler (sbatch, the
  job starting, Python and Dask starting), and the cluster closed again;
- scheduling alone: 200 empty tasks through a SLURM worker against a LocalCluster worker;
- extraction: `extract --cluster slurm:2` against `--cluster local:2` (same machine, same
  cores per worker), end to end, then each again with partitions of 4 images: the extra time
  over the extra partitions is what a partition costs on each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks_common import cpu_flags, remove_store

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the one-node cluster the tests start
OUT = ROOT / "bench-out" / "slurm"


def bare_job(s) -> float:
    """Seconds from `sbatch` until SLURM no longer lists the job (it ran `true`)."""
    t = time.perf_counter()
    job = subprocess.run(["sbatch", "--parsable", "--wrap", "true", "-o", "/dev/null"],
                         env=s.env, check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    while subprocess.run(["squeue", "-h", "-j", job], env=s.env, capture_output=True,
                         text=True).stdout.strip():  # fmt: skip
        time.sleep(0.02)
    return time.perf_counter() - t


def dask_job() -> tuple[float, float]:
    """(seconds until one SLURM job's worker has joined, seconds to close it again)."""
    from penult.core.cluster import client_for, close

    t = time.perf_counter()
    client = client_for("slurm:1")
    client.wait_for_workers(1, timeout=300)
    up = time.perf_counter() - t
    t = time.perf_counter()
    close(client)
    return up, time.perf_counter() - t


def extract_run(lst, cluster: str, partition: int) -> float:
    from penult.extract import ExtractOptions, extract

    store = OUT / "s.h5"
    remove_store(store)
    opts = ExtractOptions(precision="fp32", engine="onnxruntime", progress=False,
                          cluster=cluster, partition_size=partition, workers=0)  # fmt: skip
    t = time.perf_counter()
    s = extract(store, lst, opts)
    seconds = time.perf_counter() - t
    assert s.extracted == len(lst.paths), s.report()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    import dask
    import slurm
    from cluster_bench import cpu, listing, scheduling

    OUT.mkdir(parents=True, exist_ok=True)
    if gone := slurm.missing():
        sys.exit(f"SLURM is not installed ({', '.join(gone)}): make slurm")
    lst = listing(a.images)
    result: dict[str, object] = {"cpu": cpu(), "images": len(lst.paths)}
    print("cpu:", cpu_flags())
    with slurm.one_node(OUT / "cluster") as s:
        os.environ["SLURM_CONF"] = str(s.conf)
        cores = max(1, s.cores // 2)
        settings = {"jobqueue.slurm.queue": "debug", "jobqueue.slurm.cores": cores,
                    "jobqueue.slurm.processes": 1,
                    "jobqueue.slurm.memory": f"{s.memory_mb // 2}MB",
                    "jobqueue.slurm.log-directory": str(OUT / "jobs")}  # fmt: skip
        with dask.config.set(settings):
            bare = [bare_job(s) for _ in range(5)]
            jobs = [dask_job() for _ in range(a.repeats)]
            result["bare_job_s"] = round(statistics.median(bare), 3)
            result["dask_job_up_s"] = round(statistics.median(j[0] for j in jobs), 2)
            result["dask_job_close_s"] = round(statistics.median(j[1] for j in jobs), 2)
            result["task_ms"] = {
                spec: round(1000 * scheduling(spec), 2) for spec in ("slurm:1", "local:1")
            }
            big, small = len(lst.paths), 4  # big: as many as balanced_size gives 2 workers
            runs: dict[str, list[float]] = {}
            for _ in range(a.repeats):
                for spec in ("local:2", "slurm:2"):
                    for size in (big, small):
                        key = spec + (" small" if size == small else "")
                        runs.setdefault(key, []).append(extract_run(lst, spec, size))
        n = len(lst.paths)
        best = {k: min(v) for k, v in runs.items()}
        from penult.core.cluster import balanced_size

        extra = -(-n // balanced_size(n, small, 2)) - -(-n // balanced_size(n, big, 2))
        result["extract_s"] = {k: round(v, 2) for k, v in best.items()}
        result["images_per_s"] = {k: round(n / v, 1) for k, v in best.items()}
        result["slurm_over_local"] = round(best["slurm:2"] / best["local:2"], 3)
        result["per_partition_s"] = {
            spec: round((best[spec + " small"] - best[spec]) / extra, 3)
            for spec in ("local:2", "slurm:2")
        }
    print(json.dumps(result, indent=1))
    (OUT / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
