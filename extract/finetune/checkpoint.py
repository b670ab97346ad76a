"""What a fine-tuning run leaves on disk: the best network (safetensors, loadable as any weights
file), a JSON card (recipe, data, validation curve) and the state to resume an interrupted run.
Every file is replaced atomically; the resume file holds tensors only (read with weights_only)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from penult.core.files import atomic_path, write_text
from penult.extract.finetune.options import FinetuneError, FinetuneOptions
from penult.extract.weights import state_sha256

__all__ = ["card_path", "resume", "save_state", "save_weights", "write_card"]

# options that change what is trained: a run with other values starts over instead of resuming
SAME_RUN = ("backbone", "unfreeze", "crop_pct", "resize", "aux_level", "aux_stage", "head_init")
# what a card written before an option existed used (resize was always the weights' crop)
DEFAULTS = {**asdict(FinetuneOptions()), "resize": "crop"}


def card_path(out: Path) -> Path:
    return Path(f"{out}.json")


def _resume_path(out: Path) -> Path:
    return Path(f"{out}.resume.pt")


def write_card(out: Path, card: dict[str, Any]) -> None:
    """A kill leaves the old card or the new one, never half of one."""
    write_text(card_path(out), json.dumps(card, indent=1))


def save_weights(out: Path, net: torch.nn.Module, classifier: dict[str, torch.Tensor]) -> str:
    """safetensors of the whole classifier network (the trained trunk + the original ImageNet
    head), so that `build_backbone(base, weights=out)` loads it like any weights file; returns
    its weights hash."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    state.update(classifier)
    with atomic_path(out) as tmp:
        save_file(state, str(tmp))
    return state_sha256(state)


def save_state(out: Path, run, card: dict[str, Any], epoch: int, best: float, bad: int) -> None:
    """Everything needed to resume after ``epoch``, then the card."""
    state = {
        "model": run.model.state_dict(),
        "opt": run.opt.state_dict(),
        "sched": run.sched.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": epoch,
        "best": best,
        "bad": bad,
    }
    with atomic_path(_resume_path(out)) as tmp:
        torch.save(state, tmp)
    write_card(out, card)


def resume(out: Path, run, card: dict[str, Any]) -> tuple[int, float, int]:
    """(first epoch, best val loss, epochs without improvement) from an interrupted run of the
    same recipe, if any; the run's model, optimiser and schedule are restored in place."""
    path = _resume_path(out)
    if not path.exists() or not card_path(out).exists():
        return 0, math.inf, 0
    old = json.loads(card_path(out).read_text())
    if (
        old.get("finished")
        or any(old.get("options", {}).get(k, DEFAULTS[k]) != card["options"][k] for k in SAME_RUN)
        or old.get("classes") != card["classes"]
    ):
        return 0, math.inf, 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a planted pickle, a torn file: never executed
        raise FinetuneError(
            f"{path}: refusing to resume from it ({type(e).__name__}); delete it to start over"
        ) from None
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["opt"])
    run.sched.load_state_dict(state["sched"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    card["curve"] = old["curve"]
    for k in ("weights_sha256", "best_epoch"):
        if k in old:
            card[k] = old[k]
    card["resumed_at_epoch"] = int(state["epoch"])
    return int(state["epoch"]), float(state["best"]), int(state["bad"])
