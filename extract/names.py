"""The names extraction options choose from (engines, precisions, resize modes, ...), in a module
that imports nothing heavy: `penult extract --help` builds its arguments from these, and must answer
without importing torch (4 s of every start on a slow machine)."""

from __future__ import annotations

__all__ = [
    "DEFAULT_BACKBONE",
    "ENGINES",
    "OPTIMIZE",
    "PRECISIONS",
    "RESIZE_MODES",
    "TORCH_PRECISIONS",
    "TTA_MODES",
]

ENGINES = ("auto", "torch", "onnxruntime", "openvino")
TORCH_PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # autocast; training takes only these
PRECISIONS = (*TORCH_PRECISIONS, "int8")  # int8: OpenVINO NNCF quantization (extract.quantize)
OPTIMIZE = ("auto", "eager", "inductor")
RESIZE_MODES = ("crop", "whole", "pad")
TTA_MODES = ("none", "flip")
DEFAULT_BACKBONE = "efficientnet_lite0"
