"""kill -9 a real `penult extract` at random moments; the store must always open and finish equal."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from conftest import cub_manifest
from features import FeatureStore, StoreWriter, check

KILLS = 4  # kills that should land mid-run
MAX_TRIES = 12


def _cmd(store: Path, manifest: Path, data_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "cli", "extract", str(store), str(manifest), "--root", str(data_dir / "cub100"),
        "-q", "--precision", "fp32", "--batch-size", "8", "--commit-every", "8", "--workers", "1",
    ]  # fmt: skip


def test_kill_at_random_points_then_resume(data_dir: Path, tmp_path: Path) -> None:
    manifest = cub_manifest(data_dir, tmp_path / "m.csv", classes=4, per_class=24)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    ref = tmp_path / "ref.h5"
    t0 = time.perf_counter()
    subprocess.run(
        _cmd(ref, manifest, data_dir), check=True, env=env, timeout=300, capture_output=True
    )
    full = time.perf_counter() - t0

    store = tmp_path / "s.h5"
    rng = random.Random(0)
    # Kill somewhere in (lo, hi): the longest wait that wrote nothing and the shortest that let the run
    # finish, so the kills aim at mid-run on fast and slow machines alike (CI's warm cache made runs
    # finish faster than the reference and a fixed window missed).
    lo, hi = 0.0, full
    progress, partial = [], 0
    for _ in range(MAX_TRIES):
        if partial >= KILLS:
            break
        proc = subprocess.Popen(
            _cmd(store, manifest, data_dir),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait = rng.uniform(lo, hi)
        time.sleep(wait)
        proc.kill()  # SIGKILL: no cleanup handlers run
        proc.wait()
        if not store.exists():
            progress.append(0)
            lo = max(lo, wait)
            continue
        FeatureStore(store).images()  # the file always opens, whatever the moment of the kill
        with StoreWriter(store):  # the next writer merges what was journaled
            pass
        assert check(store) == []
        fs = FeatureStore(store)
        n = fs.backbones()["efficientnet_lite0"].count if fs.backbones() else 0
        progress.append(n)
        partial += 0 < n < 96
        if n == 0:
            lo = max(lo, wait)
        if n == 96:
            hi = min(hi, wait)
            store.unlink()  # finished before the kill: start over to test more kill points
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
