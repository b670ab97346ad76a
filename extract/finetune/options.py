"""What a fine-tuning run is asked to do, and what it gives back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from features import PenultError


class FinetuneError(PenultError, ValueError):
    """The store, backbone or checkpoint cannot be fine-tuned as asked."""


@dataclass(frozen=True)
class FinetuneOptions:
    backbone: str = "efficientnet_lite0"
    label: str = "label"
    split: str = "split"
    unfreeze: int = 1  # trainable stages, counted from the deepest
    epochs: int = 10
    batch_size: int = 32
    accumulate: int = 1  # batches per optimiser step (effective batch = batch_size x accumulate)
    lr_backbone: float = 1e-4
    lr_head: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    schedule: str = "cosine"  # or "plateau"
    label_smoothing: float = 0.1
    augment: bool = True
    balanced: bool = True
    patience: int = 3  # epochs without a better validation loss before stopping
    val_fraction: float = 0.1  # of train, when the store has no 'val' split (test is never used)
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    max_train: int | None = None  # cap on training images (quick trials, tests)
    crop_pct: float | None = None  # None: the weights' centre crop; 1.0 keeps the whole image
    head_init: str = "probe"  # "probe": logistic regression on frozen embeddings; "random"
    bn_train: bool = False  # update BatchNorm statistics in the trainable stages
    hard_mining: float = 0.0  # keep this fraction of each batch's highest losses (0: off)
    aux_level: str | None = None  # coarse label (store or taxonomy column) for the aux loss
    taxonomy: str | None = None  # CSV class,<coarse levels...> (else the store's label columns)
    aux_weight: float = 0.3
    aux_stage: int = 2  # stage whose pooled output the coarse head reads, counted from the deepest
    seed: int = 0
    progress: bool = True


@dataclass
class FinetuneResult:
    checkpoint: Path
    card: dict[str, Any]
    curve: list[dict[str, float]] = field(default_factory=list)
    model: Any = None  # the network as the last epoch left it (the checkpoint holds the best one)
