"""Deciding what to do with each listed file before any network runs: hash (reusing stored
hashes), skip what is stored, copy identical files' embeddings, resolve ``--resize auto``."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
from penult.extract.images import (
    AUTO_SAMPLE,
    ImageError,
    auto_resize,
    mostly_greyscale,
    read_source,
    source_stat,
)
from penult.extract.options import ExtractOptions
from penult.extract.sources import FolderStream, Listing
from penult.features import TableView, match_hashes, sha_raw
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def _hash_one(path: str) -> tuple[str, str]:
    try:
        return read_source(path)[1], ""
    except ImageError as e:
        return "", str(e)


def hash_listing(
    listing: Listing, row: np.ndarray, stored: TableView, *, progress: bool
) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Content hashes of every listed file (``row``: its stored row or -1); a stored hash is
    reused while size and mtime are unchanged."""
    n = len(listing)
    sha, err = [""] * n, [""] * n
    nbytes, mtime = np.zeros(n, np.int64), np.zeros(n, np.int64)
    todo = []
    for i in range(n):
        nbytes[i], mtime[i] = source_stat(listing.absolute(i))
        r = int(row[i])
        if (
            r >= 0
            and stored.sha256[r].any()
            and stored.nbytes[r] == nbytes[i]
            and stored.mtime_ns[r] == mtime[i]
        ):
            sha[i] = stored.sha256[r].tobytes().hex()
        else:
            todo.append(i)
    quiet = not progress or len(todo) < 1000
    results = _hash_files([listing.absolute(i) for i in todo])
    for i, (h, e) in tqdm(
        zip(todo, results, strict=True), total=len(todo), desc="hashing", unit="file", disable=quiet
    ):
        sha[i], err[i] = h, e
    return sha, err, nbytes, mtime


SLOW_READ_S = 0.002  # a file slower than this to read and hash: storage that waits (network, disk)
# Reads judged together: one stall (another process had the core) is not slow storage.
SLOW_WINDOW = 8


def _hash_files(paths: list[str]) -> Iterator[tuple[str, str]]:
    """``_hash_one`` of each path, in order: in this thread while files come fast (from the page
    cache threads only add lock hand-offs: 3x slower measured on 2,000 cached photos), on 8 threads
    once most of the last ``SLOW_WINDOW`` reads were slow, so reads from network storage overlap.
    One slow read alone does not switch: on a busy machine any read may wait for the core once,
    and the threads' hand-offs then cost the run 0.3 s of CPU per 2,000 files."""
    recent: deque[bool] = deque(maxlen=SLOW_WINDOW)
    for k, path in enumerate(paths):
        t = time.perf_counter()
        got = _hash_one(path)
        recent.append(time.perf_counter() - t > SLOW_READ_S)
        yield got
        if 2 * sum(recent) > SLOW_WINDOW and k + 1 < len(paths):
            with ThreadPoolExecutor(max_workers=8) as pool:
                yield from pool.map(_hash_one, paths[k + 1 :])
            return


@dataclass
class _Plan:
    todo: list[int] = field(default_factory=list)  # listing indices to run through the model
    reuse: list[tuple[int, int]] = field(default_factory=list)  # (listing index, stored row)
    skipped: int = 0
    previously_failed: int = 0
    unreadable: list[int] = field(default_factory=list)


def plan(
    sha: list[str],
    err: list[str],
    row: np.ndarray,
    stored: TableView,
    valid: np.ndarray,
    *,
    retry_failed: bool,
) -> _Plan:
    """What to do with each listed file (``row``: its stored row or -1), decided with array
    operations (no per-file Python work): skip it (stored with this hash), skip it as failed
    before, copy the embedding of an identical file already stored, run it through the model,
    or record it as unreadable."""
    n, n_stored = len(sha), len(stored.nbytes)
    is_valid = np.zeros(n_stored, bool)
    is_valid[: len(valid)] = valid[:n_stored]
    unreadable = np.fromiter(map(bool, err), bool, n)
    skipped, prev = np.zeros(n, bool), np.zeros(n, bool)
    step = 1 << 16  # a block of the listing at a time: memory stays a few bytes a row
    for s in range(0, n if n_stored else 0, step):  # (an empty store has nothing to skip)
        r = row[s : s + step]
        at = np.maximum(r, 0)
        same = (r >= 0) & ~unreadable[s : s + step]
        same &= (stored.sha256[at] == sha_raw(sha[s : s + step])).all(axis=1)
        skipped[s : s + step] = same & is_valid[at]
        prev[s : s + step] = same & ~is_valid[at] & stored.failed[at] & (not retry_failed)
    rest = np.flatnonzero(~unreadable & ~skipped & ~prev)
    # an identical file (same bytes) already embedded elsewhere: copy its row (the last one wins)
    vrows = np.flatnonzero(is_valid)[::-1]
    twin = (
        match_hashes(stored.sha256, vrows, sha_raw([sha[i] for i in rest])) if len(rest) else rest
    )
    copy = twin >= 0
    return _Plan(
        todo=rest[~copy].tolist(),
        reuse=list(zip(rest[copy].tolist(), twin[copy].tolist(), strict=True)),
        skipped=int(skipped.sum()),
        previously_failed=int(prev.sum()),
        unreadable=np.flatnonzero(unreadable).tolist(),
    )


def resolve_resize(
    opts: ExtractOptions, listing: Listing | FolderStream
) -> tuple[ExtractOptions, str]:
    """``--resize auto`` made concrete once, from the whole listing, before any shard is taken:
    every shard and cluster worker then writes the same entry. Also the reason, for the summary."""
    if opts.resize != "auto":
        return opts, ""
    if opts.crop_pct is not None:
        return replace(opts, resize="crop"), "crop (auto: --crop-pct given)"
    grey, note = mostly_greyscale(listing.sample_files(AUTO_SAMPLE))
    mode = auto_resize(grey, opts.crop_pct)
    return replace(opts, resize=mode), f"{mode} (auto: {note})"
