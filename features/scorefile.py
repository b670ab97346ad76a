"""Per-bin score files as WHOI's IFCB classifier writes them: one HDF5 file per bin with every
class's score for every ROI (``output_scores``, ROIs x classes), the class names
(``class_labels``), the ROIs' numbers in the bin (``roi_numbers``, the ADC row) and each ROI's
best class index (``output_classes``). Tools that read those files read penult's."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
from penult.core import atomic_path
from penult.core.errors import StoreError

__all__ = ["read_scores", "write_scores"]


def write_scores(
    path: str | os.PathLike[str], roi_numbers: Sequence[int], class_labels: Sequence[str],
    scores: np.ndarray,
) -> Path:  # fmt: skip
    """Write one bin's score file (atomically: a reader never sees half of it)."""
    scores = np.asarray(scores, np.float32)
    rois = np.asarray(roi_numbers, np.int64)
    if scores.shape != (len(rois), len(class_labels)):
        raise StoreError(f"{path}: {len(rois)} ROIs and {len(class_labels)} classes, but scores "
                         f"{scores.shape}")  # fmt: skip
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("output_scores", data=scores)
        f.create_dataset("class_labels", data=np.array(list(class_labels), dtype=object),
                         dtype=h5py.string_dtype())  # fmt: skip
        f.create_dataset("roi_numbers", data=rois)
        f.create_dataset("output_classes", data=scores.argmax(1) if len(rois) else rois)
    return path


def read_scores(path: str | os.PathLike[str]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(roi_numbers, class_labels, output_scores) of a score file."""
    try:
        with h5py.File(path, "r") as f:
            labels = [v.decode() if isinstance(v, bytes) else str(v) for v in f["class_labels"][()]]
            return f["roi_numbers"][()], labels, f["output_scores"][()]
    except (OSError, KeyError) as e:
        raise StoreError(f"{path}: not a score file ({e})") from None
