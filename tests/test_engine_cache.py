"""The engine cache is checked against what it stands for before it is trusted: an export copied
over another's name, one cut short, an edited identity record and a calibration file that is
not an object are found and made again (said in the run's summary), never used; an export that
disagrees with torch is never kept; an unwritable cache says so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from penult.core import OptionError
from penult.extract import ExtractOptions, build_backbone, extract, list_images
from penult.extract import engines as eng
from penult.extract.embed import make_embedder
from penult.extract.model import identity_dir
from penult.features import FeatureStore

from conftest import real_batch


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A cache of this test's own: what one test tampers with, no other test reads."""
    d = tmp_path / "engine-cache"
    monkeypatch.setenv("PENULT_ENGINE_CACHE", str(d))
    eng.cache_notes()  # nothing left over from another test
    return d


def _runtime(bb, x) -> np.ndarray:
    return make_embedder(bb, engine="onnxruntime", precision="fp32")(x)


def test_an_export_of_another_network_under_the_cached_name_is_not_used(data_dir) -> None:
    real = build_backbone("efficientnet_lite0")
    other = build_backbone("efficientnet_lite0", weights="random", seed=3)  # same shapes
    x = real_batch(data_dir, real.preprocess)
    want = make_embedder(real, engine="torch", precision="fp32")(x)
    theirs, ours = eng.onnx_file(other), eng.onnx_file(real)
    for suffix in ("", ".json"):  # the file and its record, both copied over
        shutil.copy(f"{theirs}{suffix}", f"{ours}{suffix}")
    got = _runtime(real, x)
    assert eng.lowest_cosine(want, got) >= 0.999  # ours again, not the random network
    assert any("made for another network" in n for n in eng.cache_notes())
    shutil.copy(theirs, ours)  # the file alone, with our record: its bytes do not match
    assert eng.lowest_cosine(want, _runtime(real, x)) >= 0.999
    assert any("bytes changed" in n for n in eng.cache_notes())


def test_a_truncated_export_is_exported_again_and_the_summary_says_so(data_dir, tmp_path):
    bb = build_backbone("efficientnet_lite0")
    path = eng.onnx_file(bb)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a kill, a full disk
    root = tmp_path / "imgs"
    root.mkdir()
    for f in sorted((data_dir / "hymenoptera" / "ants").glob("*.jpg"))[:3]:
        shutil.copy(f, root / f.name)
    s = extract(tmp_path / "s.h5", list_images(str(root)),
                ExtractOptions(progress=False, workers=0, engine="onnxruntime", precision="fp32"))  # fmt: skip
    assert s.extracted == 3 and "engine cache: cached export" in s.report()
    assert "exported again" in s.report()
    x = FeatureStore(tmp_path / "s.h5").embeddings("efficientnet_lite0")
    assert np.isfinite(x).all()


def test_an_edited_identity_record_is_not_trusted(cache) -> None:
    first = build_backbone("efficientnet_lite0")
    (record,) = identity_dir().glob("*.json")
    r = json.loads(record.read_text())
    r["preprocess"].update(resize=640, interpolation="bilinear")  # the fingerprint still says 256
    record.write_text(json.dumps(r))
    again = build_backbone("efficientnet_lite0")
    assert again.preprocess == first.preprocess and again.preprocess.resize != 640
    assert any("identity record" in n for n in eng.cache_notes())
    r["fingerprint"]["preprocessing"]["resize"] = 640  # both edited alike: still not what the
    r["preprocess"]["resize"] = 640  # options make, so still rebuilt
    record.write_text(json.dumps(r))
    assert build_backbone("efficientnet_lite0").preprocess == first.preprocess


def test_an_export_that_disagrees_with_torch_is_not_kept(monkeypatch, cache) -> None:
    bb = build_backbone("resnet18", weights="random", seed=7)
    other = build_backbone("resnet18", weights="random", seed=8).module
    real_export = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda m, *a, **k: real_export(other, *a, **k))
    with pytest.raises(eng.EngineError, match="disagrees with torch"):
        eng.onnx_file(bb)
    assert not list(cache.glob("resnet18-*"))


def test_an_unwritable_cache_says_so(tmp_path, monkeypatch) -> None:
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("PENULT_ENGINE_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(eng.EngineError, match="engine cache .* cannot be written.*PENULT_ENGINE"):
        eng.onnx_file(build_backbone("resnet18", weights="random"))


@pytest.mark.parametrize("text", ["[1, 2]", '"x"', '{"k": [1]}', "not json"])
def test_a_calibration_file_that_is_not_an_object_is_measured_again(cache, text) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "calibration.json").write_text(text)
    x = np.zeros((1, 3, 4, 4), np.uint8)
    assert eng.calibrate({"m": 1}, {"only": lambda: lambda a: a}, x)[::2] == ("only", False)
    assert eng.calibrate({"m": 1}, {"only": lambda: lambda a: a}, x)[::2] == ("only", True)


def test_entry_suffixes_are_made_by_options_not_by_name() -> None:
    with pytest.raises(OptionError, match="@random: --weights random"):
        build_backbone("efficientnet_lite0@random")
    with pytest.raises(
        OptionError, match="these options make efficientnet_lite0$|make efficientnet_lite0\\."
    ):
        build_backbone("efficientnet_lite0@pad")
    assert (
        build_backbone("efficientnet_lite0@random", weights="random").name
        == "efficientnet_lite0@random"
    )
    assert build_backbone("efficientnet_lite0@pad", resize="pad").name == "efficientnet_lite0@pad"


def test_a_runtime_that_disagrees_with_the_recorded_torch_output_is_refused(monkeypatch) -> None:
    """Each runtime built is run on the three probe images and compared with torch's embeddings
    of them, recorded at export: a runtime that computes another network (a stale compiled
    model, a runtime bug) is refused, and the export is removed to be made again."""
    real = build_backbone("efficientnet_lite0")
    other = build_backbone("efficientnet_lite0", weights="random", seed=3)
    ours, theirs = eng.onnx_file(real), eng.onnx_file(other)
    assert eng.make_runner("onnxruntime", ours, 1) is not None  # agrees: built
    build = eng._ort_runner
    monkeypatch.setattr(eng, "_ort_runner", lambda path, *a: build(theirs, *a))
    with pytest.raises(eng.EngineError, match="disagrees with torch's recorded output"):
        eng.make_runner("onnxruntime", ours, 1)
    assert not ours.exists()
