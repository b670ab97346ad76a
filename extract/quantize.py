"""int8 embeddings: ONNX Runtime static quantization of the exported pre-logits module,
calibrated on the user's own images.

Static (not dynamic) quantization because convolutions dominate these networks; QDQ format with
per-channel weights, ONNX Runtime's recommended CPU setting. The quantized file is cached under
the digest of its calibration images' bytes, so shards, resumed runs and cluster workers on this
machine use the very same model. Whether int8 keeps accuracy is measured, not assumed:
benchmarks/int8_probe.py (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from extract.engines import EngineError, onnx_file
from features import OptionError, atomic_path
from features.files import temporary_name

__all__ = ["CALIBRATION_IMAGES", "METHOD", "int8_file"]

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 256  # spread over the listing: "a few hundred of the user's own images"
METHOD = "onnxruntime static int8 (QDQ, per-channel 7-bit weights, MinMax calibration)"


def _path(base: Path, digest: str) -> Path:
    return base.with_name(f"{base.stem}-int8-{digest[:16]}.onnx")


def int8_file(
    backbone, files: Sequence[str], digest: str = "", batch_size: int = 32
) -> tuple[Path, dict[str, Any]]:
    """(quantized ONNX file, the fingerprint's ``quantization`` field).

    With ``digest`` (an entry's earlier calibration) the cached file of that calibration is used;
    otherwise ``files`` are decoded as extraction decodes them and calibrate a new one."""
    base = onnx_file(backbone)
    if digest:
        path = _path(base, digest)
        if not path.is_file():
            raise EngineError(
                f"this int8 entry was calibrated on other images (digest {digest[:12]}), whose "
                f"model is not in {base.parent} (another machine, or a cleared cache); extract "
                "int8 into a new entry (--name) or delete this one"
            )
        return path, {"method": METHOD, "calibration_sha256": digest}
    if not files:
        raise OptionError("--precision int8 needs images to calibrate on")
    batches, shas = _calibration_batches(backbone, files, batch_size)
    if not batches:
        raise OptionError("--precision int8: none of the calibration images could be read")
    digest = hashlib.sha256("\n".join(sorted(shas)).encode()).hexdigest()
    path = _path(base, digest)
    if not path.is_file():
        _quantize(base, path, batches)
    info = {"method": METHOD, "calibration_sha256": digest, "calibration_images": len(shas)}
    return path, info


def _calibration_batches(backbone, files: Sequence[str], batch_size: int):
    """uint8 batches of ``files`` through the extraction loader, and the content hashes read."""
    from extract.loader import make_loader

    loader = make_loader(list(files), backbone.preprocess, batch_size=batch_size, workers=2)
    batches, shas = [], []
    for b in loader:
        if len(b.indices):
            batches.append(b.images.numpy())
            shas += b.sha256
    return batches, shas


def _quantize(base: Path, path: Path, batches: list) -> None:
    """Pre-process (shape inference, graph optimisation), then quantize, atomically: a kill
    never leaves half a model under the cached name."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"images": x}

    t = time.perf_counter()
    pre = temporary_name(path.with_suffix(".pre.onnx"))  # a step only: never kept
    try:
        with atomic_path(path) as tmp:
            quant_pre_process(str(base), str(pre), skip_symbolic_shape=True)
            quantize_static(
                str(pre),
                str(tmp),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                reduce_range=True,
            )  # fmt: skip  (7-bit weights: u8s8 products saturate on CPUs without VNNI, AVX2 ones)
    except Exception as e:  # noqa: BLE001 - an op the quantizer cannot handle: say so
        raise EngineError(
            f"int8 quantization of {base.name} failed ({type(e).__name__}: {e})"
        ) from e
    finally:
        pre.unlink(missing_ok=True)
    n = sum(len(b) for b in batches)
    log.info("int8 model calibrated on %d images in %.0f s: %s", n, time.perf_counter() - t, path)
