"""Building a frozen backbone that maps uint8 image batches to penultimate-layer embeddings."""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from penult.core import OptionError
from penult.core.files import file_sha256, write_text
from penult.extract.engines import (
    ENGINES,
    cache_dir,
    cache_note,
    cpu_has_bf16,
)
from penult.extract.names import OPTIMIZE, PRECISIONS, TORCH_PRECISIONS
from penult.extract.registry import REGISTRY, BackboneSpec, Preprocess, get_spec
from penult.extract.weights import (
    PACKAGED_WEIGHTS,
    WeightsError,
    load_into,
    packaged_weights_file,
    read_state_dict,
    state_sha256,
)
from penult.features import Fingerprint
from torch import nn

__all__ = [
    "Backbone",
    "COMPILE_MIN_IMAGES",
    "ENGINES",
    "OPTIMIZE",
    "PRECISIONS",
    "PreLogits",
    "TORCH_PRECISIONS",
    "build_backbone",
    "build_network",
    "load_pretrained",
    "cpu_has_bf16",
    "pick_device",
    "pick_optimize",
    "pick_precision",
]


log = logging.getLogger(__name__)


def build_network(spec: BackboneSpec) -> nn.Module:
    """The whole classifier network with random (seeded) weights."""
    return spec.adapter.build(spec.arch, spec.weights)


def load_pretrained(net: nn.Module, spec: BackboneSpec) -> str:
    """Load the registry's default weights into ``net``; returns a description of their origin."""
    if spec.name in PACKAGED_WEIGHTS:
        path = packaged_weights_file(spec.name)
        load_into(net, read_state_dict(path), str(path))
        return f"file:{path.name}"
    return spec.adapter.load_pretrained(net, spec.arch, spec.weights)


