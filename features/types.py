"""Plain data the store hands out (the same for both store formats)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ImageTable:
    """The image table in memory: equal-length columns, row i describes image i."""

    path: list[str] = field(default_factory=list)
    root: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    error: list[str] = field(default_factory=list)
    nbytes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    mtime_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    width: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    height: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    labels: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.path)

    def index(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.path)}

    def label_array(self, column: str = "label") -> np.ndarray:
        if column not in self.labels:
            raise KeyError(f"no label column {column!r}; the store has {sorted(self.labels)}")
        return np.asarray(self.labels[column], dtype=str)


@dataclass
class TableView:
    """What a resume plan needs of every row, as compact arrays (about 50 bytes a row)."""

    sha256: np.ndarray  # (N, 32) uint8, zeros where the file could not be hashed
    nbytes: np.ndarray  # (N,) int64
    mtime_ns: np.ndarray  # (N,) int64
    failed: np.ndarray  # (N,) bool: an error is recorded


@dataclass
class Chunk:
    """Rows of the store read together by :meth:`FeatureStore.iter_chunks`."""

    rows: np.ndarray  # (k,) table rows (of the first backbone)
    X: np.ndarray  # (k, sum of dims) float32, backbones side by side in the order asked
    labels: dict[str, np.ndarray]  # (k,) str per label column asked for


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    fingerprint: dict[str, Any]
    dim: int
    dtype: str
    count: int
    created_at: str


def sha_raw(hexes: list[str]) -> np.ndarray:
    """(n, 32) uint8 digests from hex strings; "" (no hash) becomes zeros."""
    out = np.zeros((len(hexes), 32), np.uint8)
    ok = [i for i, h in enumerate(hexes) if h]
    if ok:
        raw = bytes.fromhex("".join(hexes[i] for i in ok))
        out[ok] = np.frombuffer(raw, np.uint8).reshape(-1, 32)
    return out


def sha_hex(raw: np.ndarray) -> list[str]:
    return [r.tobytes().hex() if r.any() else "" for r in raw]
