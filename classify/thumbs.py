"""Thumbnails of stored images for pages a person opens offline (contact sheets, reports): a
JPEG in a folder beside the page, linked by a relative name, shown in a fixed box with its
caption (``figure`` and ``FIGURE_CSS``, the same on every such page)."""

from __future__ import annotations

import html
import os
import stat
from pathlib import Path

__all__ = ["FIGURE_CSS", "THUMB", "breakable", "figure", "thumbnail"]

THUMB = 192  # every thumbnail fills this square box (small ROIs are enlarged to it)
FIGURE_CSS = (
    f"figure{{margin:0;width:{THUMB}px}}"
    f".box{{width:{THUMB}px;height:{THUMB}px;display:flex;align-items:center;"
    "justify-content:center;background:#f3f3f3}"
    "figcaption{font-size:12px;line-height:1.3;margin-top:3px}"
    ".name{overflow-wrap:break-word;color:#444}.missing{color:#999;font-size:12px}"
)


def thumbnail(src: str, folder: Path, name: str) -> str | None:
    """A small JPEG copy of ``src`` in ``folder``; its name relative to the sheet, or None."""
    import io

    from penult.core import ifcb
    from PIL import Image, ImageOps

    try:
        if (roi := ifcb.virtual_roi(src)) is not None:  # an IFCB ROI: read from its bin
            src = io.BytesIO(ifcb.read_roi(*roi)[0])
        elif not stat.S_ISREG(os.stat(src).st_mode):  # a FIFO would block the page's writing
            return None
        with Image.open(src) as im:  # Pillow's own decompression-bomb limit applies
            im = ImageOps.contain(im.convert("RGB"), (THUMB, THUMB), Image.Resampling.BICUBIC)
            im.save(folder / name, quality=88)
    except Exception:  # noqa: BLE001 - a bad image gets a text cell instead of a thumbnail
        return None
    return f"{folder.name}/{name}"


def breakable(name: str) -> str:
    """A path escaped for HTML that wraps after its separators (/ _ - .), never mid-word."""
    out = html.escape(name)
    for sep in ("/", "_", "-", "."):
        out = out.replace(sep, sep + "<wbr>")
    return out


def figure(
    file: str, folder: Path, thumb: str, name: str, lines: list[str], *, kind: str = "", tag: str = ""
) -> str:  # fmt: skip
    """One image on an offline page: its thumbnail (``folder/thumb``; "no image" where it
    cannot be drawn) in the fixed box, then its ``name`` and caption ``lines`` (HTML)."""
    src = thumbnail(file, folder, thumb) if file else None
    img = (
        f'<img src="{html.escape(src)}" alt="">' if src else '<span class="missing">no image</span>'
    )
    caption = f'<div class="name">{breakable(name)}</div>' + "".join(lines)
    cls = f' class="{kind}"' if kind else ""
    return (
        f'<figure{cls}>{tag}<div class="box">{img}</div><figcaption>{caption}</figcaption></figure>'
    )
