"""The store's side of fine-tuning: which images train and validate, their labels, the frozen
embeddings already stored, and the result written back."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from penult.core.labels import TEST, TRAIN, VAL, make_split, read_taxonomy
from penult.core.split import ensure_split
from penult.extract.finetune.options import FinetuneError, FinetuneOptions
from penult.extract.options import ExtractOptions
from penult.extract.run import extract
from penult.extract.sources import Listing
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


def _coarse_of(store_path, table, opts: FinetuneOptions, y: np.ndarray) -> np.ndarray:
    """The coarse label of every store row: a store column, or a taxonomy CSV column via the label."""
    level = opts.aux_level
    if not opts.taxonomy:
        if level not in table.labels:
            raise FinetuneError(
                f"{store_path}: no label column {level!r} for the auxiliary loss "
                f"(columns: {', '.join(sorted(table.labels))}); pass --taxonomy CSV"
            )
        return np.array(table.labels[level])
    return np.array(read_taxonomy(opts.taxonomy).column(level, y.tolist()))


def load(store_path, opts: FinetuneOptions) -> TrainData:
    """Training and validation images from the store's train (and val) split, with their labels."""
    t = FeatureStore(store_path).images()
    if opts.label not in t.labels:
        have = ", ".join(sorted(t.labels)) or "none"
        raise FinetuneError(f"{store_path}: no label column {opts.label!r} (columns: {have})")
    y = np.array(t.labels[opts.label])
    ok = np.array([not e for e in t.error]) & (y != "")
    split = np.array(t.labels.get(opts.split, [""] * len(y)), dtype=object)
    if (split[ok] == "").any():  # the split train makes, made here first (the same one)
        made, _ = ensure_split(
            store_path, [t.path[i] for i in np.flatnonzero(ok)], y[ok], split[ok], column=opts.split
        )
        split[ok] = made
    split = split.astype(str)
    files = np.array([os.path.join(r, p) for r, p in zip(t.root, t.path, strict=True)])
    tr, va = np.flatnonzero(ok & (split == TRAIN)), np.flatnonzero(ok & (split == VAL))
    rng = np.random.default_rng(opts.seed)
    if opts.max_train and len(tr) > opts.max_train:
        tr = np.sort(rng.choice(tr, opts.max_train, replace=False))
    if len(va) == 0:  # hold out part of train; the test split stays untouched for evaluation
        held = make_split(y[tr], test_size=opts.val_fraction, seed=opts.seed) == TEST
        tr, va = tr[~held], tr[held]
    classes = sorted(set(y[tr]))
    idx = {c: i for i, c in enumerate(classes)}
    va = np.array([i for i in va if y[i] in idx], dtype=int)
    if opts.max_val and len(va) > opts.max_val:
        va = np.sort(rng.choice(va, opts.max_val, replace=False))
    d = TrainData(
        Split(files[tr].tolist(), np.array([idx[c] for c in y[tr]])),
        Split(files[va].tolist(), np.array([idx[c] for c in y[va]])),
        classes,
        np.asarray(tr),
    )
    if opts.aux_level:
        coarse = _coarse_of(store_path, t, opts, y)
        d.coarse_classes = sorted(set(coarse[np.concatenate([tr, va])]))
        cidx = {c: i for i, c in enumerate(d.coarse_classes)}
        d.train.coarse = np.array([cidx[c] for c in coarse[tr]])
        d.val.coarse = np.array([cidx[c] for c in coarse[va]])
    return d


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
    table = FeatureStore(store_path).images()
    for root in sorted(set(table.root)):
        paths = [p for p, r in zip(table.path, table.root, strict=True) if r == root]
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
        s = extract(store_path, Listing(root=Path(root), paths=paths), opts)
        log.info(s.report())
    return name
