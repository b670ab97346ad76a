"""The notebook API (`import penult`): a store as a DataFrame, train, predict, count."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import penult
import pytest
from penult.classify import save_model
from penult.core import OptionError
from penult.features import StoreError


def test_import_penult_loads_neither_torch_nor_the_store():
    code = "import sys, penult; print(sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'h5py', 'pandas')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_store_trains_predicts_and_counts_as_the_cli_does(cub_store, tmp_path):
    store = penult.open_store(cub_store)
    t = store.table()
    assert len(t) == 1155 and {"path", "root", "sha256", "error", "label", "split"} <= set(t)
    assert t["has_efficientnet_lite0"].sum() == (t["error"] == "").sum() > 1000
    X, rows = store.embeddings()
    assert X.shape == (len(rows), 1280) and np.isfinite(X).all()

    result = penult.train(store, head="lr")
    scored = penult.predict(result.model, store)
    assert list(scored.index) == rows.tolist()
    test = scored[scored["split"] == result.eval_split]
    top1 = float((test["label"] == test["true_label"]).mean())
    assert top1 == pytest.approx(result.metrics["top1"])  # the same model, rows and labels
    assert top1 > 0.6  # 20 bird species from frozen EfficientNet-Lite0 features

    counts = penult.count(scored, by="split")
    assert counts.loc["total"].sum() == len(scored)
    assert counts.loc["total", "test"] == len(test)
    per_class = penult.count(scored)
    assert per_class.loc["total", "images"] == len(scored) and len(per_class) == 21

    save_model(result.model, tmp_path / "m.skops")  # a saved model by path: the same answers
    again = penult.predict(tmp_path / "m.skops", cub_store)
    assert (again["label"] == scored["label"]).all()


def test_mistakes_get_one_line_naming_the_problem(cub_store, tmp_path):
    with pytest.raises(OptionError, match="no option heads"):
        penult.train(cub_store, heads="lr")
    with pytest.raises(OptionError, match="'sample'"):
        penult.count(penult.open_store(cub_store).table(), by="sample")
    with pytest.raises(StoreError, match="nope.h5: no such feature store"):
        penult.open_store(tmp_path / "nope.h5")
