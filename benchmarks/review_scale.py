"""What a review action costs on a large store (issue 32, part 9): validate, move, mark dubious
and undo on a synthetic store of N rows (8-d embeddings: the label columns are what is read and
written), each the median of 3, published at once (as `penult label` does); plus reading a
level's provenance and the history. Then the same actions through `penult serve --annotate`'s
app (POST /api/label, as the review page sends them), which journals each action and publishes
when idle, with the review page answered right after each (it reads the journaled action);
then the publish itself, the page after it, and a POST that arrives while a publish runs.

    .venv/bin/python benchmarks/review_scale.py                 # 1,000,000 rows
    .venv/bin/python benchmarks/review_scale.py --rows 100000

The store is built afresh under bench-out/review/ each run (about 20 s a million rows here), so
the history starts empty.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from benchmarks_common import cpu_flags  # noqa: E402
from penult.features import FeatureStore, StoreWriter, publish, review  # noqa: E402

FP = {"architecture": "bench:synthetic", "weights_sha256": "0" * 64, "preprocessing": {},
      "layer": "x", "dim": 8, "precision": "fp32"}  # fmt: skip


def paths_of(ids: np.ndarray) -> list[str]:
    return [f"2026/{i // 100_000:03d}/IFCB_{i:09d}.png" for i in ids]


def build(path: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    with StoreWriter(path) as w:
        for s in range(0, n, 200_000):
            ids = np.arange(s, min(s + 200_000, n))
            p = paths_of(ids)
            cls = [f"class{i % 100}" for i in ids]
            w.upsert_images(
                p, ["/data"] * len(p), [f"{i + 1:064x}" for i in ids], np.full(len(p), 4096),
                np.arange(len(p)), {"label": cls, "genus": [c[:-1] for c in cls]},
                origin="/data/manifest.csv",
            )  # fmt: skip
            w.register_backbone("net", FP)
            w.append("net", p, [f"{i + 1:064x}" for i in ids], rng.standard_normal((len(p), 8)))
            w.commit()


def timed(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    print(f"cpu flags: {cpu_flags()}  ({os.cpu_count()} cores)")
    out = ROOT.parent / "bench-out" / "review"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"review_{args.rows}.h5"
    for old in out.glob(f"review_{args.rows}.h5*"):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    t = time.perf_counter()
    build(path, args.rows)
    print(f"built {args.rows:,} rows in {time.perf_counter() - t:.0f} s")
    rng = np.random.default_rng(1)
    pick = lambda k: paths_of(np.sort(rng.choice(args.rows, k, replace=False)))  # noqa: E731
    rows = [
        ("validate 1,000 images", lambda: review.validate(path, pick(1000))),
        ("move 100 images (label + genus)", lambda: review.move(path, pick(100), "class7")),
        ("mark 50 images dubious", lambda: review.mark_dubious(path, pick(50))),
        ("undo the newest change", lambda: review.undo(path)),
        ("read the label level's provenance", lambda: FeatureStore(path).provenance("label")),
        ("read the history", lambda: FeatureStore(path).history()),
    ]
    print(f"{args.rows:,} rows, median of 3 (history grows as it runs)")
    for what, fn in rows:
        print(f"  {what:36s} {1000 * timed(fn):8.0f} ms")
    served(path, args.rows, rng)


def served(path: Path, n: int, rng: np.random.Generator) -> None:
    """Actions through the server's app and the review page after each, as the page does."""
    import re

    from penult.classify.web import Site, make_app
    from starlette.testclient import TestClient

    t = time.perf_counter()
    site = Site(path, "net")
    site.warm()  # as `penult serve --annotate` does while it starts
    c = TestClient(make_app(site, annotate=True), base_url="http://127.0.0.1")
    print(f"\nthrough the server's app ({n:,} rows; started in {time.perf_counter() - t:.2f} s)")

    def get(url: str) -> float:
        t = time.perf_counter()
        r = c.get(url)
        assert r.status_code == 200, r.text
        return time.perf_counter() - t

    page = "/review?label=class7"
    first = get(page)
    token = re.search(r'csrf-token" content="([^"]+)"', c.get(page).text).group(1)
    print(f"  review page, first visit {1000 * first:.0f} ms, again {1000 * get(page):.0f} ms")
    pick = lambda k: paths_of(np.sort(rng.choice(n, k, replace=False)))  # noqa: E731
    bodies = [
        ("validate 1,000 images", lambda: {"action": "validate", "paths": pick(1000)}),
        ("move 100 images", lambda: {"action": "move", "paths": pick(100), "to": "class7"}),
        ("mark 50 images dubious", lambda: {"action": "dubious", "paths": pick(50)}),
        ("undo", lambda: {"action": "undo"}),
    ]
    for what, body in bodies:
        post, after = [], []
        for _ in range(3):
            b = body()
            t = time.perf_counter()
            r = c.post("/api/label", json=b, headers={"x-csrf-token": token})
            post.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
            after.append(get(page))
        print(f"  POST {what:28s} {1000 * statistics.median(post):6.0f} ms, then the page "
              f"{1000 * statistics.median(after):4.0f} ms (medians of 3)")  # fmt: skip
    waiting = len(FeatureStore(path).pending_shards())
    t = time.perf_counter()
    publish(path)  # what the server does once idle for 2 s (or as it stops)
    took = time.perf_counter() - t
    print(f"  publish the {waiting} journaled actions (when idle) {1000 * took:6.0f} ms, "
          f"then the page {1000 * get(page):4.0f} ms")  # fmt: skip
    c.post("/api/label", json=bodies[0][1](), headers={"x-csrf-token": token})
    worker = threading.Thread(target=publish, args=(path,))
    worker.start()
    time.sleep(0.02)
    t = time.perf_counter()
    r = c.post("/api/label", json=bodies[1][1](), headers={"x-csrf-token": token})
    late = time.perf_counter() - t
    worker.join()
    assert r.status_code == 200, r.text
    print(f"  POST move while a publish runs (waits for it)  {1000 * late:6.0f} ms")


if __name__ == "__main__":
    main()
