"""`penult mistakes` (issue 32, part 4): planted label noise in real bird photos is ranked first."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from penult.classify import MistakeOptions, load_dataset, rank_labels
from penult.cli import main
from penult.features import FeatureStore, review

from conftest import copy_store


def test_planted_label_noise_in_real_birds_is_ranked_first(cub_store: Path) -> None:
    d = load_dataset(cub_store, ["efficientnet_lite0"])
    y = np.asarray(d.column("label")).astype(str)
    classes = np.unique(y)
    rng = np.random.default_rng(0)
    flip = rng.choice(len(y), len(y) // 20, replace=False)  # 5%, each to another species
    noisy = y.copy()
    noisy[flip] = [rng.choice(classes[classes != v]) for v in y[flip]]
    r = rank_labels(d.X, noisy, MistakeOptions(folds=3))
    top = r.order()[: len(flip)]
    found = np.intersect1d(top, flip)
    assert len(found) / len(flip) >= 0.8  # precision (= recall) at k; chance is 0.05
    assert (r.suggested[found] == y[found]).mean() >= 0.8  # and it names the true species
    assert np.nanmax(r.score) <= 1 and np.nanmin(r.score) >= 0
    for signal in (-r.self_confidence, r.neighbour_margin):  # each signal alone finds most
        alone = np.argsort(-signal, kind="stable")[: len(flip)]
        assert len(np.intersect1d(alone, flip)) / len(flip) >= 0.6


def test_cli_ranks_relabelled_images_first_and_writes_a_safe_csv(
    cub_store: Path, tmp_path: Path, capsys
) -> None:
    p = copy_store(cub_store, tmp_path / "cub.h5")
    t = FeatureStore(p).images()
    species = sorted(set(t.labels["label"]))
    wrong = [t.path[i] for i in range(0, 400, 80)]  # five images of different species
    for q in wrong:
        other = next(s for s in species if s != t.labels["label"][t.path.index(q)])
        review.move(p, [q], other)  # a reviewer's slip
    review.move(p, [t.path[7]], "=HYPERLINK(1)")  # a label of its own: cannot be checked
    review.mark_dubious(p, [t.path[9]])
    out = tmp_path / "suspects.csv"
    assert main(["mistakes", str(p), "--out", str(out), "--top", "25", "--folds", "3"]) == 0
    text = capsys.readouterr().out
    assert "1 images are the only one of their label" in text and "looks like" in text
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 25 and [r["rank"] for r in rows] == [str(i) for i in range(1, 26)]
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert set(wrong) <= {r["path"] for r in rows[:15]}
    assert main(["mistakes", str(p), "--out", str(out), "--folds", "3", "--head", "lr"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(t) - 1  # every labelled image but the dubious one
    last = rows[-1]
    assert last["path"] == t.path[7] and last["label"] == "'=HYPERLINK(1)" and last["score"] == ""
