"""What the segments' checksums cost (issue 29): a store written and read whole with Fletcher-32
on every chunk, against the same store without, interleaved in one run on the same machine.

    .venv/bin/python benchmarks/checksum_bench.py                 # 100,000 rows of 1280-d float32
    .venv/bin/python benchmarks/checksum_bench.py --rows 20000 --repeats 2
    .venv/bin/python benchmarks/checksum_bench.py --extract 600     # also penult extract, both ways

Each round writes the rows through a StoreWriter (upsert, append, commit: what extract's commits
cost beside the network), then reads every embedding back from a cold open of the store
(``FeatureStore.embeddings``: what train and evaluate read). The page cache holds the files, so
the read is the CPU's cost of checking, not the disk's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import penult.features.format2.files as segments
from benchmarks_common import cpu_flags, remove_store
from penult.features import FeatureStore, StoreWriter

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench-out" / "checksum"
FP = {"architecture": "bench:synthetic", "weights_sha256": "cd" * 32, "preprocessing": {},
      "layer": "x", "dim": 1280, "precision": "fp32"}  # fmt: skip


def one(rows: int, checksums: bool, x: np.ndarray) -> tuple[float, float]:
    segments.CHECKSUMS = checksums
    store = OUT / f"s-{int(checksums)}.h5"
    remove_store(store)
    paths = [f"d{i % 97}/{i:08d}.jpg" for i in range(rows)]
    sha = [f"{i + 1:064x}" for i in range(rows)]
    t0 = time.perf_counter()
    with StoreWriter(store) as w:
        w.upsert_images(paths, ["/r"] * rows, sha, np.arange(rows), np.arange(rows), {})
        w.register_backbone("net", FP)
        w.append("net", paths, sha, x, width=np.full(rows, 3), height=np.full(rows, 4))
    write = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = FeatureStore(store).embeddings("net")
    read = time.perf_counter() - t0
    assert np.array_equal(got, x)
    return write, read


def extract_once(files: list[str], checksums: bool) -> float:
    """images/s of a whole `extract` (the default engine) into a new store."""
    from penult.extract import ExtractOptions, extract, list_images

    segments.CHECKSUMS = checksums
    store = OUT / f"e-{int(checksums)}.h5"
    remove_store(store)
    listing = OUT / "files.txt"
    listing.write_text("".join(f"{f}\n" for f in files))
    s = extract(store, list_images(str(listing)), ExtractOptions(progress=False))
    remove_store(store)
    return s.extracted / s.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--extract", type=int, default=0, help="also time extract on N cub100 images")
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(0).normal(size=(a.rows, 1280)).astype(np.float32)
    print(f"CPU flags: {cpu_flags()}; {a.rows:,} rows x 1280 float32 ({x.nbytes / 2**20:.0f} MiB)")
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(a.repeats):
        for checksums in (False, True):  # interleaved: drift hits both alike
            times[checksums].append(one(a.rows, checksums, x))
    mb = x.nbytes / 2**20
    print("| checksums | write s (median) | read s (median) | read MiB/s |")
    print("|---|---|---|---|")
    for checksums in (False, True):
        w = statistics.median(t[0] for t in times[checksums])
        r = statistics.median(t[1] for t in times[checksums])
        print(f"| {'Fletcher-32' if checksums else 'none'} | {w:.2f} | {r:.2f} | {mb / r:.0f} |")
    w0, w1 = (statistics.median(t[0] for t in times[c]) for c in (False, True))
    r0, r1 = (statistics.median(t[1] for t in times[c]) for c in (False, True))
    print(f"checksums cost: write {w1 / w0:.2f}x, full read {r1 / r0:.2f}x")
    for c in (False, True):
        remove_store(OUT / f"s-{int(c)}.h5")
    if a.extract:
        files = [str(f) for f in sorted((ROOT.parent / "shared/data/cub100").glob("*/*.jpg"))]
        files = files[:: max(1, len(files) // a.extract)][: a.extract]
        extract_once(files[:64], True)  # warm-up: the engine's export and calibration
        rates: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(a.repeats):
            for checksums in (False, True):
                rates[checksums].append(extract_once(files, checksums))
        e0, e1 = (statistics.median(rates[c]) for c in (False, True))
        print(f"extract of {len(files)} cub100 images: {e0:.1f} img/s without checksums, "
              f"{e1:.1f} with ({e1 / e0:.3f}x; runs {rates})")  # fmt: skip


if __name__ == "__main__":
    main()
