"""Nearest-neighbour benchmark: 1,000,000 clustered 1,280-d vectors, and a 100k-row store.

    .venv/bin/python benchmarks/neighbors_bench.py               # about 15 minutes on 2 cores
    .venv/bin/python benchmarks/neighbors_bench.py --n 200000    # smaller, for a quick look

Recall@10 is measured against exact search on 1,000 held-out queries from the same distribution;
queries/s is one process answering the 1,000 queries as one batch (faiss uses both cores).
Results go to bench-out/neighbors.json and are the table in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench-out"

from penult.classify.neighbors import build_index, plan_index  # noqa: E402
from penult.features import StoreWriter  # noqa: E402


def clustered(
    n: int, d: int, *, clusters: int = 1000, seed: int = 0, chunk: int = 100_000
) -> np.ndarray:
    """Unit vectors like embeddings: cluster centres plus variation along 16 shared directions and a
    little isotropic noise (low intrinsic dimension; pure isotropic 1,280-d noise would make all
    members of a cluster equidistant, which no real embedding does)."""
    rng = np.random.default_rng(0)  # the same centres and directions for base and queries
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    basis = rng.standard_normal((16, d), dtype=np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        coef = 0.2 * rng.standard_normal((m, 16), dtype=np.float32)
        noise = 0.1 * rng.standard_normal((m, d), dtype=np.float32)
        out[s : s + m] = centres[rng.integers(0, clusters, m)] + coef @ basis + noise
    faiss.normalize_L2(out)
    return out


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_search(index, q: np.ndarray, k: int = 10) -> tuple[np.ndarray, float]:
    index.search(q[:10], k)  # warm
    t = time.perf_counter()
    _, ids = index.search(q, k)
    return ids, len(q) / (time.perf_counter() - t)


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, truth, strict=True)]))


def index_bytes(index) -> int:
    return len(faiss.serialize_index(index))


def vectors_part(n: int, d: int, results: dict) -> None:
    t = time.perf_counter()
    xb = clustered(n, d)
    xq = clustered(1000, d, seed=1)
    raw = xb.nbytes
    print(
        f"generated {n:,} x {d} ({raw / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s",
        flush=True,
    )
    rows = []
    flat = faiss.IndexFlatIP(d)
    flat.add(xb)
    t = time.perf_counter()
    _, truth = flat.search(xq, 10)
    exact_qps = len(xq) / (time.perf_counter() - t)
    rows.append(
        {"index": "exact (Flat)", "build_s": 0.0, "bytes": raw, "recall10": 1.0, "qps": exact_qps}
    )
    print(f"  exact: {exact_qps:.0f} q/s", flush=True)
    del flat
    plan = plan_index(n, d, "ivf")
    sample = xb[np.sort(np.random.default_rng(0).choice(n, plan.train_rows, replace=False))]
    quant = faiss.IndexFlatIP(d)
    ivf = faiss.IndexIVFFlat(quant, d, plan.nlist, faiss.METRIC_INNER_PRODUCT)
    t = time.perf_counter()
    ivf.train(sample)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    ivf.add(xb)
    add_s = time.perf_counter() - t
    size = index_bytes(ivf)
    print(
        f"  IVF{plan.nlist},Flat: train {train_s:.0f} s on {len(sample):,}, add {add_s:.0f} s, {size / raw:.3f}x raw",
        flush=True,
    )
    for nprobe in (4, 8, 16, 32, 64):
        ivf.nprobe = nprobe
        ids, qps = timed_search(ivf, xq)
        rows.append({"index": f"IVF{plan.nlist},Flat nprobe={nprobe}", "build_s": train_s + add_s, "bytes": size, "recall10": recall(ids, truth), "qps": qps, "default": nprobe == plan.nprobe})  # fmt: skip
        print(
            f"    nprobe {nprobe}: recall@10 {rows[-1]['recall10']:.3f}, {qps:.0f} q/s", flush=True
        )
    del ivf
    metric = faiss.METRIC_INNER_PRODUCT
    compressed = [  # sharing the trained coarse quantiser; 4-bit fast-scan PQ at 2 and 1 bits/dim
        (f"PQ{d // 2}x4fs", faiss.IndexIVFPQFastScan(quant, d, plan.nlist, d // 2, 4, metric)),
        (f"PQ{d // 4}x4fs", faiss.IndexIVFPQFastScan(quant, d, plan.nlist, d // 4, 4, metric)),
        (
            "SQ4",
            faiss.IndexIVFScalarQuantizer(
                quant, d, plan.nlist, faiss.ScalarQuantizer.QT_4bit, metric
            ),
        ),
        (
            "SQ8",
            faiss.IndexIVFScalarQuantizer(
                quant, d, plan.nlist, faiss.ScalarQuantizer.QT_8bit, metric
            ),
        ),
    ]
    for name, index in compressed:
        t = time.perf_counter()
        index.train(sample)  # the coarse quantiser is trained already; this trains the codes
        index.add(xb)
        build = time.perf_counter() - t + train_s
        size = index_bytes(index)
        for nprobe in (16, 32):
            index.nprobe = nprobe
            ids, qps = timed_search(index, xq)
            rows.append({"index": f"IVF{plan.nlist},{name} nprobe={nprobe}", "build_s": build, "bytes": size, "recall10": recall(ids, truth), "qps": qps})  # fmt: skip
            print(f"  {name} nprobe {nprobe}: {size / raw:.3f}x raw, recall@10 {rows[-1]['recall10']:.3f}, {qps:.0f} q/s", flush=True)  # fmt: skip
    del compressed
    for r in rows:
        r["ratio_to_raw"] = r["bytes"] / raw
    results["vectors"] = {"n": n, "d": d, "raw_bytes": raw, "peak_rss_mib": rss_mib(), "rows": rows}


def refine_part(n: int, d: int, results: dict) -> None:
    """What `penult index` builds above 200,000 rows: IVF + 4-bit fast-scan PQ + exact re-ranking."""
    xb = clustered(n, d)
    xq = clustered(1000, d, seed=1)
    raw = xb.nbytes
    flat = faiss.IndexFlatIP(d)
    flat.add(xb)
    _, truth = flat.search(xq, 10)
    del flat
    plan = plan_index(n, d, "ivf")
    sample = xb[np.sort(np.random.default_rng(0).choice(n, plan.train_rows, replace=False))]
    index = faiss.index_factory(d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    t = time.perf_counter()
    index.train(sample)
    for s in range(0, n, 100_000):
        index.add(xb[s : s + 100_000])
    build = time.perf_counter() - t
    size = index_bytes(index)
    rows = []
    for k_factor in (10, 20):
        faiss.downcast_index(index).k_factor = k_factor
        for nprobe in (16, 32, 64):
            faiss.extract_index_ivf(index).nprobe = nprobe
            ids, qps = timed_search(index, xq)
            rows.append({"index": f"{plan.factory} nprobe={nprobe} k_factor={k_factor}", "build_s": build, "bytes": size, "ratio_to_raw": size / raw, "recall10": recall(ids, truth), "qps": qps, "default": nprobe == plan.nprobe and k_factor == 10})  # fmt: skip
            print(
                f"  {rows[-1]['index']}: {size / raw:.3f}x raw, build {build:.0f} s, recall@10 {rows[-1]['recall10']:.3f}, {qps:.0f} q/s",
                flush=True,
            )
    results["refine"] = {"n": n, "d": d, "rows": rows}


def store_part(n: int, d: int, results: dict) -> None:
    """The same data through a penult store and `build_index` (what `penult index` runs)."""
    store = OUT / f"nn{n // 1000}k.h5"
    if not store.exists():
        xb = clustered(n, d, seed=2)
        paths = [f"v{i:07d}.jpg" for i in range(n)]
        with StoreWriter(store) as w:
            w.upsert_images(
                paths,
                ["/synthetic"] * n,
                [f"{i:064x}" for i in range(n)],
                np.zeros(n),
                np.zeros(n),
                {},
            )
            w.register_backbone("synthetic", {"architecture": "synthetic", "dim": d, "layer": "-", "preprocessing": {}, "weights_sha256": "-", "precision": "fp32"})  # fmt: skip
            for s in range(0, n, 20_000):
                w.append(
                    "synthetic",
                    paths[s : s + 20_000],
                    [f"{i:064x}" for i in range(s, min(n, s + 20_000))],
                    xb[s : s + 20_000],
                )
                w.commit()
        del xb
    xq = clustered(1000, d, seed=3)
    out = []
    for kind in ("flat", "ivf"):
        t = time.perf_counter()
        ni, plan = build_index(store, "synthetic", kind=kind)
        build = time.perf_counter() - t
        if kind == "flat":
            _, truth = ni.search(xq, 10)
        t = time.perf_counter()
        _, ids = ni.search(xq, 10)
        qps = len(xq) / (time.perf_counter() - t)
        out.append(
            {
                "index": plan.factory,
                "nprobe": plan.nprobe,
                "build_s": build,
                "recall10": recall(ids, truth),
                "qps": qps,
            }
        )
        print(
            f"  store {n:,}: {plan.factory} build {build:.1f} s, recall@10 {out[-1]['recall10']:.3f}, {qps:.0f} q/s",
            flush=True,
        )
    results["store"] = {"n": n, "d": d, "rows": out}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--store-n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=1280)
    ap.add_argument("--only", choices=["vectors", "store", "refine"])
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    path = OUT / "neighbors.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.only in (None, "store"):
        store_part(args.store_n, args.d, results)
        path.write_text(json.dumps(results, indent=1))
    if args.only in (None, "vectors"):
        vectors_part(args.n, args.d, results)
        path.write_text(json.dumps(results, indent=1))
    if args.only in (None, "refine"):
        refine_part(args.n, args.d, results)
        path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
