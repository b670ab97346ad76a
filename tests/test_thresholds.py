"""Per-class thresholds (issue 31, part 5; IFCB practice): tuned on out-of-fold posteriors of
real cub100 embeddings, shown in the report, and below them an image is unclassified in
predict's CSV and in `penult count`'s counts."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from penult import cli
from penult.classify import TrainOptions, load_dataset, load_model
from penult.classify.count import UNCLASSIFIED
from penult.classify.quantify import OutOfFold
from penult.classify.thresholds import NEVER, parse_class_thresholds, tune
from penult.classify.train import build_estimator
from penult.core import OptionError


@pytest.fixture(scope="module")
def oof(cub_store) -> OutOfFold:
    d = load_dataset(cub_store, ["efficientnet_lite0"])
    tr = d.labels["split"] == "train"
    est = build_estimator(TrainOptions(n_jobs=1), None, [])
    return OutOfFold.of(est, d.X[tr], d.labels["label"].astype(str)[tr], folds=5, seed=0)


def _f1(post: np.ndarray, truth: np.ndarray, c: int, t: float) -> float:
    counted = (post.argmax(1) == c) & (post[:, c] >= t)
    tp = (counted & (truth == c)).sum()
    return 2 * tp / (counted.sum() + (truth == c).sum())


def test_f1_thresholds_never_lose_f1_and_precision_ones_reach_their_target(oof):
    t, table = tune(oof, "f1")
    assert t.shape == (len(oof.classes),) and (t >= 0).all() and (t <= 1).all()
    for c, name in enumerate(oof.classes):
        assert (
            _f1(oof.posteriors, oof.truth, c, t[c]) >= _f1(oof.posteriors, oof.truth, c, 0) - 1e-12
        )
        assert table[name]["threshold"] == pytest.approx(min(t[c], 1), abs=1e-6)
    assert (t > 0.2).any()  # some classes are worth a threshold on these posteriors
    p, table = tune(oof, "precision:0.97")
    winner = oof.posteriors.argmax(1)
    for c, name in enumerate(oof.classes):
        counted = (winner == c) & (oof.posteriors[:, c] >= p[c])
        if p[c] < NEVER:
            assert (oof.truth[counted] == c).mean() >= 0.97
            assert table[name]["precision"] >= 0.97 and table[name]["counted"] == counted.sum()
        else:
            assert not counted.any() and table[name]["counted"] == 0
    assert (p >= t).mean() > 0.5  # a high precision target raises most thresholds


def test_rules_are_checked():
    assert parse_class_thresholds("F1") == "f1"
    assert parse_class_thresholds("precision:0.90") == "precision:0.9"
    for bad in ("precision:1.5", "precision", "recall:0.9", "precision:x"):
        with pytest.raises(OptionError, match="'f1' or 'precision:P'"):
            parse_class_thresholds(bad)


def test_train_predict_and_count_use_the_thresholds(cub_store, data_dir, tmp_path, capsys):
    model = tmp_path / "t.skops"
    report = tmp_path / "report"
    report.mkdir()
    argv = [
        "train",
        str(cub_store),
        "--out",
        str(model),
        "--class-thresholds",
        "precision:0.97",
        "--unknown-score",
        "none",
        "--report",
        str(report),
        "--no-refit",
    ]  # fmt: skip  (its test split is scored below: it must be held out)
    assert cli.main(argv) == 0
    said = capsys.readouterr().out
    assert "below their class's threshold" in said
    m = load_model(model)
    assert m.manifest.class_thresholds["rule"] == "precision:0.97"
    assert len(m.manifest.class_thresholds["thresholds"]) == len(m.classes)
    assert "## Class thresholds" in (report / "report.md").read_text()
    d = load_dataset(cub_store, m.backbones)
    test = d.labels["split"] != "train"
    pred = m.predict(d.X[test])
    truth = d.labels["label"].astype(str)[test]
    right = pred.label == truth
    assert 0 < pred.below.mean() < 0.5
    assert right[~pred.below].mean() > right.mean()  # what is counted is more often right
    # predict's unknown column, and count's unclassified row, hold the images below
    root = data_dir / "cub100"
    paths = [p for p, t in zip(d.paths, test, strict=True) if t][:60]
    listing = tmp_path / "some.txt"
    listing.write_text("\n".join(str(root / p) for p in paths) + "\n")
    out = tmp_path / "p.csv"
    assert (
        cli.main(
            [
                "predict",
                str(model),
                str(listing),
                "--out",
                str(out),
                "--store",
                str(cub_store),
                "-q",
            ]
        )
        == 0
    )
    with open(out, newline="") as fh:
        flagged = sum(r["unknown"] == "1" for r in csv.DictReader(fh))
    assert flagged == int(pred.below[:60].sum())
    for method, unclassified in (("cc", flagged), ("emq", flagged)):
        counts = tmp_path / f"{method}.csv"
        argv = ["count", str(model), str(listing), "--out", str(counts), "--store",
                str(cub_store), "-q", "--no-plot", "--method", method]  # fmt: skip
        assert cli.main(argv) == 0
        with open(counts, newline="") as fh:
            by = {r["label"]: r for r in csv.DictReader(fh)}
        assert int(by[UNCLASSIFIED]["count"]) == unclassified
        share = float(by[UNCLASSIFIED]["proportion"])
        # cc counts only what passes; emq corrects for confusion itself and uses every image
        assert share == pytest.approx(flagged / 60 if method == "cc" else 0, abs=1e-6)
    assert cli.main(["train", str(cub_store), "--out", str(model), "--quantifier-folds", "0",
                     "--class-thresholds", "f1"]) == 2  # fmt: skip
    assert "need --quantifier-folds 2 or more" in capsys.readouterr().err
