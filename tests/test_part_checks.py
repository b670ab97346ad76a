"""`penult merge` reads a part whole before anything of it enters the store's journal: a part made
with other weights under the same backbone name, or with embeddings of the wrong width, is set
aside and named, and the store goes on working; a NaN row is stored as failed with the reason;
a mistyped store name is refused instead of creating an empty store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from penult import cli
from penult.features import FeatureStore, StoreError, StoreWriter, check, journal, merge
from penult.features.parts import PartWriter, list_parts, parts_dir
from store_rows import FP, synthetic_rows


def _base(store: Path) -> Path:
    paths, sha, x = synthetic_rows(0, 40)
    with StoreWriter(store) as w:
        w.upsert_images(paths, ["/r"] * 40, sha, np.arange(40), np.arange(40),
                        {"label": [p[:2] for p in paths]})  # fmt: skip
        w.register_backbone("net", FP)
        w.append("net", paths, sha, x)
    return store


def _part(store: Path, name: str, fp: dict, k: int = 3) -> Path:
    """A part written as a shard job does; one with ``fp`` other than the store's is written
    beside an empty store elsewhere and moved in (a stale part, or a job run with other
    weights under the same name)."""
    where = store if fp == FP else store.with_name(f"elsewhere-{name}.h5")
    paths, sha, xs = synthetic_rows(k, 20)
    with PartWriter(where, name) as w:
        w.upsert_images(paths, ["/r"] * 20, sha, np.arange(20), np.arange(20),
                        {"label": [p[:2] for p in paths]})  # fmt: skip
        w.register_backbone("net", fp)
        w.append("net", paths, sha, xs)
    if where != store:
        parts_dir(store).mkdir(exist_ok=True)
        (parts_dir(where) / name).rename(parts_dir(store) / name)
    return parts_dir(store) / name


def _edit_embeddings(part: Path, edit) -> None:
    """Rewrite the part's embeddings shard with ``edit(arrays)`` applied (a bad copy, another
    program's output): well-formed, so only a check of its contents finds it."""
    shard = next(s for s in journal.shards_in(part) if "embeddings" in s.name)
    meta, a = journal.read_shard(shard)
    edit(a)
    shard.unlink()
    meta.pop("kind")
    journal.write_shard_to(shard.parent, int(shard.name[:9]), "embeddings", meta, **a)


def test_a_part_with_other_weights_is_set_aside_before_the_journal(tmp_path, capsys) -> None:
    store = _base(tmp_path / "s.h5")
    _part(store, "good", FP, k=2)
    _part(store, "stale", {**FP, "weights_sha256": "ef" * 32}, k=3)
    assert cli.main(["merge", str(store)]) == 1
    out = capsys.readouterr().out
    assert "REJECTED: part stale set aside" in out and "another fingerprint" in out
    assert "merged 1 part(s)" in out
    assert list_parts(store) == [] and (parts_dir(store) / ".rejected-stale").is_dir()
    assert not journal.list_shards(store)  # nothing of it entered the journal
    assert len(FeatureStore(store)) == 60 and FeatureStore(store).backbone("net").count == 60
    assert check(store, repair=True) == [] and check(store) == []
    with StoreWriter(store) as w:  # later writes are not jammed by it
        paths, sha, x = synthetic_rows(40, 5)  # rows 200..204: new
        w.upsert_images(paths, ["/r"] * 5, sha, np.arange(5), np.arange(5), {})
        w.register_backbone("net", FP)
        w.append("net", paths, sha, x)
    assert FeatureStore(store).backbone("net").count == 65


def test_a_part_of_the_wrong_width_is_set_aside(tmp_path) -> None:
    store = _base(tmp_path / "s.h5")
    part = _part(store, "wide", FP)
    _edit_embeddings(part, lambda a: a.update(embeddings=np.zeros((len(a["path"]), 1000), "f4")))
    rejected: list[str] = []
    assert merge(store, rejected) == (0, 0)
    assert len(rejected) == 1 and "(20, 1000) float32 for 8-d backbone 'net'" in rejected[0]
    assert not journal.list_shards(store) and check(store) == []


def test_a_nan_row_is_stored_as_failed_with_the_reason(tmp_path) -> None:
    store = _base(tmp_path / "s.h5")
    paths, _, _ = synthetic_rows(3, 20)

    def spoil(a):
        a["embeddings"][4, 2] = np.nan
        a["embeddings"][7] = np.inf

    _edit_embeddings(_part(store, "nan", FP), spoil)
    assert merge(store) == (1, 3)
    fs = FeatureStore(store)
    t = fs.images()
    failed = {p: e for p, e in zip(t.path, t.error, strict=True) if e}
    assert sorted(failed) == sorted([paths[4], paths[7]])
    assert all("non-finite" in e for e in failed.values())
    assert fs.backbone("net").count == 58 and np.isfinite(fs.features("net")[1]).all()
    assert check(store) == []
    from penult.classify import TrainOptions, train

    assert train(store, TrainOptions(test_size=0.3)).metrics["top1"] >= 0  # trains on the rest


def test_merge_into_a_mistyped_store_is_refused(tmp_path) -> None:
    _base(tmp_path / "s.h5")
    with pytest.raises(StoreError, match="no such feature store, and no parts"):
        merge(tmp_path / "s5.h5")
    assert not (tmp_path / "s5.h5").exists()
