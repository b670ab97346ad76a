"""`extract --shard I/N` writes parts beside the store; `penult merge` publishes them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from penult import cli
from penult.features import FeatureStore, check, merge
from penult.features.parts import list_parts, parts_dir

from conftest import cub_manifest

ROOT = Path(__file__).resolve().parents[1]


def _by_path(store: Path, name: str = "efficientnet_lite0") -> dict[str, np.ndarray]:
    fs = FeatureStore(store)
    rows, x = fs.features(name)
    paths = fs.images().path
    return {paths[r]: v for r, v in zip(rows.tolist(), x, strict=True)}


def _failed(store: Path) -> dict[str, str]:
    t = FeatureStore(store).images()
    return {p: e for p, e in zip(t.path, t.error, strict=True) if e}


def test_two_concurrent_shards_then_merge_equal_a_single_run(
    data_dir: Path, tmp_path: Path, capsys
):
    manifest = cub_manifest(data_dir, tmp_path / "m.csv", classes=3, per_class=12)
    root = tmp_path / "imgs"
    for line in manifest.read_text().splitlines()[1:]:
        rel = line.split(",")[0]
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_dir / "cub100" / rel, root / rel)
    with open(manifest, "a") as fh:  # a file that cannot be decoded is recorded, not retried
        fh.write("001.Black_footed_Albatross/broken.jpg,001.Black_footed_Albatross,train\n")
    (root / "001.Black_footed_Albatross" / "broken.jpg").write_bytes(b"not a jpeg" * 50)
    args = [str(manifest), "--root", str(root), "-q", "--precision", "fp32", "--workers", "0"]
    single, sharded = tmp_path / "single.h5", tmp_path / "sharded.h5"
    assert cli.main(["extract", str(single), *args]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cli", "extract", str(sharded), *args, "--shard", f"{i}/2"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(list_parts(sharded)) == 2 and len(FeatureStore(sharded)) == 0  # nothing published
    capsys.readouterr()
    assert cli.main(["merge", str(sharded)]) == 0
    assert "2 linked (no copy)" in capsys.readouterr().out  # sealed by the shard jobs
    assert not parts_dir(sharded).exists() and check(sharded) == []
    want, got = _by_path(single), _by_path(sharded)
    assert sorted(got) == sorted(want) and len(want) == 36  # no row missing, none twice
    assert len(FeatureStore(sharded)) == len(FeatureStore(single)) == 37
    for p, x in want.items():
        np.testing.assert_allclose(got[p], x, atol=1e-5)
    assert _failed(sharded) == _failed(single) and len(_failed(single)) == 1
    assert FeatureStore(sharded).images().labels["split"].count("test") == FeatureStore(
        single
    ).images().labels["split"].count("test")


HOLD = "import fcntl, sys, time; fh = open(sys.argv[1], 'a+'); fcntl.lockf(fh, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)"


def test_a_shard_run_again_resumes_its_part_and_merge_skips_a_part_being_written(
    data_dir: Path, tmp_path: Path, capsys
):
    manifest = cub_manifest(data_dir, tmp_path / "m.csv", classes=2, per_class=6)
    store = tmp_path / "s.h5"
    args = ["extract", str(store), str(manifest), "--root", str(data_dir / "cub100"), "-q"]
    assert cli.main([*args, "--shard", "1/3", "--workers", "0"]) == 0
    first = capsys.readouterr().out
    assert cli.main([*args, "--shard", "1/3", "--workers", "0"]) == 0
    assert "extracted 0" in capsys.readouterr().out and "extracted 0" not in first
    part = list_parts(store)[0]
    holder = subprocess.Popen(  # a shard process still writing this part
        [sys.executable, "-c", HOLD, str(part / ".lock")], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    try:
        assert merge(store) == (0, 0) and list_parts(store) == [part]
    finally:
        holder.kill()
        holder.wait()
    parts, shards = merge(store)
    assert parts == 1 and shards >= 3 and list_parts(store) == []
    assert 0 < FeatureStore(store).backbone("efficientnet_lite0").count < 12
