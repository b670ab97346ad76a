"""The shared kernel both stages and the store stand on: errors, option declarations, safe file
writes, label columns, splits and taxonomies, IFCB raw bins (`ifcb`), EcoTaxa's TSV (`ecotaxa`),
and Dask helpers. Nothing here touches HDF5 or torch.

Layering: ``core`` (this package) <- ``features`` (the store) <- ``extract`` / ``classify``;
``core.split`` alone sits above the store (it stores the split it makes).
"""

from penult.core import ecotaxa, ifcb
from penult.core.errors import OptionError, PenultError
from penult.core.files import atomic_path, check_out_folder, file_sha256, regular_sha256
from penult.core.labels import (
    NOT_METADATA,
    SAMPLE,
    TEST,
    TRAIN,
    VAL,
    LabelError,
    Taxonomy,
    coded_sample_columns,
    make_split,
    read_taxonomy,
    sample_columns,
)
from penult.core.options import DEFAULT_MAX_PIXELS

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "NOT_METADATA",
    "SAMPLE",
    "TEST",
    "TRAIN",
    "VAL",
    "LabelError",
    "OptionError",
    "PenultError",
    "Taxonomy",
    "atomic_path",
    "check_out_folder",
    "ecotaxa",
    "file_sha256",
    "regular_sha256",
    "ifcb",
    "make_split",
    "read_taxonomy",
    "coded_sample_columns",
    "sample_columns",
]
