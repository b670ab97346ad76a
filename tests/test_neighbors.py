"""Nearest-neighbour index: exact = brute force, incremental = rebuild, stale refused, queries, duplicates."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from penult.classify.knn import FaissKNeighborsClassifier
from penult.classify.lookup import THUMB, contact_sheet, find_duplicates, neighbors, write_table
from penult.classify.neighbors import NeighborIndexError, build_index, open_index, plan_index
from penult.extract import ExtractOptions, Featuriser, extract, list_images
from penult.features import FeatureStore, StoreWriter
from PIL import Image

from conftest import copy_store

pytestmark = pytest.mark.slow
B = "efficientnet_lite0"


def _brute(X: np.ndarray, Q: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    if metric == "cosine":
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        s = (Q / np.linalg.norm(Q, axis=1, keepdims=True)) @ Xn.T
        idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    else:
        s = ((Q[:, None, :] - X[None, :, :]) ** 2).sum(-1)
        idx = np.argsort(s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, axis=1), idx


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_exact_index_matches_brute_force(cub_store, tmp_path, metric):
    store = tmp_path / "s.h5"
    copy_store(cub_store, store)
    rows, X = FeatureStore(store).features(B)
    ni, plan = build_index(store, B, metric=metric)
    assert plan.kind == "flat"
    q = X[::37]
    scores, ids = ni.search(q, 10)
    want_s, want_i = _brute(X.astype(np.float64), q.astype(np.float64), 10, metric)
    np.testing.assert_allclose(scores, want_s, rtol=1e-4, atol=1e-3)
    same = ids == rows[want_i]
    # any disagreement must be a tie in score
    assert same.mean() > 0.99 and np.allclose(scores[~same], want_s[~same], rtol=1e-4, atol=1e-3)


def _fake_store(path: Path, X: np.ndarray) -> list[str]:
    paths = [f"img{i:05d}.jpg" for i in range(len(X))]
    with StoreWriter(path) as w:
        n = len(paths)
        w.upsert_images(
            paths, ["/nowhere"] * n, [f"{i:064x}" for i in range(n)], np.zeros(n), np.zeros(n), {}
        )
        fp = {"architecture": "test:fake", "dim": X.shape[1], "layer": "x", "preprocessing": {}, "weights_sha256": "0", "precision": "fp32"}  # fmt: skip
        w.register_backbone("fake", fp)
    return paths


def _append(path: Path, paths: list[str], X: np.ndarray, idx: np.ndarray) -> None:
    table = FeatureStore(path).images()
    with StoreWriter(path) as w:
        w.register_backbone("fake", FeatureStore(path).backbone("fake").fingerprint)
        w.append("fake", [paths[i] for i in idx], [table.sha256[i] for i in idx], X[idx])


def _clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, d)).astype(np.float32)
    return (centres[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivf-disk"])
def test_incremental_add_equals_full_rebuild(tmp_path, kind):
    X = _clustered(3000, 32)
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    for s in (a, b):
        paths = _fake_store(s, X)
    _append(a, paths, X, np.arange(2000))
    pq = {"pq_m": 16} if kind == "ivf-disk" else {}  # 8 bytes a vector for these 32-d points
    build_index(a, "fake", kind=kind, nlist=16, **pq)
    with pytest.raises(NeighborIndexError, match="lacks 1000 rows"):
        _append(a, paths, X, np.arange(2000, 3000))
        open_index(a, "fake")
    inc, added = open_index(a, "fake", update=True)
    assert added == 1000 and len(inc.rows) == 3000
    _append(b, paths, X, np.arange(3000))
    full, _ = build_index(b, "fake", kind=kind, nlist=16, **pq)
    q = X[::50]
    if kind == "flat":
        si, ii = inc.search(q, 10)
        sf, if_ = full.search(q, 10)
        np.testing.assert_array_equal(ii, if_)
        np.testing.assert_allclose(si, sf, rtol=1e-5)
    else:  # trained on other samples, so not identical: both must find the added rows and agree
        inc.meta["nprobe"] = full.meta["nprobe"] = 16  # with exact search on most queries
        found = inc.search(X[2000:3000], 10)[1]
        assert np.mean([r in f for r, f in zip(range(2000, 3000), found, strict=True)]) > 0.95
        _, truth = _brute(X, q, 10, "cosine")
        for ni in (inc, full):
            got = ni.search(q, 10)[1]
            assert (
                np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth, strict=True)]) > 0.85
            )
    again, added = open_index(a, "fake")  # reopened from disk: nothing more to add
    assert added == 0 and len(again.rows) == 3000


def test_stale_or_mismatched_index_is_refused(tmp_path):
    X = _clustered(500, 16)
    s = tmp_path / "s.h5"
    paths = _fake_store(s, X)
    _append(s, paths, X, np.arange(500))
    build_index(s, "fake")
    table = FeatureStore(s).images()
    with StoreWriter(s) as w:  # the file behind row 7 changed: its embedding is gone
        w.upsert_images([paths[7]], [table.root[7]], ["f" * 64], np.zeros(1), np.zeros(1), {})
    with pytest.raises(NeighborIndexError, match="stale"):
        open_index(s, "fake", update=True)
    other = tmp_path / "o.h5"
    paths = _fake_store(other, X)
    _append(other, paths, X, np.arange(500))
    build_index(other, "fake")
    meta = Path(f"{other}.fake.cosine.faiss.json")
    meta.write_text(meta.read_text().replace('"weights_sha256": "0"', '"weights_sha256": "1"'))
    with pytest.raises(NeighborIndexError, match="fingerprint differs"):
        open_index(other, "fake")
    with pytest.raises(NeighborIndexError, match="no l2 index"):
        open_index(other, "fake", metric="l2")


def test_plan_switches_to_ivf_with_size():
    assert plan_index(100_000, 1280).kind == "flat"
    p = plan_index(1_000_000, 1280)
    assert (
        p.kind == "ivf" and p.nlist == 1024 and p.train_rows == 40 * 1024 and "RFlat" in p.factory
    )
    pq = plan_index(1_000_000, 1280, "ivfpq")
    assert pq.pq_m == 320 and "PQ320x4fs" in pq.factory


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.src.append(dict(attrs)["src"])


def test_queries_by_key_file_and_folder_with_contact_sheet(cub_store, data_dir, tmp_path):
    store = tmp_path / "s.h5"
    copy_store(cub_store, store)
    build_index(store, B)
    table = FeatureStore(store).images()
    key = table.path[5]
    f = data_dir / "cub100" / key  # the same photo as a file: answered as its stored row
    folder = tmp_path / "q"
    folder.mkdir()
    for p in table.path[100:102]:  # stored photos, copied
        shutil.copy(data_dir / "cub100" / p, folder / Path(p).name)
    with Image.open(data_dir / "cub100" / table.path[102]) as im:  # new bytes: embedded
        im.save(folder / "recompressed.jpg", quality=70)
    os.mkfifo(folder / "pipe.jpg")  # never opened: hashing or drawing it would wait forever
    res = neighbors(store, B, [key, str(f), str(folder)], k=5, images=Featuriser())
    pipe = [r for r in res if r.query.endswith("pipe.jpg")]
    assert len(pipe) == 1 and "not a regular file" in pipe[0].error and not pipe[0].hits
    res = [r for r in res if r is not pipe[0]]
    assert len(res) == 5
    where = table.index()
    assert all(h.path != key for h in res[0].hits) and len(res[0].hits) == 5
    assert res[1].label == table.labels["label"][5]  # the stored row's label, not ""
    assert [h.path for h in res[1].hits] == [h.path for h in res[0].hits]  # itself left out
    assert all(h.label == table.labels["label"][where[h.path]] for r in res for h in r.hits)
    for r, p in zip(res[2:4], table.path[100:102], strict=True):
        assert r.label == table.labels["label"][where[p]] and p not in [h.path for h in r.hits]
    assert res[4].label == "" and res[4].hits[0].path == table.path[102]
    assert res[4].hits[0].score > 0.9  # its original, found first
    out = write_table(res, tmp_path / "n.csv")
    assert out.read_text().count("\n") == 1 + 25
    sheet = contact_sheet([*res, *pipe], tmp_path / "sheet.html", title="t")
    parser = _Links()
    parser.feed(sheet.read_text())
    assert parser.tags[:2] == ["html", "head"] and len(parser.src) == 5 * 6  # the FIFO: no image
    text = sheet.read_text()
    assert text.count('class="tag">query<') == 6 and "_<wbr>" in text  # labelled; wraps at "_"
    with Image.open(sheet.parent / parser.src[0]) as im:
        assert max(im.size) == THUMB  # every thumbnail fills the same box
    for src in parser.src:
        assert (sheet.parent / src).is_file(), src
    with pytest.raises(NeighborIndexError, match="not a file, folder or store key"):
        neighbors(store, B, ["no/such.jpg"], images=Featuriser())


def test_duplicates_finds_planted_resized_and_recompressed_copies(data_dir, tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    species = sorted(p for p in (data_dir / "cub100").iterdir() if p.is_dir())[:24]
    originals = [sorted(s.glob("*.jpg"))[0] for s in species]
    for f in originals:
        shutil.copy(f, root / f.name.replace(".jpg", f"_{f.parent.name[:3]}.jpg"))
    planted = {}
    for f in originals[:3]:
        base = f.name.replace(".jpg", f"_{f.parent.name[:3]}")
        with Image.open(f) as im:
            im.resize((im.width * 3 // 5, im.height * 3 // 5)).save(
                root / f"{base}_small.jpg", quality=90
            )
            im.save(root / f"{base}_q30.jpg", quality=30)
        planted[f"{base}.jpg"] = {f"{base}_small.jpg", f"{base}_q30.jpg"}
    store = tmp_path / "d.h5"
    extract(store, list_images(root), ExtractOptions(progress=False))
    build_index(store, B)
    groups = find_duplicates(store, B, threshold=0.9)
    found = {g.query: {h.path for h in g.hits} for g in groups}
    assert found == planted, found
    sheet = contact_sheet(groups, tmp_path / "dup.html", title="dups")
    assert sheet.read_text().count("<img") == 9


def test_faiss_knn_head_matches_sklearn_brute_force(cub_store):
    from sklearn.neighbors import KNeighborsClassifier

    rows, X = FeatureStore(cub_store).features(B)
    table = FeatureStore(cub_store).images()
    y = np.array(table.labels["label"])[rows]
    split = np.array(table.labels["split"])[rows]
    tr, te = split == "train", split == "test"
    ours = FaissKNeighborsClassifier(1).fit(X[tr], y[tr]).predict(X[te])
    ref = (
        KNeighborsClassifier(1, metric="cosine", algorithm="brute").fit(X[tr], y[tr]).predict(X[te])
    )
    assert np.mean(ours == ref) > 0.995
    assert np.mean(ours == y[te]) > 0.75  # chance 0.05


def test_index_build_streams_under_a_memory_cap(tmp_path):
    """A store whose embeddings exceed the cap: loading them at once fails, the index builds anyway."""
    n, d = 120_000, 256  # 123 MB of float32
    X = _clustered(n, d)
    s = tmp_path / "big.h5"
    paths = _fake_store(s, X)
    _append(s, paths, X, np.arange(n))
    del X
    script = textwrap.dedent(f"""
        import resource
        import faiss, numpy as np
        from penult.classify.neighbors import build_index
        from penult.features import FeatureStore
        def used():
            for line in open("/proc/self/status"):
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
        # fixed costs first (BLAS work buffers, faiss code): a throw-away training on random data
        warm = faiss.index_factory({d}, "IVF64,PQ64x4fs", faiss.METRIC_INNER_PRODUCT)
        warm.train(np.random.default_rng(0).standard_normal((10000, {d}), dtype=np.float32))
        del warm
        cap = used() + 80 * 2**20  # 80 MiB for the data: less than the 117 MiB of embeddings
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
        try:
            FeatureStore({str(s)!r}).embeddings("fake")
            print("loaded-all")
        except MemoryError:
            print("load-all-refused")
        ni, plan = build_index({str(s)!r}, "fake", kind="ivfpq", nlist=64, pq_m=64)
        print("built", plan.kind, len(ni.rows))
    """)
    env = {
        **os.environ,
        "MALLOC_ARENA_MAX": "2",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }
    p = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parents[1],
    )
    assert "load-all-refused" in p.stdout, p.stdout + p.stderr[-2000:]
    assert f"built ivfpq {n}" in p.stdout, p.stdout + p.stderr[-2000:]


def test_index_neighbors_duplicates_commands(cub_store, tmp_path, capsys):
    from penult.cli import main

    store = tmp_path / "s.h5"
    copy_store(cub_store, store)
    assert main(["index", str(store)]) == 0
    assert "flat (Flat) over 1,155 x 1280" in capsys.readouterr().out
    assert main(["index", str(store)]) == 0
    assert "added 0 new rows" in capsys.readouterr().out
    key = FeatureStore(store).images().path[0]
    out, sheet = tmp_path / "n.json", tmp_path / "n.html"
    assert (
        main(["neighbors", str(store), key, "-k", "3", "--out", str(out), "--sheet", str(sheet)])
        == 0
    )
    rows = json.loads(out.read_text())
    assert [r["rank"] for r in rows] == [1, 2, 3] and all(r["neighbor"] != key for r in rows)
    dup = tmp_path / "d.csv"
    assert (
        main(["duplicates", str(store), "--out", str(dup), "--sheet", str(tmp_path / "d.html")])
        == 0
    )
    assert dup.read_text().startswith("query,query_label,rank,neighbor")
    table = FeatureStore(store).images()
    with StoreWriter(store) as w:  # a stored image changed: the index no longer describes the store
        w.upsert_images([table.path[3]], [table.root[3]], ["e" * 64], np.zeros(1), np.zeros(1), {})
    capsys.readouterr()
    assert main(["neighbors", str(store), key, "--out", str(out), "--sheet", str(sheet)]) == 2
    assert "stale" in capsys.readouterr().err
    assert main(["index", str(store), "--rebuild"]) == 0


@pytest.mark.parametrize("kind", ["ivfpq", "ivf-hnsw"])
def test_other_index_kinds_build_and_find_themselves(tmp_path, kind):
    X = _clustered(4000, 32)
    s = tmp_path / "s.h5"
    paths = _fake_store(s, X)
    _append(s, paths, X, np.arange(4000))
    ni, plan = build_index(s, "fake", kind=kind, nlist=32)
    assert plan.kind == kind and len(ni.rows) == 4000
    ni.meta["nprobe"] = 32
    found = ni.search(X[::40], 10)[1]
    if kind == "ivf-hnsw":  # raw vectors: each query finds itself
        assert np.mean([r in f for r, f in zip(range(0, 4000, 40), found, strict=True)]) > 0.9
    else:  # 4-byte codes: lossy, but what it returns first is close to the query
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        sims = np.sum(Xn[::40] * Xn[found[:, 0]], axis=1)
        assert np.median(sims) > 0.9, np.median(sims)
    again, _ = open_index(s, "fake")
    np.testing.assert_array_equal(again.search(X[:5], 3)[1], ni.search(X[:5], 3)[1])


def test_row_digest_is_vectorised_and_unchanged():
    """Indexes saved before the digest was vectorised stay valid: the same bytes are hashed."""
    import hashlib

    from penult.classify.neighbors import _digest
    from penult.features import sha_raw

    sha = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]

    class Hashes:  # the one store method the digest reads
        def hashes(self, rows):
            return sha_raw(sha)[rows]

    rows = np.random.default_rng(0).permutation(2000)[:1500]
    h = hashlib.sha256()
    for r in rows.tolist():
        h.update(sha[r].encode())
    assert _digest(Hashes(), rows) == h.hexdigest()
    assert _digest(Hashes(), rows[::-1]) != h.hexdigest()  # order matters


def test_staleness_check_reads_only_blocks_whose_segments_moved(tmp_path, monkeypatch):
    """Segments are immutable: a block whose segments did not change is not re-hashed, and an
    update reads the hashes of the new rows' blocks only; a changed image is still caught."""
    X = _clustered(3000, 16)
    p = tmp_path / "a.h5"
    with StoreWriter(p, segment_rows=1000):
        pass
    paths = _fake_store(p, X)
    for part in np.split(np.arange(2000), 4):
        _append(p, paths, X, part)
    build_index(p, "fake", kind="flat")
    read = []
    real = FeatureStore.hashes
    monkeypatch.setattr(
        FeatureStore, "hashes", lambda self, rows: read.append(rows) or real(self, rows)
    )
    _append(p, paths, X, np.arange(2000, 3000))  # block 2 only
    assert open_index(p, "fake", update=True)[1] == 1000
    assert len(read) == 1 and read[0].min() == 2000 and len(read[0]) == 1000
    read.clear()
    assert open_index(p, "fake")[1] == 0 and read == []  # nothing moved: nothing hashed
    with StoreWriter(p) as w:  # an image in block 1 changed on disk and was embedded again
        w.upsert_images([paths[1500]], ["/nowhere"], ["ab" * 32], [1], [1], {})
        w.register_backbone("fake", FeatureStore(p).backbone("fake").fingerprint)
        w.append("fake", [paths[1500]], ["ab" * 32], X[:1])
    assert FeatureStore(p).valid("fake").all()
    with pytest.raises(NeighborIndexError, match="stale"):
        open_index(p, "fake")
    assert [r.min() // 1000 for r in read] == [1]


def test_on_disk_index_moves_updates_by_copy_and_reranks_exactly(tmp_path, capfd):
    """ivf-disk: lists in a file beside the store (memory-mapped), found again after the folder
    moves; an update writes a new lists file (the old index stays whole until the rename); the
    PQ candidates are re-ranked with exact scores from the store."""
    from penult.classify.neighbors import DISK_MIN_ROWS

    assert plan_index(DISK_MIN_ROWS, 1280).kind == "ivf-disk"
    assert plan_index(DISK_MIN_ROWS, 1280).factory.endswith(",PQ320x4")  # 160 bytes a vector
    X = _clustered(3000, 32, seed=1)
    s = tmp_path / "a" / "s.h5"
    s.parent.mkdir()
    paths = _fake_store(s, X)
    _append(s, paths, X, np.arange(2500))
    ni, _ = build_index(s, "fake", kind="ivf-disk", nlist=16, pq_m=16)
    assert "resizing" not in capfd.readouterr().out  # faiss's printf notes stay off stdout
    first = sorted(p.name for p in s.parent.glob("*.ivfdata"))
    assert len(first) == 1 and (s.parent / "s.h5.fake.cosine.faiss.trained").exists()
    q = X[::97]
    scores, rows = ni.search(q, 5)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    np.testing.assert_allclose(scores, np.einsum("nd,nkd->nk", qn, Xn[rows]), rtol=1e-4, atol=1e-5)
    import penult.classify.neighbors as nb

    saved_bytes, nb.RERANK_BYTES = nb.RERANK_BYTES, 1  # one query per re-ranking block
    try:
        np.testing.assert_array_equal(ni.search(q, 5)[1], rows)
    finally:
        nb.RERANK_BYTES = saved_bytes
    # an update that dies before the new index is renamed in leaves the old one working
    _append(s, paths, X, np.arange(2500, 3000))
    real_save = nb.NeighborIndex.save
    nb.NeighborIndex.save = lambda self: (_ for _ in ()).throw(OSError("killed"))
    try:
        with pytest.raises(OSError, match="killed"):
            open_index(s, "fake", update=True)
    finally:
        nb.NeighborIndex.save = real_save
    with pytest.raises(NeighborIndexError, match="lacks 500 rows"):
        open_index(s, "fake")  # the old index, intact
    inc, added = open_index(s, "fake", update=True)
    assert added == 500 and len(inc.rows) == 3000
    now = sorted(p.name for p in s.parent.glob("*.ivfdata"))
    assert len(now) == 1 and now != first  # a new lists file; the old one and the stray are gone
    # the store's folder moves: the index finds its lists beside itself
    before = inc.search(q, 5)[1]
    moved = tmp_path / "b"
    shutil.copytree(s.parent, moved)
    shutil.rmtree(s.parent)
    again, added = open_index(moved / "s.h5", "fake")
    assert added == 0
    np.testing.assert_array_equal(again.search(q, 5)[1], before)
    found = again.search(X[2500:3000], 10)[1]  # the added rows are found (PQ4 here: coarse)
    assert np.mean([r in f for r, f in zip(range(2500, 3000), found, strict=True)]) > 0.95
    for f in moved.glob("*.ivfdata"):
        f.unlink()
    with pytest.raises(NeighborIndexError, match="inverted lists .* are missing"):
        open_index(moved / "s.h5", "fake")


UPDATE = """
import sys
sys.path[:0] = [{root!r}]
from penult.classify.neighbors import open_index
print("ready", flush=True)
open_index(sys.argv[1], "fake", update=True)
"""


def test_kill_during_on_disk_index_update_leaves_the_old_or_the_new_index(tmp_path):
    """The lists merge of an ivf-disk update, killed at random moments: the index on disk is
    always the old one (lacking the new rows) or the finished new one, never a mixture."""
    import subprocess
    import sys
    import time

    X = _clustered(3000, 32)
    src = tmp_path / "src"
    src.mkdir()
    a = src / "a.h5"
    paths = _fake_store(a, X)
    _append(a, paths, X, np.arange(2000))
    build_index(a, "fake", kind="ivf-disk", nlist=16, pq_m=16)
    _append(a, paths, X, np.arange(2000, 3000))
    shutil.copytree(src, tmp_path / "ref")
    code = UPDATE.format(root=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "ref" / "a.h5")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    assert proc.wait() == 0
    took = time.perf_counter() - t0  # kill within the update's own duration
    want = open_index(tmp_path / "ref" / "a.h5", "fake")[0].search(X[:50], 5)
    outcomes = []
    for frac in (0.03, 0.15, 0.5, 0.85):  # the first lands early even where a run was quicker
        work = tmp_path / f"work{frac}"
        shutil.copytree(src, work)
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(work / "a.h5")], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(frac * took)
        proc.kill()
        proc.wait()
        try:
            outcomes.append(len(open_index(work / "a.h5", "fake")[0].rows))
        except NeighborIndexError as e:
            assert "lacks 1000 rows" in str(e), e
            outcomes.append(2000)
        got = open_index(work / "a.h5", "fake", update=True)[0].search(X[:50], 5)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert 2000 in outcomes, outcomes  # some kills landed before the update was published
