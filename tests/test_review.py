"""Labels with provenance (issue 32, part 1): status, who, when and source per image and level,
an append-only history, undo, kills during label writes, a second writer."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
from penult.cli import main
from penult.features import FeatureStore, StoreError, StoreLockedError, StoreWriter, check, review
from penult.features.types import STATUSES
from store_rows import kill_loop, synthetic_rows, writer_held

from conftest import copy_store

ROOT = Path(__file__).resolve().parents[1]
GENUS = {"d0": "gA", "d1": "gA", "d2": "gB", "d3": "gB", "d4": "gC", "d5": "gC", "d6": "gC"}


def _status(store: Path, level: str = "label") -> list[str]:
    return [STATUSES[s] for s in FeatureStore(store).provenance(level).status]


def _labels(store: Path, level: str = "label") -> list[str]:
    return FeatureStore(store).images().labels[level]


def _synthetic(p: Path, origin: str = "/data/m.csv", labels: list[str] | None = None) -> list[str]:
    paths, sha, _ = synthetic_rows(0)
    lab = labels or [q[:2] for q in paths]
    with StoreWriter(p) as w:
        w.upsert_images(
            paths, ["/r"] * len(paths), sha, np.arange(20), np.arange(20),
            {"label": lab, "genus": [GENUS.get(v, "") for v in lab]}, origin=origin,
        )  # fmt: skip
    return paths


def test_labels_from_a_folder_are_validated_by_that_folder(hym_store: Path, data_dir: Path) -> None:
    fs = FeatureStore(hym_store)
    prov = fs.provenance("label")
    labelled = np.asarray(fs.images().labels["label"]) != ""
    assert labelled.all() and prov.counts()["validated"] == len(fs)
    src = np.asarray(prov.source_names)[prov.source]
    assert set(src) == {f"file:{(data_dir / 'hymenoptera').resolve()}"}
    assert (prov.when > 1.7e9).all() and set(np.asarray(prov.who_names)[prov.who]) != {""}
    assert len(fs.history()) == 0  # an import is provenance, not a change


def test_move_validate_dubious_then_undo_everything_on_real_birds(
    cub_store: Path, tmp_path: Path
) -> None:
    p = copy_store(cub_store, tmp_path / "cub.h5")
    t = FeatureStore(p).images()
    before = {c: list(v) for c, v in t.labels.items()}
    species = sorted(set(before["label"]))
    a, b = species[0], species[-1]
    genus_b = before["genus"][before["label"].index(b)]
    of_a = [q for q, v in zip(t.path, before["label"], strict=True) if v == a]
    moved, kept = of_a[:3], of_a[3:]

    assert review.move(p, moved, b, who="ann").changed["label"] == 3
    after = FeatureStore(p).images().labels
    for q in moved:
        i = t.path.index(q)
        assert after["label"][i] == b and after["genus"][i] == genus_b  # the taxonomy follows
        assert after["family"][i] == before["family"][before["label"].index(b)]
    review.validate(p, kept[:2])
    review.mark_dubious(p, kept[2:3])
    st = _status(p)
    assert st[t.path.index(kept[2])] == "dubious"
    assert FeatureStore(p).provenance().counts() == {
        "unlabelled": 0, "predicted": 0, "validated": len(t) - 1, "dubious": 1
    }  # fmt: skip
    prov = FeatureStore(p).provenance()
    i = t.path.index(moved[0])
    assert prov.who_names[prov.who[i]] == "ann" and prov.source_names[prov.source[i]] == "person"

    h = FeatureStore(p).history()
    levels = 1 + len(review.coarser_levels(FeatureStore(p), "label"))
    assert levels == 5  # species, genus, family, order and the name group
    assert len(np.unique(h["batch"])) == 3
    # every level of the three moved images, then two validated, one dubious
    assert (h["column"] == "label").sum() == 3 + 2 + 1 and len(h) == 3 * levels + 3
    info = FeatureStore(p)
    assert info.provenance("genus").counts()["validated"] == len(t)

    for _ in range(3):
        review.undo(p)
    assert FeatureStore(p).images().labels == before
    assert set(_status(p)) == {"validated"}
    with pytest.raises(StoreError, match="nothing to undo"):
        review.undo(p)
    h = FeatureStore(p).history()  # append-only: the undos are changes too
    assert len(h) == 2 * (3 * levels + 3) and check(p) == []


def test_undo_leaves_a_label_changed_since_and_names_it(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    paths = _synthetic(p)
    review.move(p, paths[:2], "d5")  # batch 1
    review.move(p, paths[1:2], "d2")  # then one of them again, into another genus
    h = FeatureStore(p).history()
    first = int(h["batch"][0])
    b = review.undo(p, first)
    assert b.changed == {"label": 1, "genus": 1}
    assert sorted(b.skipped) == [
        (paths[1], f"its genus changed since batch {first}"),
        (paths[1], f"its label changed since batch {first}"),
    ]
    assert _labels(p)[:2] == ["d0", "d2"] and _labels(p, "genus")[:2] == ["gA", "gB"]
    with pytest.raises(StoreError, match="already undone"):
        review.undo(p, first)
    with pytest.raises(StoreError, match="not in the history"):
        review.undo(p, 999)


def test_a_file_does_not_overwrite_a_persons_label_and_relabels_are_recorded(
    tmp_path: Path,
) -> None:
    p = tmp_path / "s.h5"
    paths = _synthetic(p)
    review.move(p, paths[:1], "d3")
    _synthetic(p, origin="/data/edited.csv", labels=["d6"] * 20)
    lab = _labels(p)
    assert lab[0] == "d3" and lab[1:] == ["d6"] * 19  # the person's label is kept
    h = FeatureStore(p).history()
    from_file = h.where(h["source"].astype(str) == "file:/data/edited.csv")
    # relabels are recorded (the images already "d6" did not change)
    assert len(from_file) == sum(1 for q in paths[1:] if q[:2] != "d6")
    assert set(from_file["new"].astype(str)) == {"d6"}
    prov = FeatureStore(p).provenance()
    assert prov.source_names[prov.source[1]] == "file:/data/edited.csv"


@pytest.mark.parametrize("bad", ["", "  ", "a/b", "a\\b", "x\x00y", "tab\there", ".."])
def test_bad_label_names_are_refused_and_nothing_is_written(tmp_path: Path, bad: str) -> None:
    p = tmp_path / "s.h5"
    paths = _synthetic(p)
    with pytest.raises(StoreError, match="label name"):
        review.move(p, paths[:2], bad)
    assert len(FeatureStore(p).history()) == 0 and _labels(p)[0] == "d0"


def test_unknown_images_and_an_unlabelled_one_are_named(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    paths = _synthetic(p, labels=["d0"] * 19 + [""])
    with pytest.raises(StoreError, match="no image 'nope.jpg'"):
        review.validate(p, [paths[0], "nope.jpg"])
    b = review.validate(p, paths[18:])
    assert b.changed == {"label": 1} and b.skipped == [
        (paths[19], "it has no label or prediction to validate")
    ]
    assert _status(p)[19] == "unlabelled"


def test_a_second_writer_is_refused_with_a_message_and_no_damage(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    paths = _synthetic(p)
    with writer_held(p), pytest.raises(StoreLockedError, match="being written by another process"):
        review.move(p, paths[:2], "d4")
    assert _labels(p)[:2] == ["d0", "d1"] and len(FeatureStore(p).history()) == 0
    review.move(p, paths[:2], "d4")  # once the other writer is gone
    assert _labels(p)[:2] == ["d4", "d4"] and check(p) == []


LABELLER = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}]
    from penult.features import FeatureStore, publish, review
    print("ready", flush=True)
    paths = FeatureStore(sys.argv[1]).images().path
    deferred = sys.argv[2] == "journal"  # as a server writes: journaled, published when idle
    for i in range(1000):
        review.move(sys.argv[1], paths[(i % 4) * 5 : (i % 4) * 5 + 5], f"k{{i}}",
                    publish=not deferred)
        if deferred and i % 5 == 4:
            publish(sys.argv[1])
""")