class PreLogits(nn.Module):
    """uint8 (B, 3, H, W) -> normalised float -> network up to its pre-logits layer -> (B, D).

    The one path from pixels to the stored embedding: `penult extract` runs it frozen, fine-tuning
    trains it. ``taps`` names inner modules whose outputs ``forward_taps`` returns as well (the
    coarse head of fine-tuning reads one). The classifier of ``net`` is dropped in place.
    """

    def __init__(self, net: nn.Module, spec: BackboneSpec, pre: Preprocess, taps=()):
        super().__init__()
        self.taps = tuple(taps)
        self.flip = pre.tta == "flip"  # evaluation only: training sees its own augmentation
        self.net = spec.adapter.truncate(net, spec.layer, self.taps)
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(pre.std).view(1, 3, 1, 1) * 255.0))
        self._tapped: dict[str, torch.Tensor] = {}
        if spec.adapter.taps_by_hooks:  # timm keeps its modules: read them through hooks
            for name in self.taps:
                self.net.get_submodule(name).register_forward_hook(self._keeper(name))

    def _keeper(self, name: str):
        def keep(_module, _inputs, out):
            self._tapped[name] = out

        return keep

    def _net(self, x: torch.Tensor):
        x = (x.float() - self.mean) * self.inv_std
        return self.net(x.contiguous(memory_format=torch.channels_last))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self._net(x)
        return (out["features"] if isinstance(out, dict) else out).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip and not self.training:  # one pass over the image and its mirror image
            n = x.shape[0]
            both = self._embed(torch.cat([x, x.flip(-1)]))
            return (both[:n] + both[n:]) / 2
        return self._embed(x)

    def forward_taps(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(embedding, {tap: output}); the tapped activations are not kept after the call."""
        out = self._net(x)
        if isinstance(out, dict):
            return out["features"].flatten(1), {t: out[t] for t in self.taps}
        taps, self._tapped = self._tapped, {}
        return out.flatten(1), taps


class Backbone:
    """A ready-to-run frozen backbone and the fingerprint that identifies its embeddings.

    ``module`` is built on first use: a run whose runtime engine finds its export cached never
    builds the torch network, so it never imports timm or torchvision (2 s of every start)."""

    def __init__(
        self,
        name: str,
        spec: BackboneSpec,
        module: nn.Module | Callable[[], nn.Module],
        preprocess: Preprocess,
        fingerprint: dict[str, Any],
    ) -> None:
        self.name, self.spec, self.preprocess = name, spec, preprocess
        self.fingerprint = fingerprint
        built = isinstance(module, nn.Module)
        self._module: nn.Module | None = module if built else None
        self._build = None if built else module

    @property
    def module(self) -> nn.Module:
        if self._module is None:
            with torch.inference_mode(False):  # first used inside inference mode, its weights
                self._module = self._build()  # would be inference tensors: no export, no training
        return self._module


# Bump when build_backbone names entries or fills fingerprints differently: known identities
# (below) are then worked out again.
IDENTITY_VERSION = 1


def build_backbone(
    name: str,
    *,
    weights: str | os.PathLike[str] = "pretrained",
    trust_checkpoint: bool = False,
    seed: int = 0,
    crop_pct: float | None = None,
    resize: str = "crop",
    tta: str = "none",
) -> Backbone:
    """Build ``name`` with ``weights``: "pretrained" (registry default), "random" (seeded), or a file.

    ``crop_pct`` overrides the weights' centre crop (1.0 keeps the whole shorter side, for images
    already cropped to the subject); ``resize`` is the mode (crop, whole, pad) and ``tta``
    "flip" averages the image and its mirror. The entry name says what differs from the
    weights' own transform (``...@crop100``, ``...@pad``, ``...@flip``).

    A backbone built before from the same weights bytes, options and library versions comes
    back from its recorded identity, its network built only when used (and checked then).
    """
    spec = get_spec(name)
    args = (name, spec, str(weights), trust_checkpoint, seed, crop_pct, resize, tta)
    key = _identity_key(*args)
    known = _read_identity(key) if key else None
    if known is not None and not _consistent(key, known, resize, tta, crop_pct):
        cache_note(f"identity record {key}.json disagrees with the options it stands for: rebuilt")
        known = None
    if known is not None:
        _as_named(name, known["name"], str(weights))
        return Backbone(known["name"], spec, lambda: _checked(_build(*args), known),
                        known["preprocess"], copy.deepcopy(known["fingerprint"]))  # fmt: skip
    module, bb_name, pre, fingerprint = _build(*args)
    _as_named(name, bb_name, str(weights))
    bb = Backbone(bb_name, spec, module, pre, fingerprint)
    if key:
        _write_identity(key, bb)
    return bb


def _build(
    name: str, spec: BackboneSpec, w: str, trust_checkpoint: bool, seed: int,
    crop_pct: float | None, resize: str, tta: str,
) -> tuple[nn.Module, str, Preprocess, dict[str, Any]]:  # fmt: skip
    torch.manual_seed(seed)
    net = build_network(spec)
    if w == "pretrained":
        origin = load_pretrained(net, spec)
        entry = spec.name
    elif w == "random":
        origin = f"random-init(seed={seed})"
        entry = f"{spec.name}@random"
    else:
        load_into(net, read_state_dict(w, trust_checkpoint=trust_checkpoint), w)
        origin = f"file:{os.path.basename(w)}"
        entry = None
    sha = state_sha256(net.state_dict())
    if entry is None:
        entry = name if "@" in name else f"{spec.name}@{sha[:8]}"
    pre = spec.preprocess(crop_pct, mode=resize, tta=tta)
    if pre.mode == "crop" and pre.resize != spec.preprocess().resize:
        entry = f"{entry}@crop{round(100 * pre.crop / pre.resize)}"
    entry += pre.suffix()
    module = PreLogits(net, spec, pre).eval().requires_grad_(False)
    return module, entry, pre, network_fingerprint(spec, pre, sha, origin)


def network_fingerprint(
    spec, pre: Preprocess, weights_sha256: str, origin: str = ""
) -> Fingerprint:
    """The fingerprint of ``spec``'s float network with these weights and preprocessing: what
    extraction stores for it, and what fine-tuning looks for among stored entries."""
    return Fingerprint(
        backbone=spec.name,  # registry entry to rebuild it from (not part of the identity)
        architecture=spec.architecture,
        layer=spec.layer,
        dim=spec.dim,
        weights=origin,
        weights_sha256=weights_sha256,
        preprocessing=_preprocessing(pre),
        precision="fp32",
    )


def _as_named(asked: str, entry: str, weights: str) -> None:
    """A name with ``@`` parts asks for what the options choose: refused unless the options make
    exactly that entry (``efficientnet_lite0@random`` without ``--weights random`` would run the
    pretrained network under a name that says otherwise)."""
    if "@" not in asked or weights not in ("pretrained", "random") or asked == entry:
        return
    if asked.startswith(("timm", "open_clip")) and entry.endswith(asked.split("@", 1)[1]):
        return
    raise OptionError(
        f"--backbone {asked}: the '@' parts of an entry name are made by options, not chosen by "
        "name (@random: --weights random; @pad, @whole: --resize; @flip: --tta flip; @cropNN: "
        f"--crop-pct); these options make {entry}. Pass --backbone {asked.split('@', 1)[0]} "
        "with the options"
    )


def _preprocessing(pre: Preprocess) -> dict[str, Any]:
    """The fingerprint's preprocessing field."""
    return {**pre.to_dict(), "jpeg_draft": True, "input": "RGB uint8, EXIF-upright"}


