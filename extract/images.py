"""Decoding one image file into an RGB picture, or a clear reason why it cannot be used.

Runs inside loader workers, so everything slow (decode, EXIF rotation, mode conversion) happens in
parallel with the model.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from penult.core.errors import PenultError
from penult.core.options import DEFAULT_MAX_PIXELS
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = [
    "AUTO_SAMPLE",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "ImageError",
    "auto_resize",
    "decode_image",
    "mostly_greyscale",
    "open_image",
    "read_image_bytes",
    "read_source",
    "source_stat",
    "spread",
]

IMAGE_SUFFIXES = frozenset(
    ".jpg .jpeg .jpe .png .gif .bmp .tif .tiff .webp .ppm .pgm .pbm .pnm .jfif".split()
)
# Larger files are refused unread: an uncompressed 16-bit RGB TIFF at the pixel limit is about 1 GB.
DEFAULT_MAX_BYTES = 1 << 30

ImageFile.LOAD_TRUNCATED_IMAGES = False
# Images looked at to resolve ``auto`` modes: enough for a clear majority, under a second.
AUTO_SAMPLE = 48


class ImageError(PenultError):
    """The file cannot be used as an image; the message says why."""


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping 16-bit or float data."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and a.min() >= 0 and a.max() <= 65535):
            lo, hi = 0.0, 65535.0 if a.max() > 255 else 255.0
        else:
            lo, hi = float(a.min()), float(a.max())
        scaled = np.clip((a - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":  # composite on white: transparent backgrounds are usually paper-white
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _placeholder_reason(im: Image.Image) -> str | None:
    """A palette graphic that is nearly one flat colour is a stand-in ("image not found"), not a photo."""
    if im.mode not in ("P", "1"):
        return None
    colors = im.getcolors(maxcolors=64)
    if colors is None:
        return None
    top = max(c for c, _ in colors) / (im.width * im.height)
    if top >= 0.75:
        return f"placeholder graphic, not a photo ({len(colors)} colours, {top:.0%} one colour)"
    return None


# penult applies its own pixel limit (``--max-pixels``) in open_image, from the header, before
# any pixel is decoded; Pillow's fixed one would refuse what the user allowed above it.
Image.MAX_IMAGE_PIXELS = None


@contextmanager
def _decoding() -> Iterator[None]:
    """Pillow's failures while opening or decoding, as ImageErrors that say what is wrong."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"corrupt or truncated image: {e}") from None


def open_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image's header only (format, mode, size; nothing decoded), checked against the pixel
    limit before any memory is spent on pixels. Raises ImageError with the reason."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    with _decoding():
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > max_pixels:
            raise ImageError(
                f"too large: {w}x{h} = {w * h:,} pixels > limit {max_pixels:,} (decompression bomb?)"
            )
        if w < 1 or h < 1:
            raise ImageError(f"image has no pixels ({w}x{h})")
    return im


