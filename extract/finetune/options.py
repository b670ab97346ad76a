"""What a fine-tuning run is asked to do, and what it gives back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from penult.core import PenultError
from penult.core.options import COUNT, CROP, FRACTION, POSITIVE, RATE, option, ranged
from penult.extract.names import RESIZE_MODES, TORCH_PRECISIONS
from penult.extract.options import RuntimeOptions

__all__ = [
    "FinetuneError",
    "FinetuneOptions",
    "FinetuneResult",
]


class FinetuneError(PenultError, ValueError):
    """The store, backbone or checkpoint cannot be fine-tuned as asked."""


@dataclass(frozen=True)
class FinetuneOptions(RuntimeOptions):
    narrowed: ClassVar[dict[str, dict[str, Any]]] = {
        "precision": {
            "help": "autocast precision of training, and the precision the store is then "
            "embedded in",
            "choices": TORCH_PRECISIONS,
        },
        "engine": {
            "help": "what runs the network when the store is embedded with the result (see "
            "`penult extract --engine`)"
        },
    }

    backbone: str = option("efficientnet_lite0", "backbone to fine-tune (timm ones and ResNets)")
    label: str = option("label", "label column to learn")
    split: str = "split"  # label column with train/val/test
    unfreeze: int = option(1, "stages trained, counted from the deepest", parse=POSITIVE)
    epochs: int = option(10, "passes over the training images", parse=POSITIVE)
    accumulate: int = option(
        1, "batches per optimiser step (effective batch = batch size x this)", parse=POSITIVE
    )
    lr_backbone: float = option(1e-4, "learning rate of the trained stages", parse=RATE)
    lr_head: float = option(1e-3, "learning rate of the new head(s)", parse=RATE)
    weight_decay: float = option(1e-4, "AdamW weight decay", parse=RATE)
    warmup_epochs: float = option(1.0, "linear learning-rate warm-up", parse=RATE)
    schedule: str = option("cosine", "after warm-up", choices=("cosine", "plateau"))
    label_smoothing: float = option(
        0.1, "of the training loss", parse=ranged(float, 0, 1, open_hi=True)
    )
    augment: bool = option(True, "no random crops, flips, rotation, jitter", flags="--no-augment")
    augment_style: str = option(
        "auto",
        "photo: random resized crop, horizontal flip, small rotation, colour jitter; plankton: "
        "any rotation, both flips, mild scale on the image's own background, no colour jitter; "
        "auto: plankton for greyscale images, else photo",
        flags="--augment",
        choices=("auto", "photo", "plankton"),
    )
    balanced: bool = option(
        True, "plain shuffling instead of class-balanced sampling", flags="--no-balance"
    )
    patience: int = option(
        3, "epochs without a better validation loss before stopping", parse=COUNT
    )
    val_fraction: float = option(
        0.1,
        "of train held out for validation when the store has no 'val' split (test is never used)",
        parse=FRACTION,
    )
    max_train: int | None = option(
        None, "use at most this many training images (quick trials)", parse=POSITIVE
    )
    max_val: int | None = option(
        None,
        "validate on at most this many images, drawn at random (quick trials: each epoch runs "
        "the whole network over them)",
        parse=POSITIVE,
    )
    crop_pct: float | None = option(
        None,
        "centre crop / resize for training and the new embeddings (default: the weights' own; "
        "1.0: whole image)",
        parse=CROP,
    )
    resize: str = option(
        "auto",
        "how images become squares, for training and the new embeddings: crop, whole or pad "
        "(as `penult extract --resize`; auto: pad for greyscale images, else crop)",
        choices=("auto", *RESIZE_MODES),
    )
    head_init: str = option(
        "probe",
        "new head from a logistic regression on the frozen embeddings, or random",
        choices=("probe", "random"),
    )
    bn_train: bool = option(
        False,
        "update BatchNorm statistics in the trained stages (default: keep the pretrained ones)",
    )
    hard_mining: float = option(
        0.0,
        "online hard-example mining: learn from this fraction of each batch's highest losses "
        "(0: off)",
        parse=ranged(float, 0, 1),
        metavar="FRACTION",
    )
    aux_level: str | None = option(
        None,
        "auxiliary coarse-label loss (e.g. genus, family): a store label column or --taxonomy "
        "column",
        metavar="COLUMN",
    )
    taxonomy: str | None = option(None, "class,<coarse levels...> for --aux-level", metavar="CSV")
    aux_weight: float = option(0.3, "weight of the coarse loss", parse=RATE)
    aux_stage: int = option(
        2, "stage (from the deepest) the coarse head reads; must be trainable", parse=POSITIVE
    )
    seed: int = option(0, "seed of the validation hold-out, sampling and the new head", parse=COUNT)
    progress: bool = option(True, "no progress bar or epoch lines", flags=("-q", "--quiet"))


@dataclass
class FinetuneResult:
    checkpoint: Path
    card: dict[str, Any]
    curve: list[dict[str, float]] = field(default_factory=list)
    model: Any = None  # the network as the last epoch left it (the checkpoint holds the best one)
