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
- publish rate: --merge-parts parts of synthetic float32 embeddings (1280-d) published by
  `penult merge` twice, on copies of the same parts: replayed (the shards written again as
  segments) and linked (sealed first, as workers do, then their segments hard-linked); rows/s
  and GB/s of embeddings (`--merge-only` runs this alone; `--growth PARTS` measures how a
  linked part's commit grows with the pieces already in the store);
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


def merge_rate(
    parts: int, rows: int, dim: int = 1280, *, stored: bool = False
) -> dict[str, object]:
    """Publishing the same parts two ways, each into a fresh copy of one store: replayed
    (today's merge: every shard read and its rows written again as segments) and linked (the
    parts sealed first, on the workers, then their segments hard-linked into the store). The
    sealing is timed apart: it runs on the workers, in parallel, not on the single writer.
    ``stored``: parts as cluster workers write them (embeddings of images the driver stored
    before the tasks ran), else as ``extract --shard`` jobs do (their own new images too)."""
    import shutil

    from penult.features import Publishing, StoreWriter, merge
    from penult.features.format2.sealed import seal
    from penult.features.parts import PartWriter, list_parts

    base = OUT / "merge"
    shutil.rmtree(base, ignore_errors=True)
    (base / "replay").mkdir(parents=True)
    store = base / "replay" / "m.h5"
    per = rows // parts
    with StoreWriter(store) as w:
        for k in range(parts if stored else 0):  # the driver stores the images first
            paths = [f"p{k}/{i:07d}.png" for i in range(per)]
            sha = [f"{k:08x}{i:056x}" for i in range(per)]
            w.upsert_images(paths, ["/data"] * per, sha, np.ones(per), np.ones(per), {})
    fp = {"architecture": "bench", "weights_sha256": "0" * 64, "preprocessing": {}, "layer": "x",
          "dim": dim, "precision": "fp32"}  # fmt: skip
    rng = np.random.default_rng(0)
    for k in range(parts):
        paths = [f"p{k}/{i:07d}.png" for i in range(per)]
        sha = [f"{k:08x}{i:056x}" for i in range(per)]
        with PartWriter(store, f"bench-{k}", sealing=False) as w:
            if not stored:
                w.upsert_images(paths, ["/data"] * per, sha, np.ones(per), np.ones(per), {})
            w.register_backbone("net", fp)
            for s in range(0, per, 8192):
                x = rng.standard_normal((len(paths[s : s + 8192]), dim), dtype=np.float32)
                w.append("net", paths[s : s + 8192], sha[s : s + 8192], x)
    shutil.copytree(base / "replay", base / "link")
    linked = base / "link" / "m.h5"
    t = time.perf_counter()
    for part in list_parts(linked):
        assert seal(linked, part)
    sealing = time.perf_counter() - t
    gb = parts * per * dim * 4 / 1e9
    out: dict[str, object] = {"parts_of": "stored rows (cluster workers)" if stored else
                              "new rows (--shard jobs)", "rows": parts * per, "parts": parts,
                              "dim": dim, "gb": round(gb, 3)}  # fmt: skip
    for way, path in (("replay", store), ("link", linked)):
        os.sync()
        report = Publishing()
        t = time.perf_counter()
        merge(path, report=report)
        seconds = time.perf_counter() - t
        out[way] = {"seconds": round(seconds, 2), "rows_per_s": round(parts * per / seconds),
                    "gb_per_s": round(gb / seconds, 3), "how": report.lines()}  # fmt: skip
        print(f"  {out['parts_of']}: publish by {way}: {seconds:.2f} s, {parts * per / seconds:,.0f} rows/s, "
              f"{gb / seconds:.3f} GB/s ({'; '.join(report.lines())})", flush=True)  # fmt: skip
    out["link_over_replay"] = round(out["link"]["rows_per_s"] / out["replay"]["rows_per_s"], 1)
    out["seal_seconds"] = round(sealing, 2)
    out["seal_rows_per_s"] = round(parts * per / sealing)
    print(f"  sealing (on the workers): {sealing:.2f} s, {parts * per / sealing:,.0f} rows/s; "
          f"link / replay {out['link_over_replay']}x", flush=True)  # fmt: skip
    shutil.rmtree(base, ignore_errors=True)
    return out


def publish_growth(parts: int, rows: int, dim: int = 16) -> dict[str, object]:
    """What a linked part costs as the store fills with pieces: ``parts`` sealed parts of
    ``rows`` rows each (a 50-class label, 16-d embeddings), published one commit each, then
    the same number again in commits of 25 parts."""
    import shutil

    from penult.features import Publishing, StoreWriter
    from penult.features.parts import PartWriter, adopt_parts, list_parts

    base = OUT / "growth"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    store = base / "g.h5"
    fp = {"architecture": "bench", "weights_sha256": "0" * 64, "preprocessing": {}, "layer": "x",
          "dim": dim, "precision": "fp32"}  # fmt: skip
    with StoreWriter(store):
        pass
    rng = np.random.default_rng(0)

    def write(first: int) -> None:
        for k in range(first, first + parts):
            paths = [f"p{k}/{i:07d}.png" for i in range(rows)]
            sha = [f"{k:08x}{i:056x}" for i in range(rows)]
            with PartWriter(store, f"b{k:05d}") as w:
                labels = {"label": [f"c{i % 50}" for i in range(rows)]}
                w.upsert_images(paths, ["/data"] * rows, sha, np.ones(rows), np.ones(rows), labels)
                w.register_backbone("net", fp)
                w.append("net", paths, sha, rng.standard_normal((rows, dim), dtype=np.float32))

    out: dict[str, object] = {"parts": parts, "rows_per_part": rows}
    write(0)
    one = []
    with StoreWriter(store) as w:
        for part in list_parts(store):
            t = time.perf_counter()
            adopt_parts(w, {part.name}, report=Publishing())
            one.append(time.perf_counter() - t)
    write(parts)
    batched, names = [], [p.name for p in list_parts(store)]
    with StoreWriter(store) as w:
        for i in range(0, len(names), 25):
            t = time.perf_counter()
            adopt_parts(w, set(names[i : i + 25]), report=Publishing())
            batched.append(time.perf_counter() - t)
    out["one_per_commit_ms"] = {"first": round(one[0] * 1e3), "last": round(one[-1] * 1e3),
                                "ms_per_part_stored": round((one[-1] - one[0]) / (parts - 1) * 1e3, 2)}  # fmt: skip
    out["25_per_commit_s"] = [round(b, 2) for b in batched]
    out["rows_per_s_25_per_commit_last"] = round(25 * rows / batched[-1])
    print(f"  one part a commit: {one[0] * 1e3:.0f} ms first, {one[-1] * 1e3:.0f} ms the "
          f"{parts}th; 25 a commit after that: {batched[-1]:.2f} s the last "
          f"({out['rows_per_s_25_per_commit_last']:,} rows/s)", flush=True)  # fmt: skip
    shutil.rmtree(base, ignore_errors=True)
    return out


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
    ap.add_argument(
        "--merge-only", action="store_true", help="only the publish rates (replay against link)"
    )
    ap.add_argument(
        "--growth",
        type=int,
        default=0,
        metavar="PARTS",
        help="only what a linked part costs as the store fills: PARTS parts of 20,000 rows "
        "published one a commit, then PARTS more 25 a commit",
    )
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    result: dict[str, object] = {"cpu": cpu(), "images": args.images, "cluster": args.cluster}
    print(json.dumps(result["cpu"]))
    if args.growth:
        result = {"cpu": result["cpu"], "growth": publish_growth(args.growth, 20_000)}
        print(json.dumps(result, indent=1))
        return
    if args.merge_only:
        result = {"cpu": result["cpu"], "merge": merge_rate(args.merge_parts, args.merge_rows),
                  "merge_stored": merge_rate(args.merge_parts, args.merge_rows, stored=True)}  # fmt: skip
        print(json.dumps(result, indent=1))
        return
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
    result["merge_stored"] = merge_rate(args.merge_parts, args.merge_rows, stored=True)
    result["input_rates_one_core"] = input_rates()
    print(json.dumps(result, indent=1))
    (OUT / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
