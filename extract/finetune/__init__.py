"""Fine-tuning a backbone on a store's labelled images; the result becomes one more store backbone.

Recipe (each an option): early stages frozen, a new linear head (initialised from a linear probe on
the frozen embeddings), a small learning rate for the backbone and a larger one for the head,
linear warm-up then cosine decay (or ReduceLROnPlateau), label smoothing, augmentation,
class-balanced sampling, online hard-example mining, an auxiliary coarse-label loss (genus, family)
on an intermediate stage, and early stopping on validation loss. Images come through the
extraction loader; the network reads them through the same pre-logits module `penult extract` runs.

Modules: options (what is asked), data (store rows, splits, the result written back),
network (the trainable wrapper), probe (the head's starting point), loop (epochs), checkpoint
(weights, card, resume), plot (the validation curve).
"""

from penult.extract.finetune.data import extract_finetuned
from penult.extract.finetune.loop import finetune, resolve_auto
from penult.extract.finetune.network import augment, stages
from penult.extract.finetune.options import FinetuneError, FinetuneOptions, FinetuneResult
from penult.extract.finetune.plot import plot_curve

__all__ = [
    "FinetuneError",
    "FinetuneOptions",
    "FinetuneResult",
    "augment",
    "extract_finetuned",
    "finetune",
    "plot_curve",
    "resolve_auto",
    "stages",
]
