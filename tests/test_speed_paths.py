"""The speed paths give the same answers: torch resampling, torch.compile, the CUDA prefetcher;
and the loader's processes start fast wherever extraction runs."""

from __future__ import annotations

import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from penult.extract import build_backbone
from penult.extract.embed import make_embedder
from penult.extract.loader import (
    ImageFiles,
    border_colour,
    collate,
    make_loader,
    preprocess_image,
    to_device,
)
from penult.extract.registry import get_spec
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF


def _pillow(im: Image.Image, pre) -> torch.Tensor:
    """What penult's loader did before torch resampled: Pillow's resample (of the crop's source
    box in crop mode), in every resize mode."""
    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
    resample = resample[pre.interpolation]
    w, h = im.size
    if pre.mode == "whole":
        out = im.resize((pre.crop, pre.crop), resample)
    elif pre.mode == "pad":
        s = pre.crop / max(w, h)
        small = im.resize((max(1, round(w * s)), max(1, round(h * s))), resample)
        out = Image.new("RGB", (pre.crop, pre.crop), border_colour(np.asarray(small)))
        out.paste(small, ((pre.crop - small.width) // 2, (pre.crop - small.height) // 2))
    else:
        rw, rh = (
            (pre.resize, int(pre.resize * h / w))
            if w <= h
            else (int(pre.resize * w / h), pre.resize)
        )
        left, top = round((rw - pre.crop) / 2.0), round((rh - pre.crop) / 2.0)
        sx, sy = rw / w, rh / h
        box = (left / sx, top / sy, (left + pre.crop) / sx, (top + pre.crop) / sy)
        out = im.resize((pre.crop, pre.crop), resample, box=box)
    return torch.from_numpy(np.asarray(out).transpose(2, 0, 1).copy())


def _odd_images(data_dir: Path) -> list[Image.Image]:
    """Large and small photos, landscape and portrait, and a greyscale plankton image."""
    files = sorted((data_dir / "hymenoptera/bees").glob("*.jpg"))[:4] + [
        data_dir / "cub100/013.Bobolink/0000.jpg",
        sorted((data_dir / "ndsb_plankton/diatom_chain_string").glob("*.jpg"))[0],
    ]
    return [Image.open(f).convert("RGB") for f in files]


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet50", "inception_v3"])
def test_resize_crop_is_torchvision_resize_then_crop_and_within_2_levels_of_pillow(
    name: str, data_dir: Path
) -> None:
    pre = get_spec(name).preprocess()
    interp = InterpolationMode(pre.interpolation)
    for im in _odd_images(data_dir):
        x = TF.pil_to_tensor(im)
        want = TF.center_crop(
            TF.resize(x, pre.resize, interpolation=interp, antialias=True), pre.crop
        )
        got = preprocess_image(im, pre)
        assert torch.equal(got, want), im.size
        # entries made with Pillow's resampling before keep their identity: near-identical pixels
        diff = (got.int() - _pillow(im, pre).int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.25, (im.size, diff.max())


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_torch_resampling_keeps_the_embeddings_of_pillow_resampling(mode, data_dir: Path) -> None:
    """Why stores made when the loader resampled with Pillow take rows resampled by torch into
    the same entry: the pretrained embeddings agree like bf16 and fp32 do (cosine >= 0.999), on
    photos (crop: mostly shrinking) and on small plankton images (pad: enlarged up to 6x, where
    the two libraries' bicubic overshoot is clipped differently, by up to 8 grey levels)."""
    bb = build_backbone("efficientnet_lite0", resize=mode)
    if mode == "crop":
        files = sorted((data_dir / "cub100").glob("*/*.jpg"))[::300]
        files += sorted((data_dir / "hymenoptera/ants").glob("*.jpg"))[:6]
    else:
        files = sorted((data_dir / "ndsb_plankton").glob("*/*.jpg"))[::300]
    ims = [Image.open(f).convert("RGB") for f in files]
    emb = make_embedder(bb, engine="torch", precision="fp32")
    new = emb(torch.stack([preprocess_image(im, bb.preprocess) for im in ims]))
    old = emb(torch.stack([_pillow(im, bb.preprocess) for im in ims]))
    cos = (new * old).sum(1) / np.linalg.norm(new, axis=1) / np.linalg.norm(old, axis=1)
    assert len(ims) >= 25 and cos.min() >= 0.999, cos.min()


def test_batches_are_uint8_with_failures_split_off() -> None:
    from penult.extract.loader import Item

    img = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    b = collate([Item(0, "a", img), Item(1, "b", None, error="bad"), Item(2, "c", img)])
    assert b.images.shape == (2, 3, 8, 8) and b.images.dtype == torch.uint8
    assert torch.equal(b.images[1], img) and [f.error for f in b.failed] == ["bad"]


@pytest.mark.slow
def test_compiled_embedder_matches_eager_and_pads_last_batch() -> None:
    bb = build_backbone("resnet18", weights="random")
    x = torch.randint(0, 256, (3, 3, 96, 96), dtype=torch.uint8)
    eager = make_embedder(bb, engine="torch", precision="fp32")(x)
    comp = make_embedder(
        build_backbone("resnet18", weights="random"),
        engine="torch",
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
    cpu = make_embedder(bb, engine="torch", device="cpu", precision="fp32")
    gpu = make_embedder(
        build_backbone("efficientnet_lite0"), engine="torch", device="cuda", precision="auto"
    )
    loader = make_loader(files, bb.preprocess, batch_size=8, workers=2, pin_memory=True)
    for b in to_device(iter(loader), gpu.device):
        assert b.images.is_cuda
        a, g = cpu(b.images.cpu()), gpu(b.images)
        cos = (a * g).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(g, axis=1)
        assert cos.min() > 0.99


def _first_batch_seconds(files: list[str], pre, default_start: bool) -> tuple[float, int]:
    """(seconds to the first batch of a 2-process loader, images in it), in the calling process:
    penult's loader, or a DataLoader started the platform's default way."""
    from torch.utils.data import DataLoader

    t = time.perf_counter()
    if default_start:
        dl = DataLoader(ImageFiles(files, pre), batch_size=4, num_workers=2, collate_fn=collate)
    else:
        dl = make_loader(files, pre, batch_size=4, workers=2)
    batch = next(iter(dl))
    return time.perf_counter() - t, len(batch.indices)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked on Linux only")
def test_loader_processes_start_fast_inside_a_spawned_process(data_dir: Path) -> None:
    """A Dask worker is a spawned process, and a spawned process starts its children by spawning
    them: each loader process would import torch again, for every partition of a cluster run
    (17.1 s against 7.3 s for 800 images in partitions of 100 on `--cluster local:1`,
    docs/BENCHMARKS.md). penult's loader forks them wherever it runs."""
    files = [str(f) for f in sorted((data_dir / "cub100").glob("*/*.jpg"))[:8]]
    pre = get_spec("efficientnet_lite0").preprocess()
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as ex:
        ours, n = ex.submit(_first_batch_seconds, files, pre, False).result()
        default, m = ex.submit(_first_batch_seconds, files, pre, True).result()
    assert n == m == 4
    assert ours < default / 3, (ours, default)  # measured here: 0.05 s against 1.4 s


def test_forkserver_loader_gives_the_same_batches_from_processes_that_share_nothing(
    data_dir: Path,
) -> None:
    """What a cluster worker's partitions use: loader processes from a fork server, not forked
    from this process (which would make its next pass through the network copy every page it
    writes: 0.73 s against 0.12 s for a batch of 32). The batches are the same."""
    import os

    psutil = pytest.importorskip("psutil")
    files = [str(f) for f in sorted((data_dir / "cub100").glob("*/*.jpg"))[:12]]
    pre = get_spec("efficientnet_lite0").preprocess()
    got = {}
    for start in ("fork", "forkserver"):
        it = iter(make_loader(files, pre, batch_size=4, workers=2, start=start))
        parents = {psutil.Process(w.pid).ppid() for w in it._workers}
        got[start] = [(b.indices, b.sha256, b.images) for b in it]
        assert (parents == {os.getpid()}) == (start == "fork"), (start, parents)
    assert [(i, h) for i, h, _ in got["fork"]] == [(i, h) for i, h, _ in got["forkserver"]]
    for (_, _, a), (_, _, b) in zip(got["fork"], got["forkserver"], strict=True):
        assert torch.equal(a, b)
    assert sum(len(i) for i, _, _ in got["fork"]) == 12


def _loader_then_wait(files: list[str], pre, q) -> None:
    """A stand-in for a Dask worker: loaders from the fork server, one batch read, then idle."""
    from penult.extract.loader import use_forkserver

    use_forkserver()
    it = iter(make_loader(files, pre, batch_size=2, workers=2, prefetch=1))
    next(it)
    q.put([w.pid for w in it._workers])
    time.sleep(600)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals as on Linux")
def test_forkserver_loader_processes_exit_when_the_process_they_serve_is_killed(
    data_dir: Path,
) -> None:
    """A Dask worker SIGKILLed mid-partition: its loader processes (children of the fork server,
    which stays while they hold its pipe) and the server exit too, instead of running for good."""
    import os
    import signal

    psutil = pytest.importorskip("psutil")
    files = [str(f) for f in sorted((data_dir / "cub100").glob("*/*.jpg"))[:40]]
    pre = get_spec("efficientnet_lite0").preprocess()
    spawn = multiprocessing.get_context("spawn")
    q = spawn.Queue()
    worker = spawn.Process(target=_loader_then_wait, args=(files, pre, q))
    worker.start()
    loaders = q.get(timeout=120)
    servers = {psutil.Process(p).ppid() for p in loaders}
    assert worker.pid not in servers  # started by the fork server, not by the worker
    os.kill(worker.pid, signal.SIGKILL)
    worker.join()

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 30
    while any(map(alive, [*loaders, *servers])) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in [*loaders, *servers] if alive(p)]
    for p in left:  # (cleaned up, so a failure leaves nothing running)
        psutil.Process(p).kill()
    assert not left, left
