"""Store format 2: piece maps, segments rolled from the tail, missing segments, old stores, kills."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from penult import cli
from penult.features import FeatureStore, StoreError, StoreWriter, check, upgrade
from penult.features.format2.files import Piece, cut, path_keys
from store_rows import FP, add_rows, kill_loop, synthetic_rows

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "store_v1.h5"  # written by penult before format 2


def test_overlays_read_like_a_dense_array() -> None:
    """Random overlays cut into a map read back as the same writes applied to a plain array."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        dense = np.full(200, -1)
        pieces: list[Piece] = []
        for k in range(int(rng.integers(1, 12))):
            lo = int(rng.integers(0, 199))
            hi = int(rng.integers(lo + 1, 201))
            dense[lo:hi] = k * 1000 + np.arange(hi - lo)
            pieces = cut(pieces, [Piece(lo, hi, str(k), 0)])
        got = np.full(200, -1)
        for p in pieces:
            got[p.lo : p.hi] = int(p.file) * 1000 + p.offset + np.arange(p.hi - p.lo)
        np.testing.assert_array_equal(got, dense)
        assert all(a.hi <= b.lo for a, b in zip(pieces, pieces[1:], strict=False))


def test_path_keys_are_stable_keyed_and_width_independent() -> None:
    paths = ["a.jpg", "dir/" + "x" * 70 + ".png", "caf\udce9.jpg", ""]
    k = path_keys(paths, 7)
    assert len({tuple(r) for r in k.tolist()}) == 4
    np.testing.assert_array_equal(path_keys(paths[:1], 7), k[:1])  # alone or with long names
    assert (path_keys(paths, 8) != k).all()  # another store's seed gives other keys


