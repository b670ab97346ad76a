"""Listing inputs: folder trees, flat folders, manifests, file lists, taxonomy and split joins."""

from __future__ import annotations

from pathlib import Path

import pytest
from penult.extract import SourceError, list_images


def _touch(root: Path, *rels: str) -> None:
    for r in rels:
        (root / r).parent.mkdir(parents=True, exist_ok=True)
        (root / r).write_bytes(b"x")


def test_imagefolder_labels_and_nested_levels(tmp_path: Path) -> None:
    _touch(
        tmp_path,
        "Parulidae/Setophaga/warbler_a/1.jpg",
        "Parulidae/Setophaga/warbler_b/2.png",
        "Icteridae/Agelaius/blackbird/3.JPG",
    )
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "taxonomy.csv").write_text(
        "class,genus\nblackbird,Agelaius\nwarbler_a,Setophaga\nwarbler_b,Setophaga\n"
    )
    listing = list_images(tmp_path)
    assert listing.paths == sorted(listing.paths) and len(listing) == 3
    assert listing.labels["genus"] == ["Agelaius", "Setophaga", "Setophaga"]
    assert any("taxonomy taxonomy.csv: added genus" in n for n in listing.notes)  # used, said
    assert listing.labels["label"] == ["blackbird", "warbler_a", "warbler_b"]
    assert listing.labels["level0"] == ["Icteridae", "Parulidae", "Parulidae"]
    assert listing.labels["level1"] == ["Agelaius", "Setophaga", "Setophaga"]
    assert listing.ignored == ["notes.md"]


def test_flat_folder_is_unlabelled_and_file_list_works(tmp_path: Path) -> None:
    _touch(tmp_path, "a.jpg", "b.jpg")
    assert list_images(tmp_path).labels == {}
    lst = tmp_path / "files.txt"
    lst.write_text("# my picks\nb.jpg\n\na.jpg\n")
    listing = list_images(lst)
    assert listing.paths == ["a.jpg", "b.jpg"] and listing.root == tmp_path.resolve()


def test_manifest_with_coarse_columns_taxonomy_and_split(tmp_path: Path) -> None:
    _touch(tmp_path, "img/1.jpg", "img/2.jpg")
    (tmp_path / "m.csv").write_text("path,class,site\nimg/2.jpg,b,north\nimg/1.jpg,a,south\n")
    (tmp_path / "tax.csv").write_text("class,genus,family\na,Ga,Fa\nb,Gb,Fa\n")
    (tmp_path / "split.csv").write_text("path,split\nimg/1.jpg,train\nimg/2.jpg,test\n")
    listing = list_images(
        tmp_path / "m.csv", taxonomy=tmp_path / "tax.csv", split=tmp_path / "split.csv"
    )
    assert listing.paths == ["img/1.jpg", "img/2.jpg"]
    assert listing.labels == {
        "label": ["a", "b"], "site": ["south", "north"], "genus": ["Ga", "Gb"], "family": ["Fa", "Fa"], "split": ["train", "test"],
    }  # fmt: skip


@pytest.mark.parametrize(
    "content, message",
    [
        ("path,label\na.jpg,x\na.jpg,y\n", "repeats 'a.jpg'"),
        ("path,label\n,x\n", "empty 'path'"),
        ("", "empty CSV"),
        ("path,label\n", "lists no images"),
    ],
)
def test_bad_manifests_are_explained(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(SourceError, match=message):
        list_images(tmp_path / "m.csv")


def test_real_cub_folder_picks_up_taxonomy_and_split(data_dir: Path) -> None:
    listing = list_images(data_dir / "cub100")
    assert len(listing) == 5902 and len(set(listing.labels["label"])) == 100
    assert {"genus", "family", "order", "split"} <= set(listing.labels)
    assert listing.labels["split"].count("train") == 2999
