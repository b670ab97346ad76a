"""Dask cluster benchmark (issue 10): what `--cluster` costs beside a single process, per
partition, and what publishing the parts costs.

    .venv/bin/python benchmarks/cluster_bench.py                 # 600 cub100 images, local:2
    .venv/bin/python benchmarks/cluster_bench.py --images 1200 --merge-rows 200000

Measured in one run, on the same images (read once before the clocks start, so every run sees
the page cache warm), EfficientNet-Lite0 with its offline weights, fp32:

- end to end: `extract` in one process, then `extract --cluster local:2` (cluster start, model
  built once per worker, partitions of --partition-size, the parts published), each into a fresh
  store, the order alternated over --repeats; the ratio of their images/s is the engine's cost;
- per-partition overhead: the same cluster run with partitions of 32 images against
  --partition-size; the extra time over the extra partitions is what each partition costs
  (task round trip, part opened and committed, loader started);
- scheduling alone: 200 empty tasks through the same client (round trip per task);
- merge rate: --merge-parts parts of synthetic float32 embeddings (1280-d) published by
  `penult merge`; GB/s of embeddings;
- per file, on one core: stat, SHA-256 (what the driver does before planning) and decode +
  preprocessing (what a worker's loader does), on cub100 and ndsb_plankton.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from benchmarks_common import cpu_flags, remove_store

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench-out" / "cluster"
DATA = ROOT.parent / "shared" / "data"


def cpu() -> dict[str, object]:
    from penult.extract.engines import cpu_model

    return {
        "model": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "flags": cpu_flags().split(),
    }


def listing(n: int):
    from penult.extract import list_images

    full = list_images(str(DATA / "cub100"))
    step = max(1, len(full.paths) // n)
    keep = list(range(0, len(full.paths), step))[:n]
    full.paths = [full.paths[i] for i in keep]
    full.labels = {k: [v[i] for i in keep] for k, v in full.labels.items()}
    for i in range(len(full.paths)):  # warm the page cache for every run alike
        Path(full.absolute(i)).read_bytes()
    return full


def extract_run(lst, cluster: str | None, partition: int) -> float:
    from penult.extract import ExtractOptions, extract

    store = OUT / "s.h5"
    remove_store(store)
    opts = ExtractOptions(
        precision="fp32", progress=False, cluster=cluster, partition_size=partition
    )
    t = time.perf_counter()
    s = extract(store, lst, opts)
    seconds = time.perf_counter() - t
    assert s.extracted == len(lst.paths), s.report()
    return seconds


def scheduling(spec: str, tasks: int = 200) -> float:
    from penult.core.cluster import client_for, close

    client = client_for(spec)
    try:
        client.gather(client.map(lambda i: i, range(20), pure=False))  # warm
        t = time.perf_counter()
        client.gather(client.map(lambda i: i, range(tasks), pure=False))
        return (time.perf_counter() - t) / tasks
    finally:
        close(client)


def merge_rate(parts: int, rows: int, dim: int = 1280) -> dict[str, float]:
    from penult.features import StoreWriter, merge
    from penult.features.parts import PartWriter

    store = OUT / "m.h5"
    remove_store(store)
    with StoreWriter(store):
        pass
    fp = {"architecture": "bench", "weights_sha256": "0" * 64, "preprocessing": {}, "layer": "x",
          "dim": dim, "precision": "fp32"}  # fmt: skip
    rng = np.random.default_rng(0)
    per = rows // parts
    for k in range(parts):
        paths = [f"p{k}/{i:07d}.png" for i in range(per)]
        sha = [f"{k:08x}{i:056x}" for i in range(per)]
        with PartWriter(store, f"bench-{k}") as w:
            w.upsert_images(paths, ["/data"] * per, sha, np.ones(per), np.ones(per), {})
            w.register_backbone("net", fp)
            for s in range(0, per, 8192):
                x = rng.standard_normal((len(paths[s : s + 8192]), dim), dtype=np.float32)
                w.append("net", paths[s : s + 8192], sha[s : s + 8192], x)
    os.sync()
    t = time.perf_counter()
    merge(store)
    seconds = time.perf_counter() - t
    gb = parts * per * dim * 4 / 1e9
    return {"rows": parts * per, "gb": round(gb, 3), "seconds": round(seconds, 2),
            "gb_per_s": round(gb / seconds, 3)}  # fmt: skip


def input_rates(n: int = 1500) -> dict[str, dict[str, float]]:
    """What the driver and a worker's loader do per file, on one thread (warm cache): stat,
    SHA-256 of the bytes, decode + the backbone's preprocessing."""
    import hashlib

    import torch
    from penult.extract import list_images
    from penult.extract.loader import make_loader
    from penult.extract.model import build_backbone

    torch.set_num_threads(1)
    pre = build_backbone("efficientnet_lite0").preprocess
    out = {}
    for name in ("cub100", "ndsb_plankton"):
        lst = list_images(str(DATA / name))
        files = [lst.absolute(i) for i in range(len(lst.paths))][:n]
        size = sum(len(Path(f).read_bytes()) for f in files)
        t = time.perf_counter()
        for f in files:
            os.stat(f)
        stat = time.perf_counter() - t
        t = time.perf_counter()
        for f in files:
            hashlib.sha256(Path(f).read_bytes()).hexdigest()
        sha = time.perf_counter() - t
        t = time.perf_counter()
        done = sum(len(b.indices) for b in make_loader(files, pre, batch_size=32, workers=0))
        decode = time.perf_counter() - t
        out[name] = {"kb_per_file": round(size / len(files) / 1e3, 1),
                     "stat_per_s": round(len(files) / stat), "sha256_files_per_s": round(len(files) / sha),
                     "sha256_mb_per_s": round(size / sha / 1e6), "decode_per_s": round(done / decode)}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1600)
    ap.add_argument("--cluster", default="local:2")
    ap.add_argument("--partition-size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--merge-parts", type=int, default=8)
    ap.add_argument("--merge-rows", type=int, default=100_000)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    result: dict[str, object] = {"cpu": cpu(), "images": args.images, "cluster": args.cluster}
    print(json.dumps(result["cpu"]))
    lst = listing(args.images)
    single, clustered = [], []
    for r in range(args.repeats):
        order = [None, args.cluster] if r % 2 == 0 else [args.cluster, None]
        for spec in order:
            t = extract_run(lst, spec, args.partition_size)
            (clustered if spec else single).append(t)
            print(
                f"  {'cluster' if spec else 'single '} {t:6.1f} s  {len(lst.paths) / t:6.1f} img/s"
            )
    n = len(lst.paths)
    s_med, c_med = statistics.median(single), statistics.median(clustered)
    result["single_img_s"] = round(n / s_med, 2)
    result["cluster_img_s"] = round(n / c_med, 2)
    result["cluster_over_single"] = round(s_med / c_med, 3)
    from penult.core.cluster import balanced_size

    workers = int(args.cluster.partition(":")[2] or 2)
    size, small = balanced_size(n, args.partition_size, workers), 32
    t_small = extract_run(lst, args.cluster, small)
    extra = -(-n // small) - -(-n // size)
    result["per_partition_s"] = round((t_small - c_med) / extra, 3)
    result["partition_overhead_note"] = (
        f"{-(-n // small)} partitions of {small} took {t_small:.1f} s against "
        f"{-(-n // size)} of {size} in {c_med:.1f} s"
    )
    result["schedule_round_trip_ms"] = round(1000 * scheduling(args.cluster), 2)
    result["merge"] = merge_rate(args.merge_parts, args.merge_rows)
    result["input_rates_one_core"] = input_rates()
    print(json.dumps(result, indent=1))
    (OUT / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
