"""One adapter per library a backbone comes from: torchvision, timm, open_clip.

Each says, for that library only, how to build the network (random weights), cut it at its
pre-logits layer, read the weights' own eval transform, load its default pretrained weights,
and (timm, open_clip) resolve a name beyond the registry. A registry entry names its source and
``BackboneSpec.adapter`` hands back the adapter (as timm registers one entry point per
architecture), so no other module asks which library a backbone is from.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from penult.core.errors import PenultError
from penult.extract.weights import WeightsError, load_into, read_state_dict
from torch import nn

__all__ = ["ADAPTERS", "Adapter", "UnknownBackboneError", "import_open_clip"]


class UnknownBackboneError(PenultError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class Adapter:
    """What penult needs of a model library; ``arch``, ``layer`` and ``weights`` are the
    registry entry's fields, meaning what that library calls them."""

    name = ""
    taps_by_hooks = True  # inner outputs are read by forward hooks (torchvision: graph nodes)

    def build(self, arch: str, weights: str) -> nn.Module:
        """The whole classifier network, random (seeded) weights."""
        raise NotImplementedError

    def truncate(self, net: nn.Module, layer: str, taps: tuple[str, ...]) -> nn.Module:
        """``net`` up to its pre-logits ``layer`` (a module whose output is the embedding, or a
        dict with it under ``"features"`` and each tap under its own name)."""
        raise NotImplementedError

    def eval_transform(self, arch: str, weights: str) -> dict[str, Any]:
        """The weights' own eval preprocessing: resize, crop, mean, std, interpolation."""
        raise NotImplementedError

    def load_pretrained(self, net: nn.Module, arch: str, weights: str) -> str:
        """Load the default pretrained weights into ``net``; returns where they came from."""
        raise NotImplementedError

    def finetunable(self, arch: str) -> bool:
        """Whether ``penult finetune`` knows this network's blocks (what to freeze, what to train)."""
        return False

    def resolve(self, tagged: str) -> tuple[str, int, str, str, str] | None:
        """(arch, dim, layer, weights, description) of a model named beyond the registry
        (``<source>/<tagged>``), or None where this library offers no such names."""
        return None


class Torchvision(Adapter):
    name = "torchvision"
    taps_by_hooks = False

    def build(self, arch: str, weights: str) -> nn.Module:
        import torchvision

        kwargs: dict[str, Any] = {}
        if arch == "inception_v3":  # same keys as the pretrained file; fast default init
            kwargs = {"aux_logits": True, "init_weights": False}
        return getattr(torchvision.models, arch)(weights=None, **kwargs)

    def truncate(self, net: nn.Module, layer: str, taps: tuple[str, ...]) -> nn.Module:
        import warnings

        from torchvision.models.feature_extraction import create_feature_extractor

        with warnings.catch_warnings():  # train/eval graphs differ (dropout, aux heads)
            warnings.filterwarnings("ignore", message="NOTE: The nodes obtained by tracing")
            nodes = {layer: "features", **{t: t for t in taps}}
            return create_feature_extractor(net, return_nodes=nodes)

    def eval_transform(self, arch: str, weights: str) -> dict[str, Any]:
        from torchvision.models import get_weight

        t = get_weight(weights).transforms()
        return {
            "resize": int(t.resize_size[0]),
            "crop": int(t.crop_size[0]),
            "mean": tuple(float(v) for v in t.mean),
            "std": tuple(float(v) for v in t.std),
            "interpolation": t.interpolation.value,
        }

    def load_pretrained(self, net: nn.Module, arch: str, weights: str) -> str:
        from torchvision.models import get_weight

        w = get_weight(weights)
        cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
        try:
            state = w.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # noqa: BLE001 - offline is the common case here
            raise WeightsError(
                f"cannot load {weights} ({type(e).__name__}: {e}). Offline? Put the file at {cache} "
                "or pass --weights FILE"
            ) from None
        load_into(net, state, weights)
        return f"torchvision:{weights}"

    def finetunable(self, arch: str) -> bool:
        return arch.startswith("resnet")