def test_small_commits_roll_into_segments_and_read_back_exactly(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    for k in range(20):  # 400 rows, 20 at a time, blocks of 32
        with StoreWriter(p, segment_rows=32) as w:
            add_rows(w, k)
    fs = FeatureStore(p)
    t = fs.images()
    want = np.concatenate([synthetic_rows(k)[2] for k in range(20)])
    assert t.path == [q for k in range(20) for q in synthetic_rows(k)[0]]
    np.testing.assert_array_equal(fs.embeddings("net"), want)
    rows = np.array([399, 3, 200, 3, 32])
    np.testing.assert_array_equal(fs.embeddings("net", rows), want[rows])
    np.testing.assert_array_equal(fs.find(["d0/00007.jpg", "nope", t.path[350]]), [7, -1, 350])
    with h5py.File(p) as f:
        for fam in ("table", "backbone:net"):
            lo, hi = f[f"segments/{fam}/lo"][()], f[f"segments/{fam}/hi"][()]
            full = hi <= 384  # the 12 finished blocks are one segment each
            assert (hi[full] - lo[full] == 32).all() and full.sum() == 12, fam
        assert len(f["index/rows"]) < 8 and f["index/rows"][()].sum() == 400
        np.testing.assert_array_equal(f["backbones/net/embeddings"][()], want)  # plain h5py
    files = os.listdir(f"{p}.segments")
    state = fs._b.state()
    referenced = state.files() | {state.view}  # segments, and the plain-h5py view over them
    assert set(files) == referenced  # superseded pieces and views were deleted
    assert check(p) == []


def test_changed_file_labels_and_failures_are_overlays(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    with StoreWriter(p, segment_rows=64) as w:
        for k in range(4):
            add_rows(w, k)
    seg = Path(f"{p}.segments")
    before = {f: (seg / f).stat().st_mtime_ns for f in os.listdir(seg)}
    paths = FeatureStore(p).images().path
    with StoreWriter(p) as w:
        w.set_labels("split", paths, ["test" if i % 5 == 0 else "train" for i in range(80)])
        w.upsert_images([paths[10]], ["/r"], ["ab" * 32], [9], [9], {"label": ["new"]})
        w.record_failures([paths[11]], [f"{12:064x}"], ["truncated file"])
    fs = FeatureStore(p)
    t = fs.images()
    assert t.labels["split"][:6] == ["test", "train", "train", "train", "train", "test"]
    assert t.labels["label"][10] == "new" and t.sha256[10] == "ab" * 32
    assert not fs.valid("net")[10] and fs.valid("net").sum() == 79
    assert t.error[11] == "truncated file" and t.error.count("") == 79
    view = fs._b.state().view
    for f, m in before.items():  # no segment was rewritten: the changes are new small pieces
        assert f.startswith("view-") or (seg / f).stat().st_mtime_ns == m, f
    with h5py.File(p) as f:  # every new piece covers only the rows that changed
        new = [
            (fam, hi - lo)
            for fam, g in f["segments"].items()
            for lo, hi, name in zip(g["lo"][()], g["hi"][()], g["file"][()], strict=True)
            if name.decode() not in before and name.decode() != view
        ]
    assert new and all(n <= 16 or fam == "label:split" for fam, n in new), new
    with StoreWriter(p) as w:  # re-embedding the changed file makes it valid again
        w.register_backbone("net", {**FP, "dim": 8})
        w.append("net", [paths[10]], ["ab" * 32], np.ones((1, 8)))
    assert FeatureStore(p).valid("net")[10] and FeatureStore(p).embeddings("net", [10])[0, 0] == 1


def test_failure_then_embedding_in_one_commit_clears_the_failure(tmp_path: Path) -> None:
    """A failure journaled earlier in the same commit (nothing stored yet) is cleared too."""
    p = tmp_path / "s.h5"
    paths, sha, x = synthetic_rows(0)
    with StoreWriter(p) as w:
        w.upsert_images(paths, ["/r"] * 20, sha, np.arange(20), np.arange(20), {})
        w.record_failures(paths[:2], sha[:2], ["truncated file"] * 2)
        w.register_backbone("net", {**FP, "dim": 8})
        w.append("net", paths[1:], sha[1:], x[1:])
    t = FeatureStore(p).images()
    assert t.error[:3] == ["truncated file", "", ""]


def test_missing_or_truncated_segment_is_named_and_repaired(tmp_path: Path, capsys) -> None:
    p = tmp_path / "s.h5"
    for k in range(3):
        with StoreWriter(p, segment_rows=32) as w:
            add_rows(w, k)
    state = FeatureStore(p)._b.state()
    emb = state.maps["backbone:net"][0].file
    seg = Path(f"{p}.segments")
    data = (seg / emb).read_bytes()
    (seg / emb).write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    with pytest.raises(StoreError, match=f"segment {seg / emb} cannot be read"):
        FeatureStore(p).embeddings("net")
    (seg / emb).unlink()
    with pytest.raises(StoreError, match=f"segment {seg / emb} is missing"):
        FeatureStore(p)
    assert cli.main(["check", str(p)]) == 1
    assert f"{seg / emb} is missing" in capsys.readouterr().out
    fixed = check(p, repair=True)
    assert any("dropped 32 rows of backbone:net" in m for m in fixed)
    fs = FeatureStore(p)
    assert check(p) == [] and fs.valid("net").sum() == 28 and len(fs) == 60
    with StoreWriter(p) as w:  # the next run makes the lost embeddings again
        add_rows(w, 0)
        add_rows(w, 1)
    assert FeatureStore(p).valid("net").all()
    table = FeatureStore(p)._b.state().maps["table"][0].file
    (seg / table).unlink()
    problems = check(p, repair=True)
    assert any("cannot repair: image-table rows 0..31" in m for m in problems)


def test_old_store_reads_as_before_and_upgrades_in_one_pass(tmp_path: Path, capsys) -> None:
    p = tmp_path / "old.h5"
    shutil.copy(FIXTURE, p)
    old = FeatureStore(p)
    assert old.version == 1
    t, entries = old.images(), old.backbones()
    a, b = old.embeddings("a"), old.embeddings("b")
    with pytest.raises(StoreError, match=r"older penult .* `penult check --upgrade"):
        StoreWriter(p).__enter__()
    assert cli.main(["check", "--upgrade", str(p)]) == 0
    assert "upgraded to store format 2 (13 images)" in capsys.readouterr().out
    new = FeatureStore(p)
    assert new.version == 2 and new.backbones() == entries
    u = new.images()
    for col in ("path", "root", "sha256", "error", "labels"):
        assert getattr(u, col) == getattr(t, col), col
    for col in ("nbytes", "mtime_ns", "width", "height"):
        np.testing.assert_array_equal(getattr(u, col), getattr(t, col))
    np.testing.assert_array_equal(new.embeddings("a"), a)
    np.testing.assert_array_equal(new.embeddings("b"), b)
    assert u.path[-1].encode("utf-8", "surrogateescape") == b"cls0/caf\xe9.jpg"
    with StoreWriter(p) as w:  # writable now
        w.set_labels("genus", u.path[:2], ["g", "g"])
    assert "already store format 2" in upgrade(p)


WRITER = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}, {tests!r}]
    import numpy as np
    from penult.features import FeatureStore, StoreWriter
    from store_rows import add_rows
    p = sys.argv[1]
    print("ready", flush=True)
    for k in range(20):
        try:
            fs = FeatureStore(p)
            if len(fs) >= 20 * (k + 1) and fs.valid("net")[20 * k : 20 * (k + 1)].all():
                continue
        except Exception:
            pass
        with StoreWriter(p, segment_rows=48) as w:
            add_rows(w, k)
