"""Imaging FlowCytobot raw data read directly: one "bin" per sample, three files side by side.

- ``<bin>.hdr``: the acquisition settings as text (new instruments: ``key: value`` lines with
  ``runTime``, ``inhibitTime`` and ``ADCFileFormat``; old ones, IFCB1-6: a few quoted lines).
- ``<bin>.adc``: one CSV row per trigger. Its columns give the ROI's width, height and byte
  offset into the ``.roi``, zero where the trigger imaged nothing.
- ``<bin>.roi``: the ROIs' 8-bit greyscale pixels, concatenated row-major (height x width).

Bin names: new style ``D20130526T095207_IFCB013`` (time, instrument), old style
``IFCB5_2012_028_081515`` (instrument, year, day of year, time). A ROI is named as WHOI's tools
name it, by the bin and its ADC row number, 1-based: ``D20130526T095207_IFCB013_00007``.

Column layouts: the two schemas of WHOI's ifcb-analysis (``ifcb_columns.m``). Old instruments
(bins named ``IFCB...``) put x, y, width, height and a 1-based start byte in columns 10-14.
New ones (``D...``) put them in columns 14-18, with a 0-based start byte.

Volume analysed, in mL, as ifcb-analysis computes it (Sosik and Olson 2007;
``IFCB_volume_analyzed.m``, pyifcb's ``compute_ml_analyzed``):
- new instruments: 0.25 mL/min x (runTime - inhibitTime) / 60, from the header.
- old instruments: the syringe moves 5/48,000 mL a step at 40 steps/s (1/240 mL/s) for the
  look time. The look time is the last frame grab's time minus the time spent processing each
  trigger: from the previous frame grab to this trigger's opening, at least 0.073 s.
  Times below zero (a bin spanning midnight) are taken one day later.

Why a reader of our own: libifcb (PyPI 0.8.1, LGPL-3.0), the maintained candidate, takes the
ADC columns from the header's ``ADCFileFormat`` line. Old instruments do not write that line, so
it fails (KeyError) on the old-style test bin. It also parses every ADC row into a dict of
strings, where this reader needs four integer columns.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from penult.core.errors import PenultError

__all__ = [
    "Bin", "BinError", "BinReader", "BinRows", "Roi", "add_part", "bin_source", "find_bins",
    "group_bins", "list_bins", "read_bin",
    "read_roi", "roi_key", "roi_source", "stat_roi", "virtual_roi",
]  # fmt: skip

NEW_BIN = re.compile(r"^D(\d{8})T(\d{6})_IFCB(\d+)$")
OLD_BIN = re.compile(r"^IFCB(\d+)_(\d{4})_(\d{3})_(\d{6})$")
ROI_NAME = re.compile(r"^(D\d{8}T\d{6}_IFCB\d+|IFCB\d+_\d{4}_\d{3}_\d{6})_(\d{5,})$")
OPEN_BINS = 8  # bins a process keeps open (a loader worker reads one bin's ROIs in a row)
PARTS = (".hdr", ".adc", ".roi")
# 0-based ADC columns of x, y, width, height, start byte (and of the times the volume needs)
OLD_COLUMNS = {"x": 9, "y": 10, "width": 11, "height": 12, "start": 13, "open": 7, "grab": 8}
NEW_COLUMNS = {"x": 13, "y": 14, "width": 15, "height": 16, "start": 17}
SYRINGE_ML_PER_MIN = 0.25  # new instruments
OLD_ML_PER_S = 5.0 / 48000.0 * 40.0  # old instruments: mL per step x steps per second
MIN_PROC_TIME = 0.073  # s, old instruments


class BinError(PenultError):
    """A bin (or one of its ROIs) that cannot be read; the message names the file and why."""


@dataclass(frozen=True)
class Roi:
    number: int  # the ADC row, 1-based: the ROI's name in WHOI's tools
    offset: int  # byte offset of its pixels in the .roi
    width: int
    height: int

    @property
    def nbytes(self) -> int:
        return self.width * self.height


@dataclass
class Bin:
    """One bin: where it is, its header, its ROIs (triggers that imaged something) and the
    per-sample metadata a count needs."""

    pid: str  # the bin's name: D20130526T095207_IFCB013
    folder: Path
    header: dict[str, str]
    rois: list[Roi]
    instrument: int
    time: str  # ISO 8601, UTC
    volume_ml: float  # NaN where it cannot be computed
    triggers: int  # ADC rows
    roi_size: int  # bytes of the .roi (0: none)
    notes: list[str] = field(default_factory=list)

    def path(self, suffix: str) -> Path:
        return self.folder / f"{self.pid}{suffix}"


def roi_key(pid: str, number: int) -> str:
    """A ROI's name as WHOI's tools write it: the bin, an underscore, the 5-digit ADC row."""
    return f"{pid}_{number:05d}"


def is_bin_name(stem: str) -> bool:
    return bool(NEW_BIN.match(stem) or OLD_BIN.match(stem))


def find_bins(root: str | os.PathLike[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The bins under ``root`` (as ``folder/<bin>`` paths without suffix, sorted by name) and
    the files that look like bin parts but cannot make one: (path, why). Files whose names are
    not bin names (a stray ``decoy.adc``) are left alone."""
    root = Path(root)
    parts: dict[Path, set[str]] = {}
    for folder, _, files in os.walk(root):
        for name in files:
            add_part(parts, Path(folder), name)
    return group_bins(parts)


