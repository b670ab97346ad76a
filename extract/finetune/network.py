"""The trainable network: the backbone's own pre-logits path (shared with `penult extract`), with
its early stages frozen, a new linear head and an optional coarse-label head on an inner stage."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from penult.core import OptionError
from penult.extract.finetune.options import FinetuneError, FinetuneOptions
from penult.extract.loader import border_colour
from penult.extract.model import PreLogits, build_network, load_pretrained
from penult.extract.registry import BackboneSpec, Preprocess
from penult.extract.weights import state_sha256
from torch import nn

__all__ = ["Built", "Trainable", "augment", "build", "stages"]


def stages(net: nn.Module) -> list[tuple[str, ...]]:
    """Module names of the network's stages, shallow to deep (what ``unfreeze`` counts from the end).

    Names, not modules, so that they resolve in the whole network and in its truncated graph alike.
    """
    if hasattr(net, "blocks") and hasattr(net, "conv_stem"):  # timm EfficientNet / MobileNet
        n = len(net.blocks)
        return [("conv_stem", "bn1"), *((f"blocks.{i}",) for i in range(n)), ("conv_head", "bn2")]
    if hasattr(net, "layer4"):  # torchvision ResNet
        return [("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)]
    raise FinetuneError(
        f"{type(net).__name__}: no known stages to freeze; fine-tuning not supported"
    )


class Trainable(nn.Module):
    """uint8 images -> PreLogits -> new linear head (+ coarse head on a tapped stage's pooled output)."""

    def __init__(self, embedder: PreLogits, n_classes: int, dim: int):
        super().__init__()
        self.embedder = embedder
        self.head = nn.Linear(dim, n_classes)
        self.aux: nn.Linear | None = None
        self.frozen: list[nn.Module] = []  # stages kept in eval mode: BatchNorm statistics too
        self.bn_train = True  # False: every BatchNorm keeps its pretrained statistics

    def attach_aux(self, n_coarse: int) -> None:
        """A coarse-label head on the embedder's one tap, sized by a dry run."""
        with torch.no_grad():
            _, taps = self.embedder.forward_taps(
                torch.zeros(1, 3, 64, 64, dtype=torch.uint8, device=self.head.weight.device)
            )
        (mid,) = taps.values()
        self.aux = nn.Linear(mid.shape[1], n_coarse).to(self.head.weight.device)

    def train(self, mode: bool = True) -> Trainable:
        super().train(mode)
        for m in self.frozen:
            m.eval()
        if not self.bn_train:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-logits embedding: the same module `penult extract` runs."""
        return self.embedder(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(class logits, coarse logits or None)."""
        if self.aux is None:
            return self.head(self.embedder(x)), None
        emb, taps = self.embedder.forward_taps(x)
        (mid,) = taps.values()
        return self.head(emb), self.aux(mid.float().mean((2, 3)))


@dataclass
class Built:
    model: Trainable
    classifier: dict[str, torch.Tensor]  # the ImageNet head, saved beside the trunk unchanged
    base_sha: str  # the pretrained weights' hash (to find their embeddings in the store)
    frozen_parameters: int
    trainable: list[nn.Parameter]


def build(
    spec: BackboneSpec, pre: Preprocess, opts: FinetuneOptions, n_classes: int, n_coarse: int
) -> Built:
    """The pretrained backbone as a Trainable, frozen but for the last ``opts.unfreeze`` stages."""
    net = build_network(spec)
    load_pretrained(net, spec)
    full = net.state_dict()
    base_sha = state_sha256(full)
    names = stages(net)
    if not 1 <= opts.unfreeze <= len(names):
        raise FinetuneError(
            f"--unfreeze must be between 1 and {len(names)} (stages of this network)"
        )
    tap = ()
    if opts.aux_level:
        if not 1 <= opts.aux_stage <= len(names):
            raise OptionError(f"--aux-stage must be between 1 and {len(names)}")
        if opts.aux_stage > opts.unfreeze:
            raise FinetuneError(
                f"--aux-stage {opts.aux_stage} is frozen: the coarse loss could not train it; "
                f"use --unfreeze {opts.aux_stage} or more"
            )
        tap = (names[len(names) - opts.aux_stage][-1],)
    embedder = PreLogits(net, spec, pre, taps=tap)
    trunk = embedder.net
    kept = trunk.state_dict()
    classifier = {k: v.clone() for k, v in full.items() if k not in kept}
    frozen = [trunk.get_submodule(n) for st in names[: len(names) - opts.unfreeze] for n in st]
    trunk.requires_grad_(False)
    for st in names[len(names) - opts.unfreeze :]:
        for n in st:
            trunk.get_submodule(n).requires_grad_(True)
    model = Trainable(embedder, n_classes, spec.dim).to(memory_format=torch.channels_last)
    model.frozen, model.bn_train = frozen, opts.bn_train
    if tap:
        model.attach_aux(n_coarse)
    trainable = [p for p in trunk.parameters() if p.requires_grad]
    n_frozen = sum(1 for p in trunk.parameters() if not p.requires_grad)
    return Built(model, classifier, base_sha, n_frozen, trainable)


def augment(
    batch: torch.Tensor, crop: int, rng: torch.Generator, style: str = "photo"
) -> torch.Tensor:
    """Random augmentation per image (uint8 in, uint8 out).

    ``photo``: random resized crop, horizontal flip, small rotation, colour jitter (brightness
    and contrast only on greyscale images). ``plankton``: any rotation, both flips and a mild
    scale change on the image's own background colour, no colour jitter: an organism in the
    water has no up, no handedness and no colour to learn.
    """
    if style == "plankton":
        return torch.stack([_plankton_view(img, crop, rng) for img in batch])
    from torchvision.transforms import v2

    geo = v2.Compose(
        [
            v2.RandomResizedCrop(crop, scale=(0.5, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(10),
        ]
    )
    colour = v2.ColorJitter(0.3, 0.3, 0.3, 0.05)
    grey = v2.ColorJitter(0.3, 0.3)
    out = []
    for img in batch:
        img = geo(img)
        is_grey = bool((img[0] == img[1]).all() and (img[1] == img[2]).all())
        out.append((grey if is_grey else colour)(img))
    return torch.stack(out)


def _plankton_view(img: torch.Tensor, crop: int, rng: torch.Generator) -> torch.Tensor:
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    fill = list(border_colour(img.permute(1, 2, 0).cpu().numpy()))  # the frame's background
    u = torch.rand(4, generator=rng).tolist()
    scale = 0.8 + 0.4 * u[1]  # 0.8x .. 1.2x
    img = F.affine(
        img, angle=360.0 * u[0], translate=[0, 0], scale=scale, shear=[0.0, 0.0],
        interpolation=InterpolationMode.BILINEAR, fill=fill,
    )  # fmt: skip
    if u[2] < 0.5:
        img = F.horizontal_flip(img)
    if u[3] < 0.5:
        img = F.vertical_flip(img)
    if img.shape[-1] != crop:
        img = F.resize(img, [crop, crop], antialias=True)
    return img
