"""`penult count` (issue 31, part 3): per sample and class, the images counted, the share
estimated with the model's quantifier calibration, a bootstrap interval and the concentration
per mL, on real photos whose true classes the test knows (it built the samples)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from penult import cli
from penult.classify import load_model
from penult.classify.count import UNCLASSIFIED, count_level
from penult.classify.countplot import parse_times
from penult.classify.quantify import Calibration, Tally, proportions

from conftest import copy_store

MIX = {"bin_A": {"ants": 24, "bees": 6}, "bin_B": {"ants": 3, "bees": 27}}


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def hym_model(hym_store, tmp_path_factory) -> tuple[Path, Path]:
    """A logistic regression on the hymenoptera store (with its quantifier calibration), and
    a copy of the store whose embeddings `count --store` reuses."""
    tmp = tmp_path_factory.mktemp("hym_count")
    store = copy_store(hym_store, tmp / "h.h5")
    model = tmp / "h.skops"
    # no open-set score: the samples reuse training photos, which it need not keep (its
    # threshold is set for new images); tests/test_novelty.py tests it on unseen species
    argv = ["train", str(store), "--out", str(model), "--unknown-score", "none"]
    assert cli.main(argv) == 0
    return model, store


@pytest.fixture(scope="module")
def bins(data_dir, tmp_path_factory) -> Path:
    """Three samples of real photos: bin_A (24 ants, 6 bees), bin_B (3 ants, 27 bees) and
    bin_C (a truncated JPEG and an empty file: nothing scorable); samples.csv gives bin_A a
    volume and a time, bin_B a time and no volume, bin_C a volume of 0."""
    root = tmp_path_factory.mktemp("bins")
    at = {"ants": 0, "bees": 0}
    for sample, mix in MIX.items():
        for kind, n in mix.items():
            files = sorted((data_dir / "hymenoptera" / kind).glob("*.jpg"))[at[kind] : at[kind] + n]
            at[kind] += n
            (root / sample).mkdir(exist_ok=True)
            for f in files:
                shutil.copy(f, root / sample / f"{kind}_{f.name}")
    (root / "bin_C").mkdir()
    first = sorted((data_dir / "hymenoptera" / "ants").glob("*.jpg"))[0].read_bytes()
    (root / "bin_C" / "cut.jpg").write_bytes(first[: len(first) // 3])
    (root / "bin_C" / "empty.jpg").write_bytes(b"")
    with open(root / "samples.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sample", "volume_ml", "time"])
        w.writerows(
            [("bin_A", "5.0", "2024-05-01"), ("bin_B", "", "2024-05-02"), ("bin_C", "0", "")]
        )
    return root


def _count(model: Path, out: Path, *args: str) -> int:
    return cli.main(["count", str(model), *args, "--out", str(out), "-q", "--engine", "torch"])


def test_counts_per_sample_match_the_samples_real_composition(hym_model, bins, tmp_path, capsys):
    model, store = hym_model
    out = tmp_path / "counts.csv"
    assert _count(model, out, str(bins), "--sample-level", "1", "--samples",
                  str(bins / "samples.csv"), "--store", str(store)) == 0  # fmt: skip
    said = capsys.readouterr().out
    assert "by emq" in said and "sample 'bin_B' has no volume_ml" in said
    assert "sample 'bin_C' has volume_ml 0" in said and "1 sample(s) without one scorable" in said
    rows = _read(out)
    assert list(rows[0]) == [
        "sample", "volume_ml", "time", "label", "count", "proportion", "low", "high",
        "abundance", "per_ml", "per_ml_low", "per_ml_high", "images", "failed", "method", "note",
    ]  # fmt: skip
    by = {(r["sample"], r["label"]): r for r in rows}
    for sample, mix in MIX.items():
        got = {k: by[(sample, k)] for k in ("ants", "bees", UNCLASSIFIED)}
        assert sum(int(r["count"]) for r in got.values()) == 30
        assert all(r["images"] == "30" and r["method"] == "emq" for r in got.values())
        assert abs(sum(float(r["proportion"]) for r in got.values()) - 1) < 1e-5
        for kind, n in mix.items():
            r = got[kind]
            assert abs(int(r["count"]) - n) <= 3  # the classifier errs on about one in twelve
            truth = n / 30
            assert float(r["low"]) <= truth <= float(r["high"]), (sample, kind, r)
            assert float(r["high"]) - float(r["low"]) < 0.5  # 30 images: wide, not vacuous
            assert float(r["abundance"]) == pytest.approx(float(r["proportion"]) * 30, abs=1e-3)
    a = by[("bin_A", "ants")]
    assert float(a["per_ml"]) == pytest.approx(float(a["abundance"]) / 5.0, rel=1e-4)
    assert float(a["per_ml_low"]) <= float(a["per_ml"]) <= float(a["per_ml_high"])
    assert by[("bin_B", "ants")]["per_ml"] == ""  # no volume: left empty, said above
    c = [r for r in rows if r["sample"] == "bin_C"]
    assert len(c) == 1 and c[0]["count"] == "0" and c[0]["images"] == "0"
    assert c[0]["failed"] == "2" and "no scorable image (2 unreadable" in c[0]["note"]
    wide = _read(tmp_path / "counts_wide.csv")
    assert [w["sample"] for w in wide] == ["bin_A", "bin_B", "bin_C"]
    assert wide[0]["ants"] == a["proportion"] and wide[2]["images"] == "0"
    per_ml = _read(tmp_path / "counts_per_ml.csv")
    head = (tmp_path / "counts_per_ml.csv").read_text().splitlines()[0].split(",")
    assert len(head) == len(set(head)), head  # every column once
    assert per_ml[0]["ants"] == a["per_ml"] and per_ml[1]["ants"] == ""
    page = (tmp_path / "counts.html").read_text()
    assert "<svg" in page and "images per mL" not in page  # bin_B has no volume: shares drawn
    assert (tmp_path / "counts.png").stat().st_size > 10_000
    assert not list(tmp_path.glob("*.partial"))

    # the same samples from a store that holds them: same counts, no network
    s2 = tmp_path / "bins.h5"
    assert cli.main(["extract", str(s2), str(bins), "--sample-level", "1", "--samples",
                     str(bins / "samples.csv"), "-q", "--engine", "torch"]) == 0  # fmt: skip
    out2 = tmp_path / "from_store.csv"
    assert cli.main(["count", str(model), "--store", str(s2), "--out", str(out2), "-q"]) == 0
    again = {(r["sample"], r["label"]): r for r in _read(out2)}
    for sample in MIX:
        for kind in ("ants", "bees"):
            assert again[(sample, kind)]["count"] == by[(sample, kind)]["count"]
            p1, p2 = (
                float(again[(sample, kind)]["proportion"]),
                float(by[(sample, kind)]["proportion"]),
            )
            assert abs(p1 - p2) < 2e-3  # the same features up to the engine's rounding


def test_models_without_calibration_count_by_cc_and_say_so(hym_store, bins, tmp_path, capsys):
    store = copy_store(hym_store, tmp_path / "h.h5")
    model = tmp_path / "old.skops"
    assert cli.main(["train", str(store), "--out", str(model), "--quantifier-folds", "0"]) == 0
    out = tmp_path / "c.csv"
    assert _count(model, out, str(bins / "bin_A"), "--store", str(store), "--no-plot") == 0
    said = capsys.readouterr().out
    assert "by cc" in said and "no quantifier calibration" in said
    rows = _read(out)
    assert {r["method"] for r in rows} == {"cc"}
    assert all("no quantifier calibration" in r["note"] for r in rows)
    assert rows[0]["sample"] == str(bins / "bin_A")  # no sample column: the input is the sample
    assert "the input they were listed from is the sample" in rows[0]["note"]
    ants = {r["label"]: r for r in rows}["ants"]
    assert float(ants["proportion"]) == pytest.approx(int(ants["count"]) / 30, abs=1e-6)
    assert not (tmp_path / "c.png").exists()
    assert _count(model, out, str(bins / "bin_A"), "--method", "emq") == 2
    assert "needs the model's quantifier calibration" in capsys.readouterr().err


def test_bad_volumes_are_refused_before_anything_is_scored(hym_model, bins, tmp_path, capsys):
    model, store = hym_model
    for bad, says in (
        ("-2", "is not a volume"),
        ("lots", "is not a number"),
        ("inf", "is not a volume"),
    ):
        samples = tmp_path / "s.csv"
        samples.write_text(f"sample,volume_ml\nbin_A,{bad}\nbin_B,3\n")
        out = tmp_path / "c.csv"
        argv = [str(bins), "--sample-level", "1"]
        assert _count(model, out, *argv, "--samples", str(samples), "--store", str(store)) == 2
        err = capsys.readouterr().err
        assert f"sample 'bin_A': volume_ml '{bad}' {says}" in err
        assert not out.exists() and not list(tmp_path.glob("*.partial"))
    assert _count(model, out, "--store", str(store)) == 2  # the store has no sample column
    assert "has no 'sample' column" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cub_model(cub_store, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cub_count")
    model = tmp / "cub.skops"
    argv = ["train", str(cub_store), "--out", str(model), "--levels", "family,genus"]
    assert cli.main(argv) == 0
    return model


def test_coarse_levels_count_the_same_images_and_absent_classes_get_rows(
    cub_model, cub_store, data_dir, tmp_path
):
    """Two net tows of 6 of the model's 20 species (manifest sample column), plus a folder
    without one: at --level family the counts are the species' counts summed per family."""
    cub = data_dir / "cub100"
    species = sorted(p.name for p in cub.iterdir() if p.is_dir())[:6]
    manifest = tmp_path / "tows.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "sample", "time"])
        for i, sp in enumerate(species):
            for f in sorted((cub / sp).glob("*.jpg"))[:10]:
                tow = "tow1" if i < 3 else "tow2"
                w.writerow([str(f), tow, "2024-06-01" if tow == "tow1" else "2024-06-08"])
    extra = tmp_path / "extra"
    extra.mkdir()
    for f in sorted((cub / species[0]).glob("*.jpg"))[10:14]:
        shutil.copy(f, extra / f.name)
    common = [str(manifest), str(extra), "--store", str(cub_store), "--method", "cc"]
    fine, coarse = tmp_path / "species.csv", tmp_path / "family.csv"
    assert _count(cub_model, fine, *common) == 0
    assert _count(cub_model, coarse, *common, "--level", "family") == 0
    model = load_model(cub_model)
    rows = _read(fine)
    samples = list(dict.fromkeys(r["sample"] for r in rows))
    assert samples == ["tow1", "tow2", str(extra)]
    assert len(rows) == 3 * (len(model.classes) + 1)  # every class of the model, every sample
    absent = [c for c in model.classes if c not in species]
    for r in rows:
        if r["label"] in absent:
            assert int(r["count"]) <= 3 and float(r["proportion"]) < 0.1
    family_of = dict(zip(model.classes, model.paths[:, model.levels.index("family")], strict=True))
    summed: dict[tuple[str, str], int] = {}
    for r in rows:
        if r["label"] != UNCLASSIFIED:
            key = (r["sample"], family_of[r["label"]])
            summed[key] = summed.get(key, 0) + int(r["count"])
    fam = {
        (r["sample"], r["family"]): int(r["count"])
        for r in _read(coarse)
        if r["family"] != UNCLASSIFIED
    }
    assert fam == summed
    level, _ = count_level(model, "family")
    cal = level.calibration
    assert cal.classes == level.classes and np.allclose(cal.hard_rates.sum(0), 1)
    # (the prior is kept to 8 decimals: 13 of them sum to 1 within 1e-7)
    assert np.allclose(cal.soft_rates.sum(0), 1) and abs(cal.prior.sum() - 1) < 1e-7
    assert (
        cli.main(["count", str(cub_model), str(extra), "--out", str(fine), "--level", "kingdom"])
        == 2
    )


