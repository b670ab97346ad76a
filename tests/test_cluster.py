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


def test_local_cluster_gives_the_rows_and_embeddings_of_a_single_run(
    data_dir: Path, tmp_path: Path, monkeypatch
):
    pytest.importorskip("distributed")
    import extract.cluster

    monkeypatch.setattr(extract.cluster, "PARTITION_IMAGES", 10)  # several tasks per worker
    manifest = cub_manifest(data_dir, tmp_path / "m.csv", classes=3, per_class=12)
    args = [str(manifest), "--root", str(data_dir / "cub100"), "-q", "--precision", "fp32"]
    single, clustered = tmp_path / "single.h5", tmp_path / "cluster.h5"
    assert cli.main(["extract", str(single), *args, "--workers", "0"]) == 0
    assert (
        cli.main(["extract", str(clustered), *args, "--workers", "1", "--cluster", "local:2"]) == 0
    )
    want, got = _by_path(single), _by_path(clustered)
    assert sorted(got) == sorted(want) and len(want) == 36  # no row missing, none twice
    assert len(FeatureStore(clustered)) == 36
    for p, x in want.items():
        np.testing.assert_allclose(got[p], x, atol=1e-5)
    assert check(clustered) == [] and not parts_dir(clustered).exists()
    assert cli.main(["extract", str(clustered), *args, "--cluster", "local:2"]) == 0  # all stored


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
