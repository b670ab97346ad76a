"""The image side of the CPU stage: what `predict` and `neighbors` (in classify/, which never
imports torch) need from extract/, handed to them as one object the CLI builds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from penult.core.labels import sample_columns
from penult.core.options import option
from penult.extract.names import TORCH_PRECISIONS
from penult.extract.options import RuntimeOptions, SampleOptions
from penult.extract.sources import list_images

__all__ = [
    "Featuriser",
]


@dataclass(frozen=True)
class Featuriser(RuntimeOptions, SampleOptions):
    """Lists image inputs and embeds files with the backbone a fingerprint names (rebuilt with
    the same weights and preprocessing, checked); networks are built once per backbone.
    ``weights`` maps a store entry name to a weights file when it is not the registry's own."""

    weights: dict[str, str] = field(default_factory=dict)
    trust_checkpoint: bool = option(
        False, "allow full pickles in --weights (runs code from the file!)"
    )
    _nets: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    narrowed: ClassVar[dict[str, dict[str, Any]]] = {
        "precision": {
            "help": "as for `penult extract` (an int8 entry runs its own model)",
            "choices": TORCH_PRECISIONS,
        },
        "engine": {
            "help": "what runs the network: torch, onnxruntime, openvino, or auto (the fastest "
            "engine installed here, measured once; see `penult extract --engine`)"
        },
    }

    def __getstate__(self) -> dict[str, Any]:  # sent to Dask workers without its networks
        return {**self.__dict__, "_nets": {}}

    def list(self, source: str) -> tuple[list[tuple[str, str]], list[str], dict[str, list[str]]]:
        """(shown path, absolute path) of every image under ``source`` (a file, folder,
        manifest or file list), the files skipped for their type (shown paths), and the
        images' sample columns (the sample and its metadata; {} without samples)."""
        listing = list_images(source, sample_level=self.sample_level, samples=self.samples)
        folder = os.path.isdir(source)
        files = [
            (
                os.path.join(source, rel) if folder else listing.absolute(i),
                os.path.abspath(listing.absolute(i)),
            )
            for i, rel in enumerate(listing.paths)
        ]
        carried = {c: listing.labels[c] for c in sample_columns(listing.labels)}
        if "object_id" in listing.labels:  # an EcoTaxa export's: predictions name the objects
            carried["object_id"] = listing.labels["object_id"]
        return files, [os.path.join(source, rel) for rel in listing.ignored], carried

    def check(self, name: str, fingerprint: dict[str, Any]) -> None:
        """Build the network now (weights found and matching), before any work is written."""
        self._net(name, fingerprint)

    def embed(
        self, name: str, fingerprint: dict[str, Any], files: list[str]
    ) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
        """(indices into ``files``, their embeddings, (index, why) of files that failed) per batch."""
        from penult.extract.embed import embed_files  # torch: not for `--help`

        net, embedder = self._net(name, fingerprint)
        for b in embed_files(
            files, net.preprocess, embedder, embedder.device, batch_size=self.batch_size,
            workers=self.workers, max_pixels=self.max_pixels,
        ):  # fmt: skip
            yield b.indices, b.X if b.indices else np.zeros((0, net.spec.dim), np.float32), b.failed

    def engines(self) -> list[str]:
        """One line per network built so far: its name, precision and engine."""
        return [
            f"{name}: {e.tag}" + (f" ({e.engine_note})" if e.engine_note else "")
            for name, (_, e) in self._nets.items()
        ]

    def for_worker(self) -> Featuriser:
        from penult.extract.cluster import for_this_worker

        return for_this_worker(self)

    def _net(self, name: str, fingerprint: dict[str, Any]):
        """(backbone, embedder), built once; an int8 entry runs its own quantized model."""
        if name not in self._nets:
            from penult.extract.embed import backbone_from_fingerprint, make_embedder

            net = backbone_from_fingerprint(
                fingerprint, weights=self.weights.get(name), trust_checkpoint=self.trust_checkpoint
            )
            embedder = make_embedder(
                net, device=self.device, precision=self.precision, batch_size=self.batch_size,
                engine=self.engine, quantization=fingerprint.get("quantization"), entry=name,
            )  # fmt: skip
            self._nets[name] = (net, embedder)
        return self._nets[name]