def decode_image(
    data: bytes | Image.Image,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode file bytes (or an ``open_image`` header) to an upright 8-bit RGB image. Raises
    ImageError with the reason.

    ``draft`` lets JPEG decode at a reduced scale that is still at least that size (fast path
    for huge camera photos; the result is still resized afterwards).
    """
    im = data if isinstance(data, Image.Image) else open_image(data, max_pixels=max_pixels)
    with _decoding():
        if draft is not None and im.format == "JPEG":
            im.draft("RGB", draft)
        im.load()
    reason = _placeholder_reason(im)
    if reason:
        raise ImageError(reason)
    try:
        ImageOps.exif_transpose(im, in_place=True)  # (not in place: a copy of every image)
    except Exception:  # noqa: BLE001 - broken EXIF must not lose an otherwise good photo
        pass
    return _to_rgb(im)


def read_image_bytes(path: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read a regular file of at most ``max_bytes``; every failure is an ImageError naming the cause.

    The file is opened without blocking and checked on the open descriptor, so a FIFO named
    ``x.jpg`` cannot hang the run and a link to ``/dev/zero`` cannot read until memory runs out.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise ImageError("is a directory, not a file") from None
    except FileNotFoundError:
        raise ImageError("file not found (deleted or a broken link)") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as e:
        raise ImageError(f"cannot read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"not a regular file ({_file_kind(st.st_mode)}); only files are read")
        if st.st_size > max_bytes:
            raise ImageError(f"file too large: {st.st_size:,} bytes > limit {max_bytes:,}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:  # grew while reading
            raise ImageError(f"file too large: more than {max_bytes:,} bytes")
        return data
    except OSError as e:
        raise ImageError(f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)


def read_source(path: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[bytes, str]:
    """An image source's bytes to decode and its content hash (SHA-256). A source is a file, or
    an IFCB ROI named ``<bin>_<nnnnn>`` beside its bin's files (``extract.ifcb``: its pixels, and
    the hash of its bytes in the ``.roi``); a bin that cannot be read is an ImageError saying why."""
    from penult.core import ifcb

    if (roi := ifcb.virtual_roi(path)) is not None:
        try:
            return ifcb.read_roi(*roi)
        except (ifcb.BinError, OSError) as e:
            raise ImageError(str(e)) from None
    if (stem := ifcb.bin_source(path)) is not None and not os.path.isfile(path):
        try:
            b = ifcb.read_bin(stem)
        except ifcb.BinError as e:
            raise ImageError(str(e)) from None
        raise ImageError(f"an IFCB bin of {len(b.rois)} ROIs, not one image")
    data = read_image_bytes(path, max_bytes=max_bytes)
    return data, hashlib.sha256(data).hexdigest()


def source_stat(path: str) -> tuple[int, int]:
    """(bytes, mtime in ns) of an image source, (0, 0) where it cannot be read: what says
    whether its stored hash still holds."""
    from penult.core import ifcb

    try:
        if (roi := ifcb.virtual_roi(path)) is not None:
            return ifcb.stat_roi(*roi)
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except (OSError, ifcb.BinError):
        return 0, 0


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def looks_greyscale(im: Image.Image, tolerance: int = 12) -> bool:
    """True when the picture carries no colour: in 99% of its pixels the three channels differ by
    at most ``tolerance`` (JPEG chroma noise on a grey picture stays below that; colour does not).
    Greyscale saved as RGB, as many imagers and microscopes write it, counts as greyscale."""
    small = im.copy()
    small.thumbnail((64, 64))
    a = np.asarray(small.convert("RGB"), dtype=np.int16)
    return float(np.percentile(np.ptp(a, axis=2), 99)) <= tolerance


def sample_greyscale(files: Sequence[str]) -> tuple[int, int]:
    """(greyscale, readable) among ``files``; unreadable ones are skipped (extraction reports them)."""
    grey = seen = 0
    for f in files:
        try:
            im = decode_image(read_source(f)[0], draft=(64, 64))
        except ImageError:
            continue
        seen += 1
        grey += looks_greyscale(im)
    return grey, seen


def spread(count: int, n: int = AUTO_SAMPLE) -> list[int]:
    """Up to ``n`` indices spread evenly over ``range(count)``: a sample that does not depend on
    how a folder happens to be sorted into classes."""
    if count <= 0:
        return []
    return np.unique(np.linspace(0, count - 1, num=min(n, count)).round().astype(int)).tolist()


def auto_resize(grey: bool, crop_pct: float | None) -> str:
    """What ``--resize auto`` becomes (extract and finetune alike): the weights' ``crop`` for
    colour photos or when a crop fraction is asked for, ``pad`` for greyscale imagery."""
    return "pad" if grey and crop_pct is None else "crop"


def mostly_greyscale(files: Sequence[str]) -> tuple[bool, str]:
    """Whether most of these (sampled) files are greyscale, and a note saying how many: what the
    ``auto`` modes decide from. Greyscale imagery (plankton imagers, microscopes) measured best
    with ``--resize pad`` and the plankton augmentation; colour photos with the weights' crop."""
    grey, seen = sample_greyscale(files)
    return bool(seen) and 2 * grey > seen, f"{grey} of {seen} sampled images greyscale"
