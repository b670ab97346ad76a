"""Embedding files: the one loop (read -> network -> embeddings) that extraction, its cluster
tasks, batch scoring (the Featuriser) and fine-tuning's probe all run, the embedder each of them
builds (int8 entries included), and the store-writing loop of `penult extract`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from penult.core import OptionError
from penult.extract.embedder import Embedder, choose_engine
from penult.extract.images import DEFAULT_MAX_PIXELS
from penult.extract.loader import batches
from penult.extract.model import Backbone, build_backbone, pick_optimize
from penult.extract.options import ExtractOptions
from penult.extract.quantize import CALIBRATION_IMAGES, METHOD
from penult.extract.registry import REGISTRY, get_spec
from penult.extract.sources import FolderStream, Listing
from penult.extract.summary import ExtractSummary
from penult.extract.weights import WeightsError
from penult.features import StoreWriter
from penult.features.parts import PartWriter
from tqdm.auto import tqdm

__all__ = [
    "EmbeddedBatch",
    "backbone_from_fingerprint",
    "build_embedder",
    "embed_files",
    "embed_into",
    "make_embedder",
]


@dataclass
class EmbeddedBatch:
    indices: list[int]  # positions in the file list
    sha256: list[str]
    X: np.ndarray  # (len(indices), D) float32
    failed: list[tuple[int, str]] = field(default_factory=list)  # (position, reason)
    failed_sha256: list[str] = field(default_factory=list)  # of each failed file ("" if unread)
    width: list[int] = field(default_factory=list)  # decoded size of each embedded image
    height: list[int] = field(default_factory=list)


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
        name = next((s.name for s in REGISTRY.values() if s.architecture == arch), None)
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
    pre,
    embed: Callable[[torch.Tensor], np.ndarray],
    device: torch.device,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[EmbeddedBatch]:
    """Embeddings of ``files`` batch by batch (memory stays flat however many files): each file
    read and preprocessed by ``pre`` in the loader's processes, then ``embed`` (an
    :class:`Embedder`, or any network's forward) run on the batch on ``device``."""
    for b in batches(
        list(files), pre, device, batch_size=batch_size, workers=workers, max_pixels=max_pixels
    ):
        failed = [(it.index, it.error) for it in b.failed]
        failed_sha = [it.sha256 for it in b.failed]
        if b.indices:
            yield EmbeddedBatch(
                list(b.indices), list(b.sha256), embed(b.images), failed, failed_sha,
                list(b.width), list(b.height),
            )  # fmt: skip
        elif failed:
            yield EmbeddedBatch([], [], np.zeros((0, 0), np.float32), failed, failed_sha)


def make_embedder(
    backbone: Backbone,
    *,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 32,
    engine: str = "auto",
    quantization: dict[str, Any] | None = None,
    int8_digest: str = "",
    calibration: Sequence[str] = (),
    progress: bool = False,
    entry: str = "",
    optimize: str = "eager",
    images: int | None = None,
) -> Embedder:
    """The embedder for ``backbone``. A stored int8 entry (``quantization`` from its fingerprint)
    runs its own quantized model, made by this version's method, whatever engine was asked;
    ``precision="int8"`` runs the calibration ``int8_digest`` names, or calibrates on the files
    ``calibration``. ``entry``: the store entry's name, for messages; ``images``: how many the
    run embeds, where known (see ``choose_engine``)."""
    digest = int8_digest
    if isinstance(quantization, dict):
        if quantization.get("method") != METHOD:  # made by the int8 trial before NNCF
            raise OptionError(
                f"{entry or backbone.name} was quantized by {quantization.get('method')!r}, which this "
                f"version does not run; extract it again with --precision int8 (now {METHOD})"
            )
        engine, precision = "openvino", "int8"
        digest = quantization.get("calibration_sha256", "")
    choice = choose_engine(
        backbone, device=device, precision=precision, batch_size=batch_size, engine=engine,
        calibration=list(calibration), int8_digest=digest, progress=progress, images=images,
    )  # fmt: skip
    return Embedder(backbone, choice, batch_size=batch_size, optimize=optimize)


def build_embedder(
    opts: ExtractOptions, listing: Listing | FolderStream | None = None, store_path=None
):
    """(backbone, embedder, store entry name, fingerprint) for an extraction. An int8 entry
    already in the store keeps its calibration; a new one calibrates on images of ``listing``."""
    backbone = build_backbone(
        opts.backbone,
        weights=opts.weights,
        trust_checkpoint=opts.trust_checkpoint,
        crop_pct=opts.crop_pct,
        resize=opts.resize,
        tta=opts.tta,
    )
    name = opts.name or backbone.name + ("@int8" if opts.precision == "int8" else "")
    digest, calibration = opts.int8_digest, []
    if opts.precision == "int8" and not digest:
        digest = _stored_calibration(store_path, name)
        if not digest and listing is not None:
            calibration = listing.sample_files(CALIBRATION_IMAGES)
    embedder = make_embedder(
        backbone, device=opts.device, precision=opts.precision, batch_size=opts.batch_size,
        engine=opts.engine, int8_digest=digest, calibration=calibration, progress=opts.progress,
        images=listing.hint if listing is not None else None,
    )  # fmt: skip
    fingerprint = {**backbone.fingerprint, "precision": embedder.tag}
    if embedder.int8:
        fingerprint["quantization"] = {
            k: embedder.int8[k] for k in ("method", "calibration_sha256")
        }  # (how many images is not part of the identity)
    return backbone, embedder, name, fingerprint


