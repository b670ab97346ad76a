"""Plain data the store hands out (the same for both store formats)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# A label's status (features/review.py); a stored 0 means "never recorded", read as VALIDATED
# where the image has a label (labels from folders and manifests) and UNLABELLED where not.
UNLABELLED, PREDICTED, VALIDATED, DUBIOUS = 1, 2, 3, 4
STATUSES = ("", "unlabelled", "predicted", "validated", "dubious")  # by code
IMPORT_PROVENANCE = ("label",)  # columns whose provenance extract records from its input
HISTORY_COLUMNS = (
    "batch", "row", "column", "old", "new", "old_status", "new_status", "who", "when", "source"
)  # fmt: skip


@dataclass
class Provenance:
    """Where each image's label of one level (column) came from: (N,) arrays, codes into names."""

    column: str
    status: np.ndarray  # (N,) int8, one of UNLABELLED..DUBIOUS
    who: np.ndarray  # (N,) int32 into who_names ("" : not recorded)
    when: np.ndarray  # (N,) int64 Unix seconds (0: not recorded)
    source: (
        np.ndarray
    )  # (N,) int32 into source_names ("file:<path>", "person", "model:<hash>", ...)
    who_names: list[str]
    source_names: list[str]

    def counts(self) -> dict[str, int]:
        """Images per status name."""
        n = np.bincount(self.status, minlength=len(STATUSES))
        return {STATUSES[i]: int(n[i]) for i in range(1, len(STATUSES))}


@dataclass
class Predicted:
    """A model's stored top labels for images of one level: (n, 3) codes into ``names`` (""
    where none) and scores (NaN where none), and (n,) which model said so. ``labels`` spells the
    codes out (a large store's pages compare codes instead)."""

    codes: np.ndarray
    names: np.ndarray  # object array; names[codes] are the labels
    scores: np.ndarray
    model_codes: np.ndarray
    model_names: np.ndarray  # object array

    @property
    def labels(self) -> np.ndarray:
        return self.names[self.codes].astype(str)

    @property
    def model(self) -> np.ndarray:
        return self.model_names[self.model_codes].astype(str)


@dataclass
class History:
    """Every recorded label change, oldest first: equal-length arrays named as HISTORY_COLUMNS
    (``batch`` is one write's id: what one undo takes back)."""

    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.columns["row"])

    def __getitem__(self, key: str) -> np.ndarray:
        return self.columns[key]

    def where(self, mask: np.ndarray) -> History:
        return History({k: v[mask] for k, v in self.columns.items()})


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

    def take(self, rows: np.ndarray) -> ImageTable:
        """The rows ``rows`` only, in that order."""
        r = np.asarray(rows, np.int64).tolist()
        pick = lambda v: [v[i] for i in r]  # noqa: E731
        return ImageTable(
            path=pick(self.path), root=pick(self.root), sha256=pick(self.sha256),
            error=pick(self.error), nbytes=self.nbytes[r], mtime_ns=self.mtime_ns[r],
            width=self.width[r], height=self.height[r],
            labels={k: pick(v) for k, v in self.labels.items()},
        )  # fmt: skip

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


# What makes two backbones' embeddings the same (not the name, the weights file's name, the
# precision tag or when it was made). "quantization": int8 entries only (absent = None for every
# float entry, old ones included).
IDENTITY_FIELDS = (
    "architecture", "weights_sha256", "preprocessing", "layer", "dim", "quantization"
)  # fmt: skip


