"""Every CSV penult writes goes through here: cells that a spreadsheet would run are neutralised.

A file name such as ``=HYPERLINK(...)`` or ``@SUM(...)`` lands in the path column of a predictions
table; opened in a spreadsheet it would be evaluated as a formula (CSV injection). As OWASP
recommends, a text cell starting with ``=``, ``+``, ``-``, ``@``, tab or carriage return gets a
leading single quote. Numbers (``-0.25``) are left alone. Names that are not valid UTF-8 are
written as their original bytes.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from typing import IO, Any

__all__ = ["SafeWriter", "open_csv", "safe_cell"]

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> Any:
    """``value`` as a spreadsheet will not evaluate it."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        try:
            float(value)
        except ValueError:
            return "'" + value
    return value


def open_csv(path: str | os.PathLike[str]) -> IO[str]:
    return open(path, "w", newline="", encoding="utf-8", errors="surrogateescape")


class SafeWriter:
    """``csv.writer`` with every cell passed through :func:`safe_cell`."""

    def __init__(self, fh: IO[str]):
        self._w = csv.writer(fh)

    def writerow(self, row: Iterable[Any]) -> None:
        self._w.writerow([safe_cell(v) for v in row])

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)
