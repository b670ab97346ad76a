"""The HDF5 feature store (the only h5py user in penult)."""

from features.inspect import check, describe
from features.store import (
    IDENTITY_FIELDS,
    Chunk,
    FeatureStore,
    FingerprintMismatchError,
    ImageTable,
    StoreError,
    StoreLockedError,
    StoreWriter,
    same_backbone,
)

__all__ = [
    "IDENTITY_FIELDS",
    "Chunk",
    "FeatureStore",
    "FingerprintMismatchError",
    "ImageTable",
    "StoreError",
    "StoreLockedError",
    "StoreWriter",
    "check",
    "describe",
    "same_backbone",
]
