"""`--cluster slurm:2` and the docs' job-array example on a real SLURM: a one-node cluster of
Debian's slurmctld, slurmd and munged started by the fixture (tests/slurm.py); dask-jobqueue
submits real `sbatch` jobs to it. Skipped, saying why, where SLURM is not installed."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import slurm
from penult import cli
from penult.features import FeatureStore, check
from penult.features.parts import parts_dir
from test_cluster import _by_path, _number

from conftest import cub_manifest

DOCS = Path(__file__).parents[1] / "docs" / "EXTRACT.md"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, monkeypatch_module):
    """The one-node SLURM cluster, and dask-jobqueue configured from the docs' jobqueue.yaml
    with only what differs on this node: its partition, one core and a share of its memory per
    job, no GPU."""
    if gone := slurm.missing():
        pytest.skip(
            f"SLURM is not installed ({', '.join(gone)} not found): `make test` installs "
            "Debian's slurm-wlm and munge where it can"
        )
    pytest.importorskip("dask_jobqueue")
    import dask
    import yaml

    folder = tmp_path_factory.mktemp("slurm")
    with slurm.one_node(folder) as s:
        documented = yaml.safe_load(_block(DOCS.read_text(), "yaml", after="jobqueue.yaml"))
        config = documented["jobqueue"]["slurm"] | {
            "queue": "debug",
            "cores": 1,
            "memory": f"{s.memory_mb // (2 * s.cores)}MB",
            "job_extra_directives": [],  # no GPU on this node
            "log_directory": str(folder / "jobs"),
        }
        monkeypatch_module.setenv("SLURM_CONF", str(s.conf))
        monkeypatch_module.setenv("TMPDIR", str(folder))  # the docs' local_directory: $TMPDIR
        # a cancelled job's worker is forgotten (and its job replaced) after 2 s, not 15
        settings = {f"jobqueue.slurm.{k}": v for k, v in config.items()}
        settings["distributed.deploy.lost-worker-timeout"] = "2s"
        with dask.config.set(settings):
            yield s


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as m:
        yield m


def _block(text: str, lang: str, after: str) -> str:
    """The first fenced ``lang`` block of ``text`` after the line holding ``after``."""
    start = text.index(after)
    m = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, start)
    assert m, f"no {lang} block after {after!r} in {DOCS}"
    return re.sub(r"^ {2}", "", m.group(1), flags=re.M)  # the blocks sit in a list item


def _wait_for_jobs(s: slurm.Slurm, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while s.jobs():
        assert time.monotonic() < deadline, f"SLURM jobs still queued: {s.jobs()}\n{s.logs()}"
        time.sleep(0.5)


def test_extract_with_a_job_cancelled_predict_and_index_on_slurm_equal_one_process(
    cluster: slurm.Slurm, data_dir: Path, tmp_path: Path, capsys, monkeypatch
):
    """`extract --cluster slurm:2` through real sbatch jobs, both `scancel`led while partitions
    are embedded: a new job is submitted in the place of each, their partitions run again
    (resuming their parts), and the store holds exactly the rows and embeddings of a single
    process, none twice. Then `predict --cluster slurm:2` writes the single process's CSV and
    `index --cluster slurm:2` builds the single process's on-disk index."""
    manifest = cub_manifest(data_dir, tmp_path / "m.csv", classes=3, per_class=12)
    lines = manifest.read_text().splitlines()  # all test images in cub100's split: train on
    manifest.write_text(  # two in three, for predict below
        "\n".join([lines[0]] + [ln.rsplit(",", 1)[0] + (",test" if i % 3 == 0 else ",train")
                               for i, ln in enumerate(lines[1:])]) + "\n"
    )  # fmt: skip
    # the engine pinned, as docs/SCALING.md advises for many jobs: else each 1-core job would
    # time the engines for its thread count first
    pin = ["--precision", "fp32", "--engine", "onnxruntime"]
    args = [str(manifest), "--root", str(data_dir / "cub100"), "-q", *pin]
    single, clustered = tmp_path / "single.h5", tmp_path / "cluster.h5"
    assert cli.main(["extract", str(single), *args, "--workers", "0"]) == 0
    cancelled: list[str] = []

    def cancel_a_job() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not cancelled:
            part = parts_dir(clustered)
            if part.is_dir() and any(part.iterdir()):  # partitions are being embedded
                running = [j for j, _, state in cluster.jobs() if state == "RUNNING"]
                if len(running) == 2 and all(map(_joined, running)):  # both workers working:
                    # nothing is left to run the rest but new jobs (a job cancelled before its
                    # worker joined is never known to Dask as lost, so it is not replaced)
                    subprocess.run(["scancel", *running], env=cluster.env, check=True)
                    cancelled.extend(running)
            time.sleep(0.05)

    def _joined(job: str) -> bool:
        return any(
            "Registered to" in log.read_text(errors="replace")
            for log in (cluster.folder / "jobs").glob(f"*-{job}.err")
        )

    t = threading.Thread(target=cancel_a_job, daemon=True)
    t.start()
    cmd = ["extract", str(clustered), *args, "--cluster", "slurm:2", "--partition-size", "3"]
    assert cli.main(cmd) == 0
    t.join(timeout=5)
    assert cancelled, "no job was cancelled mid-run"
    err = capsys.readouterr().err
    assert "left the cluster; its tasks run again elsewhere" in err, err
    assert err.count("a new job is submitted in its place") == 2, err
    submitted = re.findall(
        r"submit_batch_job: JobId=(\d+)", (cluster.folder / "slurmctld.log").read_text()
    )
    assert len(submitted) == 4, submitted  # two jobs, then one in the place of each
    want, got = _by_path(single), _by_path(clustered)
    assert sorted(got) == sorted(want) and len(FeatureStore(clustered)) == 36
    for p, x in want.items():
        np.testing.assert_allclose(got[p], x, atol=1e-5)
    assert check(clustered) == [] and not parts_dir(clustered).exists()
    _wait_for_jobs(cluster)  # the driver's jobs are cancelled when it ends

    # predict --cluster slurm:2: the single process's CSV, in input order
    model = tmp_path / "m.skops"
    assert cli.main(["train", str(clustered), "--out", str(model), "--no-refit"]) == 0
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, p in enumerate(sorted(want)[:10]):
        (inputs / f"{i:02d}.jpg").write_bytes((data_dir / "cub100" / p).read_bytes())
    (inputs / "04b.jpg").write_bytes(b"not a jpeg")
    one, many = tmp_path / "one.csv", tmp_path / "many.csv"
    base = ["predict", str(model), str(inputs), "-q", *pin, "--workers", "0"]
    assert cli.main([*base, "--out", str(one)]) == 0
    assert (
        cli.main([*base, "--out", str(many), "--cluster", "slurm:2", "--partition-size", "3"]) == 0
    )
    a, b = one.read_text().splitlines(), many.read_text().splitlines()
    assert len(a) == 12 and "04b.jpg" in a[6] and a[6].split(",")[-1]  # the bad file, with why
    for x, y in zip(a, b, strict=True):
        fx, fy = x.split(","), y.split(",")
        assert [v for v in fx if not _number(v)] == [v for v in fy if not _number(v)]
        np.testing.assert_allclose(
            [float(v) for v in fx if _number(v)], [float(v) for v in fy if _number(v)], atol=1e-5
        )
    _wait_for_jobs(cluster)

    # index --cluster slurm:2: shards of 700 rows added by SLURM jobs, merged on disk
    import penult.classify.neighbors as nb
    from test_neighbors import _append, _clustered, _fake_store

    monkeypatch.setattr(nb, "SHARD_ROWS", 700)  # cut on the driver
    X = _clustered(2100, 32, seed=3)
    stores = tmp_path / "one" / "s.h5", tmp_path / "many" / "s.h5"
    for s in stores:
        s.parent.mkdir()
        _append(s, _fake_store(s, X), X, np.arange(2100))
    index = ["--kind", "ivf-disk", "--nlist", "16", "--pq-m", "16"]
    assert cli.main(["index", str(stores[0]), *index]) == 0
    assert cli.main(["index", str(stores[1]), *index, "--cluster", "slurm:2"]) == 0
    a, b = (nb.open_index(s, "fake")[0].search(X[::29], 5) for s in stores)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    _wait_for_jobs(cluster)


