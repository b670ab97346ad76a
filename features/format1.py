"""Store format 1 (one HDF5 file, rewritten by every commit), read-only.

Stores written by penult before format 2 open as before for reading; writing needs
``penult check --upgrade STORE`` (see ``upgrade.py``), which converts one in a single pass.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
from penult.features.hdf5 import backbone_attr_problems, decode
from penult.features.types import (
    HISTORY_COLUMNS,
    UNLABELLED,
    VALIDATED,
    BackboneEntry,
    Fingerprint,
    History,
    ImageTable,
    Predicted,
    Provenance,
    TableView,
    sha_raw,
)

_STR_COLUMNS = ("path", "root", "sha256", "error")
_INT_COLUMNS = {"nbytes": np.int64, "mtime_ns": np.int64, "width": np.int32, "height": np.int32}


def read_table(f: h5py.File) -> ImageTable:
    g = f["images"]
    t = ImageTable(**{c: decode(g[c][()]) for c in _STR_COLUMNS})
    for c, dt in _INT_COLUMNS.items():
        setattr(t, c, np.asarray(g[c][()], dtype=dt))
    t.labels = {k: decode(g["labels"][k][()]) for k in g["labels"]}
    return t


def structure_problems(f: h5py.File) -> list[str]:
    """What is missing or inconsistent in the layout (shapes and attributes only: cheap)."""
    out: list[str] = []
    g = f.get("images")
    if not isinstance(g, h5py.Group):
        return ["no /images group"]
    n = None
    for c in (*_STR_COLUMNS, *_INT_COLUMNS):
        ds = g.get(c)
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 1:
            out.append(f"/images/{c} is missing or not a 1-d dataset")
        elif n is None:
            n = ds.shape[0]
        elif ds.shape[0] != n:
            out.append(f"/images/{c} has {ds.shape[0]} rows, /images/path has {n}")
    labels = g.get("labels")
    if not isinstance(labels, h5py.Group):
        out.append("no /images/labels group")
    else:
        for k, ds in labels.items():
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 1:
                out.append(f"label column {k!r} is not a 1-d dataset")
            elif n is not None and ds.shape[0] != n:
                out.append(f"label column {k!r} has {ds.shape[0]} rows for {n} images")
    bb = f.get("backbones")
    if not isinstance(bb, h5py.Group):
        return [*out, "no /backbones group"]
    for name, b in bb.items():
        out += [f"backbone {name!r}: {p}" for p in _backbone_problems(b, n)]
    return out


def _backbone_problems(b: h5py.Group | h5py.Dataset, n: int | None) -> list[str]:
    if not isinstance(b, h5py.Group):
        return ["not a group"]
    out = backbone_attr_problems(b)
    if out:
        return out
    dim = int(b.attrs["dim"])
    emb, valid = b.get("embeddings"), b.get("valid")
    if not isinstance(emb, h5py.Dataset) or emb.ndim != 2:
        out.append("embeddings missing or not 2-d")
    elif emb.shape[1] != dim:
        out.append(f"embeddings are {emb.shape[1]}-d but the dim attribute says {dim}")
    elif n is not None and emb.shape[0] != n:
        out.append(f"{emb.shape[0]} embedding rows for {n} images")
    if not isinstance(valid, h5py.Dataset) or valid.ndim != 1:
        out.append("valid flags missing or not 1-d")
    elif n is not None and valid.shape[0] != n:
        out.append(f"{valid.shape[0]} valid flags for {n} images")
    return out


class Format1:
    """The format-1 :class:`~penult.features.backends.StoreBackend`: read, never written."""

    version = 1
    read_only = (
        "was written by an older penult (store format 1) and is read-only here; "
        "convert it once with `penult check --upgrade {path}`"
    )

    def __init__(self, path: Path):
        self.path = path

    @staticmethod
    def layout_problems(f: h5py.File, path: Path, *, files: bool = True) -> list[str]:
        return structure_problems(f)

    @staticmethod
    def needs_relink(f: h5py.File, path: Path) -> bool:
        return False  # one file: nothing in it names another

    def relink(self) -> None:
        pass

    def files(self) -> list[Path]:
        return [self.path]

    def damaged(self) -> dict[str, str]:
        return {}  # one file: what h5py cannot read shows up as a reading error

    def repair(self, damaged: dict[str, str]) -> list[str]:
        return []

    def index_problems(self, missed: int, *, repair: bool) -> list[str]:
        return []  # the path index is made from the table each time

    def backbone_names(self) -> list[str]:
        with self._open() as f:
            return list(f["backbones"])

    def _open(self) -> h5py.File:
        return h5py.File(self.path, "r")

    def rows(self) -> int:
        with self._open() as f:
            return int(f["images/path"].shape[0])

    def table(self, rows: np.ndarray | None = None) -> ImageTable:
        with self._open() as f:
            t = read_table(f)
        return t if rows is None else t.take(rows)

    def view(self) -> TableView:
        t = self.table()
        return TableView(
            sha_raw(t.sha256), t.nbytes, t.mtime_ns, np.array([bool(e) for e in t.error])
        )

    def hashes(self, rows: np.ndarray) -> np.ndarray:
        return self.view().sha256[rows]

    def segment_ids(self, backbone: str) -> tuple[int, list[str]]:
        """One block, whose id changes with every commit (format 1 rewrites the whole file)."""
        st = self.path.stat()
        return max(1, self.rows()), [f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"]

    def label_versions(self, column: str) -> dict[str, str]:
        st = self.path.stat()
        v = f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"
        return {"label": v, "review": v, "pred": v}

    def find(self, paths: list[str]) -> np.ndarray:
        index = self.table().index()
        return np.array([index.get(p, -1) for p in paths], np.int64)

    def paths(self, rows: np.ndarray) -> list[str]:
        t = self.table().path
        return [t[i] for i in rows]

    def label_codes(
        self, column: str, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[str]]:
        names, codes = np.unique(
            np.asarray(self.table().labels[column], dtype=str), return_inverse=True
        )
        return codes.astype(np.int32)[slice(None) if rows is None else rows], names.tolist()

    def labels(
        self, columns: list[str], rows: np.ndarray | None = None
    ) -> dict[str, tuple[np.ndarray, list[str]]]:
        return {c: self.label_codes(c, rows) for c in columns}

    def label_columns(self) -> list[str]:
        with self._open() as f:
            return sorted(f["images/labels"])

    def provenance(self, column: str, rows: np.ndarray | None = None) -> Provenance:
        """Format 1 predates provenance: every label is validated by the file it came from."""
        codes, names = self.label_codes(column)
        codes = codes if rows is None else codes[rows]
        labelled = np.asarray(names, dtype=object)[codes] != ""
        z = np.zeros(len(codes), np.int32)
        status = np.where(labelled, VALIDATED, UNLABELLED).astype(np.int8)
        return Provenance(column, status, z, z.astype(np.int64), z, [""], [""])

    def statuses(self, column: str, rows: np.ndarray | None = None) -> np.ndarray:
        return self.provenance(column, rows).status

    def predictions(self, column: str, rows: np.ndarray | None = None) -> Predicted:
        """Format 1 holds no predictions."""
        n = self.rows() if rows is None else len(rows)
        return Predicted(
            np.zeros((n, 3), np.int32), np.array([""], dtype=object),
            np.full((n, 3), np.nan, np.float32), np.zeros(n, np.int32), np.array([""], dtype=object),
        )  # fmt: skip

    def history(self, columns: Sequence[str] | None = None, batch: int | None = None) -> History:
        return History({k: np.zeros(0) for k in columns or HISTORY_COLUMNS})

    def backbones(self) -> dict[str, BackboneEntry]:
        with self._open() as f:
            return {n: self._entry(n, g) for n, g in f["backbones"].items()}

    @staticmethod
    def _entry(name: str, g: h5py.Group) -> BackboneEntry:
        return BackboneEntry(
            name=name,
            fingerprint=Fingerprint(json.loads(g.attrs["fingerprint"])),
            dim=int(g.attrs["dim"]),
            dtype=str(g.attrs["dtype"]),
            count=int(np.count_nonzero(g["valid"][()])),
            created_at=str(g.attrs.get("created_at", "")),
        )

    def valid(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        with self._open() as f:
            v = np.asarray(f["backbones"][name]["valid"][()], dtype=bool)
        return v if rows is None else v[rows]

    def embeddings(self, name: str, rows: np.ndarray | None) -> np.ndarray:
        """Embeddings at sorted unique ``rows`` (all rows when None), float32."""
        with self._open() as f:
            ds = f["backbones"][name]["embeddings"]
            if rows is None:
                return np.asarray(ds[()], dtype=np.float32)
            if not len(rows):
                return np.zeros((0, ds.shape[1]), np.float32)
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            if hi - lo <= 4 * len(rows):  # dense: contiguous reads beat a point selection
                out = np.empty((len(rows), ds.shape[1]), np.float32)
                step = max(len(rows), 1024)
                for a in range(lo, hi, step):
                    i, j = np.searchsorted(rows, [a, a + step])
                    if j > i:
                        out[i:j] = ds[a : min(a + step, hi)][rows[i:j] - a]
                return out
            return np.asarray(ds[rows], dtype=np.float32)
