"""`penult train/evaluate/compare/predict` end to end on real images."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from penult.cli import main

from conftest import copy_store

pytestmark = pytest.mark.slow


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def hym_model(hym_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("hm")
    store = out / "hym.h5"
    copy_store(hym_store, store)
    rc = main(  # the scored split model: predict and evaluate give the report's numbers
        ["train", str(store), "--out", str(out / "ants.skops"), "--report", str(out / "report"),
         "--no-refit"]
    )  # fmt: skip
    assert rc == 0
    return out, store


def test_train_writes_model_and_readable_report(hym_model, capsys):
    out, _ = hym_model
    for f in ("report.md", "report.html", "metrics.json", "predictions.csv", "confusion.png", "per_class.png", "reliability.png"):  # fmt: skip
        assert (out / "report" / f).stat().st_size > 200, f
    m = json.loads((out / "report" / "metrics.json").read_text())
    assert m["n"] == 153 and m["top1"] > 0.9
    md = (out / "report" / "report.md").read_text()
    assert (
        f"| top-1 accuracy | {100 * m['top1']:.1f}% | share whose first guess is the true class |"
        in md
    )
    assert "top-5" not in md  # 2 classes: the top five would be every class
    page = (out / "report" / "report.html").read_text()
    assert "what it means" in page
    wrong = [r for r in _rows(out / "report" / "predictions.csv") if r["prediction"] != r["truth"]]
    gallery = page.split("<h2>Misclassified images")[1]  # every mistake, with its thumbnail
    assert gallery.startswith(f" ({len(wrong)}; all shown") and gallery.count("<img") == len(wrong)
    first = max(wrong, key=lambda r: float(r["probability"]))  # the most confident one first
    assert f"true <b>{first['truth']}</b>" in gallery.split("</figure>")[0]
    assert len(list((out / "report" / "mistakes").glob("*.jpg"))) == len(wrong)
    assert (out / "report" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    # the mistakes by name, counted from the predictions themselves
    rows = _rows(out / "report" / "predictions.csv")
    wrong = [(r["truth"], r["prediction"]) for r in rows if r["truth"] != r["prediction"]]
    want = sorted({p: wrong.count(p) for p in wrong}.items(), key=lambda kv: (-kv[1], kv[0]))
    assert wrong and [((p["true"], p["predicted"]), p["count"]) for p in m["confused"]] == want
    (t, pr), n = want[0]
    share = n / sum(r["truth"] == t for r in rows)
    assert f"| {t} | {pr} | {n} | {share:.0%} |" in (out / "report" / "report.md").read_text()


def test_predict_matches_evaluate_on_the_same_images(hym_model, data_dir, tmp_path):
    out, store = hym_model
    ev = {r["path"]: r for r in _rows(out / "report" / "predictions.csv")}
    val = [p for p, r in ev.items()]
    listing = tmp_path / "val.txt"
    listing.write_text("\n".join(str(data_dir / "hymenoptera" / p) for p in val))
    # with the store: same cached features, so identical numbers
    assert main(["predict", str(out / "ants.skops"), str(listing), "--out", str(tmp_path / "a.csv"), "--store", str(store), "-q"]) == 0  # fmt: skip
    a = {os.path.relpath(r["path"], data_dir / "hymenoptera"): r for r in _rows(tmp_path / "a.csv")}
    assert set(a) == set(ev)
    for p in val:
        assert a[p]["prediction"] == ev[p]["prediction"] and a[p]["prob1"] == ev[p]["prob1"]
    # without the store: the images go through the network again
    assert main(["predict", str(out / "ants.skops"), str(listing), "--out", str(tmp_path / "b.csv"), "-q"]) == 0  # fmt: skip
    b = {os.path.relpath(r["path"], data_dir / "hymenoptera"): r for r in _rows(tmp_path / "b.csv")}
    same = np.mean([b[p]["prediction"] == ev[p]["prediction"] for p in val])
    diff = max(abs(float(b[p]["probability"]) - float(ev[p]["probability"])) for p in val)
    assert same >= 0.99 and diff < 0.05, (same, diff)


def test_predict_reports_bad_files_and_scores_the_rest(hym_model, data_dir, tmp_path, capsys):
    out, _ = hym_model
    imgs = tmp_path / "in"
    imgs.mkdir()
    for f in sorted((data_dir / "hymenoptera" / "bees").glob("*.jpg"))[:3]:
        shutil.copy(f, imgs / f.name)
    (imgs / "empty.jpg").write_bytes(b"")
    (imgs / "text.png").write_text("not an image")
    good = sorted((data_dir / "hymenoptera" / "ants").glob("*.jpg"))[0].read_bytes()
    (imgs / "truncated.jpg").write_bytes(good[: len(good) // 3])
    shutil.copy(data_dir / "hymenoptera/ants/imageNotFound.gif", imgs / "placeholder.gif")
    csv_out = tmp_path / "p.csv"
    assert (
        main(
            [
                "predict",
                str(out / "ants.skops"),
                str(imgs),
                "--out",
                str(csv_out),
                "-q",
                "--top-k",
                "9",
            ]
        )
        == 0
    )
    rows = {Path(r["path"]).name: r for r in _rows(csv_out)}
    assert len(rows) == 7 and not (tmp_path / "p.csv.partial").exists()
    for bad in ("empty.jpg", "text.png", "placeholder.gif"):
        assert rows[bad]["error"] and not rows[bad]["prediction"], bad
    scored = [r for r in rows.values() if not r["error"]]
    assert len(scored) >= 3 and all(r["prediction"] in ("ants", "bees") for r in scored)
    assert all(r["top2"] and "top3" not in r for r in scored)  # top-k is capped at the 2 classes
    text = capsys.readouterr().out
    assert "FAILED" in text and "empty.jpg" in text


def test_evaluate_and_compare_from_the_command_line(hym_model, cub_store, tmp_path, capsys):
    out, store = hym_model
    assert main(["evaluate", str(out / "ants.skops"), str(store)]) == 0
    assert "top-1 accuracy" in capsys.readouterr().out
    assert main(["compare", str(cub_store), "--head", "lr", "--head", "centroid", "--levels", "family,genus", "--json", str(tmp_path / "c.json")]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "| backbones | head |" in table and "family" in table
    rows = json.loads((tmp_path / "c.json").read_text())
    assert {r["head"] for r in rows} == {"lr", "centroid"} and all(r["top1"] > 0.75 for r in rows)


def test_cli_errors_are_one_line(hym_model, tmp_path, capsys):
    out, store = hym_model
    cases = [
        (["evaluate", str(tmp_path / "nope.skops"), str(store)], "no such model file"),
        (["train", str(store), "--out", str(tmp_path / "m"), "--head", "forest"], "unknown head"),
        (["train", str(store), "--out", str(tmp_path / "m"), "--label", "genus"], "no label column"),
        (["predict", str(out / "ants.skops"), str(tmp_path / "missing"), "--out", str(tmp_path / "x.csv")], "no such file"),
    ]  # fmt: skip
    for argv, msg in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("penult: error:") and msg in err, err


def test_nested_folders_give_a_hierarchy(data_dir, tmp_path):
    """root/<family>/<species>/img: --levels auto trains top-down on the folder levels."""
    import csv as _csv

    tax = {r["class"]: r for r in _csv.DictReader(open(data_dir / "cub100" / "taxonomy.csv"))}
    root = tmp_path / "nested"
    species = sorted(tax)[:8]
    for s in species:
        d = root / tax[s]["family"] / s
        d.mkdir(parents=True)
        for f in sorted((data_dir / "cub100" / s).glob("*.jpg"))[:12]:
            os.symlink(f, d / f.name)
    store = tmp_path / "n.h5"
    assert main(["extract", str(store), str(root), "-q"]) == 0
    model = tmp_path / "n.skops"
    assert (
        main(["train", str(store), "--out", str(model), "--levels", "auto", "--hierarchical"]) == 0
    )
    man = json.loads(open(f"{model}.json").read())
    assert man["levels"] == ["level0", "label"] and man["kind"] == "hierarchical"
    assert all(p[0] == tax[p[1]]["family"] for p in man["paths"])


def test_confusion_matrix_is_readable_at_6_and_at_121_classes() -> None:
    """6 classes: every nonzero cell shows its image count, a colour bar, the whole title inside
    the figure; 121 classes: every class named on both axes in small but legible type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colorbar import Colorbar
    from penult.classify.report import confusion_figure

    rng = np.random.default_rng(0)
    names = ["Chaetoceros", "Tripos", "Dinophysis_acuminata", "Guinardia", "ciliate", "detritus"]
    counts = rng.integers(0, 3, (6, 6)) + np.diag([15, 18, 27, 25, 25, 12])
    fig = confusion_figure(names, counts)
    fig.canvas.draw()
    ax = fig.axes[0]
    shown = sorted(int(t.get_text()) for t in ax.texts)
    assert shown == sorted(int(n) for n in counts.ravel() if n)  # counts in the cells
    assert any(isinstance(getattr(a, "_colorbar", None), Colorbar) for a in fig.axes[1:])
    title = ax.title.get_window_extent()
    assert "6 classes" in ax.get_title() and 0 <= title.x0 and title.x1 <= fig.bbox.x1
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    plt.close(fig)
    many = [f"class_{i:03d}_with_a_long_name" for i in range(121)]
    fig = confusion_figure(many, np.diag(rng.integers(5, 60, 121)))
    ax = fig.axes[0]
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        assert [t.get_text() for t in labels] == many and labels[0].get_fontsize() >= 4
    assert not ax.texts  # no numbers in 121 x 121 cells
    plt.close(fig)
