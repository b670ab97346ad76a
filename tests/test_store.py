"""Feature store: round-trip, checks before writing, journal replay, locking, crash during commit."""

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
from penult.features import (
    FeatureStore,
    FingerprintMismatchError,
    StoreError,
    StoreLockedError,
    StoreWriter,
    check,
    journal,
)

from conftest import FP


def _sha(i: int) -> str:
    return f"{i + 1:064x}"  # all zeros would mean "not hashed"


def _fill(
    w: StoreWriter,
    n: int,
    *,
    dim: int = 8,
    name: str = "net",
    seed: int = 0,
    dtype: str = "float32",
) -> np.ndarray:
    paths = [f"c{i % 3}/img{i:03d}.jpg" for i in range(n)]
    w.upsert_images(
        paths,
        ["/data"] * n,
        [_sha(i) for i in range(n)],
        np.arange(n) + 100,
        np.arange(n),
        {"label": [f"c{i % 3}" for i in range(n)]},
    )
    w.register_backbone(name, {**FP, "dim": dim}, dtype=dtype)
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    w.append(name, paths, [_sha(i) for i in range(n)], x)
    return x


def test_roundtrip_and_plain_h5py_layout(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    with StoreWriter(p) as w:
        x = _fill(w, 10)
        w.record_failures(["bad.jpg"], [""], ["not an image"])
    s = FeatureStore(p)
    t = s.images()
    assert t.path[:2] == ["c0/img000.jpg", "c1/img001.jpg"] and len(t) == 10
    rows, got = s.features("net")
    np.testing.assert_array_equal(got, x[rows])
    assert s.backbones()["net"].fingerprint == FP
    with h5py.File(p, "r") as f:  # documented layout, readable without penult
        assert f.attrs["schema_version"] == 2
        emb = f["backbones/net/embeddings"]
        assert emb.shape == (10, 8) and emb.is_virtual
        np.testing.assert_array_equal(emb[()], x)
        names = f["images/labels/label/names"][()]
        assert names[f["images/labels/label/codes"][3]].decode() == "c0"
        assert f["images/path"][1].decode() == "c1/img001.jpg"
        assert bytes(f["images/sha256"][2]).hex() == _sha(2)
    assert check(p) == []
    assert not journal.list_shards(p)


def test_float16_storage_and_several_backbones(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    with StoreWriter(p) as w:
        x = _fill(w, 6, dtype="float16")
    with StoreWriter(p) as w:
        w.register_backbone("other", {**FP, "dim": 3, "architecture": "b"})
        w.append("other", ["c0/img000.jpg"], [_sha(0)], np.ones((1, 3)))
    s = FeatureStore(p)
    assert s.backbones()["net"].dtype == "float16"
    np.testing.assert_allclose(s.embeddings("net"), x, atol=2e-3)
    assert s.valid("other").tolist() == [True] + [False] * 5
    assert np.isnan(s.embeddings("other")[1:]).all()
    for read in (s.backbone, s.valid, s.embeddings):
        with pytest.raises(StoreError, match=r"no backbone 'nett' \(it has: net, other\)"):
            read("nett")


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda w: w.append("net", ["c0/img000.jpg"], [_sha(0)], np.ones((1, 5))), "expected"),
        (lambda w: w.append("net", ["c0/img000.jpg"], [_sha(0)], np.full((1, 8), np.nan)), "NaN"),
        (
            lambda w: w.append("net", ["c0/img000.jpg"] * 2, [_sha(0)] * 2, np.ones((2, 8))),
            "duplicate",
        ),
        (lambda w: w.append("nope", ["c0/img000.jpg"], [_sha(0)], np.ones((1, 8))), "register"),
        (
            lambda w: w.append("net", ["c0/img000.jpg"], [_sha(0)], np.ones((1, 8), np.int64)),
            "floating",
        ),
    ],
)
def test_append_checks_before_writing(tmp_path: Path, bad, match) -> None:
    p = tmp_path / "s.h5"
    with StoreWriter(p) as w:
        x = _fill(w, 4)
        with pytest.raises(StoreError, match=match):
            bad(w)
    np.testing.assert_array_equal(FeatureStore(p).embeddings("net"), x)


def test_other_fingerprint_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    with StoreWriter(p) as w:
        _fill(w, 3)
    with StoreWriter(p) as w, pytest.raises(FingerprintMismatchError, match="weights_sha256"):
        w.register_backbone("net", {**FP, "weights_sha256": "cd" * 32})
    with StoreWriter(p) as w, pytest.raises(StoreError, match="float32"):
        w.register_backbone("net", FP, dtype="float16")
    with StoreWriter(p) as w:  # only precision differs: same backbone, recorded
        w.register_backbone("net", {**FP, "precision": "bf16"})
    assert FeatureStore(p).backbones()["net"].fingerprint["precision"] == "fp32"
    with h5py.File(p) as f:
        assert f["backbones/net"].attrs["precision"] == "bf16,fp32"


