"""kill -9 a real `penult extract` at random moments; the store must always open and finish equal."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from penult.features import FeatureStore, StoreWriter, check
from penult.features.journal import list_shards

from conftest import cub_manifest

KILLS = 4  # kills that should land mid-run
MAX_TRIES = 10


def _cmd(store: Path, manifest: Path, data_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "cli", "extract", str(store), str(manifest), "--root", str(data_dir / "cub100"),
        "-q", "--precision", "fp32", "--batch-size", "8", "--commit-every", "8", "--workers", "1",
    ]  # fmt: skip


def _commits(store: Path) -> int:
    """Batches of embeddings committed to the journal and not yet merged into the store (the
    writer merges them when it ends)."""
    return sum("embeddings" in p.name for p in list_shards(store))


def _run(
    proc: subprocess.Popen, store: Path, commits: int, extra: float
) -> tuple[int, float, float]:
    """Let ``proc`` commit ``commits`` batches, wait ``extra`` seconds more and kill it (SIGKILL:
    no cleanup handlers run), unless it ends first; ``commits`` 0 kills ``extra`` seconds after
    the start. (batches seen committed, seconds to the first, seconds to the last)."""
    t0, seen, first, last = time.perf_counter(), 0, 0.0, 0.0
    while proc.poll() is None:
        if commits == 0 and time.perf_counter() - t0 >= extra:
            break
        n = _commits(store)
        if n > seen:
            seen, last = n, time.perf_counter() - t0
            first = first or last
            if commits and seen >= commits:
                time.sleep(extra)
                break
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    return seen, first, last


def test_kill_at_random_points_then_resume(data_dir: Path, tmp_path: Path) -> None:
    manifest = cub_manifest(data_dir, tmp_path / "m.csv", classes=4, per_class=24)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    ref = tmp_path / "ref.h5"
    proc = subprocess.Popen(_cmd(ref, manifest, data_dir), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    commits, first, last = _run(proc, ref, 0, 300)
    assert proc.returncode == 0 and commits >= 6, (proc.returncode, commits)  # 12 batches of 8
    gap = (last - first) / (commits - 1)  # seconds between commits

    store = tmp_path / "s.h5"
    rng = random.Random(0)
    # Kills aimed by what the run has written, not by the clock (start-up time varies several-fold
    # between machines, and a kill there writes nothing): the first while it starts, the rest
    # after a random number of its committed batches plus a random part of the time between two.
    progress, partial = [], 0
    for attempt in range(MAX_TRIES):
        if partial >= KILLS:
            break
        proc = subprocess.Popen(_cmd(store, manifest, data_dir), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        n0 = progress[-1] % 96 if progress else 0  # rows stored before (0 in a fresh store)
        left = max(1, round(commits * (96 - n0) / 96))  # about as many batches to go
        if attempt == 0:
            _run(proc, store, 0, rng.uniform(0, first))
        else:
            _run(proc, store, rng.randint(1, left), rng.uniform(0, gap))  # the last: in the merge
        if not store.exists():
            progress.append(0)
            continue
        FeatureStore(store).images()  # the file always opens, whatever the moment of the kill
        with StoreWriter(store):  # the next writer merges what was journaled
            pass
        assert check(store) == []
        fs = FeatureStore(store)
        n = fs.backbones()["efficientnet_lite0"].count if fs.backbones() else 0
        progress.append(n)
        partial += 0 < n < 96
        if n == 96:  # finished before the kill: start over to test more kill points
            store = tmp_path / f"s{attempt}.h5"
    assert partial >= 3, f"kills did not land mid-run: progress {progress}"

    subprocess.run(
        _cmd(store, manifest, data_dir), check=True, env=env, timeout=300, capture_output=True
    )
    got, want = FeatureStore(store), FeatureStore(ref)
    assert got.images().path == want.images().path and got.images().sha256 == want.images().sha256
    assert got.valid("efficientnet_lite0").all()
    np.testing.assert_allclose(
        got.embeddings("efficientnet_lite0"),
        want.embeddings("efficientnet_lite0"),
        rtol=1e-4,
        atol=1e-5,
    )