def test_a_tally_streams_a_sample_and_bounds_what_it_keeps(hym_store):
    """Fed in chunks, a tally counts every image exactly; EM on a random quarter of a sample
    lands near EM on all of it, and the m-out-of-n interval is as wide as the full one."""
    from penult.classify import TrainOptions, load_dataset
    from penult.classify.quantify import OutOfFold
    from penult.classify.train import build_estimator

    d = load_dataset(hym_store, ["efficientnet_lite0"])
    y = d.labels["label"].astype(str)
    tr = d.labels["split"] == "train"
    est = build_estimator(TrainOptions(n_jobs=1), None, [])
    cal = OutOfFold.of(est, d.X[tr], y[tr], folds=5, seed=0).calibration()
    est.fit(d.X[tr], y[tr])
    rng = np.random.default_rng(3)
    ants, bees = np.flatnonzero(~tr & (y == "ants")), np.flatnonzero(~tr & (y == "bees"))
    idx = np.concatenate([rng.choice(ants, 900), rng.choice(bees, 100)])  # a 9:1 sample
    post = est.predict_proba(d.X[idx])
    win = post.argmax(1)
    win[:20] = -1  # 20 images the model called "not one of my classes"
    full = Tally(2, 5000, np.random.default_rng(0))
    part = Tally(2, 250, np.random.default_rng(0))
    for s in range(0, 1000, 173):
        full.add(post[s : s + 173], win[s : s + 173])
        part.add(post[s : s + 173], win[s : s + 173])
    assert full.n == part.n == 1000 and full.kept == 1000 and part.kept == 250
    assert (full.wins == part.wins).all() and full.wins[-1] == 20
    a = full.estimate("emq", cal, bootstrap=200)
    b = part.estimate("emq", cal, bootstrap=200)
    exact = proportions(post[20:], "emq", cal) * 0.98
    assert np.allclose(a.proportion[:2], exact, atol=1e-9) and a.proportion[2] == pytest.approx(
        0.02
    )
    assert np.abs(b.proportion - a.proportion).max() < 0.05
    assert "EM ran on a random 250 of the sample's 1000 images" in b.notes
    wa, wb = a.high - a.low, b.high - b.low
    assert 0.5 < wb[0] / wa[0] < 2.0
    assert (a.low <= a.proportion).all() and (a.proportion <= a.high).all()
    cc = full.estimate("cc", cal)
    assert cc.proportion[0] == pytest.approx((win == 0).sum() / 1000)  # exact, from every image
    assert np.isnan(cc.low).all()  # no bootstrap asked


def test_sample_times_parse_as_dates_or_numbers_or_not_at_all():
    assert parse_times(["2024-05-01", "2024-05-02T10:00:00Z"]) is not None
    assert list(parse_times(["3", "1.5"])) == [3.0, 1.5]
    assert parse_times(["2024-05-01", ""]) is None and parse_times(["spring", "2024"]) is None


def test_coarsening_a_calibration_to_its_own_classes_changes_nothing(hym_model):
    model, _ = hym_model
    cal = Calibration.from_json(load_model(model).manifest.quantifier)
    same = cal.coarsen(cal.classes, cal.classes)
    assert np.allclose(same.hard_rates, cal.hard_rates) and np.allclose(same.prior, cal.prior)
    one = cal.coarsen(["insect", "insect"], ["insect"])
    assert one.hard_rates.shape == (1, 1) and one.hard_rates[0, 0] == pytest.approx(1)
