"""Thumbnails of stored images for pages a person opens offline (contact sheets, reports): a
JPEG in a folder beside the page, linked by a relative name."""

from __future__ import annotations

from pathlib import Path

__all__ = ["THUMB", "thumbnail"]

THUMB = 192  # every thumbnail fills this square box (small ROIs are enlarged to it)


def thumbnail(src: str, folder: Path, name: str) -> str | None:
    """A small JPEG copy of ``src`` in ``folder``; its name relative to the sheet, or None."""
    import io

    from penult.core import ifcb
    from PIL import Image, ImageOps

    try:
        if (roi := ifcb.virtual_roi(src)) is not None:  # an IFCB ROI: read from its bin
            src = io.BytesIO(ifcb.read_roi(*roi)[0])
        with Image.open(src) as im:  # Pillow's own decompression-bomb limit applies
            im = ImageOps.contain(im.convert("RGB"), (THUMB, THUMB), Image.Resampling.BICUBIC)
            im.save(folder / name, quality=88)
    except Exception:  # noqa: BLE001 - a bad image gets a text cell instead of a thumbnail
        return None
    return f"{folder.name}/{name}"
