"""`penult demo` runs the whole pipeline in one command (on a small real folder, to stay fast)."""

from __future__ import annotations

import os
import shutil

import pytest
from penult.demo import run_demo

pytestmark = pytest.mark.slow


def test_demo_extracts_trains_reports_and_scores(data_dir, tmp_path):
    root = tmp_path / "birds"
    for s in sorted(p.name for p in (data_dir / "cub100").iterdir() if p.is_dir())[:3]:
        (root / "family" / s).mkdir(parents=True)
        for f in sorted((data_dir / "cub100" / s).glob("*.jpg"))[:10]:
            os.symlink(f, root / "family" / s / f.name)
    shutil.copy(data_dir / "hymenoptera/ants/imageNotFound.gif", root / "family" / "broken.gif")
    text = run_demo(data=str(root), out=str(tmp_path / "out"), progress=False)
    for part in ("== extract", "== train a flat head", "top-1 accuracy", "== train a hierarchical head",
                 "== score 5 images", "FAILED", "== nearest neighbours"):  # fmt: skip
        assert part in text, part
    assert (tmp_path / "out" / "report" / "report.html").exists()
    assert (tmp_path / "out" / "neighbors.html").exists()
    assert (tmp_path / "out" / "flat.skops.json").exists()
    assert (tmp_path / "out" / "predictions.csv").read_text().count("\n") == 6