def add_part(parts: dict[Path, set[str]], folder: Path, name: str) -> bool:
    """Count file ``name`` of ``folder`` into ``parts`` (bin -> its suffixes) if it is a part
    of a bin; whether it is one."""
    stem, suffix = os.path.splitext(name)
    if suffix in PARTS and is_bin_name(stem):
        parts.setdefault(folder / stem, set()).add(suffix)
        return True
    return False


def group_bins(parts: dict[Path, set[str]]) -> tuple[list[Path], list[tuple[str, str]]]:
    """(bins, files that cannot make one with why) of the parts ``add_part`` found."""
    bins, problems = [], []
    for stem, have in sorted(parts.items(), key=lambda kv: (kv[0].name, str(kv[0]))):
        missing = [s for s in (".hdr", ".adc") if s not in have]
        if missing:
            problems.append((str(stem), f"no {' or '.join(missing)} file beside it"))
        else:
            bins.append(stem)
    return bins, problems


def read_bin(stem: str | os.PathLike[str]) -> Bin:
    """The bin at ``stem`` (a path without suffix); BinError naming the file and the problem
    for a bin that cannot give a single ROI (empty, zero-byte files, no ``.roi``)."""
    stem = Path(stem)
    pid = stem.name
    m_new, m_old = NEW_BIN.match(pid), OLD_BIN.match(pid)
    if not (m_new or m_old):
        raise BinError(f"{stem}: not an IFCB bin name (D<yyyymmdd>T<hhmmss>_IFCB<n> or "
                       "IFCB<n>_<yyyy>_<ddd>_<hhmmss>)")  # fmt: skip
    hdr, adc, roi = (stem.with_name(pid + s) for s in PARTS)
    for p in (hdr, adc):
        if not p.is_file():
            raise BinError(f"{p}: missing")
    if hdr.stat().st_size == 0:
        raise BinError(f"{hdr}: empty file (the instrument wrote no header)")
    header = _header(hdr.read_text(encoding="latin-1"))
    rows = _adc_rows(adc)
    cols = NEW_COLUMNS if m_new else OLD_COLUMNS
    rois = []
    for i, r in enumerate(rows, 1):
        try:
            w, h = int(float(r[cols["width"]])), int(float(r[cols["height"]]))
            start = int(float(r[cols["start"]]))
        except (IndexError, ValueError):
            raise BinError(f"{adc}: row {i} has no ROI width, height and start byte "
                           f"(columns {cols['width'] + 1}-{cols['start'] + 1})") from None  # fmt: skip
        if w > 0 and h > 0:
            rois.append(Roi(i, start if m_new else start - 1, w, h))
    if not rois:
        why = "no triggers (empty .adc)" if not rows else f"{len(rows)} triggers, no ROI imaged"
        raise BinError(f"{adc}: {why}")
    if not roi.is_file():
        raise BinError(f"{roi}: missing ({len(rois)} ROIs are listed in the .adc)")
    if m_new:
        instrument, when = int(m_new.group(3)), _new_time(m_new)
        volume = _volume_new(header)
    else:
        instrument, when = int(m_old.group(1)), _old_time(m_old)
        volume = _volume_old(rows)
    size = roi.stat().st_size
    b = Bin(pid, stem.parent, header, rois, instrument, when, volume, len(rows), size)
    cut = [r for r in rois if r.offset + r.nbytes > size]
    if cut:
        b.notes.append(f"{roi}: truncated at {size} bytes; {len(cut)} of {len(rois)} ROIs "
                       f"(from ROI {cut[0].number}) lie past its end")  # fmt: skip
    return b


