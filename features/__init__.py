"""The HDF5 feature store (the only h5py user in penult)."""

from features.errors import (
    FingerprintMismatchError,
    OptionError,
    PenultError,
    StoreError,
    StoreLockedError,
)
from features.files import atomic_path, file_sha256
from features.inspect import check, describe
from features.labels import TEST, TRAIN, VAL, LabelError, Taxonomy, make_split, read_taxonomy
from features.options import DEFAULT_MAX_PIXELS
from features.parts import PartWriter, merge
from features.store import IDENTITY_FIELDS, FeatureStore, StoreWriter, same_backbone
from features.types import BackboneEntry, Chunk, ImageTable, TableView, sha_hex, sha_raw
from features.upgrade import upgrade

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IDENTITY_FIELDS",
    "TEST",
    "TRAIN",
    "VAL",
    "BackboneEntry",
    "Chunk",
    "FeatureStore",
    "FingerprintMismatchError",
    "ImageTable",
    "LabelError",
    "OptionError",
    "PenultError",
    "PartWriter",
    "StoreError",
    "StoreLockedError",
    "StoreWriter",
    "TableView",
    "Taxonomy",
    "atomic_path",
    "check",
    "describe",
    "file_sha256",
    "make_split",
    "merge",
    "read_taxonomy",
    "same_backbone",
    "sha_hex",
    "sha_raw",
    "upgrade",
]
