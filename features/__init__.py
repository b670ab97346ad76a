"""The HDF5 feature store (the only h5py user in penult)."""

from penult.core.errors import FingerprintMismatchError, StoreError, StoreLockedError
from penult.features import review
from penult.features.inspect import check, describe
from penult.features.parts import PartWriter, Publishing, merge
from penult.features.scorefile import read_scores, write_scores
from penult.features.store import FeatureStore, StoreWriter, commit_key, current_user, publish
from penult.features.types import (
    DUBIOUS,
    IDENTITY_FIELDS,
    PREDICTED,
    STATUSES,
    UNLABELLED,
    VALIDATED,
    BackboneEntry,
    Chunk,
    Fingerprint,
    HashIndex,
    History,
    ImageTable,
    Predicted,
    Provenance,
    TableView,
    match_hashes,
    sha_hex,
    sha_raw,
)
from penult.features.upgrade import upgrade

__all__ = [
    "read_scores",
    "write_scores",
    "DUBIOUS",
    "IDENTITY_FIELDS",
    "PREDICTED",
    "STATUSES",
    "UNLABELLED",
    "VALIDATED",
    "History",
    "Predicted",
    "Provenance",
    "BackboneEntry",
    "Chunk",
    "FeatureStore",
    "Fingerprint",
    "HashIndex",
    "FingerprintMismatchError",
    "ImageTable",
    "PartWriter",
    "StoreError",
    "StoreLockedError",
    "StoreWriter",
    "TableView",
    "check",
    "commit_key",
    "current_user",
    "describe",
    "match_hashes",
    "merge",
    "Publishing",
    "publish",
    "review",
    "sha_hex",
    "sha_raw",
    "upgrade",
]
