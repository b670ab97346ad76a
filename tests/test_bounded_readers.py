"""Commands that show a few stored images read those rows alone, never the whole image table as
Python strings (issue 35: a store of 100 million rows would need about 10 GB for it); finetune
reads labels as codes and the files of the images it trains on."""

from __future__ import annotations

from pathlib import Path

import pytest
from penult.classify.evaluate import stored_samples
from penult.classify.lookup import find_duplicates, neighbors
from penult.classify.neighbors import build_index
from penult.extract.finetune.data import load
from penult.extract.finetune.options import FinetuneOptions
from penult.features import FeatureStore, describe

from conftest import copy_store

B = "efficientnet_lite0"


@pytest.fixture
def whole_table_refused(monkeypatch):
    """FeatureStore.images() without rows raises: what reads the whole table fails here."""
    real = FeatureStore.images

    def rows_only(self, rows=None):
        if rows is None:
            raise AssertionError("the whole image table was read")
        return real(self, rows)

    def allow():
        monkeypatch.setattr(FeatureStore, "images", real)

    monkeypatch.setattr(FeatureStore, "images", rows_only)
    return allow


def test_info_neighbours_and_samples_read_only_the_rows_they_show(
    cub_store: Path, tmp_path: Path, whole_table_refused
):
    store = copy_store(cub_store, tmp_path / "s.h5")
    build_index(store, B)
    t = FeatureStore(store).images(range(3))
    key = t.path[1]
    text = describe(store)
    res = neighbors(store, B, [key], k=5)
    dups = find_duplicates(store, B, threshold=0.999)
    samples = stored_samples(store, [key, "not/stored.jpg"])
    tuning = load(store, FinetuneOptions(aux_level="genus", max_train=200))
    whole_table_refused()  # the same answers from the whole table
    full = FeatureStore(store).images()
    by_file = {f"{r}/{q}": i for i, (r, q) in enumerate(zip(full.root, full.path, strict=True))}
    for part in (tuning.train, tuning.val):
        for f, c, g in zip(part.files, part.y, part.coarse, strict=True):
            i = by_file[f]
            assert (
                tuning.classes[c] == full.labels["label"][i] and full.labels["split"][i] != "test"
            )
            assert tuning.coarse_classes[g] == full.labels["genus"][i]
    assert 0 < len(tuning.train.files) <= 200 and tuning.val.files  # max_train, a val split
    assert text == describe(store) and f"images     {len(full)} (0 failed)" in text
    assert "labels[label]  20 distinct" in text
    r = res[0]
    assert r.query == key and r.label == full.labels["label"][1] and len(r.hits) == 5
    assert key not in [h.path for h in r.hits]  # itself left out
    for h in r.hits:
        assert (h.path, h.label) == (full.path[h.row], full.labels["label"][h.row])
    assert [h.path for g in dups for h in g.hits] == [
        h.path for g in find_duplicates(store, B, threshold=0.999) for h in g.hits
    ]
    assert samples == {}  # cub has no sample column: nothing carried, nothing read


def test_check_reads_the_table_in_pieces_and_finds_repeats_and_index_misses(
    cub_store: Path, tmp_path: Path, whole_table_refused, monkeypatch
):
    """`penult check` goes over the image table 100 rows at a time (never all of it): a path
    stored twice is found across pieces (the index finds the path at its other row), and rows
    the index misses are said, as with the whole table."""
    import penult.features.inspect as inspect
    from penult.features import check

    monkeypatch.setattr(inspect, "CHECK_ROWS", 100)
    store = copy_store(cub_store, tmp_path / "s.h5")
    assert check(store) == []
    real = FeatureStore.images

    def misread(self, rows=None):  # a table written wrong: row 250 holds row 3's path again,
        t = real(self, rows)  # row 120 a path the index does not know
        rows = list(rows)
        if 250 in rows:
            t.path[rows.index(250)] = real(self, [3]).path[0]
        if 120 in rows:
            t.path[rows.index(120)] = "not/stored.jpg"
        return t

    monkeypatch.setattr(FeatureStore, "images", misread)
    problems = check(store)
    first = real(FeatureStore(store), [3]).path[0]
    assert problems == [
        f"1 duplicate paths in the image table, e.g. {first}",
        "the path index misses rows; `penult check --repair` rebuilds it",
    ]
