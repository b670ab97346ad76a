"""CPU engines for the frozen backbone: ONNX Runtime and OpenVINO run penult's own pre-logits
module (uint8 in, normalisation, flip averaging and pooling inside), exported once to ONNX.

Why: on CPUs the runtimes built for inference beat torch eager by 1.8-4x on the same network
(docs/BENCHMARKS.md, "CPU engines"). Nothing here is a kernel of ours: torch exports the graph,
the runtimes run it. The export is cached by what identifies the embeddings (architecture,
weights hash, preprocessing, layer), so every process that feeds a loader loads the same file.
``auto`` times the engines on a few batches once per CPU model and backbone and keeps the answer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import platform
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from penult.core import OptionError, PenultError, atomic_path, file_sha256
from penult.core.files import file_identity, write_text
from penult.extract.names import ENGINES

__all__ = [
    "ENGINES",
    "RUNTIMES",
    "auto_runtimes",
    "EngineError",
    "INSTALL",
    "Runner",
    "cache_dir",
    "cache_note",
    "cache_notes",
    "calibrate",
    "check_engine",
    "cpu_has_bf16",
    "cpu_model",
    "engine_tag",
    "installed",
    "lowest_cosine",
    "make_runner",
    "model_key",
    "runtime_precision",
    "speed_key",
    "onnx_file",
]

log = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "openvino")  # what ``auto`` times against torch, where installed


def auto_runtimes() -> tuple[str, ...]:
    """The runtimes ``auto`` times against torch: RUNTIMES, or ``$PENULT_AUTO_ENGINES``
    (comma-separated, e.g. ``onnxruntime`` to keep OpenVINO out on a machine where it misbehaves)."""
    env = os.environ.get("PENULT_AUTO_ENGINES")
    if not env:
        return RUNTIMES
    names = tuple(e.strip() for e in env.split(",") if e.strip())
    bad = [e for e in names if e not in RUNTIMES]
    if bad:
        raise OptionError(f"PENULT_AUTO_ENGINES: {', '.join(bad)} not among {', '.join(RUNTIMES)}")
    return names


OPSET = 17
INSTALL = {  # what to run when an engine is missing
    "onnxruntime": "pip install onnxruntime onnx (regular dependencies of penult)",
    "openvino": "pip install 'penult[openvino]'",
}
Runner = Callable[[np.ndarray], np.ndarray]  # uint8 (B, 3, H, W) -> float32 (B, D)


class EngineError(PenultError):
    """An engine that is not installed, cannot run this backbone, or cannot run on this device."""


def installed(engine: str) -> bool:
    if engine == "torch":
        return True
    mods = ("onnxruntime", "onnx") if engine == "onnxruntime" else (engine,)
    return all(importlib.util.find_spec(m) is not None for m in mods)


def cpu_has_bf16() -> bool:
    """True where the CPU runs bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def runtime_precision(engine: str, precision: str) -> str:
    """What a runtime runs for ``--precision`` (``int8`` aside): OpenVINO runs bf16 where the CPU
    has it natively and bf16 or auto is asked (as torch does; 2.4-5.3x its fp32 on an AMX Xeon,
    docs/BENCHMARKS.md), everything else fp32."""
    if engine == "openvino" and precision in ("auto", "bf16") and cpu_has_bf16():
        return "bf16"
    return "fp32"


def check_engine(engine: str, device: torch.device, precision: str) -> None:
    """Refuse what cannot run, with the reason, before any model is built."""
    if engine not in ENGINES:
        raise OptionError(f"engine {engine!r} not one of {', '.join(ENGINES)}")
    if engine == "torch":
        if precision == "int8":
            raise OptionError("--precision int8 runs on --engine openvino (or auto), not torch")
        return
    if engine == "auto":
        if precision == "int8" and not installed("openvino"):
            raise EngineError(f"--precision int8 runs on OpenVINO: {INSTALL['openvino']}")
        return
    if device.type != "cpu":
        raise OptionError(f"--engine {engine} runs on the CPU; use --engine torch on {device}")
    if precision == "fp16" or (precision == "bf16" and engine != "openvino"):
        raise OptionError(
            f"--engine {engine} runs fp32 (openvino also bf16 and int8); {precision} is torch's"
        )
    if precision == "bf16" and not cpu_has_bf16():
        raise OptionError(
            "--engine openvino runs bf16 only on CPUs with native bf16 (AVX-512 BF16 or AMX); "
            "this one has none: --precision fp32 (or auto)"
        )
    if precision == "int8" and engine != "openvino":
        raise OptionError("--precision int8 is OpenVINO NNCF quantization: --engine openvino")
    if not installed(engine):
        raise EngineError(f"--engine {engine} is not installed: {INSTALL[engine]}")


