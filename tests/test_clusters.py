"""Clusters of unlabelled images and growing a class (issue 32, part 5), on real bird photos
whose labels are hidden."""

from __future__ import annotations

import csv

import numpy as np
from penult.classify.clusters import find_clusters, grow, reject
from penult.cli import main
from penult.features import FeatureStore, review


def _purity(paths: list[str], truth: dict[str, str]) -> float:
    _, n = np.unique([truth[q] for q in paths], return_counts=True)
    return n.max() / len(paths)


def test_clusters_are_mostly_one_species_and_a_class_grows_by_its_nearest(
    hidden, tmp_path, capsys
) -> None:
    p, truth = hidden
    cs = find_clusters(p, min_size=5)
    assert cs.images == len(truth) and len(cs.members) >= 10
    sizes = [len(m) for m in cs.members]
    assert sizes == sorted(sizes, reverse=True)
    typical = [_purity(m[:20], truth) for m in cs.members]
    assert np.mean(np.array(typical) >= 0.9) >= 0.7  # most clusters' typical members: one species

    # name a cluster whose typical members are one species, as a reviewer would (one that
    # left at least 15 of its species outside, so that there is something to grow)
    left = [sum(v == truth[m[0]] for v in truth.values()) - len(m) for m in cs.members]
    first = next(
        m for m, pure, n in zip(cs.members, typical, left, strict=True) if pure == 1.0 and n >= 15
    )
    name = truth[first[0]]
    review.move(p, first, name)  # naming a cluster labels all its members at once
    assert FeatureStore(p).provenance().counts()["validated"] == len(first)

    prop = grow(p, name, n=10)
    assert len(prop.paths) == 10 and not set(prop.paths) & set(first)
    assert list(prop.distance) == sorted(prop.distance)
    assert np.mean([truth[q] == name for q in prop.paths]) >= 0.6  # nearest first: mostly right
    reject(p, prop.paths[:5], name)
    again = grow(p, name, n=10)
    assert not set(again.paths) & set(prop.paths[:5])  # a reject is remembered
    assert set(again.paths) >= set(prop.paths[5:])
    assert FeatureStore(p).provenance().counts()["validated"] == len(first)  # rejects label nothing
    review.undo(p)  # forgetting the reject: they come back
    assert set(grow(p, name, n=10).paths) == set(prop.paths)

    out = tmp_path / "clusters.csv"
    assert main(["clusters", str(p), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    k2 = [r["path"] for r in rows if r["cluster"] == "2"]
    assert main(["label", str(p), "--from", str(out), "--cluster", "2", "--move", "Some bird"]) == 0
    lab = FeatureStore(p).images().labels["label"]
    t = FeatureStore(p).images().path
    assert {lab[t.index(q)] for q in k2} == {"Some bird"}
    g = tmp_path / "grow.csv"
    assert main(["grow", str(p), "Some bird", "--out", str(g), "-n", "7"]) == 0
    grown = [r["path"] for r in csv.DictReader(g.open())]
    assert len(grown) == 7
    assert main(["label", str(p), "--from", str(g), "--reject", "Some bird"]) == 0
    assert not set(grow(p, "Some bird", n=7).paths) & set(grown)
    assert main(["label", str(p), "--from", str(g), "--cluster", "1", "--validate"]) == 2
    assert "needs a 'cluster' column" in capsys.readouterr().err
