"""The validation curve of a fine-tuning run, as a PNG beside its card."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["plot_curve"]


def plot_curve(card: dict[str, Any], png: str | os.PathLike[str]) -> Path:
    """Training and validation loss and accuracy per epoch (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = card["curve"]
    ep = [r["epoch"] for r in c]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [r["train_loss"] for r in c], "o-", label="train")
    a.plot(ep, [r["val_loss"] for r in c], "o-", label="validation")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    b.plot(ep, [r["train_acc"] for r in c], "o-", label="train")
    b.plot(ep, [r["val_acc"] for r in c], "o-", label="validation")
    if "val_aux_acc" in c[0]:
        level = card["options"].get("aux_level")
        b.plot(ep, [r["val_aux_acc"] for r in c], "s--", label=f"validation ({level} head)")
        b.legend()
    b.set(
        xlabel="epoch", ylabel="accuracy", title=f"accuracy (best epoch {card.get('best_epoch')})"
    )
    a.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)
