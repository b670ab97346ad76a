""" "Not one of my classes" for every model (issue 31, part 4): on real cub100 photos, five of
twenty species are left out of training; their images must be flagged far more often than
held-out photos of the fifteen species the model knows, whose flagged share the threshold
(calibrated on held-out folds of the training images) holds near 1 - keep."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from penult import cli
from penult.classify import TrainOptions, load_dataset, load_model, train
from penult.classify.count import UNCLASSIFIED
from penult.features import FeatureStore, StoreWriter

from conftest import copy_store


@pytest.fixture(scope="module")
def fifteen(cub_store, tmp_path_factory):
    """A copy of the cub20 store whose first five species are unlabelled (never trained on)."""
    store = copy_store(cub_store, tmp_path_factory.mktemp("novel") / "cub15.h5")
    t = FeatureStore(store).images()
    labels = np.asarray(t.labels["label"], dtype=str)
    unseen = sorted(set(labels))[:5]
    hide = np.isin(labels, unseen)
    with StoreWriter(store) as w:
        w.set_labels(
            "label", [p for p, h in zip(t.path, hide, strict=True) if h], [""] * int(hide.sum())
        )
    return store, unseen, [p for p, h in zip(t.path, hide, strict=True) if h]


@pytest.mark.parametrize("score", ["mahalanobis", "knn", "msp"])
def test_unseen_species_are_flagged_and_known_ones_kept(fifteen, cub_store, score):
    store, unseen, _ = fifteen
    folds = 5 if score == "msp" else 0  # msp is set on out-of-fold posteriors, the others not
    r = train(store, TrainOptions(unknown_score=score, keep=0.95, quantifier_folds=folds))
    model = r.model
    assert model.novelty.score == score and model.manifest.novelty["keep"] == 0.95
    assert not set(unseen) & set(model.classes.tolist())
    known = r.metrics["unknown_rate"]  # the held-out test photos of the 15 species
    assert known < 0.15, known
    d = load_dataset(cub_store, model.backbones)
    novel = np.isin(d.labels["label"].astype(str), unseen)
    flagged = model.predict(d.X[novel]).unknown.mean()
    print(score, flagged, known)
    assert flagged > 2 * known + 0.05, (score, flagged, known)  # knn: 0.16 vs 0.05


def test_every_model_kind_says_unknown_and_predict_and_count_use_it(
    fifteen, cub_store, tmp_path, data_dir
):
    """Flat, hierarchical and one-vs-rest models all carry the score; a saved model keeps it;
    predict writes the unknown column; count puts flagged images under 'unclassified'."""
    store, unseen, hidden = fifteen
    for extra in (["--levels", "family", "--hierarchical"], ["--ovr"]):
        extra += ["--quantifier-folds", "0"]  # the open-set score does not need them
        out = tmp_path / "m.skops"
        assert cli.main(["train", str(store), "--out", str(out), *extra]) == 0
        m = load_model(out)
        assert m.novelty is not None and m.manifest.novelty["score"] == "mahalanobis"
    out = tmp_path / "flat.skops"
    assert cli.main(["train", str(store), "--out", str(out)]) == 0
    listing = tmp_path / "unseen.txt"
    root = data_dir / "cub100"
    listing.write_text("\n".join(str(root / p) for p in hidden[:40]) + "\n")
    pred = tmp_path / "p.csv"
    assert (
        cli.main(
            ["predict", str(out), str(listing), "--out", str(pred), "--store", str(cub_store), "-q"]
        )
        == 0
    )
    with open(pred, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {"unknown", "novelty"} <= set(rows[0])
    flagged = sum(r["unknown"] == "1" for r in rows)
    assert flagged >= 10, flagged  # unseen species: many flagged
    counts = tmp_path / "c.csv"
    argv = [
        "count",
        str(out),
        str(listing),
        "--out",
        str(counts),
        "--store",
        str(cub_store),
        "-q",
        "--no-plot",
    ]
    assert cli.main(argv) == 0
    with open(counts, newline="") as fh:
        by = {r["label"]: r for r in csv.DictReader(fh)}
    assert int(by[UNCLASSIFIED]["count"]) == flagged
    assert float(by[UNCLASSIFIED]["proportion"]) == pytest.approx(flagged / 40, abs=1e-6)
