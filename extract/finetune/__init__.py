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

from __future__ import annotations

from penult.core.lazy import lazy_package

# name -> the module defining it, imported on first use (PEP 562): `penult CMD --help` imports a
# light module of this package without pulling in what the others import (torch, scikit-learn)
_WHERE = {
    "extract_finetuned": "penult.extract.finetune.data",
    "finetune": "penult.extract.finetune.loop",
    "resolve_auto": "penult.extract.finetune.loop",
    "augment": "penult.extract.finetune.network",
    "stages": "penult.extract.finetune.network",
    "FinetuneError": "penult.extract.finetune.options",
    "FinetuneOptions": "penult.extract.finetune.options",
    "FinetuneResult": "penult.extract.finetune.options",
    "plot_curve": "penult.extract.finetune.plot",
}


__getattr__, __dir__ = lazy_package(__name__, _WHERE)


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