def test_jobs_cancelled_before_their_workers_join_are_replaced(
    cluster: slurm.Slurm, data_dir: Path, tmp_path: Path, capsys
):
    """Both jobs of `extract --cluster slurm:2` `scancel`led as soon as SLURM lists them, before
    their Dask workers join: Dask never knew them, so only squeue can tell they ended. New jobs
    are submitted in their place and the run finishes with a single process's rows (before,
    it waited forever for workers that would never come)."""
    manifest = cub_manifest(data_dir, tmp_path / "m.csv", classes=2, per_class=4)
    pin = ["--precision", "fp32", "--engine", "onnxruntime"]
    args = [str(manifest), "--root", str(data_dir / "cub100"), "-q", *pin]
    single, clustered = tmp_path / "single.h5", tmp_path / "cluster.h5"
    assert cli.main(["extract", str(single), *args, "--workers", "0"]) == 0
    log = cluster.folder / "slurmctld.log"
    before = len(re.findall(r"submit_batch_job: JobId=(\d+)", log.read_text()))
    cancelled: list[str] = []

    def cancel_on_sight() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(cancelled) < 2:
            for job, _, _ in cluster.jobs():
                if job not in cancelled:
                    subprocess.run(["scancel", job], env=cluster.env, check=True)
                    cancelled.append(job)
            time.sleep(0.02)

    result: list[int] = []
    canceller = threading.Thread(target=cancel_on_sight, daemon=True)
    canceller.start()
    cmd = ["extract", str(clustered), *args, "--cluster", "slurm:2", "--partition-size", "2"]
    run = threading.Thread(target=lambda: result.append(cli.main(cmd)), daemon=True)
    run.start()
    run.join(timeout=180)
    canceller.join(timeout=5)
    assert len(cancelled) == 2, cancelled
    assert result == [0], f"the run did not finish: {cluster.jobs()}\n{cluster.logs()}"
    joined = [j for j in cancelled if any(
        "Registered to" in p.read_text(errors="replace")
        for p in (cluster.folder / "jobs").glob(f"*-{j}.err"))]  # fmt: skip
    assert joined == [], "a job was cancelled after its worker joined: not this test's case"
    err = capsys.readouterr().err
    assert err.count("a new job is submitted in its place") == 2, err
    submitted = re.findall(r"submit_batch_job: JobId=(\d+)", log.read_text())[before:]
    assert len(submitted) == 4, submitted  # two jobs, then one in the place of each
    want, got = _by_path(single), _by_path(clustered)
    assert sorted(got) == sorted(want) and len(want) == 8
    for p, x in want.items():
        np.testing.assert_allclose(got[p], x, atol=1e-5)
    _wait_for_jobs(cluster)


