"""Labelling a data set from scratch by clusters and growing (issue 32, part 5), with a scripted
reviewer that only accepts or rejects what penult proposes.

cub100's store (EfficientNet-Lite0, 5,902 images) is copied and every label level hidden. The
reviewer knows the true species (the original labels) and looks only at what a proposal shows:

1. clusters (`classify.find_clusters`), largest first: it names a cluster with the species of
   the members the page shows (--show of them, from most to least typical: `classify.spread`)
   when at least --pure of those are one species (one action labels every member), else skips
   it (one action);
2. then rounds of growing (`classify.grow`): each labelled species proposes its --batch nearest
   unlabelled images; the reviewer accepts the batch when at least --pure of it is that species
   (one action labels them all) and rejects it otherwise (one action; remembered). It stops
   when a round accepts nothing or after --max-actions.

Reported: actions, images labelled, images per action, and the precision of the labels made
(against the hidden truth). The same actions go through the store as `penult label` makes them.

With --browser the reviewer is a Playwright script in Chromium on `penult serve --annotate`'s
clusters page (started here as a user would): it reads the tiles a cluster or a grow proposal
shows and clicks "Name", "Mixed: skip", "Accept all" or "Reject all", nothing else; the labels
are then read back from the store.

    .venv/bin/python benchmarks/cluster_labelling.py
    .venv/bin/python benchmarks/cluster_labelling.py --browser
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from benchmarks_common import cpu_flags  # noqa: E402
from mistakes_bench import store_for  # noqa: E402
from penult.classify.clusters import find_clusters, grow, reject, spread  # noqa: E402
from penult.classify.web.board import SHOW  # noqa: E402
from penult.features import FeatureStore, StoreWriter, review  # noqa: E402


def hidden_copy(src: Path, dst: Path) -> dict[str, str]:
    """``src`` copied to ``dst`` with every label level emptied; returns path -> true label."""
    for old in dst.parent.glob(dst.name + "*"):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    shutil.copy(src, dst)
    shutil.copytree(f"{src}.segments", f"{dst}.segments")
    t = FeatureStore(dst).images()
    truth = dict(zip(t.path, t.labels["label"], strict=True))
    with StoreWriter(dst) as w:
        for col in t.labels:
            if col not in ("split", "sample"):
                w.set_labels(col, t.path, [""] * len(t.path))
    return truth


@contextlib.contextmanager
def served(store: Path):
    """`penult serve STORE --annotate` on a free port, as a user starts it; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("penult")
    proc = subprocess.Popen([str(exe), "serve", str(store), "--annotate", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/api/info", timeout=5).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit(f"penult serve exited ({proc.returncode})") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def by_browser(store: Path, truth: dict[str, str], args) -> tuple[int, list, float]:
    """The scripted reviewer on the clusters page in Chromium: (actions, log, seconds)."""
    from playwright.sync_api import sync_playwright

    exe = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    if exe is None:
        raise SystemExit("no Chromium (make browser installs Debian's)")
    actions, log, waits = 0, [], []

    def keys(loc) -> list[str]:
        return [unquote(k) for k in loc.evaluate_all("fs => fs.map(f => f.dataset.key)")]

    def click(page, button) -> None:
        t = time.perf_counter()
        button.click()
        said = page.wait_for_selector("#message.message:not(:empty)")
        waits.append(time.perf_counter() - t)
        if "error" in (said.get_attribute("class") or ""):
            raise SystemExit(f"the page refused: {said.text_content()}")

    def labelled() -> int:
        return sum(map(bool, FeatureStore(store).images().labels["label"]))

    def pure(paths: list[str]) -> tuple[str, bool]:
        shown = [truth[p] for p in paths]
        species, count = np.unique(shown, return_counts=True)
        return str(species[count.argmax()]), count.max() / len(shown) >= args.pure

    with served(store) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page()
        t0 = time.perf_counter()
        while actions < args.max_actions:  # clusters: named or skipped, each leaves the page
            page.goto(f"{url}/clusters")
            first = page.locator("section.cluster").first
            if not first.count():
                break
            name, ok = pure(keys(first.locator("figure")))
            actions += 1
            if ok:
                first.locator(".name-to").fill(name)
                click(page, first.locator(".act-name"))
            else:
                click(page, first.locator(".act-skip"))
        log.append(("clusters", actions, labelled()))
        while actions < args.max_actions:  # rounds of growing every named class
            page.goto(f"{url}/clusters?view=grow")
            classes = page.locator("select[name=grow] option").all_text_contents()
            accepted = 0
            for name in classes:
                if actions >= args.max_actions:
                    break
                page.goto(f"{url}/clusters?grow={quote(name)}&n={args.batch}")
                shown = keys(page.locator("#review-grid figure.tile"))
                if not shown:
                    continue
                actions += 1
                if np.mean([truth[q] == name for q in shown]) >= args.pure:
                    click(page, page.locator("#act-accept"))
                    accepted += 1
                else:
                    click(page, page.locator("#act-reject"))
            log.append(("grow round", actions, labelled()))
            if not accepted:
                break
        secs = time.perf_counter() - t0
        browser.close()
    print(f"  browser: {np.median(waits):.2f} s median from a click to the page reloaded "
          f"and saying what was done (max {np.max(waits):.2f} s)")  # fmt: skip
    return actions, log, secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="cub100")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--show", type=int, default=SHOW, help="members a cluster shows")
    ap.add_argument("--batch", type=int, default=20, help="images a grow proposal shows")
    ap.add_argument("--pure", type=float, default=0.9, help="share the reviewer needs to accept")
    ap.add_argument("--max-actions", type=int, default=400)
    ap.add_argument("--browser", action="store_true",
                    help="review through the clusters page in Chromium (Playwright)")  # fmt: skip
    args = ap.parse_args()
    print(f"cpu flags: {cpu_flags()}  ({os.cpu_count()} cores)")
    out = Path(args.out)
    store = out / "cluster_labelling" / f"{args.data}.h5"
    store.parent.mkdir(parents=True, exist_ok=True)
    truth = hidden_copy(store_for(args.data, out), store)
    if args.browser:
        actions, log, secs = by_browser(store, truth, args)
        t = FeatureStore(store).images()
        made = {p: v for p, v in zip(t.path, t.labels["label"], strict=True) if v}
        report(args, truth, made, actions, log, secs, "clusters page in Chromium")
        return
    t0 = time.perf_counter()
    actions, made, log = 0, {}, []

    cs = find_clusters(store)
    for members in cs.members:
        if actions >= args.max_actions:
            break
        shown = [truth[p] for p in spread(members, args.show)]
        species, count = np.unique(shown, return_counts=True)
        actions += 1
        if count.max() / len(shown) >= args.pure:
            name = str(species[count.argmax()])
            review.move(store, members, name)
            made |= dict.fromkeys(members, name)
    log.append(("clusters", actions, len(made)))

    while actions < args.max_actions:
        accepted = 0
        for name in sorted(set(made.values())):
            if actions >= args.max_actions:
                break
            p = grow(store, name, n=args.batch)
            if not p.paths:
                continue
            actions += 1
            if np.mean([truth[q] == name for q in p.paths]) >= args.pure:
                review.move(store, p.paths, name)
                made |= dict.fromkeys(p.paths, name)
                accepted += 1
            else:
                reject(store, p.paths, name)
        log.append(("grow round", actions, len(made)))
        if not accepted:
            break
    secs = time.perf_counter() - t0
    print(f"  {len(cs.members)} clusters ({cs.unclustered} images unclustered)")
    report(args, truth, made, actions, log, secs, "classify.clusters calls")


def report(args, truth, made, actions, log, secs, how) -> None:
    right = sum(truth[p] == v for p, v in made.items())
    print(f"\n{args.data}: {len(truth)} images, labels hidden; reviewed through {how}")
    for what, a, n in log:
        print(f"  after {what:10s}: {a:4d} actions, {n:5d} images labelled")
    print(f"  images per action {len(made) / max(actions, 1):.1f}, precision "
          f"{right / max(len(made), 1):.3f}, {secs / max(actions, 1):.2f} s per action "
          f"(proposal + write{' + page' if args.browser else ''})")  # fmt: skip


if __name__ == "__main__":
    main()
