"""Counts corrected for prior shift (issue 31, the quantifiers): on real EfficientNet-Lite0
embeddings of the hymenoptera photos (ants and bees, a classifier that errs on about one in
twelve), samples drawn from the held-out split with skewed class frequencies are counted closer
to their true composition by the adjusted methods than by classify-and-count."""

from __future__ import annotations

import numpy as np
import pytest
from penult.classify import TrainOptions, load_dataset
from penult.classify.quantify import METHODS, Calibration, OutOfFold, proportions
from penult.classify.train import build_estimator
from penult.core import OptionError


@pytest.fixture(scope="module")
def fitted(hym_store):
    d = load_dataset(hym_store, ["efficientnet_lite0"])
    y, split = d.labels["label"].astype(str), d.labels["split"]
    tr, te = split == "train", split == "val"
    est = build_estimator(TrainOptions(n_jobs=1), None, [])
    cal = OutOfFold.of(est, d.X[tr], y[tr], folds=5, seed=0).calibration()
    est.fit(d.X[tr], y[tr])
    return est, cal, d.X[te], y[te], int(tr.sum())


def test_adjusted_counts_recover_a_prior_shift_that_classify_and_count_misses(fitted):
    est, cal, X, y, n_train = fitted
    assert cal.classes == [str(c) for c in est.classes_] and cal.folds == 5
    assert cal.images == n_train and 0.8 < (est.predict(X) == y).mean() < 0.97  # it errs
    assert np.allclose(cal.hard_rates.sum(0), 1) and np.allclose(cal.soft_rates.sum(0), 1)
    rng = np.random.default_rng(7)
    classes = np.asarray(cal.classes)
    by_class = [np.flatnonzero(y == c) for c in classes]
    post = est.predict_proba(X)
    errors = {m: [] for m in METHODS}
    for _ in range(60):  # 60 samples of 300 images, class mix from a Dirichlet(0.5)
        mix = rng.dirichlet(np.full(len(classes), 0.5))
        n = rng.multinomial(300, mix)
        idx = np.concatenate([rng.choice(by_class[j], n[j]) for j in range(len(classes))])
        truth = n / n.sum()
        for m in METHODS:
            p = proportions(post[idx], m, cal)
            assert p.shape == truth.shape and abs(p.sum() - 1) < 1e-6
            errors[m].append(np.abs(p - truth).mean())
    mae = {m: float(np.mean(e)) for m, e in errors.items()}
    assert mae["emq"] < 0.8 * mae["cc"], mae  # the correction is real, not noise
    assert mae["pacc"] < mae["cc"] and mae["acc"] < mae["cc"], mae
    assert mae["pcc"] > mae["emq"], (
        mae
    )  # averaging posteriors alone keeps the training prior's pull


def test_calibration_round_trips_and_methods_say_what_they_need(fitted):
    _, cal, X, _, _ = fitted
    back = Calibration.from_json(cal.to_json())
    assert back.classes == cal.classes and np.allclose(back.hard_rates, cal.hard_rates, atol=1e-6)
    post = np.full((3, len(cal.classes)), 1 / len(cal.classes))
    with pytest.raises(OptionError, match="needs the model's quantifier calibration"):
        proportions(post, "emq")
    with pytest.raises(OptionError, match="not one of cc, pcc, acc, pacc, emq"):
        proportions(post, "median")
    assert np.isnan(proportions(post[:0], "cc")).all()  # an empty sample has no proportions


def test_train_records_the_calibration_in_the_model_and_older_models_have_none(hym_store, tmp_path):
    """`penult train` stores what a quantifier needs (out-of-fold rates over the images the
    saved model was fitted on, and their prior); --quantifier-folds 0 stores none."""
    from penult import cli
    from penult.classify import load_model

    from conftest import copy_store

    store = copy_store(hym_store, tmp_path / "h.h5")
    out = tmp_path / "m.skops"
    assert cli.main(["train", str(store), "--out", str(out)]) == 0
    m = load_model(out)
    cal = Calibration.from_json(m.manifest.quantifier)
    assert cal.classes == m.classes.tolist() and cal.images == sum(m.manifest.train_counts.values())
    assert np.allclose(cal.prior * cal.images, [m.manifest.train_counts[c] for c in cal.classes])
    assert m.manifest.version == 4
    assert cli.main(["train", str(store), "--out", str(out), "--quantifier-folds", "0"]) == 0
    assert load_model(out).manifest.quantifier is None


def test_the_fast_adjustment_solves_what_quapys_minimiser_solves(fitted):
    """ACC and PACC solve q = rates @ p on the simplex by non-negative least squares (1.4 ms
    for 121 classes, QuaPy's minimiser 190-630 ms): same answers on real rates and shares."""
    from penult.classify.quantify import adjust
    from quapy.method.aggregative import ACC

    est, cal, X, y, _ = fitted
    post = est.predict_proba(X)
    rng = np.random.default_rng(1)
    for _ in range(10):
        idx = rng.choice(len(y), 120)
        for rates, q in ((cal.hard_rates, np.bincount(post[idx].argmax(1), minlength=2) / 120),
                         (cal.soft_rates, post[idx].mean(0))):  # fmt: skip
            ours = adjust(rates, q)
            theirs = ACC.solve_adjustment(rates, q, method="inversion", solver="minimize")
            assert np.abs(ours - theirs).max() < 1e-3 and abs(ours.sum() - 1) < 1e-9
