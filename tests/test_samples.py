"""Samples as a column: from a manifest, a folder level or a sample-metadata CSV, stored with
the labels and carried into predict's CSV (issue 31, part 1)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from penult import cli
from penult.core import coded_sample_columns, sample_columns
from penult.extract import SourceError, list_images
from penult.features import FeatureStore

from conftest import copy_store


def _bins(data_dir: Path, root: Path, *, classes: bool = False) -> dict[str, list[str]]:
    """Two IFCB-like sample folders of real hymenoptera photos (ants and bees in each)."""
    made: dict[str, list[str]] = {}
    for b, take in (
        ("D20240101T000000_IFCB1", slice(0, 3)),
        ("D20240102T000000_IFCB1", slice(3, 5)),
    ):
        for kind in ("ants", "bees"):
            for f in sorted((data_dir / "hymenoptera" / kind).glob("*.jpg"))[take]:
                dest = root / b / (kind if classes else "") / f.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, dest)
                made.setdefault(b, []).append(dest.relative_to(root).as_posix())
    return made


def _samples_csv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Sample", "volume_ml", "time"])
        w.writerows(rows)
    return path


def test_a_manifests_sample_columns_are_stored_with_the_labels(data_dir, tmp_path):
    cub = data_dir / "cub100"
    species = sorted(p.name for p in cub.iterdir() if p.is_dir())[:2]
    rows = [(f"{s}/{f.name}", s) for s in species for f in sorted((cub / s).glob("*.jpg"))[:8]]
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "sample", "volume_ml", "time"])
        for i, (p, s) in enumerate(rows):
            tow = "tow1" if i % 2 else "tow2"
            w.writerow([p, s, tow, "4.5" if tow == "tow1" else "5", f"2024-05-0{1 + i % 2}"])
    store = tmp_path / "s.h5"
    argv = ["extract", str(store), str(manifest), "--root", str(cub), "-q", "--workers", "0"]
    assert cli.main(argv) == 0
    t = FeatureStore(store).images()
    by_path = dict(zip(t.path, range(len(t)), strict=True))
    for i, (p, _) in enumerate(rows):
        k = by_path[p]
        assert t.labels["sample"][k] == ("tow1" if i % 2 else "tow2")
        assert t.labels["volume_ml"][k] == ("4.5" if i % 2 else "5")
    # the store keeps columns by name; label varies within a tow, so it is no tow's metadata
    assert sample_columns(t.labels) == ["sample", "time", "volume_ml"]
    coded = FeatureStore(store).labels()  # the same from the codes (no strings per image)
    assert coded_sample_columns(coded) == ["sample", "time", "volume_ml"]
    codes, names = coded["time"]
    codes[0] = names.index("2024-05-02" if names[codes[0]] == "2024-05-01" else "2024-05-01")
    assert coded_sample_columns(coded) == ["sample", "volume_ml"]  # time now varies in a tow
    # ... and carried into the report's predictions.csv, as predict writes them
    rep = tmp_path / "rep"
    rep.mkdir()
    argv = [
        "train",
        str(store),
        "--out",
        str(tmp_path / "m.skops"),
        "--report",
        str(rep),
        "--no-refit",
    ]  # fmt: skip  (evaluated on this store below)
    assert cli.main(argv) == 0
    with open(rep / "predictions.csv", newline="") as fh:
        scored = list(csv.DictReader(fh))
    assert list(scored[0])[:4] == ["path", "sample", "time", "volume_ml"]
    for r in scored:
        k = by_path[r["path"]]
        assert (r["sample"], r["volume_ml"]) == (t.labels["sample"][k], t.labels["volume_ml"][k])
    # ... and into evaluate's, from the rows it scored
    rep2 = tmp_path / "rep2"
    rep2.mkdir()
    assert cli.main(["evaluate", str(tmp_path / "m.skops"), str(store), "--report", str(rep2)]) == 0
    with open(rep2 / "predictions.csv", newline="") as fh:
        again = list(csv.DictReader(fh))
    assert [(r["path"], r["sample"], r["time"]) for r in again] == [
        (r["path"], r["sample"], r["time"]) for r in scored
    ]


def test_a_folder_level_is_the_sample_and_a_metadata_csv_joins_onto_it(data_dir, tmp_path):
    flat = _bins(data_dir, tmp_path / "flat")
    listing = list_images(tmp_path / "flat", sample_level=1)
    assert "label" not in listing.labels  # the folder is a sample here, not a class
    want = {p: b for b, ps in flat.items() for p in ps}
    assert dict(zip(listing.paths, listing.labels["sample"], strict=True)) == want
    nested = _bins(data_dir, tmp_path / "nested", classes=True)
    listing = list_images(tmp_path / "nested", sample_level=2)
    got = dict(
        zip(
            listing.paths,
            zip(listing.labels["sample"], listing.labels["label"], strict=True),
            strict=True,
        )
    )
    assert got == {p: (b, p.split("/")[1]) for b, ps in nested.items() for p in ps}
    meta = _samples_csv(tmp_path / "samples.csv", [("D20240101T000000_IFCB1", "5.0", "2024-01-01")])
    listing = list_images(tmp_path / "nested", sample_level=2, samples=meta)
    vol = dict(zip(listing.labels["sample"], listing.labels["volume_ml"], strict=True))
    assert vol == {"D20240101T000000_IFCB1": "5.0", "D20240102T000000_IFCB1": ""}
    assert any("1 sample(s) have no row, e.g. 'D20240102T000000_IFCB1'" in n for n in listing.notes)


def test_bad_sample_input_is_refused_naming_the_file(data_dir, tmp_path):
    _bins(data_dir, tmp_path / "flat")
    with pytest.raises(SourceError, match=r"IFCB1/\S+\.jpg: --sample-level 2 .* has 1 folder"):
        list_images(tmp_path / "flat", sample_level=2)
    with pytest.raises(SourceError, match="--sample-level 0"):
        list_images(tmp_path / "flat", sample_level=0)
    no_id = tmp_path / "bad.csv"
    no_id.write_text("bin_name,volume_ml\nx,5\n")
    with pytest.raises(SourceError, match=r"bad\.csv: a samples CSV needs a 'sample' column"):
        list_images(tmp_path / "flat", sample_level=1, samples=no_id)
    meta = _samples_csv(tmp_path / "s.csv", [("a", "1", ""), ("a", "2", "")])
    with pytest.raises(SourceError, match=r"s\.csv: line 3 repeats sample 'a'"):
        list_images(tmp_path / "flat", sample_level=1, samples=meta)
    with pytest.raises(SourceError, match="the images have none"):
        list_images(tmp_path / "flat", samples=meta)


def test_predict_carries_each_images_sample_and_its_metadata(data_dir, hym_store, tmp_path):
    store = copy_store(hym_store, tmp_path / "h.h5")
    model = tmp_path / "m.skops"
    assert cli.main(["train", str(store), "--out", str(model)]) == 0
    bins = _bins(data_dir, tmp_path / "bins")
    meta = _samples_csv(
        tmp_path / "samples.csv",
        [
            ("D20240101T000000_IFCB1", "5.0", "2024-01-01T00:00"),
            ("D20240102T000000_IFCB1", "4.8", "2024-01-02T00:00"),
        ],
    )
    out = tmp_path / "p.csv"
    argv = ["predict", str(model), str(tmp_path / "bins"), "--out", str(out), "--workers", "0"]
    assert cli.main([*argv, "--sample-level", "1", "--samples", str(meta), "-q"]) == 0
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:5] == ["path", "sample", "volume_ml", "time", "prediction"]
    assert len(rows) == sum(map(len, bins.values()))
    vol = {"D20240101T000000_IFCB1": "5.0", "D20240102T000000_IFCB1": "4.8"}
    for r in rows:
        rel = Path(r["path"]).relative_to(tmp_path / "bins").as_posix()
        assert r["sample"] == rel.split("/")[0] and r["volume_ml"] == vol[r["sample"]]
        assert r["prediction"] in ("ants", "bees") and r["error"] == ""
    # without samples the CSV is as before: no sample columns
    assert cli.main([*argv[:4], str(tmp_path / "plain.csv"), "--workers", "0", "-q"]) == 0
    with open(tmp_path / "plain.csv", newline="") as fh:
        assert next(csv.reader(fh))[:2] == ["path", "prediction"]
