"""The speed paths give the same answers: fused resize+crop, torch.compile, the CUDA prefetcher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from extract import build_backbone
from extract.loader import collate, make_loader, preprocess_image, to_device
from extract.model import Embedder
from extract.registry import get_spec


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet50", "inception_v3"])
def test_box_resample_equals_torchvision_resize_then_crop(name: str, data_dir: Path) -> None:
    pre = get_spec(name).preprocess()
    files = sorted((data_dir / "hymenoptera/bees").glob("*.jpg"))[:4] + [
        data_dir / "cub100/013.Bobolink/0000.jpg"
    ]
    for f in files:
        im = Image.open(f).convert("RGB")
        resized = TF.resize(
            im, pre.resize, interpolation=InterpolationMode(pre.interpolation), antialias=True
        )
        want = TF.pil_to_tensor(TF.center_crop(resized, pre.crop)).int()
        got = preprocess_image(im, pre).int()
        assert got.shape == want.shape
        diff = (got - want).abs()
        # off by at most one grey level: float rounding of the box coordinates only
        assert diff.max() <= 1 and diff.float().mean() < 0.25, (
            f.name,
            diff.max(),
            diff.float().mean(),
        )


def test_batches_are_uint8_with_failures_split_off() -> None:
    from extract.loader import Item

    img = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    b = collate([Item(0, "a", img), Item(1, "b", None, error="bad"), Item(2, "c", img)])
    assert b.images.shape == (2, 3, 8, 8) and b.images.dtype == torch.uint8
    assert torch.equal(b.images[1], img) and [f.error for f in b.failed] == ["bad"]


@pytest.mark.slow
def test_compiled_embedder_matches_eager_and_pads_last_batch() -> None:
    bb = build_backbone("resnet18", weights="random")
    x = torch.randint(0, 256, (3, 3, 96, 96), dtype=torch.uint8)
    eager = Embedder(bb, precision="fp32")(x)
    comp = Embedder(
        build_backbone("resnet18", weights="random"),
        precision="fp32",
        optimize="inductor",
        batch_size=4,
    )
    got = comp(x)  # 3 < batch_size: padded, one compile serves every batch
    assert comp.optimize == "inductor", "torch.compile fell back to eager"
    np.testing.assert_allclose(got, eager, rtol=1e-3, atol=1e-3)


def test_cpu_prefetch_path_passes_batches_through(data_dir: Path) -> None:
    files = [str(p) for p in sorted((data_dir / "cub100/013.Bobolink").glob("*.jpg"))[:5]]
    loader = make_loader(files, get_spec("resnet18").preprocess(), batch_size=2, workers=2)
    batches = list(to_device(iter(loader), torch.device("cpu")))
    assert [len(b.indices) for b in batches] == [2, 2, 1]


@pytest.mark.gpu
def test_cuda_extraction_matches_cpu(data_dir: Path) -> None:
    files = [str(p) for p in sorted((data_dir / "cub100/013.Bobolink").glob("*.jpg"))[:16]]
    bb = build_backbone("efficientnet_lite0")
    cpu = Embedder(bb, device="cpu", precision="fp32")
    gpu = Embedder(build_backbone("efficientnet_lite0"), device="cuda", precision="auto")
    loader = make_loader(files, bb.preprocess, batch_size=8, workers=2, pin_memory=True)
    for b in to_device(iter(loader), gpu.device):
        assert b.images.is_cuda
        a, g = cpu(b.images.cpu()), gpu(b.images)
        cos = (a * g).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(g, axis=1)
        assert cos.min() > 0.99
