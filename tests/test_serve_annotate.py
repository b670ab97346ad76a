"""`penult serve --annotate` (issue 32, parts 3 and 8, server side): POST /api/label changes
labels only with that flag, only with the page's CSRF token, only from this server's own pages,
never while another process writes the store, and never with a bad label name."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from penult.classify.web import Site, annotate, make_app
from penult.classify.web.annotate import Publisher
from penult.extract import Featuriser
from penult.features import (
    VALIDATED,
    FeatureStore,
    StoreError,
    StoreWriter,
    check,
    describe,
    review,
)
from servers import chromium, live
from starlette.testclient import TestClient
from store_rows import writer_held

from conftest import copy_store

LOCAL = "http://127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(hym_store: Path, tmp_path: Path) -> Path:
    return copy_store(hym_store, tmp_path / "hym.h5")


def _client(store: Path, annotate: bool = True) -> TestClient:
    site = Site(store, "efficientnet_lite0", images=Featuriser(workers=0), k=5)
    return TestClient(make_app(site, annotate=annotate), base_url=LOCAL)


def _token(c: TestClient) -> str:
    page = c.get("/").text
    m = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
    assert m and c.get("/api/info").json()["csrf"] == m.group(1)
    return m.group(1)


def _labels(store: Path, paths: list[str]) -> list[str]:
    t = FeatureStore(store).images()
    return [t.labels["label"][t.path.index(p)] for p in paths]


def test_a_page_moves_validates_marks_and_undoes_with_its_token(store: Path, monkeypatch) -> None:
    """Each action is journaled and answered (read at once by every reader), and published
    when the server is idle or stops."""
    monkeypatch.setattr(annotate, "PUBLISH_IDLE", 600.0)  # here: published when it stops
    with _client(store) as c:
        token = _token(c)
        ants = [p for p in FeatureStore(store).images().path if p.startswith("ants/")][:3]
        r = c.post("/api/label", json={"action": "move", "paths": ants, "to": "bees"},
                   headers={"x-csrf-token": token})  # fmt: skip
        assert r.status_code == 200 and r.json()["changed"]["label"] == 3  # and the order follows
        assert _labels(store, ants) == ["bees"] * 3
        r = c.post("/api/label", json={"action": "dubious", "paths": ants[:1]},
                   headers={"x-csrf-token": token})  # fmt: skip
        assert r.json()["changed"] == {"label": 1}
        assert FeatureStore(store).provenance().counts()["dubious"] == 1
        for _ in range(2):
            r = c.post("/api/label", json={"action": "undo"}, headers={"x-csrf-token": token})
            assert r.status_code == 200
        assert _labels(store, ants) == ["ants"] * 3
        assert c.get("/api/images?label=bees").json()["total"] == 204  # pages see the change
        pending = FeatureStore(store).pending_shards()
        assert [q.name.split("-")[1] for q in pending] == ["review.npz"] * 4
        assert check(store) == []  # journaled review actions are no problem
        assert "4 review action(s) not yet published" in describe(store)
        history, counts = FeatureStore(store).history(), FeatureStore(store).provenance().counts()
    assert FeatureStore(store).pending_shards() == []  # published as the server stopped
    assert _labels(store, ants) == ["ants"] * 3
    assert FeatureStore(store).provenance().counts() == counts
    after = FeatureStore(store).history()
    assert len(after) == len(history) and (after["batch"] == history["batch"]).all()


def test_an_idle_server_publishes_and_a_second_thread_waits_for_the_first(store: Path) -> None:
    ants = [p for p in FeatureStore(store).images().path if p.startswith("ants/")][:4]
    done = []

    def hold() -> None:
        with StoreWriter(store, publish=False):
            time.sleep(0.5)
            done.append("held")

    t = threading.Thread(target=hold)
    t.start()
    time.sleep(0.1)
    review.validate(store, ants[:2], publish=False)  # waits for the other thread, then writes
    t.join()
    assert done == ["held"] and len(FeatureStore(store).pending_shards()) == 1
    assert (FeatureStore(store).provenance().who != 0).sum() >= 2  # read before it is published
    with (
        pytest.raises(StoreError, match="must be published"),
        StoreWriter(store, publish=False) as w,
    ):
        w.set_labels("label", ants[:1], ["bees"])
    Publisher(store, idle=0.2).touch()
    deadline = time.monotonic() + 20
    while FeatureStore(store).pending_shards() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert FeatureStore(store).pending_shards() == []
    h = FeatureStore(store).history()
    assert len(h) == 2 and set(h["new_status"].tolist()) == {VALIDATED}


@pytest.mark.parametrize(
    ("annotate", "headers", "status", "message"),
    [
        (False, {}, 403, "read-only: serve with --annotate"),
        (True, {}, 403, "missing or wrong CSRF token"),
        (True, {"x-csrf-token": "guessed"}, 403, "missing or wrong CSRF token"),
        (True, {"origin": "http://evil.example"}, 403, "cross-origin request"),
        (True, {"host": "evil.example"}, 403, "is not this server's"),
    ],
)
def test_writes_are_refused_without_the_flag_the_token_or_this_servers_origin(
    store: Path, annotate: bool, headers: dict, status: int, message: str
) -> None:
    c = _client(store, annotate)
    good = _token(c) if annotate else ""
    if "origin" in headers or "host" in headers:
        headers = {**headers, "x-csrf-token": good}
    ants = [p for p in FeatureStore(store).images().path if p.startswith("ants/")][:2]
    r = c.post("/api/label", json={"action": "move", "paths": ants, "to": "bees"}, headers=headers)
    assert r.status_code == status and message in r.json()["error"]
    assert _labels(store, ants) == ["ants", "ants"] and len(FeatureStore(store).history()) == 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"action": "move", "paths": ["ants/x.jpg"], "to": "a/b"}, "path separator"),
        ({"action": "move", "paths": ["ants/x.jpg"], "to": "  "}, "must not be empty"),
        ({"action": "move", "paths": ["ants/x.jpg"], "to": "bad\x07"}, "control characters"),
        ({"action": "move", "paths": ["nope.jpg"], "to": "bees"}, "no image 'nope.jpg'"),
        ({"action": "erase", "paths": ["ants/x.jpg"]}, "not one of validate"),
        ({"action": "move", "paths": [], "to": "bees"}, "non-empty list"),
        ({"action": "move", "paths": ["ants/x.jpg"]}, "needs 'to'"),
        ({"action": "undo"}, "nothing to undo"),
    ],
)
def test_bad_requests_get_a_clear_message_and_change_nothing(store: Path, body, message) -> None:
    c = _client(store)
    r = c.post("/api/label", json=body, headers={"x-csrf-token": _token(c)})
    assert r.status_code == 400 and message in r.json()["error"], r.json()
    assert len(FeatureStore(store).history()) == 0


def test_a_store_written_by_another_process_refuses_writes_without_damage(store: Path) -> None:
    c = _client(store)
    token = _token(c)
    ants = [p for p in FeatureStore(store).images().path if p.startswith("ants/")][:2]
    with writer_held(store):
        r = c.post("/api/label", json={"action": "validate", "paths": ants},
                   headers={"x-csrf-token": token})  # fmt: skip
        assert r.status_code == 409
        assert "being written by another process" in r.json()["error"]
        assert "nothing was changed" in r.json()["error"]
    assert len(FeatureStore(store).history()) == 0
    r = c.post(
        "/api/label", json={"action": "validate", "paths": ants}, headers={"x-csrf-token": token}
    )
    assert r.status_code == 200 and r.json()["changed"] == {"label": 2}


def test_in_chromium_validate_a_screenful_move_and_undo_then_reopen(store: Path) -> None:
    """The review page in a real browser: select by click and shift-click, validate, move two
    images to the other class with the picker, undo the move; the store, reopened, holds
    exactly those labels."""
    site = Site(store, "efficientnet_lite0", images=Featuriser(workers=0), k=5)
    with chromium() as browser, live(make_app(site, annotate=True)) as port:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/review?label=ants&order=desc")
        tiles = page.locator("figure.tile")
        assert tiles.count() >= 100  # a screenful
        assert "ants" in page.text_content("#counts")
        tiles.nth(0).click()
        tiles.nth(9).click(modifiers=["Shift"])  # ten selected
        assert page.text_content("#selected") == "10"
        shown = [unquote(tiles.nth(i).get_attribute("data-key")) for i in range(10)]
        page.click("#act-validate")
        page.wait_for_selector("#message:has-text('validate: 10 label changed')")
        tiles = page.locator("figure.tile")
        moved = [unquote(tiles.nth(i).get_attribute("data-key")) for i in (20, 21)]
        tiles.nth(20).click()
        tiles.nth(21).click()
        page.fill("#move-to", "bees")
        page.click("#act-move")
        page.wait_for_selector("#message:has-text(\"move to 'bees'\")")
        assert _labels(store, moved) == ["bees", "bees"]
        page.keyboard.press("u")  # undo the move
        page.wait_for_selector("#message:has-text('undo of batch')")
    fs = FeatureStore(store)
    t = fs.images()
    assert all(
        v == "ants" for p, v in zip(t.path, t.labels["label"], strict=True) if p.startswith("ants/")
    )
    h = fs.history()
    assert len(np.unique(h["batch"])) == 3  # validate, move, undo: nothing else was written
    assert sorted(set(h["row"][h["batch"] == h["batch"].min()])) == sorted(fs.find(shown))


def test_the_review_page_filters_sorts_and_says_when_it_is_read_only(store: Path) -> None:
    fs = FeatureStore(store)
    ants = sorted(p for p in fs.images().path if p.startswith("ants/"))
    from penult.features import review

    review.mark_dubious(store, ants[:4])
    c = _client(store, annotate=False)
    page = c.get("/review?label=ants").text
    assert "Read-only: serve with --annotate" in page and 'name="csrf-token"' not in page
    assert page.count('class="tile') == min(120, len(ants))
    dub = c.get("/review?label=ants&status=dubious").text
    assert dub.count('class="tile dubious"') == 4 and "4 images" in dub
    r = c.get("/review?label=ants&lo=abc")
    assert r.status_code == 400 and "score from 'abc' is not a number" in r.text
    assert c.get("/review?label=ants&status=wrong").status_code == 400


def test_in_chromium_retrain_shows_a_bar_then_the_new_numbers_beside_the_old(store: Path) -> None:
    """The retrain action: `penult train` on the validated labels in the background, a progress
    bar, then the held-out numbers beside those before (the previous run's); dubious labels are
    left out of the second run."""
    site = Site(store, "efficientnet_lite0", images=Featuriser(workers=0), k=5)
    app = make_app(site, annotate=True)
    with chromium() as browser, live(app) as port:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/review?label=ants")
        page.click("#act-retrain")
        page.wait_for_selector("#retrain-result:not([hidden])", timeout=60_000)
        first = page.text_content("#retrain-result")
        assert "top-1" in first and "training images" in first
        status = TestClient(app, base_url=LOCAL).get("/api/retrain").json()
        assert status["state"] == "done" and Path(status["model"]).is_file()
        assert status["before"] is None and 0.5 < status["after"]["top1"] <= 1
        n = status["after"]["images"]
        tiles = page.locator("figure.tile")
        tiles.nth(0).click()
        tiles.nth(4).click(modifiers=["Shift"])
        page.click("#act-dubious")
        page.wait_for_selector("#message:has-text('dubious: 5 label changed')")
        page.click("#act-retrain")
        api = TestClient(app, base_url=LOCAL)
        for _ in range(600):  # the second run (its "before" is the first's), to its end
            s = api.get("/api/retrain").json()
            if s["before"] is not None and s["state"] != "running":
                break
            time.sleep(0.1)
        page.wait_for_selector("#retrain-stage:has-text('saved')")
        again = TestClient(app, base_url=LOCAL).get("/api/retrain").json()
    assert again["before"] == status["after"]  # the numbers before are the previous run's
    assert again["after"]["images"] < n  # the five dubious images were left out (those in train)
    c = TestClient(make_app(site, annotate=True), base_url=LOCAL)
    assert c.post("/api/retrain").status_code == 403  # no token: refused


def test_the_mistakes_view_puts_relabelled_images_first(store: Path) -> None:
    from penult.features import review

    ants = sorted(p for p in FeatureStore(store).images().path if p.startswith("ants/"))
    review.move(store, ants[:3], "bees")  # a reviewer's slips
    c = _client(store)
    page = c.get("/review?view=mistakes").text
    keys = re.findall(r'data-key="([^"]+)"', page)
    assert len(keys) == 120 and "bees \u2192 ants" in page
    assert set(ants[:3]) <= {unquote(k) for k in keys[:10]}
    assert c.get("/review?view=nonsense").status_code == 400


def test_in_chromium_the_queue_view_validates_as_the_first_choice(
    store: Path, tmp_path: Path
) -> None:
    from penult.classify import TrainOptions, annotate_store, load_model, save_model, train
    from penult.features import StoreWriter

    t = FeatureStore(store).images()
    hidden = t.path[::8]
    with StoreWriter(store) as w:
        w.set_labels("label", hidden, [""] * len(hidden))
    save_model(
        train(store, TrainOptions(quantifier_folds=0, unknown_score="none")).model,
        tmp_path / "m.skops",
    )
    annotate_store(load_model(tmp_path / "m.skops"), store)
    site = Site(store, "efficientnet_lite0", images=Featuriser(workers=0), k=5)
    with chromium() as browser, live(make_app(site, annotate=True)) as port:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/review?view=next")
        tiles = page.locator("figure.tile")
        assert 0 < tiles.count() <= len(hidden)
        picked = [unquote(tiles.nth(i).get_attribute("data-key")) for i in range(3)]
        firsts = [tiles.nth(i).locator(".note").text_content().split(" ")[0] for i in range(3)]
        tiles.nth(0).click()
        tiles.nth(2).click(modifiers=["Shift"])
        page.keyboard.press("v")
        page.wait_for_selector("#message:has-text('validate: 3 label changed')")
    assert _labels(store, picked) == firsts
    prov = FeatureStore(store).provenance()
    rows = FeatureStore(store).find(picked)
    assert {int(prov.status[r]) for r in rows} == {3}  # validated
