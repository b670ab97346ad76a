"""The loader alone (read, hash, decode, resize, batch; no network): JPEGs decoded by TorchCodec
(what the loader does) against Pillow for every image (what it did before), same images, one run,
interleaved.

    .venv/bin/python benchmarks/loader_bench.py              # 2,000 cub100 photos
    .venv/bin/python benchmarks/loader_bench.py --data ../shared/data/ndsb_plankton

Prints, for each decoder: the decode alone per image in this process (one thread), a whole
loader item in this process, and the real loader (``make_loader``, 1 and 2 worker processes):
images/s and the workers' CPU per image. The workers' CPU is what the network loses to the
loader on a CPU-only machine, where both share the cores. Every image is also checked to decode
to the same pixels both ways.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import penult.extract.loader as loader  # noqa: E402
from benchmarks_common import cpu_flags, cpu_seconds  # noqa: E402
from penult.extract import get_spec, list_images  # noqa: E402
from penult.extract.images import decode_image  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cub100"
CODEC = loader._codec_jpeg


def measure(files: list[str], datas: list[bytes], pre, workers: tuple[int, ...]) -> dict:
    """Rates of the current decoder (``loader._codec_jpeg`` set or None)."""
    out = {}
    t = time.process_time()
    for d in datas:
        loader.decode_tensor(d)
    out["decode ms"] = (time.process_time() - t) / len(datas) * 1e3
    ds = loader.ImageFiles(files, pre)
    t = time.process_time()
    for i in range(len(ds)):
        ds[i]
    out["item ms"] = (time.process_time() - t) / len(ds) * 1e3
    for w in workers:
        c, t, n = cpu_seconds(resource.RUSAGE_CHILDREN), time.perf_counter(), 0
        for b in loader.make_loader(files, pre, workers=w):  # (workers exit when it is done)
            n += len(b.indices)
        out[f"{w} workers img/s"] = n / (time.perf_counter() - t)
        out[f"{w} workers core-ms/img"] = (cpu_seconds(resource.RUSAGE_CHILDREN) - c) / n * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--limit", type=int, default=2000, help="images (every k-th file)")
    ap.add_argument("--backbone", default="efficientnet_lite0", help="whose preprocessing")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved rounds")
    args = ap.parse_args()
    if CODEC is None:
        sys.exit("torchcodec is not installed: nothing to compare")
    torch.set_num_threads(1)
    full = list_images(args.data)
    step = max(1, len(full) // args.limit)
    files = [full.absolute(i) for i in range(0, len(full), step)][: args.limit]
    datas = [Path(f).read_bytes() for f in files]
    pre = get_spec(args.backbone).preprocess()
    print(f"{len(files)} images from {args.data}; {pre}; CPU flags: {cpu_flags()}")
    same = sum(
        torch.equal(loader.decode_tensor(d), torch.from_numpy(np.array(decode_image(d))).permute(2, 0, 1))
        for d in datas
    )  # fmt: skip
    print(f"same pixels from both decoders: {same} of {len(datas)}")
    rows: dict[str, list[dict]] = {"pillow": [], "torchcodec": []}
    for _ in range(args.repeat):
        for name in rows:
            loader._codec_jpeg = CODEC if name == "torchcodec" else None
            rows[name].append(measure(files, datas, pre, (1, 2)))
            print(name, {k: round(v, 3) for k, v in rows[name][-1].items()}, flush=True)
    loader._codec_jpeg = CODEC
    keys = list(rows["pillow"][0])
    print("\n| decoder | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, runs in rows.items():  # the best of the rounds: a shared machine's speed drifts
        best = {k: (max if "img/s" in k else min)(r[k] for r in runs) for k in keys}
        cells = (f"{best[k]:.0f}" if "img/s" in k else f"{best[k]:.3f}" for k in keys)
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
