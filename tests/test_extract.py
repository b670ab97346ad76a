"""End-to-end extraction on real photos: resume, changes, reuse, several backbones, bad input, CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from penult.cli import main
from penult.extract import ExtractOptions, build_backbone, extract, list_images
from penult.extract.images import decode_image
from penult.extract.loader import make_loader, preprocess_image
from penult.features import FeatureStore, FingerprintMismatchError, check, describe
from PIL import Image

FAST = ExtractOptions(progress=False, workers=1, batch_size=8, precision="fp32")


def _opts(**kw) -> ExtractOptions:
    return ExtractOptions(**{**FAST.__dict__, **kw})


def test_extract_matches_direct_model_and_resumes(small_folder: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    s1 = extract(store, list_images(small_folder), FAST)
    assert (s1.listed, s1.extracted, s1.skipped, s1.failed) == (12, 12, 0, [])
    fs = FeatureStore(store)
    t = fs.images()
    assert set(t.label_array()) == {"ants", "bees"} and all(len(h) == 64 for h in t.sha256)
    # reference: the same backbone applied by hand to two images
    bb = build_backbone("efficientnet_lite0")
    x = torch.stack(
        [
            preprocess_image(decode_image((small_folder / p).read_bytes()), bb.preprocess)
            for p in t.path[:2]
        ]
    )
    with torch.inference_mode():
        want = bb.module(x).numpy()
    np.testing.assert_allclose(
        fs.embeddings("efficientnet_lite0", [0, 1]), want, rtol=1e-4, atol=1e-4
    )
    # second run: nothing to do
    s2 = extract(store, list_images(small_folder), FAST)
    assert (s2.extracted, s2.skipped) == (0, 12)


def test_changed_new_and_renamed_files(small_folder: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    extract(store, list_images(small_folder), FAST)
    before = FeatureStore(store)
    e_before = before.embeddings("efficientnet_lite0")
    ants = sorted((small_folder / "ants").iterdir())
    Image.open(ants[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        ants[0], "JPEG"
    )  # changed content
    shutil.move(ants[1], small_folder / "bees" / "moved.jpg")  # same bytes, new path and label
    bees = sorted((small_folder / "bees").iterdir())
    shutil.copy(ants[2], small_folder / "ants" / "zz_new.jpg")  # duplicate content, new path
    Image.open(bees[0]).rotate(90).save(small_folder / "bees" / "new.jpg")  # brand-new image
    s = extract(store, list_images(small_folder), FAST)
    assert s.extracted == 2  # the changed file and the new one; the rest reused or skipped
    assert s.reused == 2 and s.skipped == 10
    after = FeatureStore(store)
    t = after.images()
    idx = t.index()
    e = after.embeddings("efficientnet_lite0")
    old_idx = before.images().index()
    assert not np.allclose(
        e[idx[f"ants/{ants[0].name}"]], e_before[old_idx[f"ants/{ants[0].name}"]]
    )
    np.testing.assert_array_equal(
        e[idx["bees/moved.jpg"]], e_before[old_idx[f"ants/{ants[1].name}"]]
    )
    assert t.labels["label"][idx["bees/moved.jpg"]] == "bees"
    assert check(store) == []
    # an edited manifest relabels a stored image: the summary says so, not "already stored" alone
    m = tmp_path / "m.csv"
    rows = [f"{q},{'bees' if q == f'ants/{ants[2].name}' else q.split('/')[0]}" for q in t.path]
    m.write_text("path,label\n" + "\n".join(rows) + "\n")
    again = extract(store, list_images(m, root=small_folder), FAST)
    assert again.extracted == 0 and again.relabelled == {"label": 1}
    assert "labels changed for stored images: label 1" in again.report()


def test_several_backbones_and_fingerprint_refusal(small_folder: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    listing = list_images(small_folder)
    extract(store, listing, FAST)
    extract(store, listing, _opts(backbone="resnet18", weights="random"))
    entries = FeatureStore(store).backbones()
    assert {n: e.dim for n, e in entries.items()} == {
        "efficientnet_lite0": 1280,
        "resnet18@random": 512,
    }
    assert all(e.count == 12 for e in entries.values())
    other = tmp_path / "other.pth"
    torch.manual_seed(5)
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), other)
    with pytest.raises(FingerprintMismatchError, match="weights_sha256"):
        extract(
            store, listing, _opts(backbone="resnet18", weights=str(other), name="resnet18@random")
        )
    assert FeatureStore(store).backbones()["resnet18@random"].count == 12


def test_bad_files_are_recorded_and_the_run_goes_on(
    small_folder: Path, tmp_path: Path, data_dir: Path
) -> None:
    bad = small_folder / "ants"
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "notes.jpg").write_text("not an image")
    full = (data_dir / "cub100/001.Black_footed_Albatross/0000.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(full[: len(full) // 3])
    shutil.copy(data_dir / "hymenoptera/ants/imageNotFound.gif", bad / "placeholder.gif")
    Image.new("1", (20000, 10000)).save(bad / "bomb.png")
    (bad / "broken_link.jpg").symlink_to(tmp_path / "nowhere.jpg")
    Image.new("I;16", (50, 40)).save(bad / "sixteen.png")  # odd mode but fine
    Image.new("CMYK", (50, 40)).save(bad / "cmyk.jpg")
    (bad / "README.txt").write_text("ignored: not an image suffix")
    store = tmp_path / "s.h5"
    s = extract(store, list_images(small_folder), FAST)
    why = dict(s.failed)
    assert s.extracted == 14 and len(why) == 6
    assert "empty" in why["ants/zero.jpg"] and "not an image" in why["ants/notes.jpg"]
    assert "truncated" in why["ants/truncated.jpg"] and "placeholder" in why["ants/placeholder.gif"]
    assert "too large" in why["ants/bomb.png"] and "not found" in why["ants/broken_link.jpg"]
    assert s.ignored == ["ants/README.txt"]
    report = s.report()
    assert "FAILED ants/bomb.png" in report
    assert "failed images" in describe(store) and "ants/zero.jpg: empty file" in describe(store)
    again = extract(store, list_images(small_folder), FAST)
    assert (
        again.extracted == 0 and again.previously_failed == 5
    )  # the broken link is re-checked each run
    assert check(store) == []


def test_taxonomy_and_split_are_stored(data_dir: Path, tmp_path: Path) -> None:
    from conftest import cub_manifest

    manifest = cub_manifest(data_dir, tmp_path / "m.csv", classes=2, per_class=3)
    listing = list_images(
        manifest, root=data_dir / "cub100", taxonomy=data_dir / "cub100/taxonomy.csv"
    )
    store = tmp_path / "s.h5"
    extract(store, listing, FAST)
    t = FeatureStore(store).images()
    assert t.labels["family"][0] == "Diomedeidae" and t.labels["genus"][0] == "Phoebastria"
    assert set(t.labels["split"]) <= {"train", "test"}


def test_loader_decodes_ahead_in_worker_processes(data_dir: Path, tmp_path: Path) -> None:
    """With 2 workers and a prefetch of 4 (8 batches in flight), every batch after the first
    is read while the consumer still works on the first: files deleted meanwhile come back
    decoded. Read in this process (no workers), the same deletions are failures."""
    import shutil
    import time

    from penult.extract.registry import get_spec

    pre = get_spec("resnet18").preprocess()

    def after_deleting(workers: int) -> tuple[int, int]:
        folder = tmp_path / f"w{workers}"
        folder.mkdir()
        files = []
        for i, src in enumerate(sorted((data_dir / "cub100").rglob("*.jpg"))[:32]):
            files.append(str(shutil.copy(src, folder / f"{i:02d}.jpg")))
        it = iter(make_loader(files, pre, batch_size=4, workers=workers, prefetch=4))
        next(it)
        time.sleep(3.0 if workers else 0.0)  # the consumer busy with the first batch
        for f in files[4:]:
            os.remove(f)
        batches = list(it)
        return sum(len(b.indices) for b in batches), sum(len(b.failed) for b in batches)

    assert after_deleting(2) == (28, 0)
    assert after_deleting(0) == (0, 28)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "penult.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["extract", "{tmp}/s.h5", "{tmp}/missing"], "no such file or folder"),
        (["extract", "{tmp}/s.h5", "{tmp}/empty"], "no image files found"),
        (
            ["extract", "{tmp}/s.h5", "{small}", "--backbone", "resnet5"],
            "unknown backbone 'resnet5'. Did you mean",
        ),
        (["info", "{tmp}/nothing.h5"], "no such feature store"),
        (["predict", "{tmp}/m.skops", "{tmp}/missing", "--out", "{tmp}/o.csv"], "no such file"),
    ],
)
def test_cli_errors_are_one_line(args, message, tmp_path: Path, small_folder: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    argv = [a.format(tmp=tmp_path, small=small_folder) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and err.startswith("penult: error:")
    assert not (tmp_path / "s.h5").exists()


def test_cli_extract_info_check(small_folder: Path, tmp_path: Path) -> None:
    r = _cli("extract", str(tmp_path / "s.h5"), str(small_folder), "-q", "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    assert "extracted 12" in r.stdout
    info = _cli("info", str(tmp_path / "s.h5"))
    assert (
        "efficientnet_lite0: 12/12 embedded, dim 1280" in info.stdout
        and "labels[label]" in info.stdout
    )
    assert _cli("check", str(tmp_path / "s.h5")).returncode == 0
    (tmp_path / "junk.h5").write_bytes(b"junk")
    bad = _cli("check", str(tmp_path / "junk.h5"))
    assert bad.returncode == 1 and "cannot open" in bad.stdout