class BinReader:
    """Reads a bin's ROIs through one open ``.roi`` file (opened once, not once per ROI; read
    with ``pread``, so a descriptor a forked loader worker inherits is still safe to share)."""

    def __init__(self, b: Bin):
        self.bin = b
        self._fd = os.open(b.path(".roi"), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def raw(self, roi: Roi) -> bytes:
        """The ROI's bytes in the ``.roi`` (BinError where the file ends before them)."""
        data = os.pread(self._fd, roi.nbytes, roi.offset)
        if len(data) != roi.nbytes:
            raise BinError(
                f"{self.bin.path('.roi')}: ROI {roi.number} needs bytes {roi.offset}-"
                f"{roi.offset + roi.nbytes} but the file ends at {self.bin.roi_size} (truncated)"
            )
        return data

    def pixels(self, roi: Roi) -> np.ndarray:
        """(height, width) uint8 greyscale."""
        return np.frombuffer(self.raw(roi), np.uint8).reshape(roi.height, roi.width)

    def sha256(self, roi: Roi) -> str:
        """The content hash of a ROI: SHA-256 of its bytes in the ``.roi``."""
        return hashlib.sha256(self.raw(roi)).hexdigest()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> BinReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def roi_source(path: str) -> tuple[Path, int] | None:
    """(the bin's stem, the ROI's number) when ``path`` names a ROI (``<bin>_<nnnnn>``), else
    None. Only the name is looked at."""
    m = ROI_NAME.match(os.path.basename(path))
    return (Path(path).with_name(m.group(1)), int(m.group(2))) if m else None


def virtual_roi(path: str) -> tuple[Path, int] | None:
    """``roi_source(path)`` where no file exists at ``path`` (a ROI read from its bin), else
    None: a real file named like a ROI is read as the file it is."""
    roi = roi_source(path)
    return roi if roi is not None and not os.path.isfile(path) else None


def bin_source(path: str) -> Path | None:
    """``path`` as a bin's stem when its name is a bin's (``D..._IFCB013``), else None."""
    return Path(path) if is_bin_name(os.path.basename(path)) else None


_OPEN: dict[tuple, tuple[Bin, BinReader, dict[int, Roi]]] = {}
OPENED = [0]  # bins this process has read and opened (a benchmark counts them)


def _opened(stem: Path) -> tuple[Bin, BinReader, dict[int, Roi]]:
    """The bin at ``stem`` read and its ``.roi`` open, kept per process (a loader worker opens a
    bin once for all its ROIs) while its files are unchanged (a growing bin is read again)."""
    try:
        st = [os.stat(stem.with_name(stem.name + s)) for s in (".adc", ".roi")]
    except FileNotFoundError:
        st = []
    key = (os.getpid(), str(stem), *((x.st_size, x.st_mtime_ns) for x in st))
    hit = _OPEN.get(key)
    if hit is None:
        b = read_bin(stem)
        hit = (b, BinReader(b), {r.number: r for r in b.rois})
        OPENED[0] += 1
        while len(_OPEN) >= OPEN_BINS:
            _OPEN.pop(next(iter(_OPEN)))[1].close()
        _OPEN[key] = hit
    return hit


def _roi(stem: Path, number: int) -> tuple[BinReader, Roi]:
    b, reader, rois = _opened(stem)
    roi = rois.get(number)
    if roi is None:
        raise BinError(f"{b.path('.adc')}: no ROI {number} (row {number} imaged nothing, or the "
                       f"bin has {b.triggers} rows)")  # fmt: skip
    return reader, roi


def read_roi(stem: Path, number: int) -> tuple[bytes, str]:
    """ROI ``number`` of the bin at ``stem`` as an image file's bytes (binary PGM: its pixels
    behind a 15-byte header, which every image decoder reads) and its content hash: SHA-256 of
    the ROI's bytes in the ``.roi``."""
    reader, roi = _roi(stem, number)
    raw = reader.raw(roi)
    return b"P5 %d %d 255\n" % (roi.width, roi.height) + raw, hashlib.sha256(raw).hexdigest()


def stat_roi(stem: Path, number: int) -> tuple[int, int]:
    """(bytes, mtime in ns) standing for a ROI's file: its size, and the ``.roi``'s time (a bin
    that grew is hashed again; one that did not keeps its stored hashes)."""
    reader, roi = _roi(stem, number)
    return roi.nbytes, os.stat(reader.bin.path(".roi")).st_mtime_ns


def list_bins(root: Path) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """Every ROI of the bins under ``root`` as a path (``<folder>/<bin>_<nnnnn>``, relative to
    ``root``) with its bin as the sample and the bin's time, instrument and volume analysed as
    sample metadata; and notes. A bin that cannot be read is listed by its own name (extracting
    it records the reason as that row's failure, so nothing fails silently)."""
    stems, problems = find_bins(root)
    rows = BinRows(root)
    for stem in stems:
        rows.add_bin(stem)
    for path, _ in problems:
        rows.add_bad(Path(path))
    return rows.paths, rows.meta, [rows.count_note(), *rows.notes]


class BinRows:
    """The rows of bins, one bin at a time (``list_bins`` all at once; a streamed listing a
    chunk of bins at a time, with ``count_note`` over every chunk)."""

    def __init__(self, root: Path):
        self.root = root
        self.good = self.bad = self.rois = 0
        self.notes: list[str] = []
        self.clear()

    def clear(self) -> None:
        """Forget the rows (a chunk handed on); counts and notes stay."""
        self.paths: list[str] = []
        self.meta: dict[str, list[str]] = {
            k: [] for k in ("sample", "time", "instrument", "volume_ml")
        }

    def _add(self, path: str, pid: str, when: str = "", instrument: str = "", ml: str = "") -> None:
        self.paths.append(path)
        for k, v in zip(self.meta, (pid, when, instrument, ml), strict=True):
            self.meta[k].append(v)

    def add_bin(self, stem: Path) -> None:
        """A bin's ROIs; a bin that cannot be read as one row (``add_bad``)."""
        try:
            b = read_bin(stem)
        except BinError:  # its metadata still counts: a sample with no ROI analysed a volume too
            self.add_bad(stem)
            return
        rel = stem.relative_to(self.root).as_posix()
        ml = _volume_text(b.volume_ml)
        for r in b.rois:
            self._add(f"{rel}_{r.number:05d}", b.pid, b.time, str(b.instrument), ml)
        self.good += 1
        self.rois += len(b.rois)
        self.notes += b.notes

    def add_bad(self, stem: Path) -> None:
        """A bin that cannot be read (or lacks a part): one row by its own name, whose
        extraction records why."""
        self._add(stem.relative_to(self.root).as_posix(), stem.name, *_name_meta(stem.name),
                  _volume_text(bin_volume(stem)))  # fmt: skip
        self.bad += 1

    def count_note(self) -> str:
        return f"IFCB: {self.good} bins, {self.rois} ROIs" + (
            f"; {self.bad} bins cannot be read (recorded as failures)" if self.bad else ""
        )


def bin_volume(stem: Path) -> float:
    """The volume a bin analysed (mL) from whatever of its files can be read; NaN if none."""
    try:
        if NEW_BIN.match(stem.name):
            return _volume_new(_header(stem.with_name(stem.name + ".hdr").read_text("latin-1")))
        rows = _adc_rows(stem.with_name(stem.name + ".adc"))
        return _volume_old(rows) if rows else math.nan
    except (OSError, ValueError, IndexError):
        return math.nan


def _name_meta(pid: str) -> tuple[str, str]:
    """(time, instrument) that a bin's name says."""
    m_new, m_old = NEW_BIN.match(pid), OLD_BIN.match(pid)
    try:
        if m_new:
            return _new_time(m_new), str(int(m_new.group(3)))
        if m_old:
            return _old_time(m_old), str(int(m_old.group(1)))
    except ValueError:  # a name with an impossible date
        pass
    return "", ""


def _volume_text(ml: float) -> str:
    return "" if math.isnan(ml) else f"{ml:.6g}"


def _header(text: str) -> dict[str, str]:
    """``key: value`` lines (new instruments); an old header's lines are kept as ``line<i>``."""
    out = {}
    for i, line in enumerate(text.splitlines()):
        key, sep, value = line.partition(":")
        if sep and key.strip() and " " not in key.strip():
            out[key.strip()] = value.strip()
        elif line.strip():
            out[f"line{i}"] = line.strip().strip('"')
    return out


def _adc_rows(adc: Path) -> list[list[str]]:
    with open(adc, newline="", encoding="latin-1") as f:
        return [r for r in csv.reader(f) if r and any(c.strip() for c in r)]


def _new_time(m: re.Match) -> str:
    t = datetime.strptime(m.group(1) + m.group(2), "%Y%m%d%H%M%S")
    return t.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")


def _old_time(m: re.Match) -> str:
    year, day, hms = int(m.group(2)), int(m.group(3)), m.group(4)
    t = datetime(year, 1, 1, int(hms[:2]), int(hms[2:4]), int(hms[4:]), tzinfo=UTC)
    return (t + timedelta(days=day - 1)).isoformat().replace("+00:00", "Z")


def _volume_new(header: dict[str, str]) -> float:
    try:
        look = float(header["runTime"]) - float(header["inhibitTime"])
    except (KeyError, ValueError):
        return math.nan
    return SYRINGE_ML_PER_MIN * look / 60.0


def _volume_old(rows: list[list[str]]) -> float:
    c = OLD_COLUMNS
    seen, opened, grabbed = set(), [], []
    for r in rows:  # a trigger that imaged two ROIs has two rows: its first counts
        if r[0] in seen:
            continue
        seen.add(r[0])
        try:
            opened.append(float(r[c["open"]]))
            grabbed.append(float(r[c["grab"]]))
        except (IndexError, ValueError):
            return math.nan
    o, g = np.asarray(opened), np.asarray(grabbed)
    o, g = o + (o < 0) * 86400.0, g + (g < 0) * 86400.0  # a bin spanning midnight
    proc = np.maximum(o[1:] - g[:-1], MIN_PROC_TIME)
    return float((g[-1] - proc.sum()) * OLD_ML_PER_S)
