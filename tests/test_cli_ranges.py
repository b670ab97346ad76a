"""Numbers the parser takes but the data or the machine cannot: each is one line naming the value
and the fix (exit 2), before anything is written, never a library's traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from penult import cli

from conftest import copy_store


@pytest.fixture(scope="module")
def store(cub_store: Path, tmp_path_factory) -> Path:
    s = copy_store(cub_store, tmp_path_factory.mktemp("ranges") / "s.h5")
    assert cli.main(["index", str(s)]) == 0
    return s


def _refused(argv: list[str], capsys, *words: str) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    return err


def test_neighbors_k_beyond_the_index(store: Path, capsys, tmp_path) -> None:
    from penult.features import FeatureStore

    key = FeatureStore(store).images().path[0]
    out = tmp_path / "n.csv"
    _refused(["neighbors", str(store), key, "-k", "100000000000000000000", "--out", str(out),
              "--sheet", str(tmp_path / "n.html")], capsys, "-k 100000000000000000000",
             "holds 1,155 images")  # fmt: skip
    assert not out.exists()


def test_train_pca_and_params_beyond_the_data(store: Path, capsys, tmp_path) -> None:
    out = tmp_path / "m.skops"
    _refused(["train", str(store), "--pca", "100000", "--out", str(out)], capsys,
             "--pca 100000", "at most")  # fmt: skip
    _refused(["train", str(store), "--head", "knn", "--param", "n_neighbors=100000",
              "--out", str(out)], capsys, "n_neighbors=100000", "knn head")  # fmt: skip
    assert not out.exists()


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("local:100000", ("100,000 local workers", "at most")),
        ("tcp://", ("tcp://HOST:PORT",)),
        ("tcp://host:99999", ("tcp://HOST:PORT",)),
        ("slurm:2", ("no SLURM job size configured", "jobqueue.yaml")),
    ],
)
def test_cluster_specs_that_cannot_start(spec, words, data_dir, tmp_path, capsys):
    pytest.importorskip("dask_jobqueue")  # its defaults loaded first: set() restores over them
    import dask

    with dask.config.set({"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None}):
        store = tmp_path / "new.h5"
        _refused(["extract", str(store), str(data_dir / "hymenoptera"), "--cluster", spec, "-q"],
                 capsys, *words)  # fmt: skip
    assert not store.exists() and not list(tmp_path.iterdir())


def test_predict_ended_by_sigterm_leaves_no_partial_file(hym_store, data_dir, tmp_path) -> None:
    """A timeout or SLURM preemption (SIGTERM) ends predict as Ctrl-C does: exit 143, and the
    half-written ``OUT.partial`` is removed."""
    import signal
    import subprocess
    import sys
    import time

    from penult.classify import TrainOptions, save_model, train

    store = copy_store(hym_store, tmp_path / "h.h5")
    save_model(train(store, TrainOptions()).model, tmp_path / "m.skops")
    out = tmp_path / "p.csv"
    root = Path(__file__).resolve().parents[1]
    p = subprocess.Popen(
        [sys.executable, "-m", "penult.cli", "predict", str(tmp_path / "m.skops"),
         str(data_dir / "cub100"), "--out", str(out), "--workers", "0"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    partial = Path(f"{out}.partial")
    deadline = time.monotonic() + 120
    while not partial.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert partial.exists(), p.communicate()
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and "terminated" in err, err
    assert not partial.exists() and not out.exists()


def test_a_missing_output_folder_is_one_line_in_every_command(store: Path, capsys, tmp_path):
    """train, predict and neighbors refuse an output in a missing folder alike, before any work."""
    from penult.features import FeatureStore

    model = tmp_path / "m.skops"
    assert cli.main(["train", str(store), "--out", str(model)]) == 0
    capsys.readouterr()
    gone = tmp_path / "no" / "such"
    t = FeatureStore(store).images()
    key, image = t.path[0], str(Path(t.root[0]) / t.path[0])
    for argv in (
        ["train", str(store), "--out", str(gone / "m.skops")],
        ["predict", str(model), image, "--store", str(store), "--out", str(gone / "p.csv")],
        ["neighbors", str(store), key, "--out", str(gone / "n.csv")],
    ):
        _refused(argv, capsys, f"folder {gone} does not exist (create it first)")
    assert not (tmp_path / "no").exists()