def engine_tag(engine: str, precision: str) -> str:
    """The fingerprint's precision field: torch keeps its plain names (stores written before the
    engines existed read the same), a runtime is named after the precision."""
    return precision if engine == "torch" else f"{precision}/{engine}"


def cache_dir() -> Path:
    """Beside torch's downloaded weights (``$TORCH_HOME/hub``), or ``$PENULT_ENGINE_CACHE``."""
    env = os.environ.get("PENULT_ENGINE_CACHE")
    return Path(env) if env else Path(torch.hub.get_dir()) / "penult-engines"


def model_key(fingerprint: dict[str, Any]) -> str:
    """What decides the exported graph (see _identity), hashed: the cached export's name."""
    blob = json.dumps(_identity(fingerprint), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def speed_key(fingerprint: dict[str, Any]) -> str:
    """What decides how fast a network runs: its architecture, layer and input (preprocessing:
    size, flips), not its weights. A calibration then serves every checkpoint of an
    architecture, a fine-tuned one included."""
    from penult.features import Fingerprint

    speed = Fingerprint.of(fingerprint).identity()
    del speed["weights_sha256"]
    blob = json.dumps(speed, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_NOTES: list[str] = []  # what was found wrong in the cache and made again, for the summary


def cache_note(note: str) -> None:
    """Say (in the log and the run's summary) that a cache entry was found bad and made again."""
    log.warning(note)
    _NOTES.append(note)


def cache_notes() -> list[str]:
    """What the cache checks found and rebuilt since the last call (for a run's summary)."""
    out = list(_NOTES)
    _NOTES.clear()
    return out


def _identity(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """What decides the exported graph: the embedding's identity, torch's version, the opset."""
    from penult.features import Fingerprint

    return {**Fingerprint.of(fingerprint).identity(), "torch": torch.__version__, "opset": OPSET}


def _record(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _stat(path: Path) -> list[int]:
    """The file's identity (``core.files.file_identity``), as JSON keeps it: while it is the
    same, the digest checked at the last use still holds (a 500 MB export takes 0.3 s to hash)."""
    return list(file_identity(path.stat()))


def _cached(path: Path, backbone) -> bool:
    """Whether the cached export at ``path`` is the one made for ``backbone``: its record (the
    identity it was exported for, and the file's SHA-256 at write time) must match both. A file
    copied over it, cut short by a kill or a full disk, or made for another network is not."""
    if not path.is_file():
        return False
    why = ""
    try:
        rec = json.loads(_record(path).read_text())
        if not isinstance(rec, dict) or rec.get("identity") != _identity(backbone.fingerprint):
            why = "it was made for another network"
        elif rec.get("stat") != _stat(path):  # hashed once per change of the file
            if rec.get("sha256") != file_sha256(path):
                why = "its bytes changed since it was written"
            else:
                write_text(_record(path), json.dumps({**rec, "stat": _stat(path)}, sort_keys=True))
    except (OSError, ValueError):
        why = "it has no valid record of what it holds"
    if why:
        cache_note(f"cached export {path.name} was not used ({why}): exported again")
        path.unlink(missing_ok=True)
        _record(path).unlink(missing_ok=True)
        return False
    return True


def onnx_file(backbone) -> Path:
    """The backbone's pre-logits module as ONNX (dynamic batch), exported on first use, atomically:
    a kill never leaves half a file under the cached name. The export is checked against torch
    on a few images before it is kept, and recorded with its identity and SHA-256; a cached
    file is used only where both still match (see _cached)."""
    path = cache_dir() / f"{backbone.spec.name}-{model_key(backbone.fingerprint)}.onnx"
    if _cached(path, backbone):
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise PermissionError(f"{path.parent} is not writable")
    except OSError as e:
        raise EngineError(
            f"the engine cache {path.parent} cannot be written ({e}); set PENULT_ENGINE_CACHE "
            "to a writable folder, or use --engine torch"
        ) from None
    size = backbone.preprocess.crop
    x = torch.zeros((2, 3, size, size), dtype=torch.uint8)
    module = backbone.module
    was = next(module.parameters()).device
    t = time.perf_counter()
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's notes on dynamo and tracing
            torch.onnx.export(
                module.cpu(), (x,), tmp, input_names=["images"], output_names=["embedding"],
                dynamic_axes={"images": {0: "n"}, "embedding": {0: "n"}}, dynamo=False,
                opset_version=OPSET,
            )  # fmt: skip
            probe = _agrees(module, tmp, size)
    except EngineError:
        raise
    except OSError as e:  # a full disk, a cache that went away
        raise EngineError(f"cannot write the export of {backbone.spec.name} ({e})") from None
    except Exception as e:  # noqa: BLE001 - an op the exporter lacks: say which backbone and why
        raise EngineError(
            f"{backbone.spec.name} does not export to ONNX ({type(e).__name__}: {e}); "
            "use --engine torch"
        ) from e
    finally:
        module.to(was)
    record = {"identity": _identity(backbone.fingerprint), "sha256": file_sha256(path), "size": size,
              "probe": probe.astype(np.float32).tolist(), "stat": _stat(path)}  # fmt: skip
    write_text(_record(path), json.dumps(record, sort_keys=True))
    log.info("exported %s to %s in %.1f s", backbone.spec.name, path, time.perf_counter() - t)
    return path


PROBE_COSINE = 0.999  # an export that agrees less with torch on the probe images is not kept
PROBE_COSINE_BF16 = 0.98  # a runtime in bf16, against the torch fp32 reference


def _probe_images(size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, 3, size, size), np.uint8)


def _agrees(module, onnx_path: Path, size: int) -> np.ndarray:
    """The export, run by ONNX Runtime, against torch on three seeded random images: a graph
    that disagrees (an exporter bug, a wrong module) is refused before it is cached. Returns
    torch's embeddings of them: the reference every runtime built later is checked against."""
    import onnxruntime as ort

    x = _probe_images(size)
    with torch.inference_mode():
        want = module(torch.from_numpy(x)).float().numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x})[0]
    if got.shape != want.shape or lowest_cosine(got, want) < PROBE_COSINE:
        raise EngineError(
            f"the ONNX export disagrees with torch on probe images (cosine "
            f"{lowest_cosine(got, want) if got.shape == want.shape else 'n/a'}); use --engine torch"
        )
    return want


def _ort_runner(path: Path, threads: int, precision: str = "fp32") -> Runner:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    # the loader's processes share these cores: idle threads sleep instead of spinning
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": x})[0]


_CORE: list[Any] = []  # the process's one OpenVINO Core, once made
_CORE_LOCK = threading.Lock()  # cluster workers build runners from several threads


def _openvino_core():
    """One OpenVINO Core for the whole process, never dropped. Each Core loads its own CPU plugin,
    which installs a signal stack on the calling thread and puts back the one it found when it is
    freed; Cores freed out of creation order (a calibration's runner, then the run's) left the
    thread on the freed stack of an earlier plugin, and the next signal with a Python handler
    (torch's DataLoader handles SIGCHLD) crashed the process with SIGSEGV. One Core: one plugin."""
    with _CORE_LOCK:  # two threads racing here would make two Cores and drop one
        if not _CORE:
            import openvino as ov

            _CORE.append(ov.Core())
        return _CORE[0]


def _openvino_runner(path: Path, threads: int, precision: str = "fp32") -> Runner:
    config: dict[str, Any] = {
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        # its default is bf16 where the CPU has it: asked for, never implied
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "ENABLE_CPU_PINNING": False,  # the loader's processes share these cores
    }
    blobs = cache_dir() / "openvino"
    try:  # OpenVINO's own model cache: compiling Lite0 again took 0.06 s instead of 0.18
        blobs.mkdir(parents=True, exist_ok=True)
        if os.access(blobs, os.W_OK):
            config["CACHE_DIR"] = str(blobs)  # (a torn blob is compiled and written again)
    except OSError:  # a read-only cache: compile every time, still correct
        pass
    model = _openvino_core().compile_model(str(path), "CPU", config)
    return lambda x: np.array(model(x)[0], copy=True)  # its buffer is reused by the next call


def make_runner(engine: str, path: Path, threads: int, precision: str = "fp32") -> Runner:
    """The runtime's session over an exported (or quantized) ONNX file; ``precision`` bf16 is
    OpenVINO's inference precision on CPUs that have it (see runtime_precision)."""
    make = _ort_runner if engine == "onnxruntime" else _openvino_runner
    try:
        run = make(path, threads, precision)
        if not _runs_true(run, path, precision) and engine == "openvino":
            _clear_blobs()  # a compiled model from OpenVINO's cache that is not this one
            run = make(path, threads, precision)
    except Exception as e:  # noqa: BLE001 - a graph the runtime refuses: name it
        raise EngineError(f"{engine} cannot load {path.name} ({type(e).__name__}: {e})") from e
    if not _runs_true(run, path, precision):
        path.unlink(missing_ok=True)  # the next run exports it again
        _record(path).unlink(missing_ok=True)
        raise EngineError(
            f"{engine} ({precision}) disagrees with torch's recorded output for {path.name} on "
            "the probe images; the cached export was removed (the next run makes it again), or "
            "use --engine torch"
        )
    return run


def _runs_true(run: Runner, path: Path, precision: str) -> bool:
    """A newly built runtime, on the three probe images, against torch's embeddings of them
    recorded at export (a few milliseconds; no torch network needed). True where the file has
    no such record (an int8 model, an export from before records)."""
    try:
        rec = json.loads(_record(path).read_text())
        want, size = np.asarray(rec["probe"], np.float32), int(rec["size"])
    except (OSError, ValueError, KeyError, TypeError):
        return True
    got = run(_probe_images(size))
    bar = PROBE_COSINE if precision == "fp32" else PROBE_COSINE_BF16
    return got.shape == want.shape and lowest_cosine(got, want) >= bar


def _clear_blobs() -> None:
    cache_note("OpenVINO's compiled-model cache gave another network: cleared and compiled again")
    for f in (cache_dir() / "openvino").glob("*"):
        if f.is_file():
            f.unlink(missing_ok=True)


def cpu_model() -> str:
    """The CPU's model name and its fast-path flags: what a calibration is valid for."""
    name, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name") and not name:
                    name = ln.split(":", 1)[1].strip()
                elif ln.startswith("flags") and not flags:
                    keep = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
                    flags = " ".join(f for f in ln.split() if f in keep) or "-"
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    return f"{name} [{flags}] x{os.cpu_count()}"


TRUST_MARGIN = 1.10  # a winner this much faster than the runner-up is kept for good at once
STEADY = 1.25  # best batch over median batch above this: a candidate timed on a busy machine
ROUNDS = 3  # timed batches per candidate, taken in turns (a spike of load hits one round)
CONFIRM = 3  # measurements after which a close or noisy calibration is kept anyway
RECHECK_BATCHES = 250  # a run this many batches long measures an untrusted calibration again


def calibrate(
    key: dict[str, Any],
    candidates: dict[str, Callable[[], Runner]],
    x: np.ndarray,
    *,
    recheck: bool = True,
) -> tuple[str, dict[str, float], bool, bool]:
    """(fastest engine, images/s of each, whether the answer came from the cache, whether it is
    kept for good).

    Each candidate builds its runner and runs one warm-up batch (a candidate whose warm-up is
    under half the best warm-up is not timed further; one that fails to build or run is left
    out). Then the others are timed in turns, ROUNDS
    batches each, and each keeps its best batch: load from elsewhere slows a round, never
    speeds one, and taking turns spreads it over all of them. The answer is kept in
    ``calibration.json`` under ``key`` (threads, batch, network, ...), the CPU model and the
    library versions, and trusted for good only when clear: the winner TRUST_MARGIN ahead and
    its batches steady. A close or noisy one is measured again by the next run, each engine
    keeping its best figure of all measurements, until the same engine wins twice or CONFIRM
    measurements were made (a busy machine's pick is not kept for good). ``recheck=False``
    (a run too short to pay for a new measurement: under RECHECK_BATCHES batches, the
    calibration's dozen being under 5% of it) takes an untrusted answer as it is."""
    path = cache_dir() / "calibration.json"
    here = {"cpu": cpu_model(), "versions": _versions(), "candidates": sorted(candidates)}
    k = json.dumps({**key, **here}, sort_keys=True)
    before = _entry(_calibrations(path).get(k), candidates)
    if before is not None and (before["trusted"] or not recheck):
        rates = before["rates"]
        return max(rates, key=rates.get), rates, True, before["trusted"]
    rates, steady = _measure(candidates, x)
    if not rates:
        raise EngineError("no engine could run this backbone")
    best = max(rates, key=rates.get)
    runs, wins = 1, 1
    if before is not None:  # measured before, not trusted: each engine's best figure of both
        runs = before["runs"] + 1
        merged = {n: max(r, before["rates"].get(n, 0.0)) for n, r in rates.items()}
        wins = before["wins"] + 1 if max(before["rates"], key=before["rates"].get) == best else 1
        rates, best = merged, max(merged, key=merged.get)
    ranked = sorted(rates.values(), reverse=True)
    clear = len(ranked) == 1 or (ranked[0] >= TRUST_MARGIN * ranked[1] and steady)
    entry = {
        "rates": {n: round(r, 2) for n, r in rates.items()}, "runs": runs, "wins": wins,
        "trusted": bool(clear or wins >= 2 or runs >= CONFIRM),
    }  # fmt: skip
    known = _calibrations(path)  # re-read: another process may have calibrated meanwhile
    known[k] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(known, indent=1, sort_keys=True))
    except OSError as e:  # a read-only cache: measured again next time, still correct
        log.warning("could not keep the engine calibration in %s: %s", path, e)
    return best, rates, False, entry["trusted"]


