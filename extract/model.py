"""Building a frozen backbone that maps uint8 image batches to penultimate-layer embeddings."""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from penult.core import OptionError
from penult.core.files import file_sha256, write_text
from penult.extract.engines import (
    ENGINES,
    INSTALL,
    Runner,
    auto_runtimes,
    cache_dir,
    cache_note,
    calibrate,
    check_engine,
    cpu_has_bf16,
    engine_tag,
    installed,
    make_runner,
    onnx_file,
    runtime_precision,
    speed_key,
)
from penult.extract.registry import REGISTRY, BackboneSpec, Preprocess, get_spec
from penult.extract.weights import (
    PACKAGED_WEIGHTS,
    WeightsError,
    load_into,
    load_pretrained,
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
    "Embedder",
    "OPTIMIZE",
    "PRECISIONS",
    "PreLogits",
    "TORCH_PRECISIONS",
    "build_backbone",
    "build_network",
    "cpu_has_bf16",
    "pick_device",
    "pick_optimize",
    "pick_precision",
]


log = logging.getLogger(__name__)

TORCH_PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # autocast; training takes only these
PRECISIONS = (*TORCH_PRECISIONS, "int8")  # int8: OpenVINO NNCF quantization (extract.quantize)


def build_network(spec: BackboneSpec) -> nn.Module:
    """The whole classifier network with random (seeded) weights."""
    if spec.source == "torchvision":
        import torchvision

        kwargs: dict[str, Any] = {}
        if spec.arch == "inception_v3":  # same keys as the pretrained file; fast default init
            kwargs = {"aux_logits": True, "init_weights": False}
        return getattr(torchvision.models, spec.arch)(weights=None, **kwargs)
    if spec.source == "open_clip":
        from penult.extract.registry import import_open_clip

        logging.disable(logging.WARNING)  # its "initialized randomly": weights load next
        try:
            return import_open_clip().create_model(spec.arch, pretrained=None)
        finally:
            logging.disable(logging.NOTSET)
    import timm

    return timm.create_model(spec.weights, pretrained=False)


def _truncate(net: nn.Module, spec: BackboneSpec, taps: tuple[str, ...]) -> nn.Module:
    """Keep the network up to its pre-logits layer, through the libraries' documented APIs."""
    if spec.source == "torchvision":
        import warnings

        from torchvision.models.feature_extraction import create_feature_extractor

        with warnings.catch_warnings():  # train/eval graphs differ (dropout, aux heads)
            warnings.filterwarnings("ignore", message="NOTE: The nodes obtained by tracing")
            nodes = {spec.layer: "features", **{t: t for t in taps}}
            return create_feature_extractor(net, return_nodes=nodes)
    if spec.source == "open_clip":  # the image tower: encode_image without normalising
        return net.visual
    net.reset_classifier(0)  # timm: forward() now returns global-pooled pre-logits
    return net


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
        self.net = _truncate(net, spec, self.taps)
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(pre.std).view(1, 3, 1, 1) * 255.0))
        self._tapped: dict[str, torch.Tensor] = {}
        if spec.source != "torchvision":  # timm keeps its modules: read them through hooks
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
        architecture=f"{spec.source}:{spec.arch}",
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


OPTIMIZE = ("auto", "eager", "inductor")
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


