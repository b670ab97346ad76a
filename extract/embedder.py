"""How a backbone runs here (``choose_engine``: a decision) and the thin runner that runs it
(``Embedder``: uint8 batches in, float32 embeddings out).

The decision is where the heavy work is: ``auto`` times the engines once per CPU model and
backbone (``engines.calibrate``), a runtime needs the network exported to ONNX, and int8 needs
the quantized model (``quantize.int8_file``). The runner only runs what it is handed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from penult.extract.engines import (
    INSTALL,
    RECHECK_BATCHES,
    Runner,
    auto_runtimes,
    calibrate,
    check_engine,
    engine_tag,
    installed,
    make_runner,
    onnx_file,
    runtime_precision,
    speed_key,
)
from penult.extract.model import Backbone, pick_device, pick_precision
from torch import nn

__all__ = ["Embedder", "EngineChoice", "choose_engine"]

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EngineChoice:
    """How a backbone runs: on ``device``, with ``engine`` in ``precision``; ``runner`` is the
    runtime built for it (None: torch runs the module), ``note`` what ``auto`` measured, and
    ``int8`` the quantization record of an int8 model."""

    device: torch.device
    engine: str
    precision: str
    runner: Runner | None = None
    note: str = ""
    int8: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        """The fingerprint's precision field: the precision and, for a runtime, the engine."""
        return engine_tag(self.engine, self.precision)


def choose_engine(
    backbone: Backbone,
    *,
    device: str = "auto",
    precision: str = "auto",
    engine: str = "torch",
    batch_size: int = 32,
    calibration: Sequence[str] = (),
    int8_digest: str = "",
    progress: bool = True,
    images: int | None = None,
) -> EngineChoice:
    """Decide how ``backbone`` runs here and build what that needs. ``engine`` "torch" runs the
    module; "onnxruntime" and "openvino" run it exported to ONNX, on the CPU; "auto" takes the
    one a short calibration measured fastest here. ``calibration`` is the images that
    ``precision="int8"`` quantizes with (``int8_digest`` names an earlier calibration instead;
    ``progress`` shows the quantizer's bars). ``images``: how many the run embeds (a long run
    measures an untrusted calibration of ``auto`` again; None: unknown, it does not)."""
    dev = pick_device(device)
    check_engine(engine, dev, precision)
    note, ready = "", None  # ready: the winner's runtime as the calibration built it
    if engine == "auto":
        engine, precision, note, ready = _fastest(backbone, dev, precision, batch_size, images)
    if engine == "torch":
        return EngineChoice(dev, "torch", pick_precision(precision, dev), None, note)
    threads = torch.get_num_threads()
    if precision == "int8":
        from penult.extract.quantize import int8_file

        path, record = int8_file(backbone, calibration, int8_digest, batch_size, progress)
        return EngineChoice(
            dev, engine, "int8", make_runner(engine, path, threads, "int8"), note, record
        )
    p = runtime_precision(engine, precision)
    runner = ready or make_runner(engine, onnx_file(backbone), threads, p)
    return EngineChoice(dev, engine, p, runner, note)


def _fastest(
    backbone: Backbone, device: torch.device, precision: str, batch_size: int,
    images: int | None = None,
) -> tuple[str, str, str, Runner | None]:  # fmt: skip
    """(engine, precision, note, the winner's runtime if the calibration built it): the
    fastest engine here for this backbone, in the precision each runs for ``precision``
    (torch and OpenVINO bf16 where the CPU has it natively), measured once (see
    engines.calibrate). The losers' sessions go when this returns."""
    if precision == "int8":
        return "openvino", precision, "", None
    if device.type != "cpu" or precision == "fp16":
        return "torch", precision, "", None
    built: dict[str, Runner] = {}

    def runtime(engine: str, p: str) -> Runner:
        path = onnx_file(backbone)
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
    torch_precision = pick_precision(precision, device)
    candidates[f"torch {torch_precision}"] = lambda: _torch_embedder(
        backbone, device, torch_precision, batch_size
    )
    size = backbone.preprocess.crop
    x = np.random.default_rng(0).integers(0, 256, (batch_size, 3, size, size), np.uint8)
    key = {
        "network": speed_key(backbone.fingerprint),
        "threads": torch.get_num_threads(),
        "batch": batch_size,
        "precision": precision,
    }
    long_run = images is not None and images >= RECHECK_BATCHES * batch_size
    best, rates, cached, kept = calibrate(key, candidates, x, recheck=long_run)
    note = ", ".join(f"{n} {r:.0f}" for n, r in sorted(rates.items(), key=lambda t: -t[1]))
    how = "calibration cached" if cached else "calibrated now"
    if not kept:  # close, or timed on a busy machine: not trusted for good
        how += (
            "; close or unsteady, so measured again by the next run of "
            f"{RECHECK_BATCHES * batch_size:,}+ images"
        )
    note = f"auto: {note} img/s ({how})"
    if "openvino" in auto_runtimes() and not installed("openvino"):
        note += (
            f"; OpenVINO, fastest on every CPU measured, is not installed: {INSTALL['openvino']}"
        )
    engine, picked = best.split()
    return engine, picked, note, built.get(best)


def _torch_embedder(
    backbone: Backbone, device: torch.device, precision: str, batch_size: int
) -> Runner:
    """The torch candidate ``auto`` times: the very runner a torch choice gets, numpy in and out."""
    e = Embedder(backbone, EngineChoice(device, "torch", precision), batch_size=batch_size)
    return lambda x: e(torch.from_numpy(x))


class Embedder:
    """Runs a backbone as ``choice`` says: a runtime's session, or the torch module under
    ``inference_mode`` (with ``optimize="inductor"`` compiled for a fixed ``batch_size``:
    smaller batches are padded, so one compile serves the whole run; if compiling fails it falls
    back to eager). Build one with ``extract.embed.make_embedder``, which chooses first."""

    def __init__(
        self,
        backbone: Backbone,
        choice: EngineChoice,
        *,
        batch_size: int = 32,
        optimize: str = "eager",
    ):
        self.backbone, self.choice, self.batch_size = backbone, choice, batch_size
        self.device, self.engine, self.precision = choice.device, choice.engine, choice.precision
        self.engine_note, self.int8 = choice.note, choice.int8
        self._runner = choice.runner
        self._compiled: nn.Module | None = None
        self.optimize = "eager"
        self._module: nn.Module | None = None  # the torch network, only where torch runs it
        self.dtype = None
        if self._runner is None:
            self._module = backbone.module.to(self.device).to(memory_format=torch.channels_last)
            self.dtype = _DTYPES.get(self.precision)
            if optimize == "inductor":
                self.compile()

    @property
    def tag(self) -> str:
        return self.choice.tag

    @property
    def module(self) -> nn.Module:
        return self._module if self._module is not None else self.backbone.module

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
            self._compiled, self.optimize = None, "eager (torch.compile failed)"
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
