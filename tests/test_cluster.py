"""`extract --cluster`: Dask workers embed partitions into parts; the driver publishes them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import cli
from conftest import cub_manifest
from features import FeatureStore, check
from features.parts import parts_dir


def _by_path(store: Path) -> dict[str, np.ndarray]:
    fs = FeatureStore(store)
    rows, x = fs.features("efficientnet_lite0")
    paths = fs.images().path
    return {paths[r]: v for r, v in zip(rows.tolist(), x, strict=True)}


def test_cluster_spec_and_missing_dask_are_clear_errors(tmp_path: Path, monkeypatch, capsys):
    from extract.cluster import ClusterError, client_for

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


def test_local_cluster_equals_a_single_run_even_when_a_worker_is_killed(
    data_dir: Path, tmp_path: Path, monkeypatch
):
    """`--cluster local:2` with DataLoader workers inside the Dask workers, and one Dask worker
    SIGKILLed while partitions are being embedded: Dask runs its task again (resuming its part)
    and the store holds exactly the rows and embeddings of a single-process run."""
    pytest.importorskip("distributed")
    import threading
    import time

    import psutil

    import extract.cluster

    monkeypatch.setattr(extract.cluster, "PARTITION_IMAGES", 6)
    manifest = cub_manifest(data_dir, tmp_path / "m.csv", classes=3, per_class=12)
    args = [str(manifest), "--root", str(data_dir / "cub100"), "-q", "--precision", "fp32"]
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
    assert (
        cli.main(["extract", str(clustered), *args, "--workers", "0", "--cluster", "local:2"]) == 0
    )
    t.join(timeout=5)
    assert killed, "no worker was killed mid-run"
    want, got = _by_path(single), _by_path(clustered)
    assert sorted(got) == sorted(want) and len(FeatureStore(clustered)) == 36
    for p, x in want.items():
        np.testing.assert_allclose(got[p], x, atol=1e-5)
    assert check(clustered) == [] and not parts_dir(clustered).exists()
    assert cli.main(["extract", str(clustered), *args, "--cluster", "local:2"]) == 0  # all stored
    assert len(FeatureStore(clustered)) == 36