def test_the_docs_job_array_example_runs_on_slurm(
    cluster: slurm.Slurm, data_dir: Path, tmp_path: Path
):
    """docs/EXTRACT.md's job-array example, as written, submitted with real `sbatch`: the array
    script (`--shard ${SLURM_ARRAY_TASK_ID}/N`) and the merge job that waits for it with
    `--dependency=afterany`. Only the paths, the shard count (2: this node has 2 cores), the
    cores per task and the GPU request (none here) are changed. The merged store holds the rows
    and embeddings of a single run."""
    text = DOCS.read_text()
    script = _block(text, "sh", after="On SLURM:")
    submit = _block(text, "sh", after=script.splitlines()[-1])
    images = tmp_path / "images"
    for rel in sorted((data_dir / "cub100").rglob("*.jpg"))[:14]:
        (images / rel.parent.name).mkdir(parents=True, exist_ok=True)
        (images / rel.parent.name / rel.name).write_bytes(rel.read_bytes())
    store = tmp_path / "plankton.h5"
    changes = {
        "/data/plankton.h5": str(store),
        "/data/ifcb/2026": str(images),
        "--array=0-7": "--array=0-1",
        "}/8": "}/2",
        "--cpus-per-task=8": "--cpus-per-task=1",
        " --gres=gpu:1": "",
    }
    for old, new in changes.items():
        assert old in script + submit, f"the docs' example no longer has {old!r}"
        script, submit = script.replace(old, new), submit.replace(old, new)
    pin = " --precision fp32 --engine onnxruntime --workers 0"
    script = script.replace(" -q", " -q" + pin)
    (tmp_path / "extract.sh").write_text(script)
    env = {**cluster.env, "PATH": f"{Path(sys.executable).parent}:{cluster.env['PATH']}"}
    first, second = [ln.split("#")[0].strip() for ln in submit.splitlines() if ln.strip()]
    out = subprocess.run(
        first, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout
    job = re.search(r"Submitted batch job (\d+)", out).group(1)
    subprocess.run(
        second.replace("<jobid>", job), shell=True, cwd=tmp_path, env=env, check=True,
        capture_output=True,
    )  # fmt: skip
    _wait_for_jobs(cluster)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    ref = tmp_path / "ref.h5"
    assert (
        cli.main(["extract", str(ref), str(images), "-q", "--precision", "fp32", "--workers", "0"])
        == 0
    )
    want, got = _by_path(ref), _by_path(store)
    assert sorted(got) == sorted(want) and len(want) == 14, logs
    for p, x in want.items():
        np.testing.assert_allclose(got[p], x, atol=1e-5)
    assert check(store) == [] and not parts_dir(store).exists(), logs
