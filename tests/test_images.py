"""Decoding: every Pillow mode becomes correct 8-bit RGB; every kind of bad file gets a clear reason."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import penult.extract.loader as loader_module
import pytest
import torch
from penult.extract.images import ImageError, decode_image, spread
from penult.extract.loader import ImageFiles, decode_tensor
from penult.extract.registry import get_spec
from PIL import Image


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
@pytest.mark.parametrize("decode", [decode_image, decode_tensor], ids=["pillow", "loader"])
def test_bad_bytes_are_explained(data, reason, decode, data_dir: Path) -> None:
    if data is None:
        full = (data_dir / "cub100/001.Black_footed_Albatross/0000.jpg").read_bytes()
        data = full[: len(full) // 2]
    elif data == "bomb":
        data = _bomb()
    with pytest.raises(ImageError, match=reason):
        decode(data)


def test_max_pixels_governs_above_and_below_pillows_own_limit() -> None:
    """--max-pixels is the limit both ways: a 200 Mpx header (over Pillow's fixed 179 Mpx) opens
    when the user allows 250 Mpx, and a 12 Mpx one is refused at 10 Mpx."""
    from penult.extract.images import open_image

    assert open_image(_bomb(), max_pixels=250_000_000).size == (20000, 10000)
    with pytest.raises(ImageError, match="200,000,000 pixels > limit 199,999,999"):
        open_image(_bomb(), max_pixels=199_999_999)
    with pytest.raises(ImageError, match="too large"):
        open_image(_png(Image.new("1", (4000, 3000))), max_pixels=10_000_000)


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


def _pillow_tensor(data: bytes, draft=None):
    return torch.from_numpy(np.array(decode_image(data, draft=draft))).permute(2, 0, 1)


@pytest.fixture
def codec_calls(monkeypatch):
    """How many images the loader's TorchCodec path decoded (none where it is not installed)."""
    real = loader_module._codec_jpeg
    if real is None:
        pytest.skip("torchcodec is not installed: the loader decodes every image with Pillow")
    calls = []

    def counted(data):
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(loader_module, "_codec_jpeg", counted)
    return calls


@pytest.mark.parametrize("folder", ["cub100", "ndsb_plankton", "hymenoptera"])
def test_loader_decodes_real_jpegs_to_pillows_exact_pixels(
    folder, codec_calls, data_dir: Path
) -> None:
    """TorchCodec's JPEG path gives the very pixels Pillow gives (the store's embeddings must not
    depend on which decoder ran), in the same upright orientation and HWC memory layout."""
    files = sorted((data_dir / folder).rglob("*.jpg"))
    sample = [files[i] for i in spread(len(files), 24)]
    for f in sample:
        data = f.read_bytes()
        got, want = decode_tensor(data), _pillow_tensor(data)
        assert got.dtype == torch.uint8 and got.shape == want.shape, f
        assert torch.equal(got, want), f
        assert got.permute(1, 2, 0).is_contiguous()  # HWC memory: the resize kernels' fast path
    assert len(codec_calls) == len(sample)  # every one of these went the fast way


def test_loader_decodes_greyscale_and_progressive_jpegs_as_pillow_does(
    codec_calls, data_dir: Path
) -> None:
    photo = Image.open(data_dir / "cub100/001.Black_footed_Albatross/0000.jpg")
    for data in (_png(photo.convert("L"), "JPEG"), _png(photo, "JPEG", progressive=True)):
        got = decode_tensor(data)
        assert got.shape == (3, 227, 227) and torch.equal(got, _pillow_tensor(data))
    assert len(codec_calls) == 2


def test_loader_applies_exif_orientation_as_pillow_does(codec_calls, data_dir: Path) -> None:
    photo = Image.open(data_dir / "cub100/001.Black_footed_Albatross/0000.jpg").crop((0, 0, 90, 50))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = _png(photo, "JPEG", exif=exif.tobytes())
        want = _pillow_tensor(data)
        assert want.shape[1:] == ((90, 50) if orientation >= 5 else (50, 90))
        assert torch.equal(decode_tensor(data), want), orientation
    assert len(codec_calls) == 8


def test_loader_leaves_to_pillow_what_torchcodec_would_decode_otherwise(
    codec_calls, data_dir: Path
) -> None:
    """CMYK, orientation in XMP, and JPEGs large enough for Pillow's reduced-scale draft are
    Pillow's; the results are Pillow's exactly."""
    photo = Image.open(data_dir / "cub100/001.Black_footed_Albatross/0000.jpg")
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-'
        b'rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
        b'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    )
    cases = {
        "cmyk": (_png(photo.convert("CMYK"), "JPEG"), None),
        "xmp": (_png(photo.crop((0, 0, 90, 50)), "JPEG", xmp=xmp), None),
        "draft": (_png(photo.resize((1100, 1100)), "JPEG"), (512, 512)),
    }
    for name, (data, draft) in cases.items():
        got = decode_tensor(data, draft=draft)
        assert torch.equal(got, _pillow_tensor(data, draft=draft)), name
    assert decode_tensor(cases["xmp"][0]).shape[1:] == (90, 50)  # turned, as Pillow turns it
    assert decode_tensor(cases["draft"][0], draft=(512, 512)).shape[1:] == (550, 550)
    assert codec_calls == []


def test_loader_decodes_with_pillow_alone_without_torchcodec(monkeypatch, data_dir: Path) -> None:
    monkeypatch.setattr(loader_module, "_codec_jpeg", None)
    for p in sorted((data_dir / "ndsb_plankton").rglob("*.jpg"))[:3]:
        data = p.read_bytes()
        assert torch.equal(decode_tensor(data), _pillow_tensor(data))
    with pytest.raises(ImageError, match="not an image"):
        decode_tensor(b"text, not a picture" * 10)
