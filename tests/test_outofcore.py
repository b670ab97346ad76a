"""Out-of-core training: block reads cover every row once, streamed heads match in-memory ones,
and training fits under a memory cap smaller than the feature matrix."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from penult import cli
from penult.classify import TrainOptions, load_dataset, load_model, train
from penult.classify.data import stream_dataset
from penult.classify.outofcore import StreamingCentroid, StreamOptions, train_out_of_core

from conftest import copy_store

pytestmark = pytest.mark.slow
B = "efficientnet_lite0"


@pytest.fixture(scope="module")
def store(cub_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ooc") / "cub20.h5"
    copy_store(cub_store, out)
    return out


def test_blocks_visit_every_row_once_in_any_order(store):
    s, d = stream_dataset(store, [B]), load_dataset(store, [B])
    assert list(s.paths) == d.paths and s.dim == d.X.shape[1]  # read from the store when asked
    assert list(s.sha256) == d.sha256 and s.sha256.take([5, 2, 5]) == [
        d.sha256[i] for i in (5, 2, 5)
    ]
    rng = np.random.default_rng(0)
    idx = rng.choice(len(s), 500, replace=False)
    seen = []
    for pos, X in s.blocks(idx, block_rows=64, order=rng.permutation):
        np.testing.assert_array_equal(X, d.X[pos])
        seen.append(pos)
    assert sorted(np.concatenate(seen).tolist()) == sorted(idx.tolist())


def test_streamed_lr_is_within_1_5_points_of_in_memory_lr(store):
    mem = train(store, TrainOptions())
    ooc = train_out_of_core(store, TrainOptions(), StreamOptions(memory_mb=2))
    assert ooc.n_train == mem.n_train and ooc.n_eval == mem.n_eval  # the same stored split
    assert abs(ooc.metrics["top1"] - mem.metrics["top1"]) <= 0.015, (
        ooc.metrics["top1"],
        mem.metrics["top1"],
    )
    assert any("streamed" in n for n in ooc.notes)


def test_streamed_centroids_are_the_class_means(store):
    ooc = train_out_of_core(store, TrainOptions(head="centroid"), StreamOptions(memory_mb=1))
    d = load_dataset(store, [B])
    tr = d.labels["split"] == "train"
    X = d.X[tr] / np.linalg.norm(d.X[tr], axis=1, keepdims=True)
    y = d.labels["label"][tr]
    clf = ooc.model.estimator.steps[-1][1]
    assert isinstance(clf, StreamingCentroid)
    brute = np.stack([X[y == c].mean(0) for c in clf.classes_])
    np.testing.assert_allclose(clf.centroids_, brute, atol=1e-5)
    ev = d.labels["split"] == "test"
    Q = d.X[ev] / np.linalg.norm(d.X[ev], axis=1, keepdims=True)
    nearest = clf.classes_[((Q[:, None, :] - brute[None]) ** 2).sum(-1).argmin(1)]
    np.testing.assert_array_equal(ooc.model.predict(d.X[ev]).label, nearest)
    mem = train(store, TrainOptions(head="centroid"))
    assert abs(ooc.metrics["top1"] - mem.metrics["top1"]) <= 0.015


def test_other_heads_train_on_a_seeded_stratified_sample(store):
    so = StreamOptions(memory_mb=1, subsample=300)
    a = train_out_of_core(store, TrainOptions(head="knn"), so)
    b = train_out_of_core(store, TrainOptions(head="knn"), so)
    assert any("sample of 300" in n for n in a.notes)
    assert a.metrics["top1"] == b.metrics["top1"] > 0.5


def test_cli_out_of_core_saves_a_safe_model_and_report(store, tmp_path, capsys):
    out = tmp_path / "m.skops"
    argv = ["train", str(store), "--out", str(out), "--out-of-core", "--memory-mb", "4"]
    assert cli.main([*argv, "--report", str(tmp_path / "rep")]) == 0
    assert "streamed" in capsys.readouterr().out
    m = load_model(out)  # the streamed model loads without --trust-model
    assert m.manifest.out_of_core["memory_mb"] == 4
    # "not one of my classes" out of core too, set on a sample of the training images
    assert m.novelty.score == "mahalanobis" and 0 < m.manifest.metrics["unknown_rate"] < 0.2
    assert (tmp_path / "rep" / "report.md").exists() and (
        tmp_path / "rep" / "predictions.csv"
    ).exists()
    assert cli.main(["evaluate", str(out), str(store)]) == 0


def test_trains_under_a_memory_cap_smaller_than_the_matrix(tmp_path):
    """60,000 x 512 float32 features (123 MB) trained with 80 MB of headroom; loading them all fails."""
    n, d = 60_000, 512
    script = textwrap.dedent(f"""
        import resource, numpy as np
        from penult.features import StoreWriter
        from penult.classify import TrainOptions, train
        from penult.classify.outofcore import StreamOptions, train_out_of_core
        rng = np.random.default_rng(0)
        fp = {{"architecture": "t", "weights_sha256": "0" * 64, "preprocessing": {{}}, "layer": "x", "dim": {d}, "precision": "fp32"}}
        means = rng.normal(size=(10, {d})).astype(np.float32)
        path = {str(tmp_path / "big.h5")!r}
        with StoreWriter(path) as w:
            paths = [f"{{i:06d}}.jpg" for i in range({n})]
            sha = [f"{{i:064x}}" for i in range({n})]
            y = np.arange({n}) % 10
            w.upsert_images(paths, ["/d"] * {n}, sha, np.ones({n}), np.ones({n}), {{"label": [f"c{{v}}" for v in y]}})
            w.register_backbone("net", fp, dtype="float16")
            for s in range(0, {n}, 10_000):
                x = means[y[s:s + 10_000]] + 3 * rng.standard_normal((len(y[s:s + 10_000]), {d}), dtype=np.float32)
                w.append("net", paths[s:s + 10_000], sha[s:s + 10_000], x)
        del x, means
        # fixed costs first (BLAS buffers, SGD code paths): a throw-away run on a small store
        small = {str(tmp_path / "small.h5")!r}
        with StoreWriter(small) as w:
            w.upsert_images(paths[:2000], ["/d"] * 2000, sha[:2000], np.ones(2000), np.ones(2000), {{"label": [f"c{{v}}" for v in y[:2000]]}})
            w.register_backbone("net", fp, dtype="float16")
            w.append("net", paths[:2000], sha[:2000], rng.standard_normal((2000, {d}), dtype=np.float32))
        train_out_of_core(small, TrainOptions(), StreamOptions(memory_mb=16, epochs=1))
        used = lambda: int(open("/proc/self/status").read().split("VmData:")[1].split()[0]) * 1024
        cap = used() + 80 * 2**20
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
        r = train_out_of_core(path, TrainOptions(), StreamOptions(memory_mb=16, epochs=2))
        print("streamed", r.n_train, round(r.metrics["top1"], 3))
        try:
            train(path, TrainOptions())
            print("in-memory-ok")
        except MemoryError:
            print("in-memory-refused")
    """)
    env = {
        **os.environ,
        "MALLOC_ARENA_MAX": "2",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }
    p = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env,
        cwd=Path(__file__).parents[1], timeout=600,
    )  # fmt: skip
    assert "in-memory-refused" in p.stdout, p.stdout + p.stderr[-3000:]
    streamed = [ln for ln in p.stdout.splitlines() if ln.startswith("streamed")]
    assert streamed, p.stdout + p.stderr[-3000:]
    _, n_train, top1 = streamed[0].split()
    assert int(n_train) == 42_000 and float(top1) > 0.9


def test_store_iterates_fused_chunks_with_labels(store):
    """FeatureStore.iter_chunks: every image once, features and labels aligned, bounded chunks."""
    from penult.features import FeatureStore

    fs, d = FeatureStore(store), load_dataset(store, [B])
    rows, X, labels = [], [], []
    for c in fs.iter_chunks([B], columns=("label", "genus"), memory_mb=1):
        assert len(c.rows) <= (1 << 20) // (4 * 1280) and c.X.shape == (len(c.rows), 1280)
        rows.append(c.rows)
        X.append(c.X)
        labels.append(c.labels["label"])
    rows = np.concatenate(rows)
    np.testing.assert_array_equal(rows, np.flatnonzero(fs.valid(B)))
    np.testing.assert_array_equal(np.concatenate(X), d.X)  # every row is labelled in this store
    np.testing.assert_array_equal(np.concatenate(labels), d.labels["label"])
    with pytest.raises(Exception, match="no label column 'nope'"):
        next(fs.iter_chunks([B], columns=("nope",)))
