"""Extraction throughput: the textbook loop vs `penult extract` vs the model alone, same images.

    .venv/bin/python benchmarks/extract_bench.py --limit 2000

Textbook loop = what the torchvision transfer-learning tutorial teaches: ImageFolder-style dataset
with Resize/CenterCrop/ToTensor/Normalize, DataLoader(batch_size=32, num_workers=2), fp32, NCHW,
``torch.no_grad()``. Same network, same pre-logits layer, same images. resnet50 runs with random
weights (no pretrained file offline); speed does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract import ExtractOptions, build_backbone, extract, list_images  # noqa: E402
from extract.model import Embedder  # noqa: E402
from extract.sources import Listing  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cub100"


class _Files(Dataset):
    def __init__(self, files: list[str], tf):
        self.files, self.tf = files, tf

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.tf(Image.open(self.files[i]).convert("RGB")), 0


def textbook(files: list[str], name: str, weights: str) -> float:
    bb = build_backbone(name, weights=weights)
    pre = bb.preprocess
    interp = transforms.InterpolationMode(pre.interpolation)
    tf = transforms.Compose(
        [
            transforms.Resize(pre.resize, interp),
            transforms.CenterCrop(pre.crop),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]
    )
    model = bb.module.net.eval()
    loader = DataLoader(_Files(files, tf), batch_size=32, num_workers=2)
    n, t = 0, time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            model(x)
            n += len(x)
    return n / (time.perf_counter() - t)


def model_only(
    name: str, weights: str, precision: str, optimize: str, batch: int = 32, reps: int = 8
) -> float:
    bb = build_backbone(name, weights=weights)
    emb = Embedder(bb, precision=precision, optimize=optimize, batch_size=batch)
    x = torch.randint(0, 256, (batch, 3, bb.preprocess.crop, bb.preprocess.crop), dtype=torch.uint8)
    emb(x)
    t = time.perf_counter()
    for _ in range(reps):
        emb(x)
    return batch * reps / (time.perf_counter() - t)


def penult(listing: Listing, name: str, weights: str):
    with tempfile.TemporaryDirectory() as d:
        return extract(
            Path(d) / "bench.h5",
            listing,
            ExtractOptions(backbone=name, weights=weights, optimize="inductor", progress=False),
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument(
        "--limit", type=int, default=2000, help="images (every k-th file of the folder)"
    )
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet50"])
    args = ap.parse_args()
    full = list_images(args.data)
    step = max(1, len(full) // args.limit)
    keep = list(range(0, len(full), step))[: args.limit]
    listing = Listing(root=full.root, paths=[full.paths[i] for i in keep])
    files = [listing.absolute(i) for i in range(len(listing))]
    print(
        f"{len(files)} images from {args.data}; torch {torch.__version__}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}"
    )
    rows = []
    for name in args.backbones:
        weights = "pretrained" if name == "efficientnet_lite0" else "random"
        s = penult(listing, name, weights)
        base = textbook(files, name, weights)
        mo = model_only(name, weights, s.precision, s.optimize)
        rows.append((name, base, s, mo))
        print(
            f"{name}: textbook {base:.1f}, penult {s.images_per_s:.1f} (steady {s.steady_images_per_s:.1f}), model-only {mo:.1f} img/s",
            flush=True,
        )
    print(
        "\n| backbone | textbook loop (fp32, NCHW) | `penult extract` end to end | steady (after 1st batch) | speed-up end to end / steady | model only, same settings | steady / model-only |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, base, s, mo in rows:
        print(
            f"| {name} | {base:.1f} img/s | {s.images_per_s:.1f} img/s ({s.precision}, {s.optimize}, {s.seconds:.0f} s) "
            f"| {s.steady_images_per_s:.1f} img/s | {s.images_per_s / base:.2f}x / {s.steady_images_per_s / base:.2f}x "
            f"| {mo:.1f} img/s | {s.steady_images_per_s / mo:.0%} |"
        )


if __name__ == "__main__":
    main()
