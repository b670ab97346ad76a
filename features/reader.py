"""Store format 2, read side: columns read through the piece maps of the top-level file."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import h5py
import numpy as np

from features.errors import StoreError
from features.legacy import decode
from features.segmented import (
    ERROR,
    SIZE,
    TABLE,
    State,
    backbone_family,
    label_family,
    load,
    segment_dir,
)
from features.segments import KeyRun, Reader, find_keys, path_keys, read_run
from features.types import BackboneEntry, ImageTable, TableView, sha_hex

T = TypeVar("T")


def to_float32(x: np.ndarray) -> np.ndarray:
    """float16 to float32 on two threads for large blocks (numpy converts about 1 GB/s a core,
    slower than the segments are read)."""
    if x.dtype == np.float32:
        return x
    out = np.empty(x.shape, np.float32)
    if x.nbytes < (32 << 20):  # small blocks: threads (and their stacks) are not worth it
        np.copyto(out, x)
        return out
    half = len(x) // 2
    with ThreadPoolExecutor(2) as pool:  # copyto releases the GIL
        list(pool.map(lambda sl: np.copyto(out[sl], x[sl]), [np.s_[:half], np.s_[half:]]))
    return out


class Segmented:
    """Format-2 reader behind :class:`features.store.FeatureStore`. Every call reads the current
    top-level file, so it sees each commit whole; a segment deleted by a concurrent commit
    between the two is retried once on the new state."""

    version = 2

    def __init__(self, path: Path):
        self.path = path

    def state(self) -> State:
        with h5py.File(self.path, "r") as f:
            return load(f)

    def _run(self, fn: Callable[[State, Reader], T]) -> T:
        s = self.state()
        for attempt in (0, 1):
            with Reader(segment_dir(self.path)) as r:
                try:
                    return fn(s, r)
                except StoreError:
                    fresh = self.state()
                    if attempt or fresh.files() == s.files():
                        raise
                    s = fresh
        raise AssertionError("unreachable")

    def _column(
        self, family: str, column: str, rows: np.ndarray | None = None, dtype=None
    ) -> np.ndarray:
        def read(s: State, r: Reader) -> np.ndarray:
            col = s.columns(family)[column]
            ps = s.maps.get(family, [])
            if rows is None:
                return r.span(ps, col, column, 0, s.rows, dtype)
            return r.rows(ps, col, column, rows, dtype)

        return self._run(read)

    def rows(self) -> int:
        return self.state().rows

    def table(self) -> ImageTable:
        s = self.state()
        names = {k: np.asarray(v, dtype=object) for k, v in s.names.items()}
        root = self._column(TABLE, "root")
        t = ImageTable(
            path=decode(self._column(TABLE, "path")),
            root=names["root"][root].tolist() if len(root) else [],
            sha256=sha_hex(self._column(TABLE, "sha256")),
            error=names["error"][self._column(ERROR, "error")].tolist(),
            nbytes=self._column(TABLE, "nbytes"),
            mtime_ns=self._column(TABLE, "mtime_ns"),
            width=self._column(SIZE, "width"),
            height=self._column(SIZE, "height"),
        )
        for col in s.labels:
            t.labels[col] = names[label_family(col)][
                self._column(label_family(col), "code")
            ].tolist()
        return t

    def view(self) -> TableView:
        return TableView(
            sha256=self._column(TABLE, "sha256"),
            nbytes=self._column(TABLE, "nbytes"),
            mtime_ns=self._column(TABLE, "mtime_ns"),
            failed=self._column(ERROR, "error") != 0,
        )

    def hashes(self, rows: np.ndarray) -> np.ndarray:
        return self._column(TABLE, "sha256", rows)

    def segment_ids(self, backbone: str) -> tuple[int, list[str]]:
        s = self.state()
        block = s.block
        fams = (s.maps.get(TABLE, []), s.maps.get(backbone_family(backbone), []))
        ids = []
        for k in range(-(-s.rows // block)):
            lo, hi = k * block, (k + 1) * block
            ids.append(
                ";".join(
                    f"{p.lo}:{p.hi}:{p.file}:{p.offset}"
                    for ps in fams
                    for p in ps
                    if p.lo < hi and p.hi > lo
                )
            )
        return block, ids

    def find(self, paths: list[str]) -> np.ndarray:
        def read(s: State, r: Reader) -> np.ndarray:
            runs: list[KeyRun] = [read_run(r, n) for n, _ in s.index]
            out = np.empty(len(paths), np.int64)
            step = 1 << 18  # keys of 262,144 paths at a time: memory stays bounded
            for i in range(0, len(paths), step):
                keys = path_keys(paths[i : i + step], int(s.attrs["key_seed"]))
                out[i : i + step] = find_keys(runs, keys)
            return out

        return self._run(read)

    def label_columns(self) -> list[str]:
        return self.state().labels

    def label_codes(self, column: str) -> tuple[np.ndarray, list[str]]:
        names = self.state().names[label_family(column)]
        return self._column(label_family(column), "code"), list(names)

    def backbones(self) -> dict[str, BackboneEntry]:
        s = self.state()
        return {n: self._entry(s, n) for n in s.backbones}

    def _entry(self, s: State, name: str) -> BackboneEntry:
        import json

        meta = s.backbones[name]
        return BackboneEntry(
            name=name,
            fingerprint=json.loads(meta["fingerprint"]),
            dim=int(meta["dim"]),
            dtype=str(meta["dtype"]),
            count=int(np.count_nonzero(self.valid(name))),
            created_at=str(meta.get("created_at", "")),
        )

    def valid(self, name: str) -> np.ndarray:
        return self._column(backbone_family(name), "valid")

    def embeddings(self, name: str, rows: np.ndarray | None) -> np.ndarray:
        x = self._column(backbone_family(name), "embeddings", rows)  # HDF5's own float16
        return to_float32(x)  # conversion is several times slower than numpy's
