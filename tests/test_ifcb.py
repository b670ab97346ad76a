"""IFCB raw bins read directly (issue 33, part 1: the reader), on the real bins in
../shared/data/ifcb: every ROI's pixels are the .roi's bytes at the .adc's offset; bad, empty and
partial bins are errors that name the file and say why."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from penult.core.ifcb import BinError, BinReader, find_bins, read_bin, roi_key

NEW = "white/D2013/D201305/D20130526/D20130526T095207_IFCB013"
OLD = "data/2012/IFCB5_2012_028/IFCB5_2012_028_081515"


@pytest.fixture
def ifcb(data_dir: Path) -> Path:
    return data_dir / "ifcb"


def _adc(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return [r for r in csv.reader(f) if r]


@pytest.mark.parametrize(("name", "cols", "base"), [(NEW, (15, 16, 17), 0), (OLD, (11, 12, 13), 1)])
def test_every_roi_of_a_real_bin_is_its_bytes_in_the_roi_file(ifcb, name, cols, base) -> None:
    """New-style bins count start bytes from 0, old-style (IFCB1-6) from 1; ROIs are named by
    their ADC row, and a trigger with two ROIs has two rows."""
    stem = ifcb / name
    b = read_bin(stem)
    rows = _adc(Path(f"{stem}.adc"))
    want = [(i, int(r[cols[0]]), int(r[cols[1]]), int(r[cols[2]]) - base)
            for i, r in enumerate(rows, 1) if int(r[cols[0]]) > 0]  # fmt: skip
    assert [(r.number, r.width, r.height, r.offset) for r in b.rois] == want
    assert b.triggers == len(rows)
    raw = Path(f"{stem}.roi").read_bytes()
    with BinReader(b) as reader:
        for roi in b.rois:
            px = reader.pixels(roi)
            assert px.shape == (roi.height, roi.width) and px.dtype == np.uint8
            assert px.tobytes() == raw[roi.offset : roi.offset + roi.nbytes]
            assert 20 < px.mean() < 250  # a greyscale photo, not zeros or noise from a wrong offset
    assert roi_key(b.pid, 7) == f"{b.pid}_00007"


def test_the_header_gives_time_instrument_and_volume_analysed(ifcb) -> None:
    b = read_bin(ifcb / NEW)
    assert (b.instrument, b.time) == (13, "2013-05-26T09:52:07Z")
    # 0.25 mL/min for runTime - inhibitTime seconds (the header says 1231.024861 and 11.622980)
    assert b.volume_ml == pytest.approx(0.25 * (1231.024861 - 11.622980) / 60)
    old = read_bin(ifcb / OLD)
    assert (old.instrument, old.time) == (5, "2012-01-28T08:15:15Z")  # day 28 of 2012
    assert 0 < old.volume_ml < 5  # a 5 mL syringe at most; here a few triggers' worth


def test_find_bins_lists_bins_and_leaves_stray_files_alone(ifcb) -> None:
    bins, problems = find_bins(ifcb)
    names = sorted(p.name for p in bins)
    assert names.count("IFCB5_2012_028_081515") == 2  # the real bin and the one missing .roi
    assert "D20130526T095207_IFCB013" in names and "decoy" not in " ".join(names)
    assert problems == []


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("partial/IFCB5_2012_028_081515", r"\.roi: missing \(6 ROIs"),
        ("empty/D20150411T205456_IFCB012", r"\.adc: no triggers"),
        ("empty/IFCB5_2017_001_033645", r"\.adc: no triggers"),
        ("invalid/D20130101T101010_IFCB099", r"\.hdr: empty file"),
        ("data/skip/IFCB5_2006_001_121212", r"\.hdr: empty file"),
    ],
)
def test_bad_bins_are_errors_that_name_the_file_and_the_problem(ifcb, name, why) -> None:
    with pytest.raises(BinError, match=why):
        read_bin(ifcb / name)


def test_a_truncated_roi_file_fails_only_the_rois_past_its_end(ifcb, tmp_path: Path) -> None:
    for s in (".hdr", ".adc", ".roi"):
        shutil.copy(f"{ifcb / NEW}{s}", tmp_path / f"D20130526T095207_IFCB013{s}")
    stem = tmp_path / "D20130526T095207_IFCB013"
    full = read_bin(stem)
    cut = full.rois[10].offset + 5
    Path(f"{stem}.roi").write_bytes(Path(f"{stem}.roi").read_bytes()[:cut])
    b = read_bin(stem)
    assert "truncated" in b.notes[0] and "from ROI" in b.notes[0]
    with BinReader(b) as reader:
        assert reader.pixels(b.rois[9]).shape == (b.rois[9].height, b.rois[9].width)
        with pytest.raises(BinError, match=f"ROI {b.rois[10].number} needs bytes"):
            reader.pixels(b.rois[10])


def test_a_bin_that_grows_lists_its_new_rois(ifcb, tmp_path: Path) -> None:
    """The instrument still writing: a bin read again lists the ROIs added since, and the first
    ones are the same (same numbers, offsets and bytes)."""
    src = ifcb / NEW
    stem = tmp_path / "D20130526T095207_IFCB013"
    shutil.copy(f"{src}.hdr", f"{stem}.hdr")
    lines = Path(f"{src}.adc").read_text().splitlines(keepends=True)
    Path(f"{stem}.adc").write_text("".join(lines[:60]))
    shutil.copy(f"{src}.roi", f"{stem}.roi")
    early = read_bin(stem)
    Path(f"{stem}.adc").write_text("".join(lines))
    later = read_bin(stem)
    assert later.rois[: len(early.rois)] == early.rois and len(later.rois) > len(early.rois)


def _roi_hashes(stem: Path, cols: tuple[int, int, int], base: int) -> dict[str, str]:
    """ROI name -> SHA-256 of its bytes in the .roi, from the .adc read here (not by penult)."""
    import hashlib

    raw = Path(f"{stem}.roi").read_bytes()
    out = {}
    for i, r in enumerate(_adc(Path(f"{stem}.adc")), 1):
        w, h, start = int(r[cols[0]]), int(r[cols[1]]), int(r[cols[2]]) - base
        if w > 0:
            out[f"{stem.name}_{i:05d}"] = hashlib.sha256(raw[start : start + w * h]).hexdigest()
    return out


def test_extract_reads_bins_records_bad_ones_and_skips_what_is_stored(ifcb, tmp_path) -> None:
    from penult.extract import ExtractOptions, extract, list_images
    from penult.features import FeatureStore

    listing = list_images(ifcb)
    store = tmp_path / "ifcb.h5"
    s = extract(store, listing, ExtractOptions(progress=False))
    assert (s.extracted, len(s.failed)) == (25, 5)  # 19 + 6 ROIs; 5 bins that cannot be read
    why = dict(s.failed)
    assert "roi: missing (6 ROIs" in why["partial/IFCB5_2012_028_081515"]
    assert "no triggers" in why["empty/D20150411T205456_IFCB012"]
    assert "empty file" in why["invalid/D20130101T101010_IFCB099"]

    t = FeatureStore(store).images()
    want = _roi_hashes(ifcb / NEW, (15, 16, 17), 0) | _roi_hashes(ifcb / OLD, (11, 12, 13), 1)
    got = {Path(p).name: sha for p, sha, e in zip(t.path, t.sha256, t.error, strict=True) if not e}
    assert got == want  # every ROI stored, hashed over exactly its bytes in the .roi
    row = t.path.index(f"{NEW}_00007")
    assert (t.width[row], t.height[row]) == (88, 34)  # the .adc's width and height
    assert t.labels["sample"][row] == "D20130526T095207_IFCB013"
    assert float(t.labels["volume_ml"][row]) == pytest.approx(5.08084, rel=1e-5)
    assert t.labels["time"][row] == "2013-05-26T09:52:07Z"

    again = extract(store, list_images(ifcb), ExtractOptions(progress=False))
    assert (again.extracted, again.skipped) == (0, 25)


def test_a_bin_that_grew_embeds_only_its_new_rois(ifcb, tmp_path) -> None:
    from penult.extract import ExtractOptions, extract, list_images

    src, folder = ifcb / NEW, tmp_path / "bins"
    folder.mkdir()
    stem = folder / src.name
    for s in (".hdr", ".roi"):
        shutil.copy(f"{src}{s}", f"{stem}{s}")
    lines = Path(f"{src}.adc").read_text().splitlines(keepends=True)
    Path(f"{stem}.adc").write_text("".join(lines[:60]))
    store = tmp_path / "s.h5"
    first = extract(store, list_images(folder), ExtractOptions(progress=False))
    Path(f"{stem}.adc").write_text("".join(lines))  # the instrument wrote on
    later = extract(store, list_images(folder), ExtractOptions(progress=False))
    assert first.extracted > 0 and later.skipped == first.extracted
    assert later.extracted == 19 - first.extracted


def test_a_folder_of_images_and_bins_is_refused_with_a_message(ifcb, tmp_path) -> None:
    from penult.extract import list_images
    from penult.extract.sources import SourceError

    for s in (".hdr", ".adc", ".roi"):
        shutil.copy(f"{ifcb / NEW}{s}", tmp_path / f"{Path(NEW).name}{s}")
    (tmp_path / "photo.png").write_bytes(b"")
    with pytest.raises(SourceError, match="both image files .* and IFCB bins"):
        list_images(tmp_path)


def test_serve_shows_rois_that_have_no_file_of_their_own(ifcb, tmp_path, capsys) -> None:
    """Browse, thumbnails, the full image and neighbours of a ROI, straight from its bin."""
    import io

    from penult.classify.web import Site, make_app
    from penult.extract import ExtractOptions, extract, list_images
    from PIL import Image
    from starlette.testclient import TestClient

    store = tmp_path / "ifcb.h5"
    extract(store, list_images(ifcb), ExtractOptions(progress=False))
    c = TestClient(
        make_app(Site(store, "efficientnet_lite0@pad", k=3)), base_url="http://127.0.0.1"
    )
    key = f"{NEW}_00007"
    items = c.get("/api/images", params={"page": 1}).json()["items"]
    assert key in [i["path"] for i in items]
    r = c.get(f"/image/{key}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(r.content)) as im:
        b = read_bin(ifcb / NEW)
        roi = next(x for x in b.rois if x.number == 7)
        with BinReader(b) as reader:
            assert np.array_equal(np.asarray(im), reader.pixels(roi))  # the exact pixels
    t = c.get(f"/thumb/{key}")
    assert t.status_code == 200 and t.content[:2] == b"\xff\xd8"  # a JPEG
    hits = c.get("/api/neighbors", params={"key": key}).json()["hits"]
    assert len(hits) == 3 and key not in [h["path"] for h in hits]
    assert c.get(f"/image/{NEW}_00008").status_code == 404  # row 8 imaged nothing: no such row

    # `penult neighbors` by ROI key, its contact sheet's thumbnails cut from the bin
    from penult.cli import main

    for f in tmp_path.glob("ifcb.h5.*.faiss*"):  # the page built an index: start without one
        f.unlink()
    out, sheet = tmp_path / "nn.csv", tmp_path / "nn.html"
    assert main(["neighbors", str(store), key, "-k", "3", "--out", str(out),
                 "--sheet", str(sheet)]) == 0  # fmt: skip
    assert "no cosine index of efficientnet_lite0@pad yet: building it" in capsys.readouterr().out
    with open(out, newline="") as fh:
        got = [r for r in csv.DictReader(fh)]
    assert [r["neighbor"] for r in got] == [h["path"] for h in hits]  # the page's neighbours
    thumbs = list((tmp_path / "nn_files").glob("*.jpg"))
    assert len(thumbs) == 4 and all(p.stat().st_size > 100 for p in thumbs)  # query + 3


def test_predict_writes_one_score_file_per_bin_as_whois_classifier_does(
    ifcb, tmp_path, hym_store
) -> None:
    from penult.classify import TrainOptions, save_model, train
    from penult.cli import main
    from penult.features import read_scores

    from conftest import copy_store

    store = copy_store(hym_store, tmp_path / "hym.h5")
    save_model(train(store, TrainOptions(quantifier_folds=0, unknown_score="none")).model,
               tmp_path / "m.skops")  # fmt: skip
    out = tmp_path / "scores"
    assert main(["predict", str(tmp_path / "m.skops"), str(ifcb / "white"), str(ifcb / "data"),
                 "--out", str(out), "--format", "ifcb", "-q"]) == 0  # fmt: skip
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "D20130526T095207_IFCB013_class.h5",
        "IFCB5_2012_028_081515_class.h5",
    ]
    for name, stem in (("D20130526T095207_IFCB013", NEW), ("IFCB5_2012_028_081515", OLD)):
        rois, labels, scores = read_scores(out / f"{name}_class.h5")
        assert rois.tolist() == [r.number for r in read_bin(ifcb / stem).rois]
        assert labels == ["ants", "bees"] and scores.shape == (len(rois), 2)
        assert np.allclose(scores.sum(1), 1, atol=1e-4)  # every class's score, not only the top
    with h5py.File(out / "D20130526T095207_IFCB013_class.h5", "r") as f:  # as the Dashboard reads
        assert h5py.check_string_dtype(f["class_labels"].dtype).encoding == "ascii"
        assert f["class_name_auto"].asstr()[0] in ("ants", "bees")
        assert f["classifier_name"].asstr()[()].startswith("penult ")

    # count: a bin is a sample, its concentration per mL from the header's volume analysed
    assert main(["count", str(tmp_path / "m.skops"), str(ifcb / "white"), str(ifcb / "data"),
                 "--out", str(tmp_path / "c.csv"), "--no-plot", "-q"]) == 0  # fmt: skip
    with open(tmp_path / "c_per_ml.csv", newline="") as fh:
        rows = {r["sample"]: r for r in csv.DictReader(fh)}
    new = rows["D20130526T095207_IFCB013"]
    assert float(new["volume_ml"]) == pytest.approx(5.08084, rel=1e-5)
    per_ml = float(new["ants"]) + float(new["bees"]) + float(new["unclassified"])
    assert per_ml == pytest.approx(19 / 5.08084, rel=1e-4)  # its 19 ROIs in 5.08 mL
    assert rows["IFCB5_2006_001_121212"]["ants"] == ""  # an unreadable bin: no concentration


def test_bins_on_a_dask_cluster_equal_a_single_process(ifcb, tmp_path, capsys) -> None:
    """`extract --cluster local:1` on a folder of bins listed in three pieces (6, 5 and 20
    rows; each piece's partitions run and are published before the next): partitions of ROIs
    embedded by Dask workers (each opening its bins itself) give the rows, embeddings and
    failures of one process."""
    pytest.importorskip("distributed")
    from penult import cli
    from penult.features import FeatureStore

    args = [str(ifcb), "--precision", "fp32", "--workers", "0"]
    one, many = tmp_path / "one.h5", tmp_path / "many.h5"
    assert cli.main(["extract", str(one), *args, "-q"]) == 0
    dask = ["--cluster", "local:1", "--partition-size", "8", "--list-chunk", "4"]
    assert cli.main(["extract", str(many), *args, *dask]) == 0
    assert "extract (cluster)" in capsys.readouterr().err  # through Dask, in partitions

    def rows(store: Path) -> dict[str, tuple[str, str, np.ndarray | None]]:
        fs = FeatureStore(store)
        t = fs.images()
        (name,) = fs.backbones()
        valid, x = fs.features(name)
        emb = dict(zip(valid.tolist(), x, strict=True))
        cols = zip(t.path, t.sha256, t.error, strict=True)
        return {p: (sha, err, emb.get(i)) for i, (p, sha, err) in enumerate(cols)}

    a, b = rows(one), rows(many)
    assert sorted(a) == sorted(b) and len(a) == 30  # 25 ROIs and 5 bins that failed
    for p, (sha, err, x) in a.items():
        assert b[p][:2] == (sha, err), p
        if x is None:
            assert b[p][2] is None, p
        else:
            np.testing.assert_allclose(b[p][2], x, atol=1e-5)