def test_changed_content_invalidates_row(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    with StoreWriter(p) as w:
        _fill(w, 4)
        w.upsert_images(["c1/img001.jpg"], ["/data"], [_sha(99)], [1], [1], {"label": ["c1"]})
        # a late embedding computed from the old bytes must not be accepted
        w.append("net", ["c1/img001.jpg"], [_sha(1)], np.ones((1, 8)))
    s = FeatureStore(p)
    assert s.valid("net").tolist() == [True, False, True, True]
    assert s.images().sha256[1] == _sha(99)


def test_not_a_store(tmp_path: Path) -> None:
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"hello")
    with pytest.raises(StoreError, match="cannot open"):
        FeatureStore(junk)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(StoreError, match="not a penult feature store"):
        StoreWriter(other).__enter__()
    with pytest.raises(StoreError, match="no such"):
        FeatureStore(tmp_path / "missing.h5")


def test_second_writer_is_refused_in_another_process(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from penult.features import StoreWriter, StoreLockedError
        try:
            with StoreWriter({str(p)!r}):
                print("GOT LOCK")
        except StoreLockedError as e:
            print("REFUSED", e)
    """)
    with StoreWriter(p) as w:
        x = _fill(w, 5)
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        ).stdout
        assert out.startswith("REFUSED") and f"pid {os.getpid()}" in out
        with pytest.raises(StoreLockedError):  # also a second writer in the same process
            StoreWriter(p).__enter__()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    ).stdout
    assert out.startswith("GOT LOCK")
    np.testing.assert_array_equal(FeatureStore(p).embeddings("net"), x)


def test_reader_sees_last_commit_while_writer_works(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    with StoreWriter(p) as w:
        _fill(w, 4)
    with StoreWriter(p) as w:
        w.upsert_images(["new.jpg"], ["/data"], [_sha(50)], [1], [1], {"label": ["c0"]})
        assert len(FeatureStore(p).images()) == 4  # journaled, not yet committed
        w.commit()
        assert len(FeatureStore(p).images()) == 5


def test_crash_during_commit_keeps_store_and_journal(tmp_path: Path, monkeypatch) -> None:
    p = tmp_path / "s.h5"
    with StoreWriter(p) as w:
        _fill(w, 4)
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk on fire")

    with StoreWriter(p) as w:
        w.upsert_images(["new.jpg"], ["/data"], [_sha(50)], [1], [1], {"label": ["c0"]})
        monkeypatch.setattr("penult.features.store.os.replace", boom)
        with pytest.raises(StoreError, match="disk on fire.*journal.*check --repair"):
            w.commit()
        monkeypatch.undo()
        assert p.read_bytes() == before  # old file untouched, opens fine
        assert len(FeatureStore(p).images()) == 4
        assert len(journal.list_shards(p)) == 1  # the work is still journaled
    assert len(FeatureStore(p).images()) == 5  # ... and merged by the next commit


def test_replaying_a_journal_twice_is_harmless(tmp_path: Path) -> None:
    """A kill after the atomic rename but before the shards are deleted replays them: no duplicates."""
    p = tmp_path / "s.h5"
    with StoreWriter(p) as w:
        _fill(w, 4)
    saved = tmp_path / "saved"
    with StoreWriter(p) as w:
        x2 = _fill(w, 7, seed=1)
        shutil.copytree(journal.journal_dir(p), saved)
    once = FeatureStore(p)
    shutil.rmtree(journal.journal_dir(p))
    shutil.copytree(saved, journal.journal_dir(p))
    with StoreWriter(p):
        pass
    twice = FeatureStore(p)
    assert twice.images().path == once.images().path and len(twice.images()) == 7
    np.testing.assert_array_equal(twice.embeddings("net"), x2)
    assert check(p) == []


def test_half_written_shard_is_ignored(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    with StoreWriter(p) as w:
        _fill(w, 3)
    (journal.journal_dir(p) / ".tmp-abc.npz").write_bytes(b"PK\x03\x04 truncated")
    with StoreWriter(p):
        pass
    assert len(FeatureStore(p).images()) == 3
    assert not list(journal.journal_dir(p).iterdir())


def test_one_atomic_write_helper_and_one_file_hash(tmp_path: Path, data_dir: Path) -> None:
    """A write that fails leaves the old file and no temporary; the hash is the file's SHA-256;
    and no other module renames a freshly written file into place (only moves of finished
    files: journal shards adopted, the renames of an index's redo list)."""
    import hashlib

    from penult.core import atomic_path, file_sha256

    target = tmp_path / "card.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]
    img = next((data_dir / "cub100").rglob("*.jpg"))
    assert file_sha256(img) == hashlib.sha256(img.read_bytes()).hexdigest()
    root = Path(__file__).resolve().parents[1]
    renames = {
        str(p.relative_to(root))
        for pkg in ("classify", "core", "extract", "features")
        for p in (root / pkg).rglob("*.py")
        if "os.replace(" in p.read_text() or "os.rename(" in p.read_text()
    }
    assert renames == {"core/files.py", "features/journal.py", "classify/neighbors.py"}
