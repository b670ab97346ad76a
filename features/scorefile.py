"""Per-bin score files in the IFCB Dashboard's class-scores layout (version 3, the HDF5 one WHOI's
classifiers and iRfcb write, ``<bin>_class.h5``): every class's score for every ROI
(``output_scores``, ROIs x classes), the class names (``class_labels``, ASCII where they are),
the ROIs' numbers in the bin (``roi_numbers``, the ADC row): the three the Dashboard requires;
then each ROI's best class index and name (``output_classes``, ``class_name_auto``) and the
classifier's name (``classifier_name``). Tools that read those files read penult's."""

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
    scores: np.ndarray, classifier: str = "penult",
) -> Path:  # fmt: skip
    """Write one bin's score file (atomically: a reader never sees half of it)."""
    scores = np.asarray(scores, np.float32)
    rois = np.asarray(roi_numbers, np.int64)
    if scores.shape != (len(rois), len(class_labels)):
        raise StoreError(f"{path}: {len(rois)} ROIs and {len(class_labels)} classes, but scores "
                         f"{scores.shape}")  # fmt: skip
    path = Path(path)
    labels = [str(c) for c in class_labels]
    ascii_ = all(c.isascii() for c in labels)  # the Dashboard reads ASCII; other names stay UTF-8
    text = h5py.string_dtype("ascii" if ascii_ else "utf-8")
    best = scores.argmax(1) if len(rois) else rois
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("output_scores", data=scores)
        f.create_dataset("class_labels", data=np.array(labels, dtype=object), dtype=text)
        f.create_dataset("roi_numbers", data=rois)
        f.create_dataset("output_classes", data=best)
        f.create_dataset("class_name_auto", data=np.array([labels[i] for i in best], dtype=object),
                         dtype=text)  # fmt: skip
        f.create_dataset("classifier_name", data=classifier, dtype=h5py.string_dtype())
    return path


def read_scores(path: str | os.PathLike[str]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(roi_numbers, class_labels, output_scores) of a score file."""
    try:
        with h5py.File(path, "r") as f:
            labels = [v.decode() if isinstance(v, bytes) else str(v) for v in f["class_labels"][()]]
            return f["roi_numbers"][()], labels, f["output_scores"][()]
    except (OSError, KeyError) as e:
        raise StoreError(f"{path}: not a score file ({e})") from None
