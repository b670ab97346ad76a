"""Hostile model files: hand-edited skops schemas and manifests must be refused before anything runs."""

from __future__ import annotations

import importlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from penult import cli
from penult.classify import Model, ModelError, TrainOptions, load_model, save_model
from penult.classify.safe_types import unsafe_nodes
from penult.classify.train import build_estimator
from penult.core.files import file_sha256

rng = np.random.default_rng(0)
X = rng.normal(size=(90, 12)).astype(np.float32)
Y = np.array([f"c{i % 3}" for i in range(90)])


def _manifest(classes) -> dict:
    return {"classes": list(classes), "backbones": [], "feature_dim": 12, "label": "label"}


@pytest.fixture
def model_path(tmp_path) -> Path:
    est = build_estimator(TrainOptions(n_jobs=1), None, []).fit(X, Y)
    return save_model(Model(est, _manifest(est.classes_)), tmp_path / "m.skops")


def _json(value) -> dict:
    return {
        "__class__": "str",
        "__module__": "builtins",
        "__loader__": "JsonNode",
        "content": json.dumps(value),
        "is_json": True,
    }


def _tuple(*values) -> dict:
    return {
        "__class__": "tuple",
        "__module__": "builtins",
        "__loader__": "TupleNode",
        "content": [_json(v) for v in values],
    }


def _rewrite(path: Path, node: dict) -> None:
    """Put ``node`` where the logistic regression's ``C`` was, and re-sign the manifest as an
    attacker who can edit both files would."""
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    schema = json.loads(members["schema.json"])
    stack, done = [schema], False
    while stack and not done:
        d = stack.pop()
        if isinstance(d, dict):
            if d.get("__class__") == "LogisticRegression":
                d["content"]["content"]["C"] = node
                done = True
            stack.extend(v for v in d.values() if isinstance(v, dict | list))
        elif isinstance(d, list):
            stack.extend(d)
    assert done, "no LogisticRegression node to replace"
    members["schema.json"] = json.dumps(schema).encode()
    _resign(path, members)


def _resign(path: Path, members: dict[str, bytes]) -> None:
    """Write the model file's members back and re-sign its manifest, as an attacker who can
    edit both files would (or as a file from an earlier penult reads)."""
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    man_path = Path(f"{path}.json")
    man = json.loads(man_path.read_text())
    man["model_sha256"] = file_sha256(path)
    man_path.write_text(json.dumps(man))


def _reexporter(attr: str) -> str:
    """A module inside numpy/scipy/sklearn that re-exports ``attr`` from the standard library."""
    for mod in (
        "numpy.distutils.fcompiler.gnu",
        "numpy.distutils.exec_command",
        "sklearn.utils._testing",
    ):
        try:
            if hasattr(importlib.import_module(mod), attr):
                return mod
        except Exception:  # noqa: BLE001 - numpy.distutils is gone in some numpy builds
            continue
    pytest.skip(f"no module re-exports {attr} in this installation")


def _hostile(kind: str, tmp_path: Path) -> tuple[dict, Path]:
    """(schema node, file it would create) for each attack."""
    marker = tmp_path / f"pwned-{kind}"
    if kind == "memmap":  # a numpy class whose constructor opens a file for writing
        node = {
            "__class__": "memmap",
            "__module__": "numpy",
            "__loader__": "ConstructorFromReduceNode",
            "content": _tuple(str(marker), "uint8", "w+", 0, [16]),
        }
    elif kind == "popen":  # subprocess.Popen reached through a module that re-exports it
        node = {
            "__class__": "Popen",
            "__module__": _reexporter("Popen"),
            "__loader__": "ConstructorFromReduceNode",
            "content": _tuple(["touch", str(marker)]),
        }
    elif kind == "check_output":  # a function node: subprocess.check_output re-exported by sklearn
        node = {
            "__class__": "check_output",
            "__module__": _reexporter("check_output"),
            "__loader__": "FunctionNode",
        }
    elif kind == "object":  # a plain object node of a class penult's models never contain
        node = {"__class__": "memmap", "__module__": "numpy", "__loader__": "ObjectNode"}
    else:  # an allowed class, but called with the file's arguments
        node = {
            "__class__": "StandardScaler",
            "__module__": "sklearn.preprocessing._data",
            "__loader__": "ConstructorFromReduceNode",
            "content": _tuple(str(marker)),
        }
    return node, marker


@pytest.mark.parametrize("kind", ["memmap", "popen", "check_output", "object", "allowed_ctor"])
def test_hand_crafted_schema_is_refused_and_nothing_runs(kind, model_path, tmp_path):
    node, marker = _hostile(kind, tmp_path)
    _rewrite(model_path, node)
    with pytest.raises(ModelError, match="refusing to load"):
        load_model(model_path)
    assert not marker.exists()
    # the same through the CLI: one clear line, exit 2, nothing written
    out = tmp_path / "p.csv"
    img = tmp_path / "x.jpg"
    img.write_bytes(b"")
    assert cli.main(["predict", str(model_path), str(img), "--out", str(out), "-q"]) == 2
    assert not marker.exists() and not out.exists()