""")

UPGRADE = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}]
    from penult.features import upgrade
    print("ready", flush=True)
    upgrade(sys.argv[1], segment_rows=2)
""")


def test_kill_during_commits_rolls_and_index_merges_then_resume(tmp_path: Path) -> None:
    ref, p = tmp_path / "ref.h5", tmp_path / "s.h5"
    for k in range(20):
        with StoreWriter(ref, segment_rows=48) as w:
            add_rows(w, k)

    def sound() -> None:
        if p.exists():
            FeatureStore(p).images()  # opens whatever the moment of the kill
            with StoreWriter(p):  # the next writer publishes what was journaled
                pass
            assert check(p) == []

    kill_loop(WRITER, p, kills=4, after_kill=sound)
    subprocess.run(
        [sys.executable, "-c", WRITER.format(root=str(ROOT), tests=str(ROOT / "tests")), str(p)],
        check=True,
        capture_output=True,
    )
    got, want = FeatureStore(p), FeatureStore(ref)
    assert got.images().path == want.images().path
    np.testing.assert_array_equal(got.embeddings("net"), want.embeddings("net"))
    assert check(p) == []


def test_kill_during_upgrade_leaves_the_old_store_then_upgrades(tmp_path: Path) -> None:
    p = tmp_path / "old.h5"
    shutil.copy(FIXTURE, p)
    want = FeatureStore(p).embeddings("a")

    def sound() -> None:
        fs = FeatureStore(p)  # the old file, or the finished new one: never half of either
        np.testing.assert_array_equal(fs.embeddings("a"), want)
        assert check(p) == []

    kill_loop(UPGRADE, p, kills=5, after_kill=sound)
    upgrade(p)
    np.testing.assert_array_equal(FeatureStore(p).embeddings("a"), want)
    assert FeatureStore(p).version == 2 and check(p) == []


def test_the_documented_snippet_reads_a_store_with_plain_h5py(tmp_path: Path) -> None:
    doc = (ROOT / "docs" / "STORE.md").read_text()  # the store's page, linked from the README
    code = doc.split("```python")[1].split("```")[0]
    p = tmp_path / "birds.h5"
    for k in range(3):
        with StoreWriter(p, segment_rows=32) as w:
            add_rows(w, k)
            w.register_backbone("efficientnet_lite0", {**FP, "dim": 8, "architecture": "z"})
            paths, sha, x = synthetic_rows(k)
            w.append("efficientnet_lite0", paths[::2], sha[::2], x[::2])
    scope: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README", "exec"), scope)  # noqa: S102 - our own documentation
    finally:
        os.chdir(cwd)
    fs = FeatureStore(p)
    rows, want = fs.features("efficientnet_lite0")
    np.testing.assert_array_equal(scope["X"], want)
    assert scope["y"].tolist() == [fs.images().labels["label"][r] for r in rows]