def _measure(
    candidates: dict[str, Callable[[], Runner]], x: np.ndarray
) -> tuple[dict[str, float], bool]:
    """Each candidate's best batch rate (images/s), timed in turns; whether every timed
    candidate's batches were steady (best / median within STEADY: one spike of load is
    harmless, the best batch is kept; most batches slowed is a busy spell)."""
    runs: dict[str, Runner] = {}
    rates: dict[str, float] = {}
    for name, build in candidates.items():
        try:
            run = build()
            t = time.perf_counter()
            run(x)
            rate = len(x) / (time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001 - an engine that cannot run is simply not picked
            log.warning("engine %s left out of the calibration: %s", name, e)
            continue
        rates[name], runs[name] = rate, run
    if rates:  # under half the best even warm: it cannot win, its warm-up's rate is kept
        runs = {n: r for n, r in runs.items() if rates[n] >= max(rates.values()) / 2}
    seen: dict[str, list[float]] = {n: [] for n in runs}
    for _ in range(ROUNDS):
        for name, run in list(runs.items()):
            try:
                t = time.perf_counter()
                run(x)
                seen[name].append(len(x) / (time.perf_counter() - t))
            except Exception as e:  # noqa: BLE001
                log.warning("engine %s left out of the calibration: %s", name, e)
                del runs[name], rates[name], seen[name]
    for name, got in seen.items():
        rates[name] = max(got)
    steady = all(max(g) <= STEADY * float(np.median(g)) for g in seen.values() if g)
    return rates, steady


def _entry(kept: Any, candidates: dict[str, Any]) -> dict[str, Any] | None:
    """A kept calibration for these candidates, or None (missing, malformed, or written by an
    older penult as a plain {engine: rate}: measured again)."""
    if not isinstance(kept, dict):
        return None
    rates = kept.get("rates")
    if not isinstance(rates, dict) or not rates or not set(rates) <= set(candidates):
        return None
    if not all(isinstance(v, int | float) and v > 0 for v in rates.values()):
        return None
    runs, wins = kept.get("runs"), kept.get("wins")
    return {"rates": {n: float(v) for n, v in rates.items()},
            "runs": runs if isinstance(runs, int) and runs > 0 else 1,
            "wins": wins if isinstance(wins, int) and wins > 0 else 1,
            "trusted": kept.get("trusted") is True}  # fmt: skip


def _calibrations(path: Path) -> dict[str, Any]:
    """The kept calibrations; a file that is missing, not JSON or not an object counts as none
    (it is written again whole)."""
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(known, dict):
        log.warning("%s is not a JSON object: calibrating again", path)
        return {}
    return known


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "onnxruntime", "openvino"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def lowest_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The least cosine similarity between matching rows (1.0 = same direction)."""
    num = (a.astype(np.float64) * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float((num / np.maximum(den, 1e-30)).min()) if len(a) else 1.0