class Embedder:
    """Runs a backbone on one device in one precision, with one engine.

    ``engine`` "torch" runs the module under ``inference_mode`` (with ``optimize="inductor"`` it is
    compiled for a fixed ``batch_size``: smaller batches are padded, so one compile serves the
    whole run; if compiling fails it falls back to eager). "onnxruntime" and "openvino" run the
    same module exported to ONNX, on the CPU; "auto" takes the one a short calibration measured
    fastest here (``engine_note`` says how fast each was). ``calibration`` is the images that
    ``precision="int8"`` quantizes with (``int8_digest`` names an earlier calibration instead;
    ``progress`` shows the quantizer's bars).
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        device: str = "auto",
        precision: str = "auto",
        optimize: str = "eager",
        batch_size: int = 32,
        engine: str = "torch",
        calibration: Sequence[str] = (),
        int8_digest: str = "",
        progress: bool = True,
    ):
        self.device = pick_device(device)
        check_engine(engine, self.device, precision)
        self.backbone, self.batch_size = backbone, batch_size
        self._module: nn.Module | None = None  # the torch network, only where torch runs it
        self.optimize = "eager"
        self._compiled: nn.Module | None = None
        self._runner: Runner | None = None
        self.engine_note = ""
        self.int8: dict[str, Any] = {}
        ready = None  # the winner's runtime as auto's calibration built it: not built twice
        if engine == "auto":
            engine, precision, self.engine_note, ready = self._pick(precision)
        self.engine = engine
        if engine == "torch":
            self._use_torch(pick_precision(precision, self.device))
            if optimize == "inductor":
                self.compile()
        elif precision == "int8":
            from penult.extract.quantize import int8_file

            path, self.int8 = int8_file(backbone, calibration, int8_digest, batch_size, progress)
            self._use_runtime(engine, path, "int8")
        else:
            p = runtime_precision(engine, precision)
            self._use_runtime(engine, onnx_file(backbone), p, ready)

    @property
    def tag(self) -> str:
        """The fingerprint's precision field: the precision and, for a runtime, the engine."""
        return engine_tag(self.engine, self.precision)

    @property
    def module(self) -> nn.Module:
        return self._module if self._module is not None else self.backbone.module

    def _use_torch(self, precision: str) -> Runner:
        self.engine, self.precision, self._runner = "torch", precision, None
        self._module = self.module.to(self.device).to(memory_format=torch.channels_last)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        return lambda x: self(torch.from_numpy(x))

    def _use_runtime(self, engine: str, path, precision: str, runner: Runner | None = None) -> None:
        self._runner = runner or make_runner(engine, path, torch.get_num_threads(), precision)
        self.engine, self.precision, self.dtype = engine, precision, None
        self._module = None  # a torch network moved here for the calibration is not kept

    def _pick(self, precision: str) -> tuple[str, str, str, Runner | None]:
        """(engine, precision, note, the winner's runtime if the calibration built it): the
        fastest engine here for this backbone, in the precision each runs for ``precision``
        (torch and OpenVINO bf16 where the CPU has it natively), measured once (see
        engines.calibrate). The losers' sessions go when this returns."""
        if precision == "int8":
            return "openvino", precision, "", None
        if self.device.type != "cpu" or precision == "fp16":
            return "torch", precision, "", None
        built: dict[str, Runner] = {}

        def runtime(engine: str, p: str) -> Runner:
            path = onnx_file(self.backbone)
            built[f"{engine} {p}"] = make_runner(engine, path, torch.get_num_threads(), p)
            return built[f"{engine} {p}"]

        candidates = {}
        for e in auto_runtimes():
            p = runtime_precision(e, precision)
            if installed(e) and (precision != "bf16" or p == "bf16"):
                candidates[f"{e} {p}"] = lambda e=e, p=p: runtime(e, p)
        if not candidates:
            return "torch", precision, "", None
        # last: on CPUs without native bf16 torch is the slowest, and calibrate skips timing a
        # candidate whose warm-up batch is under half the best rate so far
        torch_precision = pick_precision(precision, self.device)
        candidates[f"torch {torch_precision}"] = lambda: self._use_torch(torch_precision)
        size = self.backbone.preprocess.crop
        x = np.random.default_rng(0).integers(0, 256, (self.batch_size, 3, size, size), np.uint8)
        key = {
            "network": speed_key(self.backbone.fingerprint),
            "threads": torch.get_num_threads(),
            "batch": self.batch_size,
            "precision": precision,
        }
        best, rates, cached = calibrate(key, candidates, x)
        note = ", ".join(f"{n} {r:.0f}" for n, r in sorted(rates.items(), key=lambda t: -t[1]))
        note = f"auto: {note} img/s ({'calibration cached' if cached else 'calibrated now'})"
        if "openvino" in auto_runtimes() and not installed("openvino"):
            note += f"; OpenVINO, fastest on every CPU measured, is not installed: {INSTALL['openvino']}"
        engine, picked = best.split()
        return engine, picked, note, built.get(best)

    def compile(self) -> None:
        """Switch to torch.compile (inductor, frozen weights); the compile happens on the first batch."""
        if self.engine != "torch":
            return
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        self._compiled = torch.compile(
            self.module, dynamic=False, options={"freezing": True, "compile_threads": 1}
        )
        self.optimize = "inductor"

    def warmup(self, size: int) -> None:
        """Compile now, on a dummy batch shaped like the loader's (uint8 NCHW).

        Must run before loader workers are forked: compiling while they run crashed (SIGSEGV) here.
        """
        self(torch.zeros((self.batch_size, 3, size, size), dtype=torch.uint8))

    def _forward(self, batch: torch.Tensor, n: int) -> torch.Tensor:
        if self._compiled is None:
            return self.module(batch[:n])
        try:
            return self._compiled(batch)[:n]
        except Exception as e:  # noqa: BLE001 - no C++ compiler, unsupported op, ...: stay correct
            log.warning(
                "torch.compile failed (%s: %s); continuing in eager mode", type(e).__name__, e
            )
            self._compiled, self.optimize = None, "eager"
            return self.module(batch[:n])

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        """uint8 (B, 3, H, W) on any device -> float32 numpy (B, D)."""
        if self._runner is not None:
            return np.asarray(self._runner(batch.cpu().numpy()), np.float32)
        batch = batch.to(self.device, non_blocking=True)
        n = batch.shape[0]
        if self._compiled is not None and n < self.batch_size:
            # pad outside inference_mode: an inference tensor would fail the compiled guards (recompile)
            batch = torch.cat([batch, batch.new_zeros((self.batch_size - n, *batch.shape[1:]))])
        with (
            torch.inference_mode(),
            torch.autocast(
                self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
            ),
        ):
            out = self._forward(batch, n)
        return out.float().cpu().numpy()
