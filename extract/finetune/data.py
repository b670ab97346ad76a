"""The store's side of fine-tuning: which images train and validate, their labels, the frozen
embeddings already stored, and the result written back."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from penult.core.labels import TEST, TRAIN, VAL, make_split, read_taxonomy
from penult.core.split import ensure_split
from penult.extract.finetune.options import FinetuneError, FinetuneOptions
from penult.extract.images import spread
from penult.extract.options import ExtractOptions
from penult.extract.run import extract
from penult.extract.sources import Listing
from penult.extract.walk import CHUNK
from penult.features import FeatureStore, Fingerprint

__all__ = [
    "Split",
    "TrainData",
    "epoch_order",
    "extract_finetuned",
    "load",
    "stored_embeddings",
]

log = logging.getLogger(__name__)


@dataclass
class Split:
    files: list[str]
    y: np.ndarray  # class ids
    coarse: np.ndarray | None = None  # coarse-label ids (auxiliary loss)


@dataclass
class TrainData:
    train: Split
    val: Split
    classes: list[str]
    rows: np.ndarray  # store rows of the training images (for the linear-probe initialisation)
    coarse_classes: list[str] = field(default_factory=list)


def _coarse_of(store_path, fs, opts: FinetuneOptions, y: np.ndarray) -> np.ndarray:
    """The coarse label of every store row: a store column, or a taxonomy CSV column via the label."""
    level = opts.aux_level
    if not opts.taxonomy:
        if level not in (have := fs.label_columns()):
            raise FinetuneError(
                f"{store_path}: no label column {level!r} for the auxiliary loss "
                f"(columns: {', '.join(sorted(have))}); pass --taxonomy CSV"
            )
        return _decoded(*fs.label_codes(level))
    return np.array(read_taxonomy(opts.taxonomy).column(level, y.tolist()))


def _decoded(codes: np.ndarray, names: list[str]) -> np.ndarray:
    """A label column's value per row as shared str objects (8 bytes a row, not a string each)."""
    return np.asarray(names, dtype=object)[codes]


def load(store_path, opts: FinetuneOptions) -> TrainData:
    """Training and validation images from the store's train (and val) split, with their labels.
    Labels are read as codes and file names for the chosen images alone, so a store of millions
    of rows does not hold its image table as strings."""
    fs = FeatureStore(store_path)
    if opts.label not in (have := fs.label_columns()):
        raise FinetuneError(
            f"{store_path}: no label column {opts.label!r} (columns: {', '.join(sorted(have)) or 'none'})"
        )
    y = _decoded(*fs.label_codes(opts.label))
    failed = fs.table_view().failed if len(y) else np.zeros(0, bool)
    ok = ~failed & (y != "")
    split = (
        _decoded(*fs.label_codes(opts.split))
        if opts.split in have
        else np.full(len(y), "", dtype=object)
    )
    if (split[ok] == "").any():  # the split train makes, made here first (the same one)
        rows = np.flatnonzero(ok)
        made, _ = ensure_split(
            store_path, fs.paths(rows), y[ok].astype(str), split[ok], column=opts.split
        )
        split[ok] = made
    tr, va = np.flatnonzero(ok & (split == TRAIN)), np.flatnonzero(ok & (split == VAL))
    rng = np.random.default_rng(opts.seed)
    if opts.max_train and len(tr) > opts.max_train:
        tr = np.sort(rng.choice(tr, opts.max_train, replace=False))
    if len(va) == 0:  # hold out part of train; the test split stays untouched for evaluation
        held = make_split(y[tr].astype(str), test_size=opts.val_fraction, seed=opts.seed) == TEST
        tr, va = tr[~held], tr[held]
    classes = sorted(set(y[tr]))
    idx = {c: i for i, c in enumerate(classes)}
    va = np.array([i for i in va if y[i] in idx], dtype=int)
    if opts.max_val and len(va) > opts.max_val:
        va = np.sort(rng.choice(va, opts.max_val, replace=False))
    files = _files(fs, np.concatenate([tr, va]))
    d = TrainData(
        Split([files[i] for i in tr.tolist()], np.array([idx[c] for c in y[tr]])),
        Split([files[i] for i in va.tolist()], np.array([idx[c] for c in y[va]])),
        classes,
        np.asarray(tr),
    )
    if opts.aux_level:
        coarse = _coarse_of(store_path, fs, opts, y)
        d.coarse_classes = sorted(set(coarse[np.concatenate([tr, va])]))
        cidx = {c: i for i, c in enumerate(d.coarse_classes)}
        d.train.coarse = np.array([cidx[c] for c in coarse[tr]])
        d.val.coarse = np.array([cidx[c] for c in coarse[va]])
    return d