@pytest.mark.parametrize("mode", ["publish", "journal"])
def test_kill_during_label_writes_leaves_whole_batches(tmp_path: Path, mode: str) -> None:
    """Killed while it moves labels (publishing each action, or journaling them and publishing
    every fifth as a server does), the store always holds whole batches: as read before the
    next writer publishes what was journaled (readers replay it) and after."""
    p = tmp_path / "s.h5"
    _synthetic(p)
    seen = []

    def batches() -> tuple[np.ndarray, list[str]]:
        fs = FeatureStore(p)
        h = fs.history()
        lab = fs.images().labels["label"]
        _, sizes = np.unique(h["batch"], return_counts=True)
        assert (sizes == 10).all()  # 5 images x (label, genus): never half a batch
        for k in range(4):  # each group of 5 holds the label of its newest batch
            rows = h.where(h["row"] // 5 == k)
            if len(rows):
                newest = str(rows["new"][rows["column"] == "label"][-1])
                assert lab[k * 5 : k * 5 + 5] == [newest] * 5
        return h["batch"], lab

    def whole() -> None:
        before = batches()  # journaled actions are read at once
        with StoreWriter(p):  # the next writer publishes whatever whole batch was journaled
            pass
        assert check(p) == []
        after = batches()
        assert (before[0] == after[0]).all() and before[1] == after[1]
        seen.append(len(np.unique(after[0])))

    kill_loop(LABELLER, p, kills=4, after_kill=whole, wait=(0.3, 1.2), args=[mode])
    assert seen[-1] > 4  # the kills landed after some batches


def test_cli_label_moves_undoes_and_writes_the_history(tmp_path: Path, capsys) -> None:
    p = tmp_path / "s.h5"
    paths = _synthetic(p)
    lst = tmp_path / "pick.csv"
    lst.write_text("path,note\n" + "".join(f"{q},x\n" for q in paths[:3]))
    assert main(["label", str(p), "--from", str(lst), "--move", "d6", "--who", "ann"]) == 0
    assert "3 label, 3 genus changed" in capsys.readouterr().out
    assert main(["label", str(p), paths[5], "--dubious"]) == 0
    assert main(["info", str(p)]) == 0
    out = capsys.readouterr().out
    assert (
        "status[label]  19 validated, 1 dubious" in out and "history    7 label changes in 2" in out
    )
    assert main(["label", str(p), "--history", str(tmp_path / "h.csv")]) == 0
    import csv

    rows = list(csv.DictReader(open(tmp_path / "h.csv")))
    assert rows[0]["who"] == "ann" and rows[0]["new"] == "d6" and rows[0]["path"] in paths[:3]
    assert main(["label", str(p), "--undo"]) == 0
    assert "undo of batch" in capsys.readouterr().out and _status(p)[5] == "validated"
    assert main(["label", str(p), "nope.jpg", "--validate"]) == 2
    assert "has no image 'nope.jpg'" in capsys.readouterr().err
    assert main(["label", str(p), paths[0], "--move", "a/b"]) == 2


def test_training_leaves_out_dubious_labels_unless_asked(hym_store: Path, tmp_path: Path) -> None:
    from penult.classify import TrainOptions, train

    p = copy_store(hym_store, tmp_path / "hym.h5")
    plain = {"quantifier_folds": 0, "unknown_score": "none"}
    before = train(p, TrainOptions(**plain))
    t = FeatureStore(p).images()
    train_paths = [q for q, s in zip(t.path, t.labels["split"], strict=True) if s == "train"]
    review.mark_dubious(p, train_paths[:7])
    after = train(p, TrainOptions(**plain))
    assert after.n_train == before.n_train - 7
    assert any("7 images whose 'label' label is not validated" in n for n in after.notes)
    assert train(p, TrainOptions(status="all", **plain)).n_train == before.n_train


def test_predictions_go_into_the_store_and_validate_as_the_first_choice(
    cub_store: Path, tmp_path: Path, capsys
) -> None:
    from penult.classify import TrainOptions, annotate_store, load_model, save_model, train

    p = copy_store(cub_store, tmp_path / "cub.h5")
    t = FeatureStore(p).images()
    hide = t.path[::10]
    truth = np.asarray(t.labels["label"][::10])
    with StoreWriter(p) as w:  # images nobody labelled yet
        w.set_labels("label", hide, [""] * len(hide))
    plain = TrainOptions(quantifier_folds=0, unknown_score="none")
    n_train = train(p, plain).n_train
    save_model(train(p, plain).model, tmp_path / "m.skops")
    model = load_model(tmp_path / "m.skops")

    s = annotate_store(model, p)
    assert s.scored == len(hide) and s.skipped_validated == len(t) - len(hide)
    fs = FeatureStore(p)
    assert fs.provenance().counts()["predicted"] == len(hide)
    rows = np.sort(fs.find(hide))
    pred = fs.predictions("label", rows)
    order = np.argsort(fs.find(hide))
    first = np.empty(len(hide), dtype=object)
    first[order] = pred.labels[:, 0]
    assert (first == truth).mean() >= 0.8  # the model's first choice is mostly right
    assert (np.diff(pred.scores, axis=1) <= 0).all() and set(pred.model) == {s.model}
    assert set(np.asarray(fs.images().labels["label"])[rows]) == {""}  # nothing trains on them
    assert train(p, plain).n_train == n_train

    q = tmp_path / "next.csv"
    assert main(["next", str(p), "--out", str(q), "-n", "30", "--similarity", "0.9"]) == 0
    import csv

    rows_q = list(csv.DictReader(q.open()))
    assert len(rows_q) == 30 and {r["status"] for r in rows_q} == {"predicted"}
    margins = [float(r["margin"]) for r in rows_q]
    assert margins == sorted(margins)  # most doubtful first
    assert np.mean(margins) < np.mean(pred.scores[:, 0] - np.nan_to_num(pred.scores[:, 1]))
    X = fs.embeddings("efficientnet_lite0", np.sort(fs.find([r["path"] for r in rows_q])))
    Z = X / np.linalg.norm(X, axis=1, keepdims=True)
    assert (np.triu(Z @ Z.T, 1) < 0.9).all()  # no near-duplicates in the queue

    b = review.validate(p, hide[:10])
    assert b.changed == {"label": 10}
    lab = FeatureStore(p).images().labels["label"]
    assert [lab[t.path.index(q)] for q in hide[:10]] == list(first[:10])
    assert FeatureStore(p).provenance().counts()["predicted"] == len(hide) - 10
    assert main(["annotate", str(tmp_path / "m.skops"), str(p)]) == 0
    assert f"{len(hide) - 10} images given model" in capsys.readouterr().out


def test_the_queue_skips_near_duplicates_of_a_doubtful_image() -> None:
    from penult.classify.tolabel import diverse_order

    rng = np.random.default_rng(0)
    base = rng.normal(size=16)
    clump = base + 0.01 * rng.normal(size=(50, 16))  # fifty frames of one particle
    other = rng.normal(size=(20, 16))
    X = np.vstack([clump, other])
    doubt = np.r_[np.full(50, 0.99), np.linspace(0.9, 0.5, 20)]
    pick = diverse_order(X, doubt, 10, 0.95)
    assert len(pick) == 10 and (pick < 50).sum() == 1 and pick[0] < 50
    assert list(pick[1:]) == list(range(50, 59))  # then the others, most doubtful first


def test_a_damaged_history_segment_is_found_and_repaired_without_touching_labels(
    tmp_path: Path,
) -> None:
    p = tmp_path / "s.h5"
    paths = _synthetic(p)
    review.move(p, paths[:2], "d5")
    h = FeatureStore(p).history()
    seg = next(Path(f"{p}.segments").glob("history-*.h5"))
    seg.write_bytes(seg.read_bytes()[:200])  # truncated on disk
    problems = check(p)
    assert problems and seg.name in " ".join(problems)
    done = check(p, repair=True)
    assert any(f"dropped {len(h)} entries of the label history" in d for d in done), done
    assert check(p) == [] and len(FeatureStore(p).history()) == 0
    assert _labels(p)[:2] == ["d5", "d5"]  # the labels themselves are intact


def test_a_reader_of_a_large_store_reads_only_what_changed(cub_store: Path, tmp_path: Path) -> None:
    """What `penult serve` reads instead of the whole table: some rows of it, the statuses alone,
    and an id per part of a label level that moves only when that part changes (validating
    images changes their status, not their labels: their label column is not rewritten)."""
    p = copy_store(cub_store, tmp_path / "cub.h5")
    fs = FeatureStore(p)
    t = fs.images()
    rows = np.array([3, 17, len(t) - 1])
    some = fs.images(rows)
    assert some.path == [t.path[r] for r in rows] and some.root == [t.root[r] for r in rows]
    assert some.labels["genus"] == [t.labels["genus"][r] for r in rows]

    v0 = fs.label_versions("label")
    review.validate(p, t.path[:5])
    v1 = FeatureStore(p).label_versions("label")
    assert v1["label"] == v0["label"] and v1["review"] != v0["review"]
    review.mark_dubious(p, t.path[5:7])
    fs = FeatureStore(p)
    assert fs.label_versions("label")["label"] == v0["label"]
    assert (fs.statuses("label") == fs.provenance("label").status).all()
    assert fs.statuses("label")[5] == STATUSES.index("dubious")
    other = sorted(set(t.labels["label"]) - {t.labels["label"][9]})[0]
    review.move(p, [t.path[9]], other)
    v2 = FeatureStore(p).label_versions("label")
    assert v2["label"] != v0["label"] and v2["pred"] == v0["pred"]
