"""bf16 autocast (the CPU speed path) must give the same embeddings and the same head accuracy as fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from penult.extract import ExtractOptions, extract, list_images
from penult.extract.model import cpu_has_bf16
from penult.features import FeatureStore
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from conftest import cub_manifest


@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_bf16(), reason="CPU has no native bf16; autocast would be emulated")
def test_bf16_agrees_with_fp32(data_dir: Path, tmp_path: Path) -> None:
    manifest = cub_manifest(data_dir, tmp_path / "m.csv", classes=25)
    listing = list_images(manifest, root=data_dir / "cub100")
    stores = {}
    for precision in ("fp32", "bf16"):
        stores[precision] = tmp_path / f"{precision}.h5"
        s = extract(stores[precision], listing, ExtractOptions(precision=precision, progress=False))
        assert s.precision == precision and s.extracted == len(listing)
    a, b = (FeatureStore(stores[p]).embeddings("efficientnet_lite0") for p in ("fp32", "bf16"))
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.99, f"worst cosine {cos.min():.4f}"

    t = FeatureStore(stores["fp32"]).images()
    y, split = t.label_array(), t.label_array("split")
    train, test = split == "train", split == "test"
    acc = {}
    for p, x in (("fp32", a), ("bf16", b)):
        head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(
            x[train], y[train]
        )
        acc[p] = float((head.predict(x[test]) == y[test]).mean())
    assert acc["fp32"] > 0.8  # the features are good, so the comparison means something
    assert abs(acc["fp32"] - acc["bf16"]) <= 0.005, acc
