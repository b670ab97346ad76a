"""Segments are checked for what they are, not only that they exist: a chunk whose bytes changed
(finite numbers, so no NaN check sees it), a segment copied in from another store, and two
segments swapped are each found by `penult check`, refused by every read (train included) with
the file named, and set aside by `check --repair` so the rows are made again."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from penult.features import FeatureStore, StoreError, StoreWriter, check
from penult.features.format2.state import load, segment_dir
from store_rows import FP, synthetic_rows


def _store(path: Path, n: int = 600) -> Path:
    """One commit of ``n`` synthetic rows with a label and a split column."""
    paths, sha, _ = synthetic_rows(0, n)
    x = np.random.default_rng(1).normal(size=(n, 8)).astype(np.float32)
    with StoreWriter(path) as w:
        w.upsert_images(
            paths, ["/r"] * n, sha, np.arange(n), np.arange(n),
            {"label": [p[:2] for p in paths], "split": ["train", "test"] * (n // 2)},
        )  # fmt: skip
        w.register_backbone("net", FP)
        w.append("net", paths, sha, x, width=np.full(n, 3), height=np.full(n, 4))
    return path


def _files(store: Path) -> dict[str, list[str]]:
    with h5py.File(store, "r") as f:
        return {fam: sorted({p.file for p in ps}) for fam, ps in load(f).maps.items()}


def _one(store: Path, family: str) -> Path:
    (name,) = _files(store)[family]
    return segment_dir(store) / name


def _train(store: Path):
    from penult.classify import TrainOptions, train

    return train(store, TrainOptions(test_size=0.3))


def test_overwritten_bytes_in_an_embeddings_chunk_are_an_error_never_numbers(tmp_path) -> None:
    store = _store(tmp_path / "s.h5")
    good = FeatureStore(store).embeddings("net")
    seg = _one(store, "backbone:net")
    with h5py.File(seg, "r") as f:
        info = f["embeddings"].id.get_chunk_info(0)
    with open(seg, "r+b") as fh:  # a third of the chunk: finite floats, as a bad copy leaves
        fh.seek(info.byte_offset + info.size // 3)
        fh.write(np.full(info.size // 12, 0.5, np.float32).tobytes())
    with pytest.raises(StoreError, match=f"segment .*{seg.name} is damaged"):
        FeatureStore(store).embeddings("net")
    with pytest.raises(StoreError, match=seg.name):
        _train(store)
    found = check(store)
    assert any(seg.name in p and "checksum" in p for p in found), found
    fixed = check(store, repair=True)
    assert any("dropped 600 rows of backbone:net" in p for p in fixed), fixed
    s = FeatureStore(store)
    assert not s.valid("net").any()  # made again by the next extract, never read as they were
    assert check(store) == [] and good.shape == (600, 8)


def test_a_segment_of_another_store_is_refused(tmp_path) -> None:
    a = _store(tmp_path / "a.h5")
    b = _store(tmp_path / "b.h5")  # the same rows and shapes, written for another store
    seg_a, seg_b = _one(a, "backbone:net"), _one(b, "backbone:net")
    with h5py.File(seg_b, "r+") as f:  # other numbers, same shape
        f["embeddings"][:] = f["embeddings"][:] + 1
    shutil.copy(seg_b, seg_a)
    with pytest.raises(StoreError, match=f"{seg_a.name} is not the one .*another store"):
        FeatureStore(a).embeddings("net")
    with pytest.raises(StoreError, match="another store"):
        _train(a)
    assert any(seg_a.name in p and "another store" in p for p in check(a))


def test_label_and_split_segments_swapped_are_found(tmp_path) -> None:
    store = _store(tmp_path / "s.h5")
    label, split = _one(store, "label:label"), _one(store, "label:split")
    tmp = label.with_suffix(".swap")
    os.rename(label, tmp)
    os.rename(split, label)
    os.rename(tmp, split)
    with pytest.raises(StoreError, match="holds 'label:split', the store's map says 'label:label'"):
        FeatureStore(store).label_codes("label")
    with pytest.raises(StoreError, match=r"label:"):
        _train(store)
    found = check(store)
    assert sum(label.name in p or split.name in p for p in found) == 2, found


def test_a_segment_renamed_over_another_of_its_store_is_found(tmp_path) -> None:
    store = _store(tmp_path / "s.h5", n=200)
    with StoreWriter(store) as w:  # a second embeddings segment of the same store and family
        paths, sha, _ = synthetic_rows(5, 50)
        w.upsert_images(paths, ["/r"] * 50, sha, np.arange(50), np.arange(50), {})
        w.register_backbone("net", FP)
        w.append("net", paths, sha, np.ones((50, 8), np.float32), width=np.full(50, 3),
                 height=np.full(50, 4))  # fmt: skip
    first, second = _files(store)["backbone:net"]
    shutil.copy(segment_dir(store) / second, segment_dir(store) / first)
    with pytest.raises(StoreError, match=f"{first} is not the one .*written as {second}"):
        FeatureStore(store).embeddings("net")


# -- check and --upgrade say what they do -------------------------------------------------------


def test_plain_check_lists_a_truncated_segment(tmp_path, capsys) -> None:
    from penult import cli

    store = _store(tmp_path / "s.h5")
    seg = _one(store, "backbone:net")
    seg.write_bytes(seg.read_bytes()[: seg.stat().st_size // 2])
    assert cli.main(["check", str(store)]) == 1  # listed as a problem, not an error (exit 2)
    out = capsys.readouterr().out
    assert f"PROBLEM: {store}: segment {seg} cannot be read" in out


def test_check_repair_rebuilds_a_path_index_that_misses_rows(tmp_path) -> None:
    from penult.features.format2.state import save

    store = _store(tmp_path / "s.h5", n=200)
    with StoreWriter(store) as w:  # a second run of the index
        paths, sha, _ = synthetic_rows(5, 50)
        w.upsert_images(paths, ["/r"] * 50, sha, np.arange(50), np.arange(50), {})
    with h5py.File(store, "r") as f:
        s = load(f)
    assert len(s.index) == 2
    s.index.pop()  # the newest run's rows are no longer found by path
    save(store, s)
    assert any("misses rows" in p for p in check(store))
    assert check(store, repair=True) == ["repaired: rebuilt the path index from the image table"]
    assert check(store) == [] and (FeatureStore(store).find(paths) >= 0).all()


def test_repair_without_the_segments_folder_changes_nothing_and_says_so(tmp_path) -> None:
    store = _store(tmp_path / "s.h5")
    before = store.read_bytes()
    shutil.rmtree(segment_dir(store))
    said = check(store, repair=True)
    assert said and all("cannot repair" in p or "is missing" in p for p in said), said
    assert not any(p.startswith("repaired") for p in said)
    assert any("nothing was changed" in p for p in said)
    assert store.read_bytes() == before


def test_upgrade_keeps_files_it_did_not_write(tmp_path) -> None:
    from penult.features import upgrade

    fixture = Path(__file__).parent / "fixtures" / "store_v1.h5"
    p = tmp_path / "old.h5"
    shutil.copy(fixture, p)
    foreign = segment_dir(p)
    foreign.mkdir()
    (foreign / "backbone_x-0123.h5").write_bytes(b"a newer store's segment")
    said = upgrade(p)
    kept = [d for d in tmp_path.iterdir() if d.name.startswith(".before-upgrade-old.h5.segments")]
    assert len(kept) == 1 and (kept[0] / "backbone_x-0123.h5").read_bytes().startswith(b"a newer")
    assert kept[0].name in said and check(p) == []
    with pytest.raises(StoreError, match="is a folder, not a feature store"):
        upgrade(tmp_path)


# -- a store renamed or copied under a new name reads the same through plain h5py -------------


def _plain(store: Path) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    with h5py.File(store, "r") as f:  # what the README's snippet does: plain h5py, no penult
        return (f["backbones/net/valid"][:], f["backbones/net/embeddings"][:],
                f["images/path"][:].tolist())  # fmt: skip


def test_a_renamed_store_fails_loudly_in_plain_h5py_until_penult_opened_it(tmp_path):
    store = _store(tmp_path / "birds.h5", n=100)
    valid, x, paths = _plain(store)
    assert valid.all() and np.isfinite(x).all()
    new = tmp_path / "moved" / "plankton.h5"
    new.parent.mkdir()
    store.rename(new)
    segment_dir(store).rename(segment_dir(new))
    with pytest.raises(KeyError, match="open"):  # the old folder's view: an error, no fill values
        _plain(new)
    assert len(FeatureStore(new)) == 100  # any penult command on it points it at its folder
    v2, x2, p2 = _plain(new)
    assert v2.all() and np.array_equal(x2, x) and p2 == paths and check(new) == []
    assert len(list(segment_dir(new).glob("view-*"))) == 1  # the old view went with the relink


def test_a_store_moved_with_its_folder_reads_the_same_without_penult(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    store = _store(tmp_path / "a" / "birds.h5", n=100)
    want = _plain(store)
    shutil.move(tmp_path / "a", tmp_path / "b")
    got = _plain(tmp_path / "b" / "birds.h5")
    assert got[0].all() and np.array_equal(got[1], want[1]) and got[2] == want[2]


def test_a_copy_read_before_penult_fails_once_the_original_changes(tmp_path) -> None:
    from conftest import copy_store

    a = _store(tmp_path / "a.h5", n=100)
    _, x, _ = _plain(a)
    b = copy_store(a, tmp_path / "b.h5")
    assert np.array_equal(_plain(b)[1], x)  # the original's view: the same rows as the copy's
    with StoreWriter(a) as w:  # the original changes: its view is replaced, b's link dangles
        w.set_labels("label", _plain(a)[2][:3], ["other"] * 3)
    with pytest.raises(KeyError):
        _plain(b)
    FeatureStore(b)
    assert np.array_equal(_plain(b)[1], x)


def test_a_copy_under_a_new_name_reads_its_own_segments(tmp_path) -> None:
    from conftest import copy_store

    a = _store(tmp_path / "a.h5", n=100)
    _, x, _ = _plain(a)
    b = copy_store(a, tmp_path / "b.h5")
    FeatureStore(b)
    shutil.rmtree(segment_dir(a))  # the original changes (here: is gone)
    valid, xb, _ = _plain(b)
    assert valid.all() and np.array_equal(xb, x)