class Timm(Adapter):
    name = "timm"

    def build(self, arch: str, weights: str) -> nn.Module:
        import timm

        return timm.create_model(weights, pretrained=False)

    def truncate(self, net: nn.Module, layer: str, taps: tuple[str, ...]) -> nn.Module:
        net.reset_classifier(0)  # forward() now returns global-pooled pre-logits
        return net

    def eval_transform(self, arch: str, weights: str) -> dict[str, Any]:
        import math

        import timm

        cfg = timm.models.get_pretrained_cfg(weights)
        if cfg is None:
            raise KeyError(f"timm has no pretrained config {weights!r}")
        crop = int(cfg.input_size[-1])
        return {
            "resize": int(math.floor(crop / cfg.crop_pct)),
            "crop": crop,
            "mean": tuple(float(v) for v in cfg.mean),
            "std": tuple(float(v) for v in cfg.std),
            "interpolation": cfg.interpolation,
        }

    def load_pretrained(self, net: nn.Module, arch: str, weights: str) -> str:
        import timm

        try:
            timm.models.load_pretrained(net)  # uses net.pretrained_cfg, set by create_model
        except Exception as e:  # noqa: BLE001
            raise WeightsError(
                f"cannot load timm weights {weights} ({type(e).__name__}). Offline? Fill the Hugging "
                "Face cache (HF_HUB_OFFLINE=1 skips the network retries) or pass --weights FILE"
            ) from None
        return f"timm:{weights}"

    def finetunable(self, arch: str) -> bool:
        return True

    def resolve(self, tagged: str) -> tuple[str, int, str, str, str]:
        """Any timm model, e.g. ``vit_small_patch14_dinov2.lvd142m``: preprocessing from its
        pretrained config, the embedding from timm's pooled pre-logits (``num_classes=0``)."""
        import timm

        arch = tagged.split(".", 1)[0]
        if not timm.is_model(arch) or timm.models.get_pretrained_cfg(tagged) is None:
            raise UnknownBackboneError(
                f"timm has no model {tagged!r} (see timm.list_models(pretrained=True))"
            )
        with torch.device("meta"):
            net = timm.create_model(tagged, pretrained=False, num_classes=0)
        size = int(timm.models.get_pretrained_cfg(tagged).input_size[-1])
        with torch.no_grad():  # a shape-only forward pass (meta tensors: no compute)
            dim = int(net(torch.empty(1, 3, size, size, device="meta")).shape[-1])
        return arch, dim, "pre_logits", tagged, f"timm {tagged}, pooled pre-logits"


def import_open_clip():
    try:
        import open_clip
    except ImportError:
        raise UnknownBackboneError(
            "open_clip backbones need the optional package open_clip_torch: "
            "pip install 'penult[clip]'"
        ) from None
    return open_clip


class OpenClip(Adapter):
    name = "open_clip"

    def build(self, arch: str, weights: str) -> nn.Module:
        logging.disable(logging.WARNING)  # its "initialized randomly": weights load next
        try:
            return import_open_clip().create_model(arch, pretrained=None)
        finally:
            logging.disable(logging.NOTSET)

    def truncate(self, net: nn.Module, layer: str, taps: tuple[str, ...]) -> nn.Module:
        return net.visual  # the image tower: encode_image without normalising

    def eval_transform(self, arch: str, weights: str) -> dict[str, Any]:
        """Shorter side to the tower's size, centre crop, its mean/std."""
        open_clip = import_open_clip()
        size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
        size = int(size if isinstance(size, int) else size[-1])
        cfg = open_clip.get_pretrained_cfg(arch, weights)
        return {
            "resize": size,
            "crop": size,
            "mean": tuple(float(v) for v in cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN),
            "std": tuple(float(v) for v in cfg.get("std") or open_clip.OPENAI_DATASET_STD),
            "interpolation": cfg.get("interpolation") or "bicubic",
        }

    def load_pretrained(self, net: nn.Module, arch: str, weights: str) -> str:
        """From the Hugging Face cache (or a download where online), read by penult's own safe
        reader (tensors only)."""
        open_clip = import_open_clip()
        try:
            path = open_clip.download_pretrained(open_clip.get_pretrained_cfg(arch, weights))
        except Exception as e:  # noqa: BLE001 - offline is the common case here
            raise WeightsError(
                f"cannot load open_clip weights {arch}:{weights} ({type(e).__name__}). "
                "Offline? Fill the Hugging Face cache (HF_HUB_OFFLINE=1 skips the network retries) "
                "or pass --weights FILE"
            ) from None
        if not path:
            raise WeightsError(f"open_clip has no download for {arch}:{weights}")
        load_into(net, read_state_dict(path), str(path))
        return f"open_clip:{arch}:{weights}"

    def resolve(self, tagged: str) -> tuple[str, int, str, str, str]:
        """An image tower, e.g. ``ViT-B-32:laion2b_s34b_b79k``: the embedding is
        ``encode_image`` (the projected pooled output), preprocessing from its own config."""
        open_clip = import_open_clip()
        arch, _, tag = tagged.partition(":")
        if arch not in open_clip.list_models():
            raise UnknownBackboneError(f"open_clip has no architecture {arch!r}")
        if not tag or tag not in open_clip.list_pretrained_tags_by_model(arch):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
            raise UnknownBackboneError(
                f"open_clip/{tagged}: name the weights as open_clip/{arch}:<pretrained> ({tags})"
            )
        dim = int(open_clip.get_model_config(arch)["embed_dim"])
        return arch, dim, "image_embeds", tag, f"open_clip {arch} ({tag}) image tower, encode_image"


ADAPTERS: dict[str, Adapter] = {a.name: a for a in (Torchvision(), Timm(), OpenClip())}