def _consistent(
    key: str, known: dict[str, Any], resize: str, tta: str, crop_pct: float | None
) -> bool:
    """Whether a recorded identity is whole and says what its options make: its digest (over
    its key and contents) holds, its preprocessing is the one its fingerprint claims, with the
    options' resize mode, flips and crop, and the entry name ends as that preprocessing's. An
    edited, torn or stale record is not trusted (it would make extract apply one preprocessing
    while the entry claims another). Nothing here imports timm or builds the network."""
    pre, fp = known["preprocess"], known["fingerprint"]
    crop_ok = crop_pct is None or pre.mode != "crop" or abs(pre.crop / pre.resize - crop_pct) < 0.01
    return (
        known.get("digest") == _record_digest(key, known)
        and fp.get("preprocessing") == _preprocessing(pre)
        and (pre.mode, pre.tta) == (resize, tta)
        and crop_ok
        and known["name"].endswith(pre.suffix())
    )


def _record_digest(key: str, known: dict[str, Any]) -> str:
    """What a record's ``digest`` holds: its key and contents, hashed."""
    body = {"name": known["name"], "fingerprint": known["fingerprint"]}
    body["preprocess"] = asdict(known["preprocess"])
    return hashlib.sha256((key + json.dumps(body, sort_keys=True)).encode()).hexdigest()


def _checked(built: tuple, known: dict[str, Any]) -> nn.Module:
    """The network of a recorded identity, built now: it must still be what was recorded."""
    module, name, _, fingerprint = built
    if (name, fingerprint) != (known["name"], known["fingerprint"]):
        raise WeightsError(
            f"{name}: built now, its weights hash {fingerprint['weights_sha256'][:12]}..., not "
            f"{known['fingerprint']['weights_sha256'][:12]}... as recorded in {identity_dir()}; "
            "delete that folder and run again"
        )
    return module


def identity_dir() -> Path:
    return cache_dir() / "identities"


def _identity_key(
    name: str, spec: BackboneSpec, w: str, trust_checkpoint: bool, seed: int,
    crop_pct: float | None, resize: str, tta: str,
) -> str | None:  # fmt: skip
    """What decides a backbone's entry name, fingerprint and preprocessing, known without
    building it: the weights file's bytes, the options, the registry entry and the versions of
    the libraries that build it. None where only building tells (library hub weights)."""
    if name not in REGISTRY:  # timm:NAME and the like: found by importing their library
        return None
    if w == "pretrained":
        if spec.name not in PACKAGED_WEIGHTS:
            return None
        weights = f"sha256:{file_sha256(packaged_weights_file(spec.name))}"
    elif w == "random":
        weights = f"random:{seed}"
    elif Path(w).is_file():
        weights = f"sha256:{file_sha256(w)}:{os.path.basename(w)}"
    else:
        return None  # building says what is wrong with it
    versions = {}
    for lib in ("torch", "torchvision", "timm"):
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    blob = json.dumps(
        {"v": IDENTITY_VERSION, "name": name, "spec": asdict(spec), "weights": weights,
         "trust": trust_checkpoint, "crop_pct": crop_pct, "resize": resize, "tta": tta,
         "libraries": versions},
        sort_keys=True,
    )  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _read_identity(key: str) -> dict[str, Any] | None:
    try:
        known = json.loads((identity_dir() / f"{key}.json").read_text())
        pre = known["preprocess"]
        pre["mean"], pre["std"] = tuple(pre["mean"]), tuple(pre["std"])
        known["preprocess"] = Preprocess(**pre)
        if not isinstance(known["name"], str) or "weights_sha256" not in known["fingerprint"]:
            return None
        return known
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: build
        return None


def _write_identity(key: str, bb: Backbone) -> None:
    record = {"name": bb.name, "preprocess": asdict(bb.preprocess), "fingerprint": bb.fingerprint}
    record["digest"] = _record_digest(key, {**record, "preprocess": bb.preprocess})
    try:
        identity_dir().mkdir(parents=True, exist_ok=True)
        write_text(identity_dir() / f"{key}.json", json.dumps(record, sort_keys=True))
    except OSError:  # a read-only cache: every start builds the network, still correct
        pass


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device {device!r} requested but CUDA is not available")
    return d


def pick_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise OptionError(f"precision {precision!r} not one of {', '.join(PRECISIONS)}")
    if precision == "int8":
        raise OptionError("--precision int8 runs on --engine openvino (or auto), not torch")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


# On CPU, torch.compile with weight freezing (conv+BN folding, oneDNN weight prepacking) measured
# about 1.5x (ResNet-50 26 -> 39 img/s, EfficientNet-Lite0 ~95 -> 149) over eager bf16 here, after a compile of 10-25 s
# with a warm cache and ~40 s cold (fresh machine); it pays off from about this many images.
COMPILE_MIN_IMAGES = 10_000


def pick_optimize(optimize: str, device: torch.device, n_images: int) -> str:
    if optimize not in OPTIMIZE:
        raise OptionError(f"optimize {optimize!r} not one of {', '.join(OPTIMIZE)}")
    if optimize != "auto":
        return optimize
    return "inductor" if device.type == "cpu" and n_images >= COMPILE_MIN_IMAGES else "eager"
