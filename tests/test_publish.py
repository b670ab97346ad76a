"""Publishing a part without a copy: a sealed part's segments are linked into the store
(features/format2/sealed.py); the result equals a replay of the same part, and a kill at any
step leaves the part's rows in the store once or not at all."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from penult.features import FeatureStore, Publishing, StoreWriter, check, merge
from penult.features.format2 import sealed
from penult.features.format2.files import MIN_STANDING, Piece, to_merge
from penult.features.format2.state import segment_dir
from penult.features.parts import PartWriter, list_parts

ROOT = Path(__file__).resolve().parents[1]
FP = {"architecture": "test", "weights_sha256": "0" * 64, "preprocessing": {}, "layer": "x",
      "dim": 8, "precision": "fp32"}  # fmt: skip
ROWS = MIN_STANDING + 904  # a part big enough to stand as its own piece


def _sha(p: str) -> str:
    return hashlib.sha256(p.encode()).hexdigest()


def _write_part(store: Path, name: str, k: int, *, sealing: bool, first: int = 0, classes=None):
    """A part of ``k`` images (``first`` ...): labels, sizes, one failure, 8-d embeddings."""
    paths = [f"{name}/{i:06d}.png" for i in range(first, first + k)]
    sha = [_sha(p) for p in paths]
    classes = classes or ["a", "b", "c"]
    labels = {"label": [classes[i % len(classes)] for i in range(k)]}
    x = np.random.default_rng(len(name) + first).standard_normal((k, 8), dtype=np.float32)
    with PartWriter(store, name, sealing=sealing) as w:
        w.upsert_images(paths, ["/data"] * k, sha, np.full(k, 100), np.full(k, 7), labels)
        w.register_backbone("net", FP)
        w.record_failures(paths[:1], sha[:1], ["cannot decode"])
        w.append(
            "net", paths[1:], sha[1:], x[1:], width=np.full(k - 1, 32), height=np.full(k - 1, 24)
        )


def _driver_store(store: Path, k: int) -> list[str]:
    """A store holding ``k`` images without embeddings, one recorded as unreadable among them
    (as a cluster driver leaves it before its tasks run); returns the paths to embed."""
    paths = [f"imgs/{i:06d}.png" for i in range(k)]
    sha = [_sha(p) for p in paths]
    with StoreWriter(store) as w:
        w.upsert_images(paths, ["/data"] * k, sha, np.full(k, 100), np.full(k, 7),
                        {"label": ["a", "b"] * (k // 2)})  # fmt: skip
        w.record_failures(paths[7:8], sha[7:8], ["unreadable: permission denied"])
    return paths[:7] + paths[8:]


def _worker_part(store: Path, name: str, paths: list[str], *, sealing: bool, why: str) -> None:
    """A part as a cluster worker writes it: embeddings of stored images, one failure."""
    sha = [_sha(p) for p in paths]
    x = np.random.default_rng(len(paths)).standard_normal((len(paths), 8), dtype=np.float32)
    with PartWriter(store, name, sealing=sealing) as w:
        w.register_backbone("net", FP)
        w.record_failures(paths[-1:], sha[-1:], [why])
        n = len(paths) - 1
        w.append("net", paths[:n], sha[:n], x[:n], width=np.full(n, 32), height=np.full(n, 24))


def _content(store: Path) -> dict[str, tuple]:
    """Every row by path: folder, hash, sizes, label, error and embedding."""
    fs = FeatureStore(store)
    t = fs.images()
    rows, x = fs.features("net") if "net" in fs.backbones() else (np.zeros(0, int), [])
    emb = {int(r): tuple(v.tolist()) for r, v in zip(rows.tolist(), x, strict=True)}
    out = {
        p: (t.root[i], t.sha256[i], int(t.nbytes[i]), int(t.mtime_ns[i]), int(t.width[i]),
            int(t.height[i]), t.labels["label"][i], t.error[i], emb.get(i))
        for i, p in enumerate(t.path)
    }  # fmt: skip
    assert len(out) == len(t.path), "a path stored twice"
    return out


def _inodes(part: Path) -> set[int]:
    return {p.stat().st_ino for p in segment_dir(part / sealed.SEALED).iterdir()}


def _store_inodes(store: Path) -> set[int]:
    return {p.stat().st_ino for p in segment_dir(store).iterdir()}


def test_a_sealed_part_is_linked_into_the_store_and_equals_its_replay(tmp_path: Path):
    replayed, linked = tmp_path / "replayed.h5", tmp_path / "linked.h5"
    for store, sealing in ((replayed, False), (linked, True)):
        with StoreWriter(store):
            pass
        _write_part(store, "p0", ROWS, sealing=sealing)
        _write_part(store, "p1", ROWS, sealing=sealing, classes=["c", "d", "a"])  # other order
    parts = list_parts(linked)
    assert all(sealed.is_sealed(p) for p in parts)
    assert not any(sealed.is_sealed(p) for p in list_parts(replayed))
    seals = set().union(*(_inodes(p) for p in parts))
    reports = {}
    for store in (replayed, linked):
        reports[store] = Publishing()
        assert merge(store, report=reports[store]) == (2, 8)
        assert list_parts(store) == [] and check(store) == []
    assert reports[replayed].ways == {"replayed": 2}
    assert reports[linked].ways == {"linked": 2}, reports[linked].lines()
    # the embeddings' segments are the part's files, not copies (the same inodes)
    with h5py.File(linked) as f:  # the piece map of the embeddings (docs/STORE.md)
        files = {segment_dir(linked) / n.decode() for n in f["segments/backbone:net/file"][()]}
    assert {f.stat().st_ino for f in files} <= seals and len(files) == 2
    want = _content(replayed)
    assert _content(linked) == want and len(want) == 2 * ROWS
    assert sum(v[7] != "" for v in want.values()) == 2  # the failures, kept
    # a second round onto a store that has rows, labels and names: still the same
    for store, sealing in ((replayed, False), (linked, True)):
        _write_part(store, "p2", ROWS, sealing=sealing, classes=["e", "a"])
        merge(store)
    assert _content(linked) == _content(replayed)
    assert set(FeatureStore(linked).images().labels["label"]) == {"a", "b", "c", "d", "e"}


def test_a_sealed_part_that_cannot_be_linked_is_copied_or_replayed(tmp_path: Path, monkeypatch):
    ref, store = tmp_path / "ref.h5", tmp_path / "s.h5"
    for s, sealing in ((ref, False), (store, True)):
        with StoreWriter(s):
            pass
        _write_part(s, "p0", 300, sealing=sealing)
    merge(ref)
    merge(store)
    # the same images again, sealed (a partition run twice): its rows are there already
    _write_part(store, "p0", 300, sealing=True)
    _write_part(store, "p1", 200, sealing=True)
    _write_part(ref, "p1", 200, sealing=False)
    merge(ref)

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(sealed.os, "link", no_links)  # parts on another file system
    report = Publishing()
    assert merge(store, report=report)[0] == 2
    assert report.ways == {"copied": 1, "replayed": 1}, report.lines()
    assert "300 of its 300 images are stored already" in report.notes[0]
    assert _content(store) == _content(ref) and check(store) == []
    assert not (_store_inodes(store) & _store_inodes(ref))


def test_a_worker_part_is_laid_over_its_stored_rows_and_equals_its_replay(tmp_path: Path):
    stores = {}
    for way, sealing in (("replayed", False), ("linked", True)):
        store = tmp_path / f"{way}.h5"
        todo = _driver_store(store, 5000)
        half = len(todo) // 2  # the first part spans the unreadable row: two runs of rows
        _worker_part(store, "t0", todo[:half], sealing=sealing, why="cannot decode")
        _worker_part(store, "t1", todo[half:], sealing=sealing, why="truncated")
        report = Publishing()
        merge(store, report=report)
        assert report.ways == {way: 2}, report.lines()
        assert check(store) == [] and list_parts(store) == []
        stores[way] = store
    got, want = _content(stores["linked"]), _content(stores["replayed"])
    assert got == want and len(want) == 5000
    assert sorted({v[7] for v in want.values()}) == [
        "", "cannot decode", "truncated", "unreadable: permission denied",
    ]  # fmt: skip
    assert sum(v[8] is not None for v in want.values()) == 4997

    # a file changed after its part was sealed: the part is replayed (its stale row skipped)
    store = tmp_path / "changed.h5"
    todo = _driver_store(store, 600)
    _worker_part(store, "t0", todo, sealing=True, why="cannot decode")
    with StoreWriter(store) as w:
        w.upsert_images(todo[:1], ["/data"], ["f" * 64], np.full(1, 5), np.full(1, 5), {})
    report = Publishing()
    merge(store, report=report)
    assert report.ways == {"replayed": 1}
    assert "changed in the store since it was sealed" in report.notes[0]
    fs = FeatureStore(store)
    assert fs.backbone("net").count == 600 - 3  # the changed, the failed and the unreadable


KILL = """
import os, sys
from penult.features import merge
from penult.features.format2 import commit, sealed, state
from penult.features import parts
point = sys.argv[2]
calls = {"link": 0}
def die():
    os._exit(9)
