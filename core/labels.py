"""Label tables from outside the store: a taxonomy CSV (class -> coarse levels) and the seeded
train/test split. One set of rules for `extract`, `train` and `finetune` alike, so the same
file gives the same labels (or the same error) to every command:

- the first column is the class; the other columns are coarse levels (genus, family, ...);
- header names are matched without case and surrounding spaces (`Class, Genus` is `genus`);
- values are stripped of surrounding spaces;
- a labelled class missing from the taxonomy is an error naming how many and which.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from penult.core.errors import PenultError

__all__ = [
    "LabelError",
    "NOT_METADATA",
    "SAMPLE",
    "TEST",
    "TRAIN",
    "Taxonomy",
    "VAL",
    "make_split",
    "read_taxonomy",
    "coded_sample_columns",
    "sample_columns",
]


TRAIN, TEST, VAL = "train", "test", "val"  # the split names every command uses
SAMPLE = "sample"  # the column naming each image's sample (an IFCB bin, a net tow, a day)
NOT_METADATA = ("label", "split")  # never a sample's: they differ between its images


def sample_columns(columns: dict[str, Sequence[str]]) -> list[str]:
    """The sample column and its metadata, in the order given: every other column whose value
    is one and the same for all images of each sample (``volume_ml``, ``time``, ``lat``, ...).
    Images without a sample are not looked at; [] where there are no samples."""
    samples = columns.get(SAMPLE)
    if samples is None or not any(samples):
        return []
    out = [SAMPLE]
    for name, values in columns.items():
        if name == SAMPLE or name in NOT_METADATA:
            continue
        seen: dict[str, str] = {}
        if all(seen.setdefault(s, v) == v for s, v in zip(samples, values, strict=True) if s):
            out.append(name)
    return out


def coded_sample_columns(columns: dict[str, tuple[np.ndarray, Sequence[str]]]) -> list[str]:
    """:func:`sample_columns` over a store's label codes ((codes, names) per column): the same
    answer without a string per image (a pair of codes a row, sorted once per column)."""
    if SAMPLE not in columns:
        return []
    s_codes, s_names = columns[SAMPLE]
    named = np.flatnonzero(np.asarray(s_names, dtype=object) != "")
    has = np.isin(s_codes, named)
    if not has.any():
        return []
    sample = s_codes[has].astype(np.int64) << 32
    out = [SAMPLE]
    for name, (codes, _) in columns.items():
        if name == SAMPLE or name in NOT_METADATA:
            continue
        pairs = np.unique(sample | codes[has].astype(np.int64))
        if len(pairs) == len(np.unique(pairs >> 32)):  # one value per sample
            out.append(name)
    return out


class LabelError(PenultError, ValueError):
    """A taxonomy or split cannot be used as given (unreadable, malformed, classes missing)."""


@dataclass(frozen=True)
class Taxonomy:
    path: str
    levels: tuple[str, ...]  # the coarse columns, lower-cased, in file order
    parents: dict[str, tuple[str, ...]]  # class -> its value at each level

    def check(self, classes: Sequence[str]) -> None:
        """Refuse labelled classes the taxonomy does not have (unlabelled "" is fine)."""
        missing = sorted({c for c in classes if c and c not in self.parents})
        if missing:
            shown = ", ".join(repr(c) for c in missing[:3])
            raise LabelError(
                f"{self.path}: {len(missing)} classes are not in the taxonomy, e.g. {shown}"
            )

    def columns(self, classes: Sequence[str]) -> dict[str, list[str]]:
        """Each level's value for each of ``classes`` ("" for an unlabelled row)."""
        self.check(classes)
        return {
            level: [self.parents[c][j] if c else "" for c in classes]
            for j, level in enumerate(self.levels)
        }

    def column(self, level: str, classes: Sequence[str]) -> list[str]:
        """One level's value for each of ``classes``."""
        key = level.strip().lower()
        if key not in self.levels:
            raise LabelError(f"{self.path}: no {level!r} column (levels: {', '.join(self.levels)})")
        return self.columns(classes)[key]


def read_taxonomy(path: str | os.PathLike[str]) -> Taxonomy:
    """Read a taxonomy CSV (see the module docstring for the rules)."""
    p = Path(path)
    if not p.is_file():
        raise LabelError(f"{p}: cannot read taxonomy CSV (not a regular file)")
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if any(v.strip() for v in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise LabelError(f"{p}: cannot read taxonomy CSV ({e})") from None
    if len(rows) < 2 or len(rows[0]) < 2:
        raise LabelError(f"{p}: a taxonomy needs a header and rows of class,<coarse levels...>")
    header = [h.strip().lower() for h in rows[0]]
    levels = tuple(header[1:])
    if len(set(levels)) != len(levels) or "" in levels:
        raise LabelError(f"{p}: the level names {', '.join(rows[0][1:])} must be distinct")
    parents: dict[str, tuple[str, ...]] = {}
    for n, r in enumerate(rows[1:], start=2):
        cls = r[0].strip()
        values = tuple(r[j].strip() if j < len(r) else "" for j in range(1, len(header)))
        if cls in parents and parents[cls] != values:
            raise LabelError(f"{p}, line {n}: class {cls!r} is listed twice with other levels")
        parents[cls] = values
    return Taxonomy(str(p), levels, parents)


def make_split(y: np.ndarray, *, test_size: float = 0.3, seed: int = 0) -> np.ndarray:
    """A seeded stratified train/test assignment; classes with one image stay in train."""
    from sklearn.model_selection import train_test_split

    if not 0 < test_size < 1:
        raise LabelError(f"test size {test_size!r} must be a fraction strictly between 0 and 1")
    y = np.asarray(y, dtype=str)
    out = np.full(len(y), TRAIN, dtype=object)
    classes, counts = np.unique(y, return_counts=True)
    idx = np.flatnonzero(np.isin(y, classes[counts >= 2]))
    k = int(np.sum(counts >= 2))  # classes that can have an image on each side
    # stratification needs at least one image per class on each side
    n_test = min(max(int(round(test_size * len(idx))), k), len(idx) - k)
    if k and n_test > 0:
        _, test = train_test_split(idx, test_size=n_test, stratify=y[idx], random_state=seed)
        out[test] = TEST
    return out.astype(str)
