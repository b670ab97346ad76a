"""What `penult extract` is asked: every option declared once (flags, defaults, --help)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from penult.core import OptionError
from penult.core.options import COUNT, CROP, DEFAULT_MAX_PIXELS, POSITIVE, option, parse_shard
from penult.extract.names import (
    DEFAULT_BACKBONE,
    ENGINES,
    OPTIMIZE,
    PRECISIONS,
    RESIZE_MODES,
    TTA_MODES,
)

__all__ = [
    "ExtractOptions",
    "RuntimeOptions",
    "SampleOptions",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeOptions:
    """How a network runs over images: declared once here, and the same fields (flags, defaults,
    help) in every command that runs one. ExtractOptions, FinetuneOptions and the Featuriser are
    RuntimeOptions; a command narrows a field's choices or words its help in ``narrowed``."""

    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")
    precision: str = option(
        "auto",
        "auto: bf16 on CPUs with native bf16 (AVX-512 BF16, AMX: torch and OpenVINO; ONNX "
        "Runtime stays fp32), fp16/bf16 on CUDA, else fp32. int8: "
        "OpenVINO NNCF quantization calibrated on 256 of your images, into an entry of its own "
        "(NAME@int8; needs penult[openvino]); on cub100 it kept linear-probe top-1 within 0.5 "
        "points of fp32 (docs/BENCHMARKS.md)",
        choices=PRECISIONS,
    )
    engine: str = option(
        "auto",
        "what runs the network: torch, onnxruntime or openvino (CPU; the same module exported to "
        "ONNX once, cached beside torch's weights); auto = on CPU the fastest of torch, ONNX "
        "Runtime and OpenVINO where installed, timed on a few batches (cached per CPU model and "
        "architecture; PENULT_AUTO_ENGINES=onnxruntime limits the runtimes it tries), torch on CUDA",
        choices=ENGINES,
    )
    batch_size: int = option(32, "images per batch", parse=POSITIVE)
    workers: int | None = option(
        None, "loader processes (default: by device and cores)", parse=COUNT
    )
    max_pixels: int = option(
        DEFAULT_MAX_PIXELS, "larger images are refused as decompression bombs", parse=POSITIVE
    )

    narrowed: ClassVar[dict[str, dict[str, Any]]] = {}  # field -> Flag fields to override

    def __post_init__(self) -> None:
        for name, flag in self.narrowed.items():
            allowed = flag.get("choices")
            if allowed is not None and getattr(self, name) not in allowed:
                raise OptionError(
                    f"{type(self).__name__}: {name} {getattr(self, name)!r} is not one of "
                    f"{', '.join(map(str, allowed))}"
                )


@dataclass(frozen=True)
class SampleOptions:
    """Where each image's sample (an IFCB bin, a net tow, a day) comes from, besides a
    manifest's ``sample`` column: declared once for `extract` and `predict`."""

    sample_level: int | None = option(
        None,
        "each image's sample is the folder this many steps above it (1: its own folder, which is "
        "then not its class); stored and carried into every CSV like a label",
        parse=POSITIVE,
        metavar="K",
    )
    samples: str | None = option(
        None,
        "CSV of sample metadata (a 'sample' column plus volume_ml, time, lat, lon, depth, ...) "
        "joined onto each image by its sample",
        metavar="FILE",
    )


@dataclass(frozen=True)
class ExtractOptions(RuntimeOptions):
    backbone: str = option(DEFAULT_BACKBONE, "registry name (see `penult backbones`)")
    weights: str = option(
        "pretrained", "'pretrained' (library default/cache), 'random', or a state-dict FILE"
    )
    name: str | None = option(
        None, "store entry name (default: backbone name, plus weights hash for a file)"
    )
    crop_pct: float | None = option(
        None,
        "centre crop as a fraction of the resized image (default: the weights' own, e.g. 0.875); "
        "1.0 keeps the whole image, for photos already cropped to the subject. Stored as NAME@cropNN",
        parse=CROP,
    )
    resize: str = option(
        "auto",
        "how images become squares: crop (the weights' resize + centre crop: photos), whole (the "
        "whole image squashed: photos already cropped to the subject) or pad (aspect kept, padded "
        "with the image's border colour: plankton, microscope images, long thin subjects); auto = "
        "pad when most of a sample of the images is greyscale, else crop. Stored as NAME@whole / "
        "NAME@pad",
        choices=("auto", *RESIZE_MODES),
    )
    tta: str = option(
        "none",
        "flip: store the mean embedding of each image and its mirror image (decoded once, twice "
        "the network time). Stored as NAME@flip",
        choices=TTA_MODES,
    )
    trust_checkpoint: bool = option(
        False, "allow full pickles in --weights (runs code from the file!)"
    )
    optimize: str = option(
        "auto",
        "inductor = torch.compile with frozen weights (10-40 s compile, about 1.5x faster on "
        "CPU); auto uses it on CPU from 10,000 images",
        choices=OPTIMIZE,
    )
    dtype: str = option("float32", "storage dtype of embeddings", choices=("float32", "float16"))
    commit_every: int = option(
        512, "rows per journal commit (the most a crash can lose)", parse=POSITIVE
    )
    retry_failed: bool = option(False, "try again images that failed in an earlier run")
    progress: bool = option(True, "no progress bar", flags=("-q", "--quiet"))
    shard: tuple[int, int] | None = option(
        None,
        "embed only shard I of N (0-based; a fixed split of the paths) into a part beside the "
        "store, for job arrays; run `penult merge STORE` when the shards are done. A shard run "
        "again after a kill resumes its part",
        parse=parse_shard,
        metavar="I/N",
    )
    cluster: str | None = option(
        None,
        "embed on Dask: local[:N] (N worker processes; default one per GPU, else 2), "
        "tcp://HOST:PORT (a running scheduler) or slurm[:JOBS] (dask-jobqueue, configured in "
        "~/.config/dask/jobqueue.yaml). The driver plans, workers write parts, the driver "
        "publishes them; needs `pip install 'penult[dask]'`",
        metavar="SPEC",
    )
    partition_size: int = option(
        2048,
        "images per Dask task with --cluster: larger means less scheduling, smaller means less "
        "redone when a worker dies",
        parse=POSITIVE,
        metavar="N",
    )
    int8_digest: str = ""  # an int8 entry's calibration (set by the driver for its workers)