def test_every_head_in_every_mode_is_on_the_allow_list():
    """What penult itself saves must load without --trust-model (else the list is too short)."""
    tax = {"c0": ("g0",), "c1": ("g0",), "c2": ("g1",)}
    for head in ("lr", "svm", "mlp", "knn", "nn", "centroid"):
        for mode in ("flat", "ovr", "hier"):
            o = TrainOptions(
                head=head, ovr=mode == "ovr", hierarchical=mode == "hier", pca=6, n_jobs=1
            )
            est = build_estimator(o, tax if mode == "hier" else None, ["genus"]).fit(X, Y)
            with zipfile.ZipFile(_dump(est)) as z:
                schema = json.loads(z.read("schema.json"))
            assert unsafe_nodes(schema) == [], (head, mode)
    # the tree-based k-NN index (ball tree for other metrics) and the SGD-trained MLP
    for o in (
        TrainOptions(head="knn", preprocess="none", params=(("metric", "manhattan"),)),
        TrainOptions(head="mlp", params=(("solver", "sgd"),)),
        TrainOptions(head="lr", class_weight="balanced"),
    ):
        est = build_estimator(o, None, []).fit(X, Y)
        with zipfile.ZipFile(_dump(est)) as z:
            assert unsafe_nodes(json.loads(z.read("schema.json"))) == [], o


def _dump(est):
    import io

    return io.BytesIO(sio.dumps(est))


def test_edited_manifest_classes_are_refused(model_path):
    man_path = Path(f"{model_path}.json")
    man = json.loads(man_path.read_text())
    man["classes"] = man["classes"][::-1]  # predict would print labels that disagree with top-1
    man_path.write_text(json.dumps(man))
    with pytest.raises(ModelError, match="classes differ from the copy inside"):
        load_model(model_path)


def test_edited_manifest_fingerprint_is_refused(model_path):
    man_path = Path(f"{model_path}.json")
    man = json.loads(man_path.read_text())
    man["backbones"] = [{"name": "resnet50", "fingerprint": {"dim": 12}}]
    man_path.write_text(json.dumps(man))
    with pytest.raises(ModelError, match="backbones differ"):
        load_model(model_path)


def test_format_1_model_still_loads_and_its_classes_are_checked(tmp_path):
    """Files from the previous penult hold the bare estimator; classes are checked against it."""
    est = build_estimator(TrainOptions(n_jobs=1), None, []).fit(X, Y)
    path = tmp_path / "old.skops"
    sio.dump(est, path)
    man = {"format": "penult-model", "version": 1, **_manifest(est.classes_)}
    man["model_sha256"] = file_sha256(path)
    Path(f"{path}.json").write_text(json.dumps(man))
    m = load_model(path)
    np.testing.assert_array_equal(m.predict(X).label, est.predict(X))
    man["classes"] = ["c1", "c0", "c2"]
    Path(f"{path}.json").write_text(json.dumps(man))
    with pytest.raises(ModelError, match="classes differ from the model's own"):
        load_model(path)


def test_save_refuses_a_missing_folder(tmp_path):
    est = build_estimator(TrainOptions(n_jobs=1), None, []).fit(X, Y)
    with pytest.raises(ModelError, match="does not exist"):
        save_model(Model(est, _manifest(est.classes_)), tmp_path / "no" / "such" / "m.skops")
    assert not (tmp_path / "no").exists()


def test_taxonomy_paths_edited_in_both_manifests_are_refused(tmp_path):
    """Paths edited alike in the embedded manifest and MODEL.json (hash re-signed) would make
    predict print coarse labels that disagree with the estimator's own hierarchy."""
    from penult.classify.hierarchy import HierarchicalClassifier

    tax = {"c0": ("g0",), "c1": ("g0",), "c2": ("g1",)}
    est = HierarchicalClassifier(taxonomy=tax, level_names=("genus",)).fit(X, Y)
    paths = [[*tax[c], c] for c in est.classes_]
    good = save_model(Model(est, {**_manifest(est.classes_), "paths": paths}), tmp_path / "h.skops")
    assert load_model(good).paths.tolist() == paths
    lied = [["g1", "c0"], ["g1", "c1"], ["g0", "c2"]]  # consistent in both files, signed anew
    bad = save_model(Model(est, {**_manifest(est.classes_), "paths": lied}), tmp_path / "b.skops")
    with pytest.raises(ModelError, match="taxonomy paths differ from the model's own"):
        load_model(bad)


def _old_homes(path: Path, module: str = "") -> None:
    """Rewrite a saved model as penult wrote it before its modules moved under `penult.`
    (``classify.hierarchy`` for ``penult.classify.hierarchy``), or name ``module`` instead."""
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    text = members["schema.json"].decode()
    assert '"penult.classify.' in text
    members["schema.json"] = text.replace('"penult.classify.', f'"{module or "classify."}').encode()
    _resign(path, members)


def test_a_model_saved_before_the_penult_namespace_still_loads(tmp_path):
    """Models name penult's own classes by module: those written as `classify.x` load as
    `penult.classify.x`, checked against the same allow-list (nothing else is trusted)."""
    from penult.classify.hierarchy import HierarchicalClassifier

    tax = {"c0": ("g0",), "c1": ("g0",), "c2": ("g1",)}
    est = HierarchicalClassifier(taxonomy=tax, level_names=("genus",)).fit(X, Y)
    paths = [[*tax[c], c] for c in est.classes_]
    old = save_model(Model(est, {**_manifest(est.classes_), "paths": paths}), tmp_path / "h.skops")
    _old_homes(old)
    m = load_model(old)
    np.testing.assert_array_equal(m.predict(X).label, est.predict(X))
    assert type(m.estimator) is HierarchicalClassifier
    _old_homes(old := save_model(Model(est, {**_manifest(est.classes_), "paths": paths}),
                                 tmp_path / "x.skops"), "classify.os.")  # fmt: skip
    with pytest.raises(ModelError, match="refusing to load"):
        load_model(old)
