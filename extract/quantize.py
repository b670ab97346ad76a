"""int8 embeddings: OpenVINO NNCF post-training quantization of the exported pre-logits module,
calibrated on the user's own images, run by OpenVINO.

Why NNCF and not ONNX Runtime's static quantizer: on cub100 ONNX Runtime's int8 (QDQ, per-channel
7-bit weights) lost 3.1 points of linear-probe top-1; NNCF's min-max ranges with fast bias
correction, with the first convolution kept in fp32 (it reads the normalised pixels, whose
errors every later layer inherits), lost 0.3 (docs/BENCHMARKS.md, "int8"). The quantized model is
cached under the digest of its calibration images' bytes, so shards, resumed runs and cluster
workers on this machine use the very same model. Whether int8 keeps accuracy is measured, not
assumed: benchmarks/precision_probe.py.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext, redirect_stdout
from pathlib import Path
from typing import Any

from penult.core import OptionError, atomic_path
from penult.core.files import temporary_name
from penult.extract.engines import INSTALL, EngineError, onnx_file

__all__ = ["CALIBRATION_IMAGES", "METHOD", "int8_file"]

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 256  # spread over the listing: "a few hundred of the user's own images"
METHOD = "openvino nncf int8 (min-max, fast bias correction, first convolution fp32)"


def _path(base: Path, digest: str) -> Path:
    """OpenVINO's IR: this .xml names the graph, a .bin of the same stem holds the weights."""
    return base.with_name(f"{base.stem}-int8-{digest[:16]}.xml")


def int8_file(
    backbone, files: Sequence[str], digest: str = "", batch_size: int = 32, progress: bool = True
) -> tuple[Path, dict[str, Any]]:
    """(quantized OpenVINO model file, the fingerprint's ``quantization`` field).

    With ``digest`` (an entry's earlier calibration) the cached file of that calibration is used;
    otherwise ``files`` are decoded as extraction decodes them and calibrate a new one (with
    NNCF's progress bars where ``progress``)."""
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
        _quantize(base, path, batches, progress)
    info = {"method": METHOD, "calibration_sha256": digest, "calibration_images": len(shas)}
    return path, info


def _calibration_batches(backbone, files: Sequence[str], batch_size: int):
    """uint8 batches of ``files`` through the extraction loader, and the content hashes read."""
    from penult.extract.loader import make_loader

    loader = make_loader(list(files), backbone.preprocess, batch_size=batch_size, workers=2)
    batches, shas = [], []
    for b in loader:
        if len(b.indices):
            batches.append(b.images.numpy())
            shas += b.sha256
    return batches, shas


def _quantize(base: Path, path: Path, batches: list, progress: bool = True) -> None:
    """NNCF over OpenVINO's reading of the ONNX export; the IR is written weights first, graph
    last, each renamed into place: a kill never leaves a graph without its weights."""
    # importing NNCF loads torch's C++-extension helper, which warns "No CUDA runtime is found"
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        import nncf
        import openvino as ov
    except ImportError as e:
        raise EngineError(
            f"--precision int8 needs OpenVINO and NNCF: {INSTALL['openvino']} ({e})"
        ) from e

    nncf.set_log_level(logging.WARNING)  # its per-node notes, not the user's business
    t = time.perf_counter()
    try:
        model = ov.convert_model(str(base))
        first = next(
            op.get_friendly_name()
            for op in model.get_ordered_ops()
            if op.get_type_name() == "Convolution"
        )
        # NNCF draws its bars (rich) on whatever sys.stdout is at the time: -q hides them
        quiet = nullcontext() if progress else redirect_stdout(io.StringIO())
        with quiet:
            quantized = nncf.quantize(
                model, nncf.Dataset(batches), subset_size=len(batches),  # items are batches
                ignored_scope=nncf.IgnoredScope(names=[first]),
            )  # fmt: skip
        tmp = temporary_name(path)
        tmp_xml, tmp_bin = tmp.with_name(tmp.name + ".xml"), tmp.with_name(tmp.name + ".bin")
        with atomic_path(path, tmp=tmp_xml), atomic_path(path.with_suffix(".bin"), tmp=tmp_bin):
            ov.save_model(quantized, str(tmp_xml), compress_to_fp16=False)
    except Exception as e:  # noqa: BLE001 - an op the quantizer cannot handle: say so
        raise EngineError(
            f"int8 quantization of {base.name} failed ({type(e).__name__}: {e})"
        ) from e
    n = sum(len(b) for b in batches)
    log.info("int8 model calibrated on %d images in %.0f s: %s", n, time.perf_counter() - t, path)
