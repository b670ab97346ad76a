"""Models for use and honest numbers on small data: `penult train` (and the API's
``refit_all``) saves a model fitted on every labelled image after scoring it held out, and
`evaluate` refuses to call that store held out; `--cv K` scores by K stratified folds (hymenoptera: 397 photos, the small-data case)."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from penult import cli
from penult.classify import DataError, TrainOptions, evaluate, load_model, train
from penult.features import FeatureStore

from conftest import copy_store


def test_refit_all_scores_held_out_then_saves_a_model_of_every_image(hym_store, tmp_path):
    store = tmp_path / "h.h5"
    copy_store(hym_store, store)
    plain = train(store, TrainOptions())
    r = train(store, TrainOptions(refit_all=True))
    assert r.metrics["top1"] == plain.metrics["top1"] > 0.85  # the same held-out estimate
    refit = r.model.manifest.refit_all
    n = plain.n_train + plain.n_eval
    assert refit.images == n and refit.metrics_from == plain.eval_split
    assert r.scored is not None and r.scored.manifest.refit_all is None
    assert sum(r.model.manifest.train_counts.values()) == n > plain.n_train
    w_scored = r.scored.estimator[-1].coef_
    w_refit = r.model.estimator[-1].coef_
    assert not np.allclose(w_scored, w_refit)  # the held-out images moved the saved model
    with pytest.raises(DataError, match="refit on all .* labelled images of this store"):
        evaluate(r.model, store)
    evaluate(r.scored, store)  # the train-split model is still scored as before


def test_the_command_line_saves_a_refit_model_unless_told_not_to(hym_store, tmp_path, capsys):
    """`penult train` scores the split model on the held-out images, then saves a model refit
    on every labelled image (its manifest keeps the held-out score); --no-refit saves the split
    model, which evaluate scores on this store; a refit model it refuses, saying the estimate."""
    store = tmp_path / "h.h5"
    copy_store(hym_store, store)
    model = tmp_path / "m.skops"
    rep = tmp_path / "rep"
    rep.mkdir()
    argv = ["train", str(store), "--out", str(model), "--report", str(rep)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "refit on all 397 labelled" in out and (rep / "report.md").exists()
    saved = json.loads(open(f"{model}.json").read())
    assert saved["refit_all"]["images"] == 397 and saved["refit_all"]["metrics_from"] == "val"
    held = float(re.search(r"top-1 accuracy\s+([\d.]+)%", out).group(1)) / 100
    assert saved["metrics"]["top1"] == pytest.approx(held, abs=0.0005)  # the split's score
    assert cli.main(["evaluate", str(model), str(store)]) == 2
    err = capsys.readouterr().err
    assert "none of them is held out" in err and f"top-1 {saved['metrics']['top1']:.3f}" in err
    assert "--no-refit" in err and load_model(model).manifest.refit_all
    split = tmp_path / "split.skops"
    assert cli.main(["train", str(store), "--out", str(split), "--no-refit"]) == 0
    assert "refit on all" not in capsys.readouterr().out
    assert load_model(split).manifest.refit_all is None
    assert cli.main(["evaluate", str(split), str(store)]) == 0
    scored = float(re.search(r"top-1 accuracy\s+([\d.]+)%", capsys.readouterr().out).group(1))
    assert scored / 100 == pytest.approx(held, abs=0.0005)  # the same split, the same model
    assert cli.main(["train", str(store), "--out", str(split), "--no-refit", "--cv", "3"]) == 2
    assert "no split model" in capsys.readouterr().err
    cv_rep = tmp_path / "cv"
    cv_rep.mkdir()
    argv = ["train", str(store), "--out", str(tmp_path / "cv.skops"), "--cv", "3"]
    assert cli.main([*argv, "--report", str(cv_rep)]) == 0
    out = capsys.readouterr().out
    assert "3-fold stratified cross-validation" in out and "+-" in out and "top5" not in out
    metrics = json.loads((cv_rep / "metrics.json").read_text())
    assert metrics["n"] > 300 and "pooled out-of-fold" in metrics["info"][0]


def test_cv_reports_mean_and_spread_over_stratified_folds(hym_store, tmp_path):
    store = tmp_path / "h.h5"
    copy_store(hym_store, store)
    fs = FeatureStore(store)
    before = set(fs.images().labels)
    r = train(store, TrainOptions(cv=5))
    cv = r.cv
    assert cv["folds"] == 5 and len(cv["per_fold"]) == 5
    tops = [f["top1"] for f in cv["per_fold"]]
    assert min(tops) <= cv["mean"]["top1"] <= max(tops) and 0 < cv["std"]["top1"] < 0.1
    n = r.model.manifest.refit_all.images
    assert r.metrics["n"] == n == len(r.truth)  # every labelled image predicted exactly once
    assert abs(r.metrics["top1"] - cv["mean"]["top1"]) < 0.01 and r.metrics["top1"] > 0.85
    assert sum(r.model.manifest.train_counts.values()) == n  # the saved model saw them all
    assert r.model.manifest.cv["mean"]["top1"] == cv["mean"]["top1"]
    assert set(FeatureStore(store).images().labels) == before  # no split was written
    again = train(store, TrainOptions(cv=5))
    assert again.cv["per_fold"] == cv["per_fold"]  # seeded folds
    with pytest.raises(DataError, match="refit on all"):
        evaluate(r.model, store)


def test_cv_needs_two_images_of_every_class(hym_store, tmp_path):
    store = tmp_path / "h.h5"
    copy_store(hym_store, store)
    t = FeatureStore(store).images()
    labels = np.array(t.labels["label"], dtype=object)
    labels[np.flatnonzero(labels == "ants")[0]] = "wasps"
    from penult.features import StoreWriter

    with StoreWriter(store) as w:
        w.set_labels("label", list(t.path), labels.tolist())
    with pytest.raises(DataError, match="'wasps' has 1"):
        train(store, dataclasses.replace(TrainOptions(), cv=3))


def test_every_train_report_is_one_writer_from_one_scoring(hym_store, tmp_path, monkeypatch):
    """`train --report` writes the report from the predictions train made (the model is scored
    once, not again for the report), and a --cv report has its predictions.csv like the others:
    one row per pooled out-of-fold prediction."""
    import csv

    from penult.classify.model import Model

    store = copy_store(hym_store, tmp_path / "hym.h5")
    calls = []
    real = Model.predict

    def counted(self, X):
        calls.append(len(X))
        return real(self, X)

    monkeypatch.setattr(Model, "predict", counted)
    rep = tmp_path / "rep"
    rep.mkdir()
    assert (
        cli.main(["train", str(store), "--out", str(tmp_path / "m.skops"), "--report", str(rep)])
        == 0
    )
    assert len(calls) == 1  # the held-out split, scored once
    rows = list(csv.DictReader(open(rep / "predictions.csv")))
    assert len(rows) == calls[0] == json.loads((rep / "metrics.json").read_text())["n"]
    cv_rep = tmp_path / "cv"
    cv_rep.mkdir()
    argv = [
        "train",
        str(store),
        "--out",
        str(tmp_path / "cv.skops"),
        "--cv",
        "3",
        "--report",
        str(cv_rep),
    ]
    assert cli.main(argv) == 0
    rows = list(csv.DictReader(open(cv_rep / "predictions.csv")))
    n = json.loads((cv_rep / "metrics.json").read_text())["n"]
    assert len(rows) == n > 300 and len({r["path"] for r in rows}) == n  # every image once
    cv = json.loads((cv_rep / "metrics.json").read_text())["cv"]
    md = (cv_rep / "report.md").read_text()  # the folds' spread, not only the pooled number
    folds = md.split("## Folds")[1].split("\n\n")[1].splitlines()[2:]
    assert len(folds) == 3 + 1 and folds[-1].startswith("| mean +- sd |")
    assert f"{100 * cv['mean']['top1']:.1f} +- {100 * cv['std']['top1']:.1f}%" in folds[-1]
    assert sum(int(r.split("|")[2]) for r in folds[:3]) == n  # each image in one fold
