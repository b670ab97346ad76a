"""The HDF5 feature store (the only h5py user in penult)."""

from penult.core.errors import FingerprintMismatchError, StoreError, StoreLockedError
from penult.features.inspect import check, describe
from penult.features.parts import PartWriter, merge
from penult.features.store import IDENTITY_FIELDS, FeatureStore, StoreWriter, same_backbone
from penult.features.types import BackboneEntry, Chunk, ImageTable, TableView, sha_hex, sha_raw
from penult.features.upgrade import upgrade

__all__ = [
    "IDENTITY_FIELDS",
    "BackboneEntry",
    "Chunk",
    "FeatureStore",
    "FingerprintMismatchError",
    "ImageTable",
    "PartWriter",
    "StoreError",
    "StoreLockedError",
    "StoreWriter",
    "TableView",
    "check",
    "describe",
    "merge",
    "same_backbone",
    "sha_hex",
    "sha_raw",
    "upgrade",
]
