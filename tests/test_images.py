"""Decoding: every Pillow mode becomes correct 8-bit RGB; every kind of bad file gets a clear reason."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.images import ImageError, decode_image
from extract.loader import ImageFiles
from extract.registry import get_spec


def _png(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(w: int = 40, h: int = 30) -> np.ndarray:
    return np.tile(np.linspace(0, 1, w), (h, 1))


@pytest.mark.parametrize(
    "make, fmt",
    [
        (lambda: Image.fromarray((_gradient() * 255).astype(np.uint8), "L"), "PNG"),
        (lambda: Image.fromarray((_gradient() * 255).astype(np.uint8), "L").convert("1"), "PNG"),
        (
            lambda: (
                Image.fromarray((_gradient() * 255).astype(np.uint8), "L")
                .convert("RGB")
                .convert("CMYK")
            ),
            "JPEG",
        ),
        (
            lambda: (
                Image.fromarray((_gradient() * 255).astype(np.uint8), "L")
                .convert("RGB")
                .convert("P", palette=Image.Palette.ADAPTIVE)
            ),
            "PNG",
        ),
        (lambda: Image.fromarray((_gradient() * 255).astype(np.uint8), "L").convert("LA"), "PNG"),
        (lambda: Image.fromarray((_gradient() * 255).astype(np.uint8), "L").convert("RGBA"), "PNG"),
        (lambda: Image.fromarray((_gradient() * 65535).astype(np.uint16)), "PNG"),
        (lambda: Image.fromarray((_gradient() * 65535).astype(np.uint16)), "TIFF"),
        (lambda: Image.fromarray(_gradient().astype(np.float32), "F"), "TIFF"),
    ],
    ids=["L", "1", "CMYK", "P", "LA", "RGBA", "I16-png", "I16-tiff", "F-tiff"],
)
def test_modes_become_rgb_without_clipping(make, fmt) -> None:
    im = decode_image(_png(make(), fmt))
    a = np.asarray(im)
    assert im.mode == "RGB" and a.shape == (30, 40, 3)
    grey = a.mean(axis=(0, 2))
    assert (
        grey[0] < 40 and grey[-1] > 215
    )  # the full range survives (16-bit is scaled, not saturated)
    if "1" not in im.getbands():
        assert grey[len(grey) // 2] == pytest.approx(128, abs=40)


def test_alpha_is_composited_on_white() -> None:
    im = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.asarray(decode_image(_png(im)))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied() -> None:
    im = Image.new("RGB", (60, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = decode_image(_png(im, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 60)


def _bomb() -> bytes:
    return _png(Image.new("1", (20000, 10000)))  # 200 Mpx, a few kB on disk


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is a text file, not a picture\n" * 10, "not an image"),
        (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "corrupt or truncated|not an image"),
        (None, "corrupt or truncated"),  # truncated real JPEG, filled in below
        ("bomb", "too large"),
    ],
    ids=["zero-byte", "text", "corrupt", "truncated", "decompression-bomb"],
)
def test_bad_bytes_are_explained(data, reason, data_dir: Path) -> None:
    if data is None:
        full = (data_dir / "cub100/001.Black_footed_Albatross/0000.jpg").read_bytes()
        data = full[: len(full) // 2]
    elif data == "bomb":
        data = _bomb()
    with pytest.raises(ImageError, match=reason):
        decode_image(data)


def test_gif_placeholder_is_refused_but_real_gif_photo_is_not(data_dir: Path) -> None:
    with pytest.raises(ImageError, match="placeholder"):
        decode_image((data_dir / "hymenoptera/ants/imageNotFound.gif").read_bytes())
    photo = Image.open(data_dir / "cub100/001.Black_footed_Albatross/0000.jpg").convert(
        "P", palette=Image.Palette.ADAPTIVE
    )
    assert decode_image(_png(photo, "GIF")).size == photo.size


def test_loader_reports_unreadable_paths_and_keeps_going(tmp_path: Path, data_dir: Path) -> None:
    good = tmp_path / "good.jpg"
    shutil.copy(data_dir / "cub100/001.Black_footed_Albatross/0000.jpg", good)
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    files = [str(good), str(tmp_path / "dir.jpg"), str(tmp_path / "dangling.jpg")]
    ds = ImageFiles(files, get_spec("efficientnet_lite0").preprocess())
    items = [ds[i] for i in range(3)]
    assert (
        items[0].image is not None
        and items[0].image.shape == (3, 224, 224)
        and len(items[0].sha256) == 64
    )
    assert "directory" in items[1].error
    assert "not found" in items[2].error
