"""Model files: round trip, manifest, tampering, planted payloads, and fingerprint checks."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from penult.classify import (
    Model,
    ModelError,
    TrainOptions,
    evaluate,
    load_dataset,
    load_model,
    save_model,
    train,
)
from penult.extract import ExtractOptions, extract, list_images
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hier_model(cub_store, tmp_path_factory):
    r = train(cub_store, TrainOptions(levels=("family", "genus"), hierarchical=True))
    path = save_model(r.model, tmp_path_factory.mktemp("m") / "birds.skops")
    return path, r


def test_round_trip_predicts_identically_and_manifest_says_what_it_is(hier_model, cub_store):
    path, r = hier_model
    m = load_model(path)
    d = load_dataset(cub_store, ["efficientnet_lite0"])
    a, b = r.model.predict(d.X), m.predict(d.X)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.proba, b.proba)
    man = json.loads(open(f"{path}.json").read())
    assert man["kind"] == "hierarchical" and man["levels"] == ["family", "genus", "label"]
    assert len(man["classes"]) == 20 and len(man["paths"]) == 20
    assert man["backbones"][0]["fingerprint"]["weights_sha256"]
    assert man["metrics"]["top1"] == pytest.approx(r.metrics["top1"])
    assert {"scikit-learn", "numpy", "skops"} <= set(man["versions"])
    assert len(man["model_sha256"]) == 64


def test_the_typed_manifest_reads_and_writes_the_json_it_came_from(hier_model, tmp_path):
    """What ``load_model`` types is the JSON beside the file: every field it knows read back as
    written, a field it does not know kept, and a missing one named in a one-line error."""
    from penult.classify.manifest import Manifest

    path, _ = hier_model
    raw = json.loads(open(f"{path}.json").read())
    m = load_model(path).manifest
    assert m.to_json() == raw
    assert m.kind == "hierarchical" and m.levels == ["family", "genus", "label"]
    assert m.trained_on.split_column == "split" and m.backbones[0].dim == m.feature_dim
    assert Manifest.from_json({**raw, "added_later": [1, 2]}).to_json()["added_later"] == [1, 2]
    bad = tmp_path / "b.skops"
    shutil.copy(path, bad)
    Path(f"{bad}.json").write_text(json.dumps({k: v for k, v in raw.items() if k != "classes"}))
    with pytest.raises(ModelError, match=r"b\.skops\.json: field 'classes' is missing"):
        load_model(bad)


def test_tampered_model_file_is_refused(hier_model, tmp_path):
    path, _ = hier_model
    bad = tmp_path / "m.skops"
    shutil.copy(path, bad)
    shutil.copy(f"{path}.json", f"{bad}.json")
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="does not match its manifest"):
        load_model(bad)
    os.remove(f"{bad}.json")
    with pytest.raises(ModelError, match="manifest .* is missing"):
        load_model(bad)


def _plant(tmp_path, estimator, name):
    """A model file with a correct manifest (an attacker can rewrite both)."""
    path = tmp_path / name
    save_model(Model(estimator, {"classes": ["a"], "backbones": [], "feature_dim": 1}), path)
    return path


def test_planted_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = make_pipeline(FunctionTransformer(func=os.system, kw_args=None))
    evil.fit(np.zeros((1, 1)))
    path = _plant(tmp_path, evil, "evil.skops")
    with pytest.raises(ModelError, match="posix.system|nt.system"):
        load_model(path)
    assert not marker.exists()
    # a pickle renamed to .skops is not a skops file: refused without unpickling
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    pkl = tmp_path / "pickle.skops"
    pkl.write_bytes(pickle.dumps(Boom()))
    man = json.loads(open(f"{path}.json").read())
    from penult.core.files import file_sha256

    man["model_sha256"] = file_sha256(pkl)
    open(f"{pkl}.json", "w").write(json.dumps(man))
    with pytest.raises(ModelError, match="not a readable skops model file"):
        load_model(pkl)
    assert not marker.exists()


def test_foreign_class_needs_trust(tmp_path):
    path = _plant(tmp_path, FunctionTransformer(func=json.dumps), "f.skops")
    with pytest.raises(
        ModelError, match="json.dumps"
    ):  # outside sklearn/numpy/scipy/penult: refused
        load_model(path)
    assert isinstance(load_model(path, trust=True).estimator, FunctionTransformer)


def test_store_from_other_weights_is_refused(hier_model, data_dir, tmp_path):
    """Same backbone name, random weights: evaluate must refuse, naming what differs."""
    path, _ = hier_model
    listing = list_images(data_dir / "hymenoptera" / "bees")
    listing.paths = listing.paths[:4]
    listing.labels = {}
    other = tmp_path / "other.h5"
    opts = ExtractOptions(weights="random", name="efficientnet_lite0", progress=False)
    extract(other, listing, opts)
    with pytest.raises(ModelError, match="weights_sha256"):
        evaluate(load_model(path), other)
    with pytest.raises(ModelError, match="no features from 'efficientnet_lite0'"):
        extract(tmp_path / "x.h5", listing, ExtractOptions(weights="random", progress=False))
        evaluate(load_model(path), tmp_path / "x.h5")


def test_features_of_the_wrong_width_are_refused(hier_model):
    path, _ = hier_model
    with pytest.raises(ModelError, match="expects 1280-d features"):
        load_model(path).predict(np.zeros((2, 512), np.float32))


def test_skops_sees_only_safe_types_in_every_head(cub_store, tmp_path):
    """Every head penult trains loads without --trust-model."""
    plain = {"quantifier_folds": 0, "unknown_score": "none"}  # the heads' own types
    for opts in (
        TrainOptions(head="svm", **plain),
        TrainOptions(head="mlp", **plain),
        TrainOptions(head="knn", **plain),
        TrainOptions(head="centroid", pca=32, whiten=True, **plain),
        TrainOptions(ovr=True),  # with the count calibration and the open-set score's arrays
    ):
        r = train(cub_store, opts)
        path = save_model(r.model, tmp_path / f"{opts.head}-{opts.ovr}.skops")
        assert not [t for t in sio.get_untrusted_types(file=path) if t.startswith("posix")]
        m = load_model(path)
        assert m.manifest.head == opts.head


def test_predict_refuses_a_backbone_whose_weights_differ(hier_model, data_dir, tmp_path):
    """Without a store, predict rebuilds the backbone; other weights than the model's are refused."""
    import copy

    from penult.classify import PredictOptions, predict_images
    from penult.extract import Featuriser, WeightsError

    path, _ = hier_model
    model = load_model(path)
    model.manifest = copy.deepcopy(model.manifest)
    model.manifest.backbones[0].fingerprint["weights_sha256"] = "0" * 64
    img = sorted((data_dir / "cub100" / "001.Black_footed_Albatross").glob("*.jpg"))[0]
    with pytest.raises(WeightsError, match="pass --weights FILE"):
        predict_images(
            model, [str(img)], tmp_path / "p.csv", PredictOptions(progress=False), Featuriser()
        )
    assert not (tmp_path / "p.csv").exists()


def test_evaluating_on_a_store_with_other_labels_is_refused(hier_model, hym_store):
    path, _ = hier_model
    with pytest.raises(Exception, match="is a class of this model"):
        evaluate(load_model(path), hym_store, split="val")