real_link, real_view, real_save, real_unseal = os.link, state._write_view, commit.save, sealed.unseal
def link(a, b):
    calls["link"] += 1
    if point == f"link:{calls['link']}":
        die()
    real_link(a, b)
def view(*a, **k):
    out = real_view(*a, **k)
    if point == "view":
        die()
    return out
def save(*a, **k):
    real_save(*a, **k)
    if point == "saved":
        die()
def unseal(part):
    real_unseal(part)
    if point == "unsealed":
        die()
sealed.os.link, state._write_view, commit.save, parts.sealed.unseal = link, view, save, unseal
merge(sys.argv[1])
"""


@pytest.mark.parametrize("point", ["link:1", "link:3", "view", "saved", "unsealed"])
def test_a_kill_while_parts_are_linked_leaves_each_part_once_or_not_at_all(
    tmp_path: Path, point: str
):
    store = tmp_path / "s.h5"
    with StoreWriter(store):
        pass
    _write_part(store, "p0", 300, sealing=False)
    merge(store)  # a store with rows already
    before = _content(store)
    for k in (1, 2):
        _write_part(store, f"p{k}", 250 * k, sealing=True)
    _kill_and_finish(tmp_path, store, point, before, {"p1": 250, "p2": 500})


@pytest.mark.parametrize("point", ["link:2", "saved"])
def test_a_kill_while_worker_parts_are_laid_over_their_rows_leaves_them_once_or_not(
    tmp_path: Path, point: str
):
    store = tmp_path / "s.h5"
    todo = _driver_store(store, 900)
    before = _content(store)
    _worker_part(store, "t0", todo[:400], sealing=True, why="cannot decode")
    _worker_part(store, "t1", todo[400:], sealing=True, why="cannot decode")
    _kill_and_finish(tmp_path, store, point, before, {})


def _kill_and_finish(tmp_path: Path, store: Path, point: str, before: dict, new: dict) -> None:
    """Kill a merge of ``store`` at ``point``; the store must hold each part once or not at
    all (``new``: parts of new rows by path prefix and size; else parts of embeddings over
    stored rows), and the next merge must give what an unkilled merge gives."""
    ref = tmp_path / "ref"
    shutil.copytree(tmp_path, ref, ignore=shutil.ignore_patterns("ref"))
    merge(ref / "s.h5")
    want = _content(ref / "s.h5")
    env = {**os.environ, "PYTHONPATH": f"{ROOT.parent}{os.pathsep}{ROOT}"}
    r = subprocess.run([sys.executable, "-c", KILL, str(store), point], env=env, timeout=120)
    assert r.returncode == 9, f"the kill at {point} did not happen"
    got = _content(store)  # opens, whatever the moment
    assert check(store) == []
    assert set(before) <= set(got)
    done = point in ("saved", "unsealed")
    if new:
        parts_in = {k for k in new if any(p.startswith(k + "/") for p in got)}
        assert len(got) == len(before) + sum(new[k] for k in parts_in)  # once or not at all
        assert parts_in == (set(new) if done else set())
    else:  # embeddings of stored rows: all of a part or none of it, the same rows
        assert set(got) == set(before)
        embedded = sum(v[8] is not None for v in got.values())
        assert embedded == (len(want) - 3 if done else 0)
    report = Publishing()
    merge(store, report=report)  # the next writer finishes the job
    assert _content(store) == want and list_parts(store) == [] and check(store) == []
    if point == "saved":
        assert report.ways == {sealed.PUBLISHED: 2}
    elif point != "unsealed":
        assert report.ways == {"linked": 2}


def test_compaction_leaves_standing_pieces_as_they_are():
    block = 1_000_000
    big = [Piece(0, 20_000, "a", 0), Piece(20_000, 40_000, "b", 0)]
    small = [Piece(40_000 + 10 * i, 40_010 + 10 * i, f"s{i}", 0) for i in range(3)]
    tail = [Piece(40_030, 70_000, "c", 0), Piece(70_000, 70_005, "t", 0)]
    ps = big + small + tail
    assert to_merge(ps, block, 0, finished=True) == [(40_000, 40_030)]  # the small run only
    assert to_merge(ps, block, 0, finished=False) == []
    tiny = [Piece(10 * i, 10 * i + 10, f"x{i}", 0) for i in range(8)]
    assert to_merge(tiny, block, 0, finished=False) == [(0, 80)]  # size-tiered as before
    assert to_merge(tiny, block, 0, finished=True) == [(0, 80)]


def test_two_sealed_parts_sharing_images_publish_them_once(tmp_path: Path):
    store = tmp_path / "s.h5"
    with StoreWriter(store):
        pass
    _write_part(store, "p0", 100, sealing=True, first=150)  # images 150-249, made as p1:
    part = store.with_name("s.h5.parts") / "p0"
    part.rename(part.with_name("p1"))
    _write_part(store, "p0", 200, sealing=True)  # images 0-199: 50 in both parts
    report = Publishing()
    assert merge(store, report=report)[0] == 2
    assert report.ways == {"linked": 1, "replayed": 1}, report.lines()
    assert "holds images part p0 holds too" in report.notes[0]
    got = _content(store)
    assert len(got) == 250 and check(store) == []


def test_a_part_stored_as_another_dtype_is_not_sealed_and_is_set_aside(tmp_path: Path):
    store = tmp_path / "s.h5"
    todo = _driver_store(store, 300)
    sha = [_sha(p) for p in todo[:50]]
    with PartWriter(store, "t0", sealing=False) as w:  # a job run with --dtype float16 ...
        w.register_backbone("net", FP, dtype="float16")
        w.append("net", todo[:50], sha, np.ones((50, 8), np.float32))
    with StoreWriter(store) as w:  # ... while another stored the backbone as float32
        w.register_backbone("net", FP)
    part = list_parts(store)[0]
    assert not sealed.seal(store, part) and not sealed.is_sealed(part)
    rejected: list[str] = []
    assert merge(store, rejected) == (0, 0)
    assert "as float16, the store as float32" in rejected[0]
    assert FeatureStore(store).backbone("net").count == 0


def test_an_empty_part_is_sealed_and_merged(tmp_path: Path):
    """A shard job whose share of the folder is empty (more shards than images) writes an empty
    part; merging it leaves the store as it was (it crashed on the empty path index)."""
    store = tmp_path / "s.h5"
    with StoreWriter(store):
        pass
    _write_part(store, "p0", 300, sealing=False)
    merge(store)
    before = _content(store)
    with PartWriter(store, "empty") as w:
        w.upsert_images([], [], [], np.zeros(0), np.zeros(0), {})
        w.register_backbone("net", FP)
    assert sealed.is_sealed(list_parts(store)[0])
    report = Publishing()
    assert merge(store, report=report) == (1, 2)
    assert report.ways == {"linked": 1} and _content(store) == before and check(store) == []
