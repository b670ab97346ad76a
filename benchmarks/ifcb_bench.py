"""Reading IFCB ROIs straight from their bins against reading the same ROIs as PNG files
(issue 33, part 4), same pixels, one run.

The real new-style bin in ../shared/data/ifcb (19 ROIs) is copied under --copies names (one
sample each), and every ROI is also written as a PNG (the export labs make today with other
software). Then, on both:
- the loader's work alone in this process (read, hash, decode, resize), per image, and how many
  times a bin was opened;
- `penult extract` end to end (EfficientNet-Lite0, default engine), images/s.

    .venv/bin/python benchmarks/ifcb_bench.py
    .venv/bin/python benchmarks/ifcb_bench.py --copies 200
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from benchmarks_common import cpu_flags  # noqa: E402
from penult.core import ifcb  # noqa: E402
from penult.extract import ExtractOptions, extract, get_spec, list_images  # noqa: E402
from penult.extract.loader import ImageFiles  # noqa: E402
from PIL import Image  # noqa: E402

SRC = ROOT.parents[1] / "shared" / "data" / "ifcb" / "white" / "D2013" / "D201305" / "D20130526"
BIN = "D20130526T095207_IFCB013"


def make(folder: Path, copies: int) -> tuple[Path, Path]:
    """``folder/bins`` with ``copies`` bins and ``folder/png`` with each of their ROIs a PNG."""
    bins, pngs = folder / "bins", folder / "png"
    bins.mkdir()
    pngs.mkdir()
    for k in range(copies):
        name = f"D20130526T{9 + k // 3600:02d}{k // 60 % 60:02d}{k % 60:02d}_IFCB013"
        for s in ifcb.PARTS:
            shutil.copy(SRC / f"{BIN}{s}", bins / f"{name}{s}")
        b = ifcb.read_bin(bins / name)
        with ifcb.BinReader(b) as r:
            for roi in b.rois:
                Image.fromarray(r.pixels(roi)).save(pngs / f"{ifcb.roi_key(name, roi.number)}.png")
    return bins, pngs


def loader_alone(files: list[str], rounds: int = 3) -> float:
    """Seconds per image of the loader's item (read, hash, decode, resize) in this process."""
    ds = ImageFiles(files, get_spec("efficientnet_lite0").preprocess(mode="pad"))
    best = np.inf
    for _ in range(rounds):
        t = time.perf_counter()
        for i in range(len(ds)):
            assert not ds[i].error, ds[i].error
        best = min(best, (time.perf_counter() - t) / len(ds))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=100, help="copies of the 19-ROI bin")
    ap.add_argument("--rounds", type=int, default=4, help="extract runs of each kind")
    args = ap.parse_args()
    print(f"cpu flags: {cpu_flags()}  ({os.cpu_count()} cores)")
    with tempfile.TemporaryDirectory() as tmp:
        bins, pngs = make(Path(tmp), args.copies)
        lb, lp = list_images(bins), list_images(pngs)
        n = len(lb)
        assert n == len(lp) == 19 * args.copies
        ifcb.OPENED[0] = 0
        t_bins = loader_alone([lb.absolute(i) for i in range(n)], rounds=1)
        opened = ifcb.OPENED[0]
        t_bins = min(t_bins, loader_alone([lb.absolute(i) for i in range(n)]))
        t_png = loader_alone([lp.absolute(i) for i in range(n)])
        print(f"\n{n} ROIs in {args.copies} bins; the same ROIs as {n} PNG files")
        print(f"  loader item in this process: bins {1e3 * t_bins:.3f} ms/image, "
              f"PNGs {1e3 * t_png:.3f} ms/image (bins / PNGs = {t_bins / t_png:.2f}); "
              f"{opened} bin opens for {n} ROIs")  # fmt: skip
        rates: dict[str, list[float]] = {"bins": [], "png": []}
        kinds = [("bins", lb), ("png", lp)]
        for k in range(args.rounds):  # interleaved, each first in turn: drift hits both alike
            for name, listing in kinds if k % 2 == 0 else kinds[::-1]:
                store = Path(tmp) / f"{name}{k}.h5"
                s = extract(store, listing, ExtractOptions(progress=False))
                rates[name].append(s.extracted / s.seconds)
        for name, r in rates.items():
            print(f"  penult extract from {name:4s}: {n} images, "
                  f"{', '.join(f'{x:.0f}' for x in r)} images/s (median {np.median(r):.0f})")  # fmt: skip
        ratio = np.median(rates["bins"]) / np.median(rates["png"])
        print(f"  extract from bins / from PNGs: {ratio:.2f}x the images per second")


if __name__ == "__main__":
    main()
