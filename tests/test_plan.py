"""Resume planning with array operations equals the per-file reference on random stores."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from penult.extract.plan import plan
from penult.extract.sources import Listing
from penult.features import ImageTable, TableView, sha_raw


def _reference(listing, sha, err, table, valid, *, retry_failed):
    """The per-file plan penult used before (a dict per lookup), kept as the brute-force oracle."""
    index = {p: i for i, p in enumerate(table.path)}
    by_hash = {table.sha256[r]: r for r in np.flatnonzero(valid)}
    todo, reuse, skipped, prev, unreadable = [], [], 0, 0, []
    for i, p in enumerate(listing.paths):
        r = index.get(p)
        same = r is not None and table.sha256[r] == sha[i]
        if err[i]:
            unreadable.append(i)
        elif same and r < len(valid) and valid[r]:
            skipped += 1
        elif same and table.error[r] and not retry_failed:
            prev += 1
        elif sha[i] in by_hash:
            reuse.append((i, by_hash[sha[i]]))
        else:
            todo.append(i)
    return todo, reuse, skipped, prev, unreadable


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("retry_failed", [False, True])
def test_vectorised_plan_equals_the_reference(seed, retry_failed):
    rng = np.random.default_rng(seed)
    n_stored = int(rng.integers(0, 300))
    hashes = [f"{h:064x}" for h in rng.integers(0, 60, n_stored)]  # repeated bytes: copies
    table = ImageTable(
        path=[f"d/{i:04d}.jpg" for i in range(n_stored)],
        root=["/r"] * n_stored,
        sha256=hashes,
        error=["corrupt" if rng.random() < 0.1 else "" for _ in range(n_stored)],
    )
    valid = rng.random(n_stored - int(rng.integers(0, 5)) if n_stored > 5 else n_stored) < 0.6
    n = int(rng.integers(0, 400))
    paths = [f"d/{int(i):04d}.jpg" for i in rng.choice(600, n, replace=False)]
    sha = [f"{h:064x}" for h in rng.integers(0, 90, n)]
    for i in rng.choice(n, n // 3, replace=False) if n else []:  # unchanged files keep their hash
        if paths[i] in table.path:
            sha[i] = table.sha256[table.path.index(paths[i])]
    err = ["" if rng.random() > 0.05 else "unreadable" for _ in range(n)]
    sha = ["" if e else s for s, e in zip(sha, err, strict=True)]
    listing = Listing(root="/r", paths=paths)
    stored = TableView(
        sha_raw(table.sha256),
        np.zeros(n_stored, np.int64),
        np.zeros(n_stored, np.int64),
        np.array([bool(e) for e in table.error], bool),
    )
    at = table.index()
    row = np.array([at.get(p, -1) for p in listing.paths], np.int64)
    got = plan(sha, err, row, stored, valid, retry_failed=retry_failed)
    want = _reference(listing, sha, err, table, valid, retry_failed=retry_failed)
    assert (got.todo, got.reuse, got.skipped, got.previously_failed, got.unreadable) == want


def test_match_hashes_confirms_all_bytes_when_prefixes_collide():
    from penult.features import match_hashes

    keys = np.zeros((4, 32), np.uint8)
    keys[:, 31] = [1, 2, 2, 3]  # the same 8-byte prefix for every key
    queries = np.zeros((3, 32), np.uint8)
    queries[:, 31] = [2, 3, 9]
    assert match_hashes(keys, np.arange(4), queries).tolist() == [1, 3, -1]
    assert match_hashes(keys, np.array([3, 2, 1, 0]), queries).tolist() == [2, 3, -1]
    assert match_hashes(keys, np.arange(0), queries).tolist() == [-1, -1, -1]
    # many keys sharing a prefix, a duplicate, queries a block at a time: the first of ``rows``
    # holding each digest, as a brute-force search finds it
    from penult.features.types import HashIndex

    rng = np.random.default_rng(0)
    keys = rng.integers(0, 256, (3000, 32), dtype=np.uint8)
    keys[:2000, :8] = 0
    keys[100] = keys[1500]
    rows = rng.permutation(3000)
    queries = np.concatenate(
        [keys[rng.choice(3000, 60)], keys[[100]], rng.integers(0, 256, (5, 32), dtype=np.uint8)]
    )
    queries[-1, :8] = 0  # an unknown digest with the shared prefix
    want = [next((r for r in rows.tolist() if (keys[r] == q).all()), -1) for q in queries]
    assert HashIndex(keys, rows).find(queries, block=7).tolist() == want


def test_plan_on_an_empty_store_runs_everything():
    stored = TableView(np.zeros((0, 32), np.uint8), np.zeros(0), np.zeros(0), np.zeros(0, bool))
    p = plan(
        ["ab" * 32, ""],
        ["", "unreadable"],
        np.array([-1, -1]),
        stored,
        np.zeros(0, bool),
        retry_failed=False,
    )
    assert (p.todo, p.reuse, p.skipped, p.unreadable) == ([0], [], 0, [1])


def test_hashes_come_back_in_order_read_in_this_thread_or_on_threads(data_dir, monkeypatch):
    """Files that read fast are hashed in the calling thread; once most reads are slow (network
    storage), on threads: either way each path gets its own hash or reason, in order. A single
    slow read (a stall on a busy machine) does not switch."""
    import hashlib

    import penult.extract.plan as run

    files = [str(f) for f in sorted((data_dir / "cub100").glob("*/*.jpg"))[:40]]
    files.insert(7, str(data_dir / "no-such-file.jpg"))
    want = [
        (hashlib.sha256(open(f, "rb").read()).hexdigest(), "") if "no-such" not in f else None
        for f in files
    ]
    threads_seen = []
    real = run._hash_one

    stall = {3}  # the reads that wait (as for a core another process holds)

    def spy(path):
        threads_seen.append(threading.get_ident())
        if len(threads_seen) - 1 in stall:
            time.sleep(0.02)
        return real(path)

    monkeypatch.setattr(run, "_hash_one", spy)
    for slow_after in (float("inf"), 0.0):  # never slow; every file slow
        monkeypatch.setattr(run, "SLOW_READ_S", slow_after)
        threads_seen.clear()
        got = list(run._hash_files(files))
        assert [g for g, w in zip(got, want, strict=True) if w is not None] == [
            w for w in want if w is not None
        ]
        assert got[7][0] == "" and "not found" in got[7][1]
        assert (len(set(threads_seen)) > 1) == (slow_after == 0.0)
    monkeypatch.setattr(run, "SLOW_READ_S", 0.01)
    for stalls, switched in (({3}, False), ({3, 4, 12, 20}, False), (set(range(2, 40)), True)):
        stall.clear()
        stall.update(stalls)
        threads_seen.clear()
        got = list(run._hash_files(files))
        assert [g for g, w in zip(got, want, strict=True) if w is not None] == [
            w for w in want if w is not None
        ]
        assert (len(set(threads_seen)) > 1) == switched, stalls