class Fingerprint(dict):
    """What made a backbone's embeddings, as stored (a JSON object: still a dict), with the one
    rule that decides whether two entries hold the same embeddings: :meth:`same_as`. The store,
    model files, neighbour indexes, the engine cache and fine-tuning all ask it."""

    @classmethod
    def of(cls, value: dict[str, Any]) -> Fingerprint:
        return value if isinstance(value, Fingerprint) else cls(value)

    def same_as(self, other: dict[str, Any]) -> bool:
        """Whether ``other`` describes the same embeddings (every identity field equal)."""
        return not self.differences(other)

    def differences(self, other: dict[str, Any]) -> list[str]:
        """The identity fields that differ from ``other``'s, in a fixed order."""
        return [k for k in IDENTITY_FIELDS if self.get(k) != other.get(k)]

    def identity(self) -> dict[str, Any]:
        """Only the identity fields (what an engine cache or export is keyed by)."""
        return {k: self.get(k) for k in IDENTITY_FIELDS}


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    fingerprint: Fingerprint
    dim: int
    dtype: str
    count: int
    created_at: str


_NIBBLE = np.zeros(256, np.uint8)
_NIBBLE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
_NIBBLE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def sha_raw(hexes: list[str] | np.ndarray) -> np.ndarray:
    """(n, 32) uint8 digests from hex strings; "" (no hash) becomes zeros. Vectorised, a block
    of strings at a time (memory stays bounded for millions of rows)."""
    out = np.zeros((len(hexes), 32), np.uint8)
    for s in range(0, len(hexes), 1 << 16):
        part = np.asarray(hexes[s : s + (1 << 16)], dtype="S64")
        if not len(part):
            continue
        if part.dtype.itemsize < 64:
            part = part.astype("S64")
        digits = _NIBBLE[part.view(np.uint8).reshape(len(part), 64)]
        out[s : s + len(part)] = (digits[:, 0::2] << 4) | digits[:, 1::2]
    return out


def sha_hex(raw: np.ndarray) -> list[str]:
    return [r.tobytes().hex() if r.any() else "" for r in raw]


class HashIndex:
    """Stored rows found by the content hash of their file: sorted 8-byte prefixes and a binary
    search, every hit confirmed on all 32 bytes (a prefix shared by two digests is looked up
    exactly). Of rows with the same hash, the first in ``rows``' order is found. The one way
    penult joins by content (extract's copies of identical files, fused backbones, scoring
    files the store already holds); built once, asked many times."""

    def __init__(self, digests: np.ndarray, rows: np.ndarray):
        self.digests, self.rows = digests, np.asarray(rows, np.int64)
        k = np.ascontiguousarray(digests[:, :8]).view(np.uint64).ravel()[self.rows]
        self.order = np.argsort(k, kind="stable")
        self.sorted = k[self.order]

    def find(self, queries: np.ndarray, block: int = 65536) -> np.ndarray:
        """The row of each (n, 32) query digest, -1 where none has it (``block`` queries at a
        time: the candidates' digests compared at once cost 64 bytes a query)."""
        if len(queries) > block:
            return np.concatenate(
                [self.find(queries[s : s + block]) for s in range(0, len(queries), block)]
            )
        out = np.full(len(queries), -1, np.int64)
        if not len(self.rows) or not len(queries):
            return out
        rows, digests = self.rows, self.digests
        q = np.ascontiguousarray(queries[:, :8]).view(np.uint64).ravel()
        pos = np.minimum(np.searchsorted(self.sorted, q), len(rows) - 1)
        cand = self.order[pos]
        same_prefix = self.sorted[pos] == q
        exact = same_prefix & (digests[rows[cand]] == queries).all(axis=1)
        out[exact] = rows[cand[exact]]
        for i in np.flatnonzero(same_prefix & ~exact).tolist():  # another digest, same prefix:
            lo = int(pos[i])  # the run's first (pos is searchsorted's left end)
            hi = int(np.searchsorted(self.sorted, q[i], "right"))
            run = np.sort(self.order[lo:hi])  # every row with that prefix, in ``rows``' order
            hit = run[(digests[rows[run]] == queries[i]).all(axis=1)]
            out[i] = rows[hit[0]] if len(hit) else -1
        return out


def match_hashes(digests: np.ndarray, rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """For each query digest, the first of ``rows`` whose entry in ``digests`` (n, 32) equals
    it, -1 where none does (a :class:`HashIndex` asked once)."""
    return HashIndex(digests, rows).find(queries)
