"""EcoTaxa exports as input (issue 33, part 2), on an export-shaped folder of real plankton
images: the TSV with its typed second header line, categories, hierarchy, statuses, samples and
metadata; odd rows (a missing image, no category, an unknown status) handled and said."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from penult.extract import ExtractOptions, extract, list_images
from penult.features import STATUSES, FeatureStore

CLASSES = {  # ndsb folder -> (EcoTaxa category, its hierarchy above it)
    "copepod_calanoid": ("Calanoida", "living>Eukaryota>Opisthokonta>Arthropoda>Copepoda"),
    "diatom_chain_string": ("Bacillariophyta", "living>Eukaryota>Harosa>Stramenopiles>Ochrophyta"),
}
HEAD = ["object_id", "img_file_name", "object_annotation_category", "object_annotation_hierarchy",
        "object_annotation_status", "object_area", "sample_id", "acq_instrument"]  # fmt: skip
TYPES = ["[t]", "[t]", "[t]", "[t]", "[t]", "[f]", "[t]", "[t]"]


def _export(data_dir: Path, out: Path) -> dict[str, tuple[str, str]]:
    """An export folder: images under images/, ecotaxa_export.tsv; returns object id ->
    (status as written, category)."""
    (out / "images").mkdir(parents=True)
    lines, made = ["\t".join(HEAD), "\t".join(TYPES)], {}
    statuses = ["validated", "V", "predicted", "dubious", "P", "D"]
    for folder, (cat, above) in CLASSES.items():
        files = sorted((data_dir / "ndsb_plankton" / folder).iterdir())[:6]
        for k, f in enumerate(files):
            oid = f"{folder}_{k}"
            shutil.copy(f, out / "images" / f"{oid}.jpg")
            st = statuses[k]
            lines.append("\t".join([oid, f"images/{oid}.jpg", cat, f"{above}>{cat}", st,
                                    str(100 + k), f"tow{k % 2}", "FlowCam"]))  # fmt: skip
            made[oid] = (st, cat)
    lines.append("\t".join(["gone", "images/gone.jpg", "Calanoida", "", "validated", "1", "tow0",
                            "FlowCam"]))  # fmt: skip
    lines.append("\t".join(["nocat", "images/copepod_calanoid_0.jpg".replace("_0", "_x"), "", "",
                            "", "1", "tow1", "FlowCam"]))  # fmt: skip
    shutil.copy(
        out / "images" / "copepod_calanoid_0.jpg", out / "images" / "copepod_calanoid_x.jpg"
    )
    lines.append("\t".join(["odd", "images/odd.jpg", "Calanoida", "", "maybe", "1", "tow1",
                            "FlowCam"]))  # fmt: skip
    shutil.copy(out / "images" / "copepod_calanoid_1.jpg", out / "images" / "odd.jpg")
    (out / "ecotaxa_export.tsv").write_text("\n".join(lines) + "\n")
    return made


def test_an_export_lists_labels_levels_statuses_samples_and_says_what_was_odd(
    data_dir: Path, tmp_path: Path
) -> None:
    made = _export(data_dir, tmp_path / "export")
    listing = list_images(tmp_path / "export" / "ecotaxa_export.tsv")
    assert len(listing) == 12 + 3
    at = {oid: i for i, oid in enumerate(listing.labels["object_id"])}
    for oid, (st, cat) in made.items():
        i = at[oid]
        full = {"v": "validated", "p": "predicted", "d": "dubious"}.get(st.lower(), st)
        assert listing.status[i] == full
        assert listing.labels["label"][i] == ("" if full == "predicted" else cat)
        assert listing.predicted[i] == (cat if full == "predicted" else "")
    i = at["copepod_calanoid_0"]
    assert [listing.labels[f"level{k}"][i] for k in range(5)] == CLASSES["copepod_calanoid"][
        1
    ].split(">")
    assert (
        listing.labels["sample"][i] == "tow0" and listing.labels["acq_instrument"][i] == "FlowCam"
    )
    assert "object_area" not in listing.labels  # a measurement, not a label
    assert listing.status[at["nocat"]] == "" and listing.labels["label"][at["nocat"]] == ""
    assert listing.status[at["odd"]] == "predicted"  # an unknown status is not trusted
    assert any("unknown status" in n and "'maybe'" in n for n in listing.notes)


def test_extracting_an_export_keeps_statuses_and_records_the_missing_image(
    data_dir: Path, tmp_path: Path
) -> None:
    made = _export(data_dir, tmp_path / "export")
    store = tmp_path / "s.h5"
    s = extract(store, list_images(tmp_path / "export" / "ecotaxa_export.tsv"),
                ExtractOptions(progress=False))  # fmt: skip
    assert [p for p, _ in s.failed] == ["images/gone.jpg"]
    assert "not found" in s.failed[0][1]
    fs = FeatureStore(store)
    t = fs.images()
    status = fs.statuses("label")
    pred = fs.predictions("label")
    for oid, (st, cat) in made.items():
        r = t.path.index(f"images/{oid}.jpg")
        full = {"v": "validated", "p": "predicted", "d": "dubious"}.get(st.lower(), st)
        assert STATUSES[status[r]] == full, oid
        assert pred.labels[r, 0] == (cat if full == "predicted" else "")
    # a second run changes nothing: no new history, no second prediction batch
    before = len(fs.history())
    again = extract(store, list_images(tmp_path / "export" / "ecotaxa_export.tsv"),
                    ExtractOptions(progress=False))  # fmt: skip
    assert again.extracted == 0 and len(FeatureStore(store).history()) == before


def test_an_export_zip_is_unpacked_beside_it_and_read(data_dir: Path, tmp_path: Path) -> None:
    _export(data_dir, tmp_path / "export")
    archive = tmp_path / "ecotaxa_tow.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted((tmp_path / "export").rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(tmp_path / "export").as_posix())
    listing = list_images(archive)
    assert len(listing) == 15 and (tmp_path / "ecotaxa_tow" / "ecotaxa_export.tsv").is_file()
    assert any("unpacked" in n for n in listing.notes)
    bad = tmp_path / "evil.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("../outside.tsv", "img_file_name\n")
    with pytest.raises(Exception, match="outside"):
        list_images(bad)
    assert not (tmp_path / "outside.tsv").exists()
    assert np.array_equal(np.array(listing.paths), np.sort(listing.paths))


def test_predictions_go_out_as_an_ecotaxa_tsv_our_reader_reads_back(
    data_dir: Path, tmp_path: Path, hym_store: Path
) -> None:
    """EcoTaxa TSV in, `penult predict --format ecotaxa` out, read back by our own reader: the
    same object ids, status predicted, a category of the model's and images that exist."""
    from penult.classify import TrainOptions, save_model, train
    from penult.cli import main
    from penult.core.ecotaxa import read_tsv

    from conftest import copy_store

    made = _export(data_dir, tmp_path / "export")
    store = copy_store(hym_store, tmp_path / "hym.h5")
    save_model(train(store, TrainOptions(quantifier_folds=0, unknown_score="none")).model,
               tmp_path / "m.skops")  # fmt: skip
    out = tmp_path / "export" / "predicted.tsv"
    tsv = tmp_path / "export" / "ecotaxa_export.tsv"
    assert main(["predict", str(tmp_path / "m.skops"), str(tsv), "--out", str(out),
                 "--format", "ecotaxa", "-q"]) == 0  # fmt: skip
    assert out.read_text().splitlines()[1].split("\t")[:5] == ["[t]", "[t]", "[t]", "[t]", "[f]"]
    back = read_tsv(out)
    assert sorted(back.ids) == sorted([*made, "nocat", "odd"])  # the missing image is not an object
    assert set(back.status) == {"predicted"} and set(back.category) <= {"ants", "bees"}
    assert all((out.parent / p).is_file() for p in back.images)
    assert set(back.sample) == {"tow0", "tow1"}
    lines = out.read_text().splitlines()
    score = lines[0].split("\t").index("object_score")
    scores = [float(ln.split("\t")[score]) for ln in lines[2:]]
    assert len(scores) == len(back.ids) and all(0.5 <= v <= 1 for v in scores)  # two classes
