"""The train/test split every head is compared on: made once (seeded, stratified) and stored.

The one module of the kernel that writes the store (a label column), so extract, finetune and
classify can all make the split without going through each other.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
from penult.core.labels import TEST, make_split

__all__ = ["ensure_split"]

log = logging.getLogger(__name__)


def ensure_split(
    store_path: str | os.PathLike[str],
    paths: Sequence[str],
    y: np.ndarray,
    split: np.ndarray | None,
    *,
    column: str = "split",
    test_size: float = 0.3,
    seed: int = 0,
) -> tuple[np.ndarray, str | None]:
    """The split of the images ``paths`` (labels ``y``): the stored assignments (``split``,
    "" where none) where set, the rest made now and stored as label ``column``. Assignments
    already stored never change, so every head is compared on the same images; rows without one
    (new images) are split among themselves. Returns the split and a note when one was made."""
    from penult.features import StoreWriter  # above the store: the rest of core is not

    split = np.full(len(paths), "", dtype=object) if split is None else np.asarray(split)
    missing = np.flatnonzero(split == "")
    note = None
    if len(missing):
        split = split.astype(object)  # (an array of strings per row only when some are made)
        new = make_split(np.asarray(y)[missing], test_size=test_size, seed=seed)
        split[missing] = new
        with StoreWriter(store_path) as w:
            take = getattr(paths, "take", None)  # paths read from a store, many at once
            chosen = take(missing) if take else [paths[i] for i in missing]
            w.set_labels(column, chosen, [str(s) for s in new])
        note = (
            f"made a seeded ({seed}) stratified split for {len(missing)} images "
            f"({int(np.sum(new == TEST))} test) and stored it as label column {column!r}"
        )
        log.info(note)
    return (split if split.dtype.kind == "U" else split.astype(str)), note
