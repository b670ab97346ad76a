"""`extract --cluster`: Dask workers embed partitions into parts; the driver publishes them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from penult import cli
from penult.features import FeatureStore, StoreWriter, check
from penult.features.parts import parts_dir

from conftest import cub_manifest


def _by_path(store: Path) -> dict[str, np.ndarray]:
    fs = FeatureStore(store)
    rows, x = fs.features("efficientnet_lite0")
    paths = fs.images().path
    return {paths[r]: v for r, v in zip(rows.tolist(), x, strict=True)}


def test_cluster_spec_and_missing_dask_are_clear_errors(tmp_path: Path, monkeypatch, capsys):
    from penult.core.cluster import ClusterError, client_for

    with pytest.raises(ClusterError, match="use local"):
        client_for("yarn:3")
    with pytest.raises(ClusterError, match="positive integer"):
        client_for("local:zero")
    monkeypatch.setitem(sys.modules, "dask", None)  # as if Dask were not installed
    with pytest.raises(ClusterError, match=r"pip install 'penult\[dask\]'"):
        client_for("local:2")
    assert (
        cli.main(
            [
                "extract",
                str(tmp_path / "s.h5"),
                str(tmp_path),
                "--shard",
                "0/2",
                "--cluster",
                "local",
            ]
        )
        == 2
    )
    assert "use one" in capsys.readouterr().err


def test_the_cluster_starts_while_the_driver_plans_and_is_closed_whatever_happens(
    data_dir: Path, tmp_path: Path, capsys
):
    """`extract --cluster`: a wrong spec fails before any file is read; a good one starts its
    workers in the background while the driver plans, and they are gone when the driver fails."""
    pytest.importorskip("distributed")
    import time

    import psutil
    from penult.core.cluster import ClusterError, ClusterStart

    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{p}\n" for p in sorted((data_dir / "hymenoptera").rglob("*.jpg"))))
    assert cli.main(["extract", str(tmp_path / "s.h5"), str(listed), "--cluster", "yarn:3"]) == 2
    assert "use local" in capsys.readouterr().err and not (tmp_path / "s.h5").exists()
    t = time.perf_counter()
    before = set(psutil.Process().children(recursive=True))
    with pytest.raises(RuntimeError, match="driver failed"), ClusterStart("local:1") as cluster:
        started = time.perf_counter() - t
        assert started < 0.5, started  # the driver goes on at once
        assert len(cluster.client().scheduler_info()["workers"]) == 1
        workers = [
            c for c in set(psutil.Process().children(recursive=True)) - before
            if "spawn_main" in " ".join(c.cmdline())
        ]  # fmt: skip
        assert workers
        raise RuntimeError("the driver failed after the cluster started: it is closed all the same")
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive
    with pytest.raises(ClusterError, match="positive integer"):
        ClusterStart("local:0")


def test_local_cluster_equals_a_single_run_even_when_a_worker_is_killed(
    data_dir: Path, tmp_path: Path, capsys
):
    """`--cluster local:2` with DataLoader workers inside the Dask workers, and one Dask worker
    SIGKILLed while partitions are being embedded: Dask runs its task again (resuming its part)
    and the store holds exactly the rows and embeddings of a single-process run."""
    pytest.importorskip("distributed")
    import threading
    import time

    import psutil

    manifest = cub_manifest(data_dir, tmp_path / "m.csv", classes=3, per_class=12)
    lines = manifest.read_text().splitlines()  # these are all test images in cub100's split:
    manifest.write_text(  # train on two in three, for the predict part below
        "\n".join([lines[0]] + [ln.rsplit(",", 1)[0] + (",test" if i % 3 == 0 else ",train")
                               for i, ln in enumerate(lines[1:])]) + "\n"
    )  # fmt: skip
    root = tmp_path / "imgs"  # a copy, with one broken image among them
    for ln in manifest.read_text().splitlines()[1:]:
        rel = ln.split(",")[0]
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes((data_dir / "cub100" / rel).read_bytes())
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    with open(manifest, "a") as fh:
        fh.write("broken.jpg,001.Black_footed_Albatross,train\n")
    args = [str(manifest), "--root", str(root), "-q", "--precision", "fp32"]
    single, clustered = tmp_path / "single.h5", tmp_path / "cluster.h5"
    assert cli.main(["extract", str(single), *args, "--workers", "0"]) == 0
    killed: list[int] = []

    def kill_a_worker() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if parts_dir(clustered).is_dir() and any(parts_dir(clustered).iterdir()):
                workers = [
                    c for c in psutil.Process().children() if "spawn_main" in " ".join(c.cmdline())
                ]
                if workers:
                    workers[0].kill()
                    killed.append(workers[0].pid)
                    return
            time.sleep(0.05)

    t = threading.Thread(target=kill_a_worker, daemon=True)
    t.start()
    capsys.readouterr()
    assert (
        cli.main(
            [
                "extract",
                str(clustered),
                *[a for a in args if a != "-q"],  # the summary says how parts were published
                "--workers",
                "1",  # a DataLoader process inside each Dask worker
                "--cluster",
                "local:2",
                "--partition-size",
                "6",
            ]
        )
        == 0
    )
    t.join(timeout=5)
    assert killed, "no worker was killed mid-run"
    out = capsys.readouterr()
    assert "left the cluster; its tasks run again elsewhere" in out.err
    assert "linked (no copy)" in out.out and "replayed" not in out.out, out.out  # sealed parts
    want, got = _by_path(single), _by_path(clustered)
    assert sorted(got) == sorted(want) and len(FeatureStore(clustered)) == 37
    for p, x in want.items():
        np.testing.assert_allclose(got[p], x, atol=1e-5)
    t = FeatureStore(clustered).images()
    assert "broken.jpg" not in got and t.error[t.path.index("broken.jpg")]  # recorded, with why
    assert check(clustered) == [] and not parts_dir(clustered).exists()
    assert cli.main(["extract", str(clustered), *args, "--cluster", "local:2"]) == 0  # all stored
    assert (
        len(FeatureStore(clustered)) == 37
        and "skipped as failed before 1" in capsys.readouterr().out
    )

    # predict --cluster: the same CSV as a single process, in input order, failures included
    model = tmp_path / "m.skops"
    assert cli.main(["train", str(clustered), "--out", str(model)]) == 0
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, p in enumerate(sorted(want)[:13]):
        (inputs / f"{i:02d}.jpg").write_bytes((root / p).read_bytes())
    (inputs / "05b.jpg").write_bytes(b"not a jpeg")
    one, many = tmp_path / "one.csv", tmp_path / "many.csv"
    base = ["predict", str(model), str(inputs), "-q", "--precision", "fp32", "--workers", "0"]
    assert cli.main([*base, "--out", str(one)]) == 0
    assert (
        cli.main([*base, "--out", str(many), "--cluster", "local:2", "--partition-size", "3"]) == 0
    )
    a, b = one.read_text().splitlines(), many.read_text().splitlines()
    assert len(a) == 15 and "05b.jpg" in a[7] and a[7].split(",")[-1]  # the bad file, with why
    for x, y in zip(a, b, strict=True):  # same rows, same order; probabilities to 1e-5
        fx, fy = x.split(","), y.split(",")
        assert [v for v in fx if not _number(v)] == [v for v in fy if not _number(v)]
        np.testing.assert_allclose(
            [float(v) for v in fx if _number(v)], [float(v) for v in fy if _number(v)], atol=1e-5
        )


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_driver_killed_at_random_moments_then_a_rerun_equals_an_uninterrupted_run(
    data_dir: Path, tmp_path: Path
):
    """SIGKILL the driver of `extract --cluster local:1` while its tasks run and its parts are
    published: the orphaned workers exit, the store always opens and checks clean, and a rerun
    publishes the parts left behind and finishes equal to an uninterrupted run."""
    pytest.importorskip("distributed")
    import os
    import random
    import shutil
    import subprocess
    import time

    import psutil

    manifest = cub_manifest(data_dir, tmp_path / "m.csv", classes=2, per_class=12)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    common = [str(manifest), "--root", str(data_dir / "cub100"), "-q", "--precision", "fp32",
              "--workers", "0", "--batch-size", "4", "--commit-every", "4"]  # fmt: skip

    def cmd(store: Path) -> list[str]:
        return [sys.executable, "-m", "cli", "extract", str(store), *common,
                "--cluster", "local:1", "--partition-size", "4"]  # fmt: skip

    # one worker: what is killed is the driver; two workers' start-up cost 20 s of the suite

    # the uninterrupted run in one process (the test above: a cluster run equals it)
    ref, store = tmp_path / "ref.h5", tmp_path / "s.h5"
    assert cli.main(["extract", str(ref), *common]) == 0
    rng = random.Random(1)
    landed = []
    for _ in range(5):
        if len(landed) >= 2:
            break
        before = _files(parts_dir(store))
        proc = subprocess.Popen(
            cmd(store), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        # aim at the cluster phase: up to 1.2 s from the first file a worker writes (a model
        # still being built, tasks running, parts published, the cluster closing)
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if _files(parts_dir(store)) - before:
                break
            time.sleep(0.02)
        wait = rng.uniform(0.0, 1.2)
        try:
            proc.wait(timeout=wait)  # finished before the kill: start over
            for f in tmp_path.glob("s.h5*"):
                shutil.rmtree(f) if f.is_dir() else f.unlink()
            continue
        except subprocess.TimeoutExpired:
            workers = psutil.Process(proc.pid).children(recursive=True)
            proc.kill()  # SIGKILL: no cleanup runs
            proc.wait()
        _, alive = psutil.wait_procs(workers, timeout=30)  # orphaned, they notice and exit
        assert not alive, f"orphaned workers still running: {alive}"
        FeatureStore(store).images()  # always opens, whatever the moment
        with StoreWriter(store):  # the next writer merges what was journaled
            pass
        assert check(store) == []
        stored = FeatureStore(store).backbones()
        parts = list(parts_dir(store).iterdir()) if parts_dir(store).is_dir() else []
        landed.append(
            (round(wait, 2), stored["efficientnet_lite0"].count if stored else 0, len(parts))
        )
    assert len(landed) >= 2, f"kills did not land mid-run: {landed}"
    subprocess.run(cmd(store), env=env, check=True, timeout=300, capture_output=True)
    want, got = _by_path(ref), _by_path(store)
    assert sorted(got) == sorted(want) and len(FeatureStore(store)) == 24
    for p, x in want.items():
        np.testing.assert_allclose(got[p], x, atol=1e-5)
    assert check(store) == [] and not parts_dir(store).exists()


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()


def test_on_disk_index_shards_added_on_a_cluster_equal_a_single_process_build(
    tmp_path: Path, monkeypatch, capsys
):
    """`penult index --cluster local:1`: the shards of an ivf-disk index (here 700 rows each)
    are added by Dask tasks from one trained quantiser and merged on disk; the index, built and
    then updated that way, answers exactly as one built in one process."""
    pytest.importorskip("distributed")
    import penult.classify.neighbors as nb
    from test_neighbors import _append, _clustered, _fake_store

    monkeypatch.setattr(nb, "SHARD_ROWS", 700)
    X = _clustered(3000, 32, seed=2)
    one, many = tmp_path / "one" / "s.h5", tmp_path / "many" / "s.h5"
    for s in (one, many):
        s.parent.mkdir()
        paths = _fake_store(s, X)
        _append(s, paths, X, np.arange(2200))
    index = ["index", "--kind", "ivf-disk", "--nlist", "16", "--pq-m", "16"]
    assert cli.main(["index", str(many), "--kind", "ivf", "--cluster", "local:1"]) == 2
    assert "ivf-disk" in capsys.readouterr().err
    assert cli.main([*index[:1], str(one), *index[1:]]) == 0
    assert cli.main([*index[:1], str(many), *index[1:], "--cluster", "local:1"]) == 0
    for s in (one, many):  # an update: the 800 new rows as two more shards
        _append(s, paths, X, np.arange(2200, 3000))
    assert cli.main(["index", str(one)]) == 0
    assert cli.main(["index", str(many), "--cluster", "local:1"]) == 0
    a = nb.open_index(one, "fake")[0].search(X[::37], 5)
    b = nb.open_index(many, "fake")[0].search(X[::37], 5)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert len(nb.open_index(many, "fake")[0].rows) == 3000
    assert not list(many.parent.glob(".*shards*"))  # the shard files are gone


def test_slurm_spec_submits_jobs_from_the_jobqueue_config(tmp_path: Path, monkeypatch):
    """`--cluster slurm:2` asks dask-jobqueue for two jobs built from the jobqueue config (here a
    fake `sbatch` on PATH records what it was given: no SLURM needed)."""
    pytest.importorskip("dask_jobqueue")
    import os
    import time

    import dask
    from penult.core.cluster import client_for, close

    log = tmp_path / "sbatch.log"
    for tool, reply in (("sbatch", "Submitted batch job 4242"), ("scancel", "")):
        script = tmp_path / tool
        script.write_text(
            f'#!/bin/sh\necho "{tool} $*" >> {log}\ncat "$1" >> {log} 2>/dev/null\necho "{reply}"\n'
        )
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    config = {"queue": "gpu", "cores": 8, "processes": 1, "memory": "32GB", "walltime": "01:00:00",
              "job_extra_directives": ["--gres=gpu:1"], "log_directory": str(tmp_path)}  # fmt: skip
    with dask.config.set({f"jobqueue.slurm.{k}": v for k, v in config.items()}):
        client = client_for("slurm:2")
        try:
            deadline = time.monotonic() + 30
            while not log.exists() or log.read_text().count("sbatch ") < 2:
                assert time.monotonic() < deadline, "the jobs were not submitted"
                time.sleep(0.2)
        finally:
            close(client)
    text = log.read_text()
    assert text.count("sbatch ") == 2
    for line in ("#SBATCH -p gpu", "#SBATCH --gres=gpu:1", "#SBATCH -t 01:00:00", "--nthreads 8"):
        assert line in text, line


def test_a_stale_attempt_finds_its_partition_published_and_makes_no_part(
    cub_store: Path, data_dir: Path
):
    """A cancelled SLURM job's worker can still be finishing a task that Dask ran again
    elsewhere and the driver published: it sees every image stored with the same content and
    an embedding, and makes no part again. Any image missing, changed or not embedded, and it
    embeds the partition as usual."""
    import hashlib

    from penult.extract.cluster import Partition, _published

    fs = FeatureStore(cub_store)
    root = data_dir / "cub100"
    paths = fs.paths(np.arange(0, 60, 7))
    sha = [hashlib.sha256((root / p).read_bytes()).hexdigest() for p in paths]
    name = fs.backbone_names()[0]
    some = np.arange(0, 60, 7)  # the rows it checks are read alone, as in the whole column
    np.testing.assert_array_equal(fs.valid(name, some), fs.valid(name)[some])
    assert _published(str(cub_store), name, Partition("t", str(root), paths, sha))
    assert _published(str(cub_store), name, Partition("t", str(root), paths[::-1], sha[::-1]))
    changed = sha[:-1] + [hashlib.sha256(b"other bytes").hexdigest()]
    assert not _published(str(cub_store), name, Partition("t", str(root), paths, changed))
    new = Partition("t", str(root), [*paths, "new.jpg"], [*sha, sha[0]])
    assert not _published(str(cub_store), name, new)
    assert not _published(str(cub_store), "resnet50", Partition("t", str(root), paths, sha))
    assert not _published(str(cub_store) + ".none", name, Partition("t", str(root), paths, sha))
