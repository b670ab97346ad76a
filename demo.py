"""`penult demo`: the whole pipeline on an embedded default data set (or any folder with --data).

The default is the PyPI package elpv-dataset: 2,624 real 300x300 greyscale electroluminescence
images of solar cells, labelled with a defect probability (0, 1/3, 2/3, 1) and the module type
(mono/poly). It installs with penult, so the demo needs no download.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

from extract import DEFAULT_BACKBONE, ExtractOptions, Listing, extract, list_images
from features import describe


def elpv_listing() -> Listing:
    """The elpv images with labels: ``label`` = defect probability, ``module_type`` = mono/poly."""
    import elpv_dataset

    root = Path(elpv_dataset.__file__).parent / "data"
    paths, defect, mtype = [], [], []
    for line in (root / "labels.csv").read_text().splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        paths.append(parts[0])
        defect.append(str(Fraction(parts[1]).limit_denominator(3)))
        mtype.append(parts[2])
    return Listing(root=root, paths=paths, labels={"label": defect, "module_type": mtype})


def run_demo(
    *,
    data: str | None = None,
    out: str = "demo-out",
    backbone: str = DEFAULT_BACKBONE,
    progress: bool = True,
) -> str:
    """Extract the data set into ``out/<name>.h5`` and return a printable account of what happened."""
    listing = list_images(data) if data else elpv_listing()
    name = Path(data).resolve().name if data else "elpv"
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = out_dir / f"{name}.h5"
    header = [
        f"penult demo: {len(listing)} images from {listing.root}",
        f"  labels: {', '.join(listing.labels) or 'none'}; backbone {backbone}; store {store}",
        *(f"  {n}" for n in listing.notes),
        "",
        "== extract (frozen backbone, penultimate layer; re-running skips stored images)",
    ]
    summary = extract(store, listing, ExtractOptions(backbone=backbone, progress=progress))
    return "\n".join([*header, summary.report(), "", "== store", describe(store, max_classes=10)])
