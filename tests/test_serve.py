"""`penult serve`: the pages and API answer from the store (neighbours of stored images and of
uploads, filters, paging), only the store's own image files are ever served, bad uploads get a
clear message, and the server starts on localhost and stops cleanly on Ctrl-C."""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import uvicorn
from penult.classify.web import Site, make_app
from penult.extract import ExtractOptions, Featuriser, extract, list_images
from PIL import Image
from servers import chromium, free_port
from servers import live as live_app
from starlette.testclient import TestClient

from conftest import copy_hymenoptera

ROOT = Path(__file__).resolve().parents[1]
LOCAL = "http://127.0.0.1"  # the server answers only to its own names (DNS rebinding)


@pytest.fixture(scope="module")
def served(data_dir: Path, tmp_path_factory) -> Site:
    """A store of 6 ants + 6 bees, a resized copy of the first ant filed under bees, a corrupt
    file, and a link that leads out of the image root (to a file that must never be served)."""
    tmp = tmp_path_factory.mktemp("serve")
    root = copy_hymenoptera(data_dir, tmp / "imgs")
    first = sorted((root / "ants").glob("*.jpg"))[0]
    with Image.open(first) as im:
        im.convert("RGB").resize((im.width * 3 // 4, im.height * 3 // 4)).save(
            root / "bees" / "copy_of_ant.jpg", quality=80
        )
    (root / "ants" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    secret = tmp / "outside" / "secret.jpg"
    secret.parent.mkdir()
    shutil.copy(sorted((data_dir / "hymenoptera" / "bees").glob("*.jpg"))[-1], secret)
    (root / "ants" / "escape.jpg").symlink_to(secret)
    store = tmp / "s.h5"
    extract(store, list_images(str(root)), ExtractOptions(progress=False, workers=0))
    return Site(store, "efficientnet_lite0", images=Featuriser(workers=0), k=5)


@pytest.fixture(scope="module")
def client(served: Site) -> TestClient:
    return TestClient(make_app(served, max_upload=200_000), base_url=LOCAL)


def test_browse_filters_and_pages_come_from_the_store(client: TestClient, served: Site) -> None:
    bees = client.get("/api/images", params={"label": "bees"}).json()
    assert bees["total"] == 7 and {it["label"] for it in bees["items"]} == {"bees"}
    failed = client.get("/api/images", params={"failed": "yes"}).json()
    assert [it["path"] for it in failed["items"]] == ["ants/broken.jpg"]
    assert "not" in failed["items"][0]["error"] and not failed["items"][0]["embedded"]
    page = client.get("/", params={"label": "ants"})
    assert (
        page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    )
    assert page.text.count('<img src="/thumb/ants/') == 8  # 6 photos, the broken file, the link
    thumb = client.get("/thumb/" + bees["items"][0]["path"])
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 192
    assert client.get("/api/images", params={"page": "x"}).status_code == 400


def _digest(store: Path) -> str:
    """The store's bytes: its top-level file and every segment file."""
    import hashlib

    h = hashlib.sha256()
    for f in [store, *sorted(Path(f"{store}.segments").rglob("*"))]:
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_neighbours_of_a_stored_image_and_of_an_upload(client: TestClient, served: Site) -> None:
    before = _digest(served.store_path)
    first = sorted(
        p for p in served.store.images().path if p.startswith("ants/") and p[5:7] != "br"
    )[0]
    r = client.get("/api/neighbors", params={"key": "bees/copy_of_ant.jpg", "k": 3}).json()
    assert r["query"]["path"] == "bees/copy_of_ant.jpg" and len(r["hits"]) == 3
    assert r["hits"][0]["path"] == first and r["hits"][0]["score"] > 0.9  # its original
    assert all(h["path"] != "bees/copy_of_ant.jpg" for h in r["hits"])  # never itself
    # an upload is embedded with the store's backbone: the same bytes find their stored row
    data = (Path(served.store.images().root[0]) / first).read_bytes()
    r = client.post("/api/neighbors", files={"file": ("mine.jpg", data, "image/jpeg")}).json()
    assert r["hits"][0]["path"] == first and r["hits"][0]["score"] > 0.999
    page = client.get("/similar", params={"key": first})
    assert page.status_code == 200 and f'data-key="{first}"' in page.text
    assert _digest(served.store_path) == before  # read-only: the index and thumbnails live beside


@pytest.mark.parametrize(
    ("name", "data", "status", "message"),
    [
        ("junk.jpg", b"\xff\xd8 half a jpeg", 400, "junk.jpg: "),
        ("tool.exe", b"MZ\x90\x00", 400, "not an image file name"),
        ("empty.png", b"", 400, "empty file"),
        ("huge.jpg", b"\xff" * 300_000, 413, "upload"),
    ],
)
def test_a_bad_upload_gets_a_clear_message(client, name, data, status, message) -> None:
    r = client.post("/api/neighbors", files={"file": (name, data, "image/jpeg")})
    assert r.status_code == status and message in r.json()["error"]
    assert "Traceback" not in r.text
    r = client.post("/api/neighbors", data={"nofile": "x"})
    assert r.status_code == 400 and "field named 'file'" in r.json()["error"]


def test_an_upload_above_the_pixel_limit_is_refused_like_extract_refuses_it(client) -> None:
    buf = io.BytesIO()
    Image.new("1", (20000, 10000)).save(buf, "PNG")  # 200 Mpx in a few KiB: a decompression bomb
    assert len(buf.getvalue()) < 200_000
    r = client.post("/api/neighbors", files={"file": ("bomb.png", buf.getvalue(), "image/png")})
    assert r.status_code == 400 and "bomb.png: " in r.json()["error"]
    assert "too large" in r.json()["error"]


def live(site: Site):
    """The app of ``site`` on a real uvicorn server in a thread; yields its port."""
    return live_app(make_app(site))


def test_only_the_stores_own_files_are_served(served: Site) -> None:
    """Raw request paths (no client-side clean-up of ``..``) against a live server."""
    with live(served) as port:
        good = (
            "ants/" + sorted(p for p in os.listdir(Path(served.store.images().root[0]) / "ants"))[0]
        )

        def get(raw: str) -> tuple[int, bytes]:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("GET", raw)
            r = c.getresponse()
            return r.status, r.read()

        status, body = get(f"/image/{good}")
        assert status == 200 and body == (Path(served.store.images().root[0]) / good).read_bytes()
        store = served.store_path.name
        for raw in [
            f"/image/../{store}",
            f"/image/ants/../../{store}",
            "/image/../../../../etc/passwd",
            "/image//etc/passwd",
            "/image/%2Fetc%2Fpasswd",
            f"/image/%2e%2e/{store}",
            f"/image/ants%2f..%2f..%2f{store}",
            f"/image/%252e%252e/{store}",
            f"/image/ants/..%5c..%5c{store}",
            "/image/ants/escape.jpg",  # a row of the store, but a link out of the image root
            "/thumb/ants/escape.jpg",
            "/thumb/../outside/secret.jpg",
            "/image/ants/not_in_store.jpg",
            "/static/../site.py",
            "/static/%2e%2e/site.py",
        ]:
            status, body = get(raw)
            assert status == 404, raw
            assert b"JFIF" not in body and b"root:" not in body, raw


def test_serve_starts_on_localhost_warns_elsewhere_and_stops_on_ctrl_c(served: Site) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "penult.cli", "serve", str(served.store_path), "--port", str(port)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        line = p.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line and "WARNING" not in line
        for _ in range(100):  # the banner comes just before uvicorn binds
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/api/info")
                info = c.getresponse()
                break
            except ConnectionRefusedError:
                time.sleep(0.1)
        assert info.status == 200 and json.loads(info.read())["rows"] == 15
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=20) == 0
    finally:
        p.kill()
    said = []
    from penult.classify.web import serve

    real = uvicorn.Server.run
    try:
        uvicorn.Server.run = lambda self, sockets: said.append(sockets[0].getsockname())
        serve(served, host="0.0.0.0", port=port, announce=said.append)
    finally:
        uvicorn.Server.run = real
    assert "WARNING" in said[0] and "no login" in said[0] and said[-1] == ("0.0.0.0", port)


@pytest.fixture(scope="module")
def with_model(hym_store: Path, tmp_path_factory) -> tuple[Site, TestClient]:
    """The hymenoptera store served with a flat LR trained on its train split."""
    from penult.classify import TrainOptions, save_model, train

    from conftest import copy_store

    out = tmp_path_factory.mktemp("served_model")
    store = copy_store(hym_store, out / "hym.h5")
    save_model(train(store, TrainOptions()).model, out / "m.skops")
    from penult.classify import load_model

    site = Site(store, "efficientnet_lite0", images=Featuriser(workers=0),
                model=load_model(out / "m.skops"), model_file=str(out / "m.skops"))  # fmt: skip
    return site, TestClient(make_app(site), base_url=LOCAL)


def test_mistakes_name_the_confused_pairs_and_show_the_images_behind_them(with_model) -> None:
    site, client = with_model
    m = client.get("/api/mistakes").json()
    ev = site.evaluation
    pred = ev.metrics["predictions"].label
    wrong = [(t, p) for t, p in zip(ev.truth, pred, strict=True) if t != p]
    assert m["split"] == ev.split and m["n"] == len(ev.truth) == ev.n
    assert sum(p["count"] for p in m["pairs"]) == len(wrong) > 0
    at = {path: i for i, path in enumerate(ev.paths)}
    for pair in m["pairs"]:
        assert len(pair["images"]) == pair["count"]  # every one shown (fewer than 12 here)
        for it in pair["images"]:  # really that mistake, on that image
            i = at[it["path"]]
            assert (
                (ev.truth[i], pred[i])
                == (pair["true"], pair["predicted"])
                == (it["label"], it["predicted"])
            )
    recalls = [r["recall"] for r in m["per_class"]]
    assert recalls == sorted(recalls) and {r["class"] for r in m["per_class"]} == {"ants", "bees"}
    page = client.get("/mistakes").text
    top = m["pairs"][0]
    assert f'data-true="{top["true"]}" data-predicted="{top["predicted"]}"' in page
    assert page.count('<img src="/thumb/') == sum(len(p["images"]) for p in m["pairs"])


def test_score_gives_the_models_answer_for_uploaded_images(with_model, data_dir: Path) -> None:
    site, client = with_model
    ev = site.evaluation
    proba, classes = ev.metrics["predictions"].proba, list(ev.metrics["predictions"].classes)
    picks = [0, len(ev.paths) - 1]  # an ant and a bee of the held-out split
    files = [("file", (f"up{i}.jpg", (data_dir / "hymenoptera" / ev.paths[i]).read_bytes(), "image/jpeg")) for i in picks]  # fmt: skip
    files.append(("file", ("bad.png", b"\x89PNG not really", "image/png")))
    r = client.post("/api/predict", params={"k": 2}, files=files).json()["results"]
    for i, got in zip(picks, r, strict=False):  # the same bytes: the evaluation's own answer
        assert got["label"] == ev.metrics["predictions"].label[i]
        assert got["unknown"] == bool(ev.metrics["predictions"].unknown[i])
        assert got["probability"] == pytest.approx(proba[i, classes.index(got["label"])], abs=1e-4)
        assert [t["label"] for t in got["top"]][0] == got["label"] and len(got["top"]) == 2
    assert r[2]["upload"] == "bad.png" and r[2]["error"] and r[2]["label"] == ""
    assert "Score" in client.get("/score").text
    bare = TestClient(make_app(Site(site.store_path, site.backbone)), base_url=LOCAL)
    no = bare.get("/api/mistakes")
    assert no.status_code == 400 and "--model" in no.json()["error"]


# -- in a real browser (Playwright on the system's Chromium) ----------------------------------


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def test_in_a_browser_click_an_image_then_upload_one(browser, served: Site) -> None:
    first = sorted(p for p in served.store.images().path if p.startswith("ants/0"))[0]
    with live(served) as port:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/?label=bees")
        page.click('a[title="bees/copy_of_ant.jpg"]')  # Browse -> Similar for that image
        page.wait_for_selector("figure.hit")
        assert page.url.endswith("/similar?key=bees%2Fcopy_of_ant.jpg")
        hits = page.locator("figure.hit")
        assert hits.count() == served.k and hits.first.get_attribute("data-path") == first
        page.set_input_files(
            "#upload input[type=file]", str(Path(served.store.images().root[0]) / first)
        )
        page.wait_for_selector(f"#message:has-text('most similar to {Path(first).name}')")
        assert page.locator("figure.hit").first.get_attribute("data-path") == first
        page.set_input_files(
            "#upload input[type=file]",
            files=[{"name": "junk.jpg", "mimeType": "image/jpeg", "buffer": b"\xff\xd8 junk"}],
        )
        page.wait_for_selector("#message.error")
        assert "junk.jpg: " in page.text_content("#message")


def test_in_a_browser_mistakes_and_score(browser, with_model, data_dir: Path) -> None:
    site, _ = with_model
    m = site.mistakes()
    ev = site.evaluation
    with live(site) as port:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/mistakes")
        top = m["pairs"][0]
        heading = page.locator("section.pair h3").first.text_content()
        assert f"{top['true']} taken for {top['predicted']}" in " ".join(heading.split())
        page.goto(f"http://127.0.0.1:{port}/score")
        page.set_input_files("#score input[type=file]", str(data_dir / "hymenoptera" / ev.paths[0]))
        page.wait_for_selector("tr.scored")
        assert (
            page.locator("tr.scored").get_attribute("data-label")
            == ev.metrics["predictions"].label[0]
        )
        with page.expect_download() as got:  # the scores as a CSV, as `penult predict` has them
            page.click("#download")
        rows = list(csv.DictReader(open(got.value.path(), newline="", encoding="utf-8")))
        assert len(rows) == 1 and rows[0]["image"] == Path(ev.paths[0]).name
        assert rows[0]["label"] == ev.metrics["predictions"].label[0] == rows[0]["top1"]
        assert 0 < float(rows[0]["probability"]) <= 1 and rows[0]["error"] == ""


def test_scores_name_the_path_of_a_hierarchical_model_and_unknown_for_ovr(cub_store: Path) -> None:
    from penult.classify import TrainOptions, predict_files, train
    from penult.features import FeatureStore

    t = FeatureStore(cub_store).images()
    files = [str(Path(t.root[i]) / t.path[i]) for i in (0, 600)]
    images = Featuriser(workers=0)
    h = train(cub_store, TrainOptions(levels=("family", "genus"), hierarchical=True)).model
    for r in predict_files(h, files, images, top_k=3):
        assert len(r["path"]) == 3 and r["path"][-1] == r["label"] and not r["unknown"]
        assert h.paths[list(h.classes).index(r["label"])].tolist() == r["path"]  # a real branch
    ovr = train(cub_store, TrainOptions(ovr=True, threshold=0.999)).model
    said = predict_files(ovr, files, images, top_k=3)
    assert any(
        r["unknown"] and r["label"] == ovr.unknown and r["probability"] is None for r in said
    )
    assert all(len(r["top"]) == 3 and not r["error"] for r in said)


def test_a_refit_model_is_served_with_its_mistakes_from_out_of_fold_predictions(
    hym_store: Path, tmp_path: Path, data_dir: Path
) -> None:
    """A `train --cv` model saw every labelled image: serve takes it (Browse, Similar, Score),
    and its Mistakes page shows 5-fold out-of-fold predictions, never its own training fit."""
    from penult.classify import TrainOptions, evaluate, load_dataset, train
    from penult.features import FeatureStore

    from conftest import copy_store

    store = copy_store(hym_store, tmp_path / "hym.h5")
    model = train(store, TrainOptions(cv=3, quantifier_folds=0, unknown_score="none")).model
    assert model.manifest.refit_all is not None
    with pytest.raises(Exception, match="refit on all"):
        evaluate(model, store)  # still refused: nothing of this store is held out
    site = Site(store, "efficientnet_lite0", images=Featuriser(workers=0), model=model)
    client = TestClient(make_app(site), base_url=LOCAL)
    m = client.get("/api/mistakes").json()
    ev = site.evaluation
    assert m["split"] == "5-fold out-of-fold" and m["n"] == len(ev.paths) == 397
    own = model.predict(load_dataset(store, ["efficientnet_lite0"]).X).label
    pred = ev.metrics["predictions"].label
    assert (pred != own).sum() > 0  # not the refit model's answers on images it trained on
    assert ev.metrics["top1"] == pytest.approx(m["top1"])
    assert 0.7 < m["top1"] < 1.0 and sum(p["count"] for p in m["pairs"]) == int(
        (pred != ev.truth).sum()
    )
    t = FeatureStore(store).images()
    up = ("file", ("up.jpg", (data_dir / "hymenoptera" / t.path[0]).read_bytes(), "image/jpeg"))
    assert client.post("/api/predict", files=[up]).json()["results"][0]["label"] in ("ants", "bees")
    assert client.get("/").status_code == 200 and client.get("/score").status_code == 200
