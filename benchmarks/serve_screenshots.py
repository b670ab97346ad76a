"""Screenshots of `penult serve`'s pages for docs/ and the README, taken on cub100 in Chromium.

    .venv/bin/python benchmarks/resize_bench.py --only cub     # makes bench-out/resize/cub100.h5
    .venv/bin/python benchmarks/serve_screenshots.py

Trains a flat LR on the store's Lite0 features (its stored split), serves the store with it,
and saves docs/serve-browse.jpg, serve-similar.jpg, serve-mistakes.jpg and serve-score.jpg.
"""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import uvicorn  # noqa: E402
from penult.classify import TrainOptions, load_model, save_model, train  # noqa: E402
from penult.classify.web import Site, make_app  # noqa: E402
from penult.extract import Featuriser  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

STORE = ROOT / "bench-out" / "resize" / "cub100.h5"
BACKBONE = "efficientnet_lite0"
DOCS = ROOT / "docs"


def main() -> None:
    model_file = ROOT / "bench-out" / "serve_lr.skops"
    save_model(train(STORE, TrainOptions(backbones=(BACKBONE,))).model, model_file)
    site = Site(STORE, BACKBONE, images=Featuriser(workers=0), model=load_model(model_file),
                model_file=str(model_file), thumbs=Path(tempfile.mkdtemp()))  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(site), port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    t = site.store.images([1234])
    photo = Path(t.root[0]) / t.path[0]
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = b.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{url}/?label=087.Mallard")
        page.wait_for_load_state("networkidle")
        page.screenshot(path=DOCS / "serve-browse.jpg", type="jpeg", quality=75)
        page.click("figure a >> nth=3")
        page.wait_for_selector("figure.hit")
        page.wait_for_load_state("networkidle")
        page.screenshot(path=DOCS / "serve-similar.jpg", type="jpeg", quality=75)
        page.goto(f"{url}/mistakes")
        page.wait_for_load_state("networkidle")
        page.screenshot(path=DOCS / "serve-mistakes.jpg", type="jpeg", quality=75)
        page.goto(f"{url}/score")
        page.set_input_files("#score input[type=file]", str(photo))
        page.wait_for_selector("tr.scored")
        page.screenshot(path=DOCS / "serve-score.jpg", type="jpeg", quality=75)
        b.close()
    server.should_exit = True
    print(
        "wrote",
        ", ".join(f"docs/serve-{n}.jpg" for n in ("browse", "similar", "mistakes", "score")),
    )


if __name__ == "__main__":
    main()
