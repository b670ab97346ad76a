"""One taxonomy reader and one split maker for extract, train and finetune: the same odd CSV
gives every command the same labels, or the same error."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from penult import cli
from penult.core import LabelError, read_taxonomy
from penult.features import FeatureStore

from conftest import copy_store, cub_manifest


def _odd_csv(path: Path, genus: dict[str, str], drop: str | None = None) -> Path:
    """`Class,Genus` in odd case, with spaces around names and values."""
    rows = [" Class , Genus "] + [f"  {c} ,  {g}  " for c, g in genus.items() if c != drop]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_one_odd_taxonomy_gives_the_same_labels_or_error_to_all_three_commands(
    cub_store: Path, data_dir: Path, tmp_path: Path, capsys
) -> None:
    import penult.extract.finetune as ft

    store = tmp_path / "c.h5"
    copy_store(cub_store, store)
    labels = FeatureStore(store).images().labels["label"]
    genus = {c: f"G {i % 4}" for i, c in enumerate(sorted(set(labels)))}  # not cub's own genera
    odd = _odd_csv(tmp_path / "odd.csv", genus)
    tax = read_taxonomy(odd)
    assert tax.levels == ("genus",) and tax.column("GENUS", ["x"] * 0) == []

    # extract: the genus column of the store
    manifest = cub_manifest(data_dir, tmp_path / "m.csv", classes=2, per_class=2)
    small = tmp_path / "e.h5"
    root = ["--root", str(data_dir / "cub100"), "-q"]
    assert cli.main(["extract", str(small), str(manifest), *root, "--taxonomy", str(odd)]) == 0
    t = FeatureStore(small).images()
    assert t.labels["genus"] == [genus[c] for c in t.labels["label"]]
    # train: the taxonomy paths in the model's manifest
    model = tmp_path / "m.skops"
    assert cli.main(["train", str(store), "--out", str(model), "--taxonomy", str(odd), "--levels", "genus"]) == 0  # fmt: skip
    paths = json.loads(Path(f"{model}.json").read_text())["paths"]
    assert {c: g for g, c in paths} == genus
    # finetune: the coarse classes of its auxiliary loss
    quick = dataclasses.replace(
        ft.FinetuneOptions(), epochs=1, batch_size=16, max_train=32, augment=False,
        balanced=False, warmup_epochs=0, head_init="random", progress=False, unfreeze=2,
        aux_level="Genus", taxonomy=str(odd),
    )  # fmt: skip
    ft.finetune(store, tmp_path / "f.safetensors", quick)
    card = json.loads(Path(tmp_path / "f.safetensors.json").read_text())
    assert set(card["coarse_classes"]) <= set(genus.values())

    # a class missing from the taxonomy: the same one-line error from each command
    dropped = t.labels["label"][0]
    _odd_csv(odd, genus, drop=dropped)
    capsys.readouterr()
    errors = []
    for argv in (
        ["extract", str(tmp_path / "e2.h5"), str(manifest), *root, "--taxonomy", str(odd)],
        ["train", str(store), "--out", str(tmp_path / "m2.skops"), "--taxonomy", str(odd)],
        ["finetune", str(store), "--out", str(tmp_path / "f2.safetensors"), "--aux-level",
         "genus", "--taxonomy", str(odd), "--unfreeze", "2", "-q"],
    ):  # fmt: skip
        assert cli.main(argv) == 2, argv[0]
        errors.append(capsys.readouterr().err.strip().splitlines()[-1])
    want = f"penult: error: {odd}: 1 classes are not in the taxonomy, e.g. {dropped!r}"
    assert errors == [want] * 3
    assert not (tmp_path / "e2.h5").exists()  # refused before anything was written


def test_taxonomy_files_that_cannot_be_used_are_explained(tmp_path: Path) -> None:
    for content, message in [
        ("class\n", "needs a header and rows"),
        ("class,genus,Genus\na,b,c\n", "must be distinct"),
        ("class,genus\na,G1\na,G2\n", "line 3: class 'a' is listed twice"),
    ]:
        (tmp_path / "t.csv").write_text(content)
        with pytest.raises(LabelError, match=message):
            read_taxonomy(tmp_path / "t.csv")
    with pytest.raises(LabelError, match="not a regular file"):
        read_taxonomy(tmp_path)
    (tmp_path / "t.csv").write_text("class,genus\na,G1\n")
    with pytest.raises(LabelError, match=r"no 'family' column \(levels: genus\)"):
        read_taxonomy(tmp_path / "t.csv").column("family", ["a"])
