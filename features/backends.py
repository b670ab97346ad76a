"""The store's on-disk formats behind one protocol, found by the version the file declares.

``FeatureStore``, ``penult info``/``check`` and the writers talk to a :class:`StoreBackend`;
only the two backends (``format1.py``, read-only, and ``format2/``) know their layout, so no
other module asks which format a store has (as anndata dispatches each element by its encoding).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Protocol

import h5py
import numpy as np
from penult.core.errors import StoreError
from penult.features.format1 import Format1
from penult.features.format2.backend import Format2
from penult.features.hdf5 import FORMAT
from penult.features.types import (
    BackboneEntry,
    History,
    ImageTable,
    Predicted,
    Provenance,
    TableView,
)


class StoreBackend(Protocol):
    """One store format: what ``FeatureStore`` reads through, and what ``check`` asks of it."""

    version: ClassVar[int]
    read_only: ClassVar[str]  # "" where penult writes this format, else why not and what to run
    path: Path

    def __init__(self, path: Path) -> None: ...

    # opening (the file is open once, for these cheap checks)
    @staticmethod
    def layout_problems(f: h5py.File, path: Path, *, files: bool = True) -> list[str]: ...
    @staticmethod
    def needs_relink(f: h5py.File, path: Path) -> bool: ...
    def relink(self) -> None: ...

    # reading
    def rows(self) -> int: ...
    def table(self, rows: np.ndarray | None = None) -> ImageTable: ...
    def view(self) -> TableView: ...
    def hashes(self, rows: np.ndarray) -> np.ndarray: ...
    def paths(self, rows: np.ndarray) -> list[str]: ...
    def segment_ids(self, backbone: str) -> tuple[int, list[str]]: ...
    def label_versions(self, column: str) -> dict[str, str]: ...
    def find(self, paths: list[str]) -> np.ndarray: ...
    def label_columns(self) -> list[str]: ...
    def label_codes(
        self, column: str, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[str]]: ...
    def labels(
        self, columns: list[str], rows: np.ndarray | None = None
    ) -> dict[str, tuple[np.ndarray, list[str]]]: ...
    def provenance(self, column: str, rows: np.ndarray | None = None) -> Provenance: ...
    def statuses(self, column: str, rows: np.ndarray | None = None) -> np.ndarray: ...
    def predictions(self, column: str, rows: np.ndarray | None = None) -> Predicted: ...
    def history(
        self, columns: Sequence[str] | None = None, batch: int | None = None
    ) -> History: ...
    def backbone_names(self) -> list[str]: ...
    def backbones(self) -> dict[str, BackboneEntry]: ...
    def valid(self, name: str, rows: np.ndarray | None = None) -> np.ndarray: ...
    def embeddings(self, name: str, rows: np.ndarray | None) -> np.ndarray: ...

    # checking and repairing (the caller holds the writer's lock to repair)
    def files(self) -> list[Path]: ...
    def damaged(self) -> dict[str, str]: ...
    def repair(self, damaged: dict[str, str]) -> list[str]: ...
    def index_problems(self, missed: int, *, repair: bool) -> list[str]: ...


BACKENDS: dict[int, type[StoreBackend]] = {1: Format1, 2: Format2}
NEWEST = max(BACKENDS)


def backend_for(f: h5py.File, path: Path) -> type[StoreBackend]:
    """The backend of the store open as ``f``, or a StoreError if this penult cannot read it."""
    if f.attrs.get("format") != FORMAT:
        raise StoreError(f"{path} is an HDF5 file but not a penult feature store")
    version = int(f.attrs.get("schema_version", 1))
    if version > NEWEST:
        raise StoreError(
            f"{path} has schema version {version}, newer than this penult ({NEWEST}); upgrade penult"
        )
    if version not in BACKENDS:
        raise StoreError(f"{path} has schema version {version}, which no penult wrote")
    return BACKENDS[version]