def _files(fs: FeatureStore, rows: np.ndarray) -> dict[int, str]:
    """The image file of each of ``rows`` (its root joined), read for those rows alone."""
    rows = np.unique(rows.astype(np.int64))
    if not len(rows):
        return {}
    t = fs.images(rows.tolist())
    return {int(r): os.path.join(t.root[i], t.path[i]) for i, r in enumerate(rows.tolist())}


def stored_embeddings(store_path, rows: np.ndarray, want: Fingerprint):
    """The store's embeddings of ``rows`` from an entry that holds the same embeddings as
    ``want`` (the base network before fine-tuning; an int8 entry of it does not), or None."""
    fs = FeatureStore(store_path)
    for name, entry in fs.backbones().items():
        if not entry.fingerprint.same_as(want):
            continue
        if fs.valid(name)[rows].all():
            return fs.embeddings(name, rows)
    return None


def epoch_order(y: np.ndarray, balanced: bool, rng: np.random.Generator) -> np.ndarray:
    """The images of one training epoch: a shuffle, or a class-balanced draw with replacement."""
    if not balanced:
        return rng.permutation(len(y))
    w = 1.0 / np.bincount(y)[y]
    return rng.choice(len(y), len(y), replace=True, p=w / w.sum())


class StoredImages:
    """A store's own images as listings of ``chunk`` rows (one per root in each), what a
    fine-tuned network re-embeds: never the whole image table at once."""

    ignored: list[str] = []
    ignored_count, origin = 0, ""
    notes: list[str] = []

    def __init__(self, store_path: str | os.PathLike[str], chunk: int = CHUNK):
        self.store = FeatureStore(store_path)
        self.chunk, self.hint = chunk, len(self.store)

    def sample_files(self, n: int) -> list[str]:
        t = self.store.images(spread(self.hint, n))
        return [os.path.join(r, p) for r, p in zip(t.root, t.path, strict=True)]

    def chunks(self) -> Iterator[Listing]:
        for start in range(0, self.hint, self.chunk):
            t = self.store.images(range(start, min(start + self.chunk, self.hint)))
            for root in sorted(set(t.root)):
                paths = [p for p, r in zip(t.path, t.root, strict=True) if r == root]
                yield Listing(root=Path(root), paths=paths)


def extract_finetuned(
    store_path: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    *,
    progress: bool = True,
    engine: str = "auto",
    precision: str = "auto",
) -> str:
    """Embed every image of the store with the fine-tuned network, as backbone ``<base>@ft-<hash>``
    (``engine`` and ``precision`` as for ``penult extract``)."""
    card = json.loads(Path(f"{checkpoint}.json").read_text())
    name = f"{card['base_backbone']}@ft-{card['weights_sha256'][:8]}"
    opts = ExtractOptions(
        backbone=card["base_backbone"],
        weights=str(checkpoint),
        name=name,
        crop_pct=card["options"].get("crop_pct"),
        resize=card["options"].get("resize", "crop"),
        progress=progress,
        engine=engine,
        precision=precision,
    )
    s = extract(store_path, StoredImages(store_path), opts)
    log.info(s.report())
    return name
