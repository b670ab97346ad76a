"""The clusters page of `penult serve --annotate` (issue 32, parts 3 and 5): name a cluster of
unlabelled bird photos, grow its class by accepting and rejecting what the page proposes, in
Chromium; then the store, reopened, holds exactly those labels and remembers the rejects."""

from __future__ import annotations

import re
from urllib.parse import unquote

import numpy as np
from penult.classify.clusters import find_clusters, spread
from penult.classify.web import Site, make_app
from penult.features import VALIDATED, FeatureStore
from servers import chromium, live
from starlette.testclient import TestClient

LOCAL = "http://127.0.0.1"


def _keys(page) -> list[str]:
    tiles = page.locator("#review-grid figure.tile")
    return [unquote(tiles.nth(i).get_attribute("data-key")) for i in range(tiles.count())]


def test_in_chromium_name_a_cluster_then_grow_it_by_reject_and_accept(hidden) -> None:
    store, truth = hidden
    made = find_clusters(store)  # what the page will show: the same clustering
    site = Site(store, "efficientnet_lite0", k=5)
    with chromium() as browser, live(make_app(site, annotate=True)) as port:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/clusters")
        first = page.locator("section.cluster").first
        assert first.get_attribute("data-cluster") == "1"
        assert first.locator(".size").text_content() == str(len(made.members[0]))
        shown = [unquote(k) for k in first.locator("figure").evaluate_all(
            "fs => fs.map(f => f.dataset.key)")]  # fmt: skip
        assert shown == spread(made.members[0], 30)  # most typical to least
        species = max(set(truth[p] for p in shown), key=[truth[p] for p in shown].count)
        first.locator(".name-to").fill(species)
        first.locator(".act-name").click()
        page.wait_for_selector(f"#message:has-text('named {len(made.members[0])} images')")
        # the named cluster is gone from the page; the others keep their numbers
        numbers = page.locator("section.cluster").evaluate_all(
            "ss => ss.map(s => Number(s.dataset.cluster))"
        )
        assert 1 not in numbers and numbers[0] == 2

        page.click("text=grow a class")
        assert page.text_content("#grow-label") == species
        rejected = _keys(page)
        assert len(rejected) == 20 and not set(rejected) & set(made.members[0])
        page.click("#act-reject")
        page.wait_for_selector(f"#message:has-text(\"reject as '{species}'\")")
        accepted = _keys(page)
        assert len(accepted) == 20 and not set(accepted) & set(rejected)  # a reject is kept
        page.keyboard.press("y")  # accept all
        page.wait_for_selector(f"#message:has-text(\"move to '{species}'\")")
        assert not set(_keys(page)) & set(accepted)

    fs = FeatureStore(store)
    t = fs.images()
    labelled = {p for p, v in zip(t.path, t.labels["label"], strict=True) if v}
    assert labelled == set(made.members[0]) | set(accepted)
    assert {t.labels["label"][t.path.index(p)] for p in labelled} == {species}
    status = fs.provenance().status
    assert all(status[r] == VALIDATED for r in fs.find(sorted(labelled)))
    h = fs.history()
    rej = h["source"].astype(str) == f"reject:{species}"
    assert sorted(t.path[r] for r in np.unique(h["row"][rej])) == sorted(rejected)
    assert len(np.unique(h["batch"])) == 3  # name, reject, accept: nothing else was written


def test_cluster_writes_need_the_flag_and_token_and_refuse_what_is_no_cluster(hidden) -> None:
    store, _ = hidden
    site = Site(store, "efficientnet_lite0", k=5)
    ro = TestClient(make_app(site), base_url=LOCAL)
    page = ro.get("/clusters").text
    assert "data-cluster=" in page and "act-name" not in page  # read-only: look, no buttons
    assert ro.post("/api/cluster", json={"cluster": 1, "to": "x"}).status_code == 403
    c = TestClient(make_app(site, annotate=True), base_url=LOCAL)
    token = re.search(r'csrf-token" content="([^"]+)"', c.get("/clusters").text).group(1)

    def post(body):
        return c.post("/api/cluster", json=body, headers={"x-csrf-token": token})

    r = post({"cluster": 999, "to": "x"})
    assert r.status_code == 400 and "no cluster 999" in r.json()["error"]
    assert post({"cluster": "1", "to": "x"}).status_code == 400
    r = post({"cluster": 2, "to": "a/b"})
    assert r.status_code == 400 and "a/b" in r.json()["error"]
    assert post({"cluster": 2, "skip": True}).status_code == 200
    assert 'data-cluster="2"' not in c.get("/clusters").text  # skipped: hidden
    assert post({"recluster": True}).status_code == 200
    assert 'data-cluster="2"' in c.get("/clusters").text  # a new clustering shows it again
    assert "No class has validated images yet" in c.get("/clusters?view=grow").text
    r = post({"cluster": 1, "to": "some_bird"})
    assert r.status_code == 200 and r.json()["changed"]["label"] > 0
    grow = c.get("/clusters?view=grow").text
    assert 'id="grow-label">some_bird<' in grow and grow.count('class="tile"') == 20
