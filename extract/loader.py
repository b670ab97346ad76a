"""Reader stage: files -> (hash, decoded, resized uint8 tensors) in worker processes, prefetched.

Workers read the bytes once, hash them (the store key) and decode them, so the main process only
runs the model. Images travel as uint8 (4x less to copy than float); normalisation happens on the
device. On CUDA a side stream copies the next batch while the current one computes.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from penult.extract.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    decode_image,
    open_image,
    read_source,
)
from penult.extract.registry import Preprocess
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info

try:  # TorchCodec: the PyTorch project's image decoders (torchvision's are deprecated since 0.29)
    from torchcodec.decoders import decode_jpeg as _codec_jpeg
except Exception:  # noqa: BLE001 - a platform without its wheel or libraries: Pillow decodes all
    _codec_jpeg = None

__all__ = [
    "batches",
    "Batch",
    "ImageFiles",
    "Item",
    "border_colour",
    "collate",
    "decode_tensor",
    "default_workers",
    "make_loader",
    "preprocess_image",
    "to_device",
    "use_forkserver",
    "worker_context",
]


def decode_tensor(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft: tuple[int, int] | None = None
) -> torch.Tensor:
    """File bytes -> upright uint8 RGB (3, H, W) in HWC memory (the resize kernels' fast layout),
    or ImageError: what ``decode_image`` gives, as a tensor.

    Ordinary JPEGs (RGB or greyscale, orientation in EXIF or none, too small for a reduced-scale
    draft) are decoded by TorchCodec: the same libjpeg-turbo pixels as Pillow (checked on every
    image of the three test sets), 0.17 instead of 0.37 ms per cub100 photo with the header
    check, the loader's largest cost after resizing. Anything else, or anything TorchCodec
    refuses, goes through Pillow, which also words the error."""
    im = open_image(data, max_pixels=max_pixels)
    if _codec_jpeg is not None and _plain_jpeg(im, draft):
        try:
            return _codec_jpeg(data)  # EXIF orientation applied, as exif_transpose does
        except Exception:  # noqa: BLE001 - Pillow decides (and words the error)
            pass
    return _hwc_tensor(decode_image(im, draft=draft))


def _plain_jpeg(im: Image.Image, draft: tuple[int, int] | None) -> bool:
    """A JPEG that TorchCodec decodes to exactly Pillow's pixels: RGB or greyscale (Pillow
    converts CMYK with its own rules), no orientation outside EXIF (Pillow also reads XMP's),
    and no draft that would let Pillow decode it at a reduced scale (faster for large photos)."""
    if im.format != "JPEG" or im.mode not in ("RGB", "L") or "xmp" in im.info:
        return False
    if draft is not None and min(im.width // draft[0], im.height // draft[1]) >= 2:
        return False
    return True


def _hwc_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def preprocess_image(im: Image.Image | torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """The image (Pillow RGB, or ``decode_tensor``'s uint8 (3, H, W)) as uint8 (3, crop, crop),
    resized (antialiased) by ``pre.mode``.

    Resampled by torch's antialiased uint8 kernels (``F.interpolate(antialias=True)``, what
    torchvision's Resize runs on tensors): 2.5-7x faster than Pillow's on one core. Shrinking, it
    is within 2 grey levels of Pillow; enlarging small images, bicubic overshoot at sharp edges is
    clipped differently (up to 8 levels on a few pixels). The embeddings agree (cosine >= 0.999),
    so entries made with Pillow before keep their identity (docs/BENCHMARKS.md, "Cheaper per
    image and at start").
    The result may be a strided view; ``collate`` copies it into the batch."""
    x = im if isinstance(im, torch.Tensor) else _hwc_tensor(im)  # HWC memory: the fast layout
    if pre.mode == "whole":
        return _resize(x, pre.crop, pre.crop, pre.interpolation)
    if pre.mode == "pad":
        return _pad_to_square(x, pre.crop, pre.interpolation)
    return _resize_crop(x, pre)


def _resize(x: torch.Tensor, h: int, w: int, interpolation: str) -> torch.Tensor:
    """uint8 (3, H, W) -> (3, h, w), antialiased when shrinking."""
    if x.shape[1:] == (h, w):
        return x
    return F.interpolate(x[None], size=(h, w), mode=interpolation, antialias=True)[0]


def _pad_to_square(x: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """Longer side to ``size``, aspect kept, centred on a square of the image's border colour
    (the median of its outermost pixels: the background of a plankton or microscope frame)."""
    h, w = x.shape[1:]
    s = size / max(w, h)
    small = _resize(x, max(1, round(h * s)), max(1, round(w * s)), interpolation)
    sh, sw = small.shape[1:]
    colour = border_colour(small.permute(1, 2, 0).numpy())
    canvas = torch.tensor(colour, dtype=torch.uint8)[:, None, None].repeat(1, size, size)
    top, left = (size - sh) // 2, (size - sw) // 2
    canvas[:, top : top + sh, left : left + sw] = small
    return canvas


def border_colour(a: np.ndarray) -> tuple[int, ...]:
    """The median of an (H, W, C) image's outermost pixels, per channel: the background of a
    plankton or microscope frame (what padding and turned-in corners are filled with)."""
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0))


def _resize_crop(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """Shorter side to ``pre.resize``, centre crop ``pre.crop``: torchvision's Resize +
    CenterCrop arithmetic."""
    h, w = x.shape[1:]
    rw, rh = (
        (pre.resize, int(pre.resize * h / w)) if w <= h else (int(pre.resize * w / h), pre.resize)
    )
    out = _resize(x, rh, rw, pre.interpolation)
    top, left = int(round((rh - pre.crop) / 2.0)), int(round((rw - pre.crop) / 2.0))
    return out[:, top : top + pre.crop, left : left + pre.crop]


@dataclass
class Item:
    index: int
    sha256: str
    image: torch.Tensor | None
    width: int = 0
    height: int = 0
    error: str = ""


class ImageFiles(Dataset):
    """Map-style dataset over absolute file paths; failures become Items with ``error`` set."""

    def __init__(
        self, files: Sequence[str], pre: Preprocess, *, max_pixels: int = DEFAULT_MAX_PIXELS
    ):
        self.files, self.pre, self.max_pixels = list(files), pre, max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Item:
        sha = ""
        try:
            data, sha = read_source(self.files[i])
            draft = (2 * self.pre.resize, 2 * self.pre.resize)
            x = decode_tensor(data, max_pixels=self.max_pixels, draft=draft)
            h, w = x.shape[1:]
            return Item(i, sha, preprocess_image(x, self.pre), w, h)
        except ImageError as e:
            return Item(i, sha, None, error=str(e))
        except Exception as e:  # noqa: BLE001 - one odd file must never stop a long run
            return Item(i, sha, None, error=f"unexpected {type(e).__name__}: {e}")


@dataclass
class Batch:
    """Decoded images of one loader step, plus the files of that step that failed."""

    indices: list[int]
    sha256: list[str]
    images: torch.Tensor  # uint8 (n, 3, H, W)
    width: list[int]
    height: list[int]
    failed: list[Item] = field(default_factory=list)

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        self.images = self.images.pin_memory()
        return self


def collate(items: list[Item]) -> Batch:
    ok = [it for it in items if it.image is not None]
    if ok:  # written straight into shared memory when collated in a worker (no extra copy)
        images = torch.empty((len(ok), *ok[0].image.shape), dtype=torch.uint8)
        if get_worker_info() is not None:
            images.share_memory_()
        torch.stack([it.image for it in ok], out=images)
    else:
        images = torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    return Batch(
        indices=[it.index for it in ok],
        sha256=[it.sha256 for it in ok],
        images=images,
        width=[it.width for it in ok],
        height=[it.height for it in ok],
        failed=[it for it in items if it.image is None],
    )


def default_workers(device: torch.device) -> int:
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    # On CPU the workers share cores with the model; as many workers as cores measured best here
    # (fewer starve the model of input: the scheduler gives each process its share).
    return min(8, cores) if device.type == "cuda" else max(1, min(4, cores))


def make_loader(
    files: Sequence[str],
    pre: Preprocess,
    *,
    batch_size: int = 32,
    workers: int = 2,
    pin_memory: bool = False,
    prefetch: int = 4,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    start: str | None = None,
) -> DataLoader:
    """The reader stage over ``files``; ``start`` is how its processes start (worker_context;
    default: this process's, fork unless ``use_forkserver`` was called)."""
    start = start or _process_start
    ctx = worker_context(start) if workers > 0 else None
    served = ctx is not None and ctx.get_start_method() == "forkserver"
    return DataLoader(
        ImageFiles(files, pre, max_pixels=max_pixels),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=prefetch if workers > 0 else None,
        persistent_workers=False,
        multiprocessing_context=ctx,
        worker_init_fn=partial(_exit_with, os.getpid()) if served else None,
    )


def batches(
    files: Sequence[str],
    pre: Preprocess,
    device: torch.device,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[Batch]:
    """Decoded batches of ``files`` on ``device``: the one reader every caller uses (extract,
    scoring, fine-tuning). ``workers`` defaults by device and cores, and is never more than
    there are batches (a process started for nothing costs a second)."""
    n = default_workers(device) if workers is None else workers
    loader = make_loader(
        files,
        pre,
        batch_size=batch_size,
        workers=min(n, max(1, len(files) // batch_size)) if n else 0,
        pin_memory=device.type == "cuda",  # page-locked batches copy to the GPU asynchronously
        max_pixels=max_pixels,
    )
    return to_device(iter(loader), device)


def _exit_with(pid: int, worker_id: int) -> None:
    """In a loader process started by the fork server: exit when process ``pid`` (the one that
    reads the batches) is gone. torch's own check watches the parent, which here is the server;
    and the server stays while its children hold its pipe, so a SIGKILLed Dask worker left both
    running for good."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except (ProcessLookupError, PermissionError):  # gone (or its pid now another user's)
                os._exit(0)

    threading.Thread(target=watch, name="penult-parent-watch", daemon=True).start()


def worker_context(start: str = "fork"):
    """How loader processes start. ``fork`` (Linux, whatever this process's default): they start
    in milliseconds and share the file list with this process. A process that was itself spawned
    (a Dask worker) defaults to spawn, as do macOS and Python 3.14 on Linux (forkserver): each
    loader process would import torch again before its first batch, 1.4 s here.

    ``forkserver``, for a process that starts many loaders beside a network it has already run
    (a Dask worker, one loader per partition): forked from this process, the loader processes
    share its memory copy-on-write, so its next batch through the network copies every page it
    writes: 0.73 s instead of 0.12 for a batch of 32, once per partition. A fork server (started
    once per process, torch imported in it once) shares nothing with it. It imports the main
    module in each loader process, as spawn does: what Dask's workers already need.

    Elsewhere (macOS, Windows) the platform's default, which is safe there."""
    methods = multiprocessing.get_all_start_methods()
    if start == "forkserver" and "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["penult.extract.loader"])  # (no effect once the server runs)
        return ctx
    if sys.platform.startswith("linux") and "fork" in methods:
        return multiprocessing.get_context("fork")
    return None


_process_start = "fork"  # how this process's loaders start; see use_forkserver


def use_forkserver() -> None:
    """From now on this process's loaders start from a fork server (worker_context), started now:
    it imports torch (1.5 s here) while this process builds its network, instead of when the
    first loader asks for processes. For a Dask worker, which starts a loader for every partition
    or chunk beside the network it keeps."""
    global _process_start
    if "forkserver" in multiprocessing.get_all_start_methods():
        from multiprocessing import forkserver

        worker_context("forkserver")  # its preload is set before the server starts
        forkserver.ensure_running()
        _process_start = "forkserver"


def to_device(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """Yield batches with images on ``device``; on CUDA the copy of batch i+1 overlaps compute of i."""
    if device.type != "cuda":
        yield from batches
        return
    stream = torch.cuda.Stream(device)
    it = iter(batches)

    def load() -> Batch | None:
        b = next(it, None)
        if b is not None:
            with torch.cuda.stream(stream):
                b.images = b.images.to(device, non_blocking=True)
        return b

    nxt = load()
    while nxt is not None:
        torch.cuda.current_stream(device).wait_stream(stream)
        cur = nxt
        cur.images.record_stream(torch.cuda.current_stream(device))
        nxt = load()
        yield cur