def _stored_calibration(store_path, name: str) -> str:
    """The calibration digest of int8 entry ``name`` when the store has it, else ""."""
    from penult.features import FeatureStore

    if store_path is None or not Path(store_path).exists():
        return ""
    entry = FeatureStore(store_path).backbones().get(name)
    q = entry.fingerprint.get("quantization") if entry else None
    return q.get("calibration_sha256", "") if isinstance(q, dict) else ""


class _Pending:
    """Rows embedded or failed since the last commit; ``flush`` hands them to the writer at once."""

    def __init__(self, w: StoreWriter | PartWriter, name: str):
        self.w, self.name = w, name
        self.rows: dict[str, list] = {"path": [], "sha": [], "x": [], "w": [], "h": []}
        self.fails: dict[str, list] = {"path": [], "sha": [], "why": []}

    def __len__(self) -> int:
        return len(self.rows["path"]) + len(self.fails["path"])

    def fail(self, path: str, sha: str, why: str) -> None:
        for k, v in (("path", path), ("sha", sha), ("why", why)):
            self.fails[k].append(v)

    def add(self, path: str, sha: str, x: np.ndarray, width: int, height: int) -> None:
        for k, v in (("path", path), ("sha", sha), ("x", x), ("w", width), ("h", height)):
            self.rows[k].append(v)

    def flush(self) -> None:
        r = self.rows
        if r["path"]:
            x = np.concatenate(r["x"])
            h, wd = np.array(r["h"]), np.array(r["w"])
            self.w.append(self.name, r["path"], r["sha"], x, width=wd, height=h)
        self.w.record_failures(self.fails["path"], self.fails["sha"], self.fails["why"])
        for d in (self.rows, self.fails):
            for v in d.values():
                v.clear()


def embed_into(
    w: StoreWriter | PartWriter,
    name: str,
    listing: Listing,
    sha: list[str],
    todo: list[int],
    embedder: Embedder,
    pre,
    opts: ExtractOptions,
    s: ExtractSummary,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Embed the listed files ``todo`` into ``w`` as entry ``name``, committing every
    ``opts.commit_every`` rows; failures and files changed since hashing (``sha``) are recorded,
    not embedded. ``on_batch(n)`` is told of every ``n`` images done."""
    optimize = pick_optimize(opts.optimize, embedder.device, len(todo))
    # (a runtime has its own graph; a listing in pieces compiles once, for its first piece)
    if embedder.engine == "torch" and optimize == "inductor" and embedder.optimize == "eager":
        t = time.perf_counter()
        embedder.compile()
        embedder.warmup(pre.crop)
        s.compile_seconds += time.perf_counter() - t
    pending = _Pending(w, name)
    bar = tqdm(
        total=len(todo), desc=f"extract {name}", unit="img", disable=not opts.progress,
        smoothing=0.1,
    )  # fmt: skip
    t_loop = time.perf_counter()
    try:
        for b in embed_files(
            [listing.absolute(i) for i in todo], pre, embedder, embedder.device,
            batch_size=opts.batch_size, workers=opts.workers, max_pixels=opts.max_pixels,
        ):  # fmt: skip
            if b.indices and not s.warmup_images:
                s.warmup_seconds, s.warmup_images = time.perf_counter() - t_loop, len(b.indices)
            for (j, why), digest in zip(b.failed, b.failed_sha256, strict=True):
                pending.fail(listing.paths[todo[j]], digest, why)
                s.add_failed([(listing.paths[todo[j]], why)])
            for k, j in enumerate(b.indices):
                i = todo[j]
                if b.sha256[k] != sha[i]:
                    s.add_failed([(listing.paths[i], "file changed while extracting; run again")])
                    continue
                pending.add(listing.paths[i], sha[i], b.X[k : k + 1], b.width[k], b.height[k])
                s.extracted += 1
            n = len(b.indices) + len(b.failed)
            bar.update(n)
            bar.set_postfix(failed=s.failed_count, refresh=False)
            if on_batch is not None:
                on_batch(n)
            if len(pending) >= opts.commit_every:
                pending.flush()
    except KeyboardInterrupt:
        s.interrupted = True
    else:
        s.optimize = embedder.optimize
    finally:
        s.loop_seconds = time.perf_counter() - t_loop
        bar.close()
        pending.flush()
