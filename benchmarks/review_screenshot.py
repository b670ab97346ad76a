"""Screenshots of `penult serve --annotate`'s review and clusters pages for the README, taken
on cub100 in Chromium.

    .venv/bin/python benchmarks/review_screenshot.py      # uses bench-out/count_cub100.h5

Review: a copy of the store has a fifth of its labels hidden; a flat LR trained on the rest
annotates them (status predicted), a few images are marked dubious, and the page shows one
species with three tiles selected. Saves docs/serve-review.jpg.

Clusters: a copy with every label hidden; the page's first clusters (the first mixes two
hummingbirds, which its members spread from most to least typical show). Saves
docs/serve-clusters.jpg.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from penult.classify import TrainOptions, annotate_store, load_model, save_model, train  # noqa: E402
from penult.classify.web import Site, make_app  # noqa: E402
from penult.extract import Featuriser  # noqa: E402
from penult.features import FeatureStore, StoreWriter, review  # noqa: E402
from servers import chromium, live  # noqa: E402

from conftest import copy_store  # noqa: E402

SRC = ROOT / "bench-out" / "count_cub100.h5"
SPECIES = "087.Mallard"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = copy_store(SRC, Path(tmp) / "cub100.h5")
        t = FeatureStore(store).images()
        with StoreWriter(store) as w:
            w.set_labels("label", t.path[::5], [""] * len(t.path[::5]))
        r = train(store, TrainOptions(quantifier_folds=0, unknown_score="none"))
        save_model(r.model, Path(tmp) / "m.skops")
        annotate_store(load_model(Path(tmp) / "m.skops"), store)
        mallards = [p for p, v in zip(t.path, t.labels["label"], strict=True) if v == SPECIES]
        review.mark_dubious(store, mallards[1:3])
        site = Site(store, "efficientnet_lite0", images=Featuriser(workers=0))
        with chromium() as browser, live(make_app(site, annotate=True)) as port:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(f"http://127.0.0.1:{port}/review?label={SPECIES}&order=asc")
            tiles = page.locator("figure.tile")
            for i in (0, 1, 2):
                tiles.nth(i).click(modifiers=["Shift"] if i else [])
            page.fill("#move-to", "088.Western_Meadowlark")
            page.wait_for_timeout(500)
            page.screenshot(path=ROOT / "docs" / "serve-review.jpg", type="jpeg", quality=75)
    print("docs/serve-review.jpg")
    with tempfile.TemporaryDirectory() as tmp:
        store = copy_store(SRC, Path(tmp) / "cub100.h5")
        t = FeatureStore(store).images()
        with StoreWriter(store) as w:
            for col in t.labels:
                w.set_labels(col, t.path, [""] * len(t.path))
        site = Site(store, "efficientnet_lite0", images=Featuriser(workers=0))
        with chromium() as browser, live(make_app(site, annotate=True)) as port:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/clusters")
            page.locator("section.cluster").first.locator(".act-skip").hover()
            page.wait_for_timeout(800)
            page.screenshot(path=ROOT / "docs" / "serve-clusters.jpg", type="jpeg", quality=75)
    print("docs/serve-clusters.jpg")


if __name__ == "__main__":
    main()
