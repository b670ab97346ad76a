"""The HDF5 feature store (the only h5py user in penult)."""

from features.inspect import check, describe
from features.store import (
    FeatureStore,
    FingerprintMismatchError,
    ImageTable,
    StoreError,
    StoreLockedError,
    StoreWriter,
)

__all__ = [
    "FeatureStore",
    "FingerprintMismatchError",
    "ImageTable",
    "StoreError",
    "StoreLockedError",
    "StoreWriter",
    "check",
    "describe",
]
