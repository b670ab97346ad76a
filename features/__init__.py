"""The HDF5 feature store (the only h5py user in penult)."""

from penult.core.errors import FingerprintMismatchError, StoreError, StoreLockedError
from penult.features.inspect import check, describe
from penult.features.parts import PartWriter, merge
from penult.features.store import FeatureStore, StoreWriter
from penult.features.types import (
    IDENTITY_FIELDS,
    BackboneEntry,
    Chunk,
    Fingerprint,
    HashIndex,
    ImageTable,
    TableView,
    match_hashes,
    sha_hex,
    sha_raw,
)
from penult.features.upgrade import upgrade

__all__ = [
    "IDENTITY_FIELDS",
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
    "describe",
    "match_hashes",
    "merge",
    "sha_hex",
    "sha_raw",
    "upgrade",
]
