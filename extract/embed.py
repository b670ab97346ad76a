"""Embedding files without a store (batch scoring): rebuild a stored backbone, stream its embeddings."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from penult.extract.images import DEFAULT_MAX_PIXELS
from penult.extract.loader import default_workers, make_loader, to_device
from penult.extract.model import Backbone, Embedder, build_backbone
from penult.extract.registry import REGISTRY, get_spec
from penult.extract.weights import WeightsError


@dataclass
class EmbeddedBatch:
    indices: list[int]  # positions in the file list
    sha256: list[str]
    X: np.ndarray  # (len(indices), D) float32
    failed: list[tuple[int, str]] = field(default_factory=list)  # (position, reason)


def backbone_from_fingerprint(
    fingerprint: dict[str, Any],
    *,
    weights: str | os.PathLike[str] | None = None,
    trust_checkpoint: bool = False,
) -> Backbone:
    """Rebuild the backbone a fingerprint describes; refuses weights whose hash differs."""
    name = fingerprint.get("backbone")
    if name is None:  # stores written before the field existed: match the architecture
        arch = fingerprint.get("architecture", "")
        name = next((s.name for s in REGISTRY.values() if f"{s.source}:{s.arch}" == arch), None)
        if name is None:
            raise WeightsError(f"no registry backbone has architecture {arch!r}")
    get_spec(name)
    origin = str(fingerprint.get("weights", ""))
    w = weights or ("random" if origin.startswith("random-init") else "pretrained")
    pre = fingerprint.get("preprocessing", {})
    mode, tta = pre.get("mode", "crop"), pre.get("tta", "none")
    crop_pct = None  # the recorded crop, whether or not it is the weights' own (asking the
    if mode == "crop" and pre.get("resize") and pre.get("crop"):  # weights imports timm)
        crop_pct = pre["crop"] / pre["resize"]
    bb = build_backbone(
        name, weights=w, trust_checkpoint=trust_checkpoint, crop_pct=crop_pct, resize=mode, tta=tta
    )
    if pre and bb.fingerprint["preprocessing"] != pre:
        raise WeightsError(
            f"{name}: cannot rebuild the preprocessing {pre} the model was trained with"
        )
    want = fingerprint.get("weights_sha256")
    if bb.fingerprint["weights_sha256"] != want:
        raise WeightsError(
            f"{name}: weights {w!s} hash {bb.fingerprint['weights_sha256'][:12]}... but the model was "
            f"trained on features from weights {str(want)[:12]}... ({origin}); pass --weights FILE"
        )
    return bb


def embed_files(
    files: Sequence[str],
    backbone: Backbone,
    *,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    engine: str = "torch",
    embedder: Embedder | None = None,
) -> Iterator[EmbeddedBatch]:
    """Yield embeddings of ``files`` batch by batch (memory stays flat however many files);
    ``embedder`` (built once by the caller) serves many calls."""
    if embedder is None:
        embedder = Embedder(
            backbone, device=device, precision=precision, batch_size=batch_size, engine=engine
        )
    n_workers = default_workers(embedder.device) if workers is None else workers
    loader = make_loader(
        list(files),
        backbone.preprocess,
        batch_size=batch_size,
        workers=min(n_workers, max(1, len(files) // batch_size)),
        pin_memory=embedder.device.type == "cuda",
        max_pixels=max_pixels,
    )
    for batch in to_device(iter(loader), embedder.device):
        failed = [(it.index, it.error) for it in batch.failed]
        if batch.indices:
            yield EmbeddedBatch(
                list(batch.indices), list(batch.sha256), embedder(batch.images), failed
            )
        elif failed:
            yield EmbeddedBatch([], [], np.zeros((0, backbone.spec.dim), np.float32), failed)
