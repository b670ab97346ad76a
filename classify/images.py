"""What the CPU stage needs from the image side, as a protocol: classify/ never imports torch
or extract/; the CLI hands it an ``extract.Featuriser``, which does this."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np


class Images(Protocol):
    def list(self, source: str) -> tuple[list[tuple[str, str]], list[str], dict[str, list[str]]]:
        """(shown path, absolute path) of every image under ``source``; the files skipped
        for their type; and the images' sample columns (name -> one value per image)."""
        ...

    def check(self, name: str, fingerprint: dict[str, Any]) -> None:
        """Refuse now a backbone that cannot be rebuilt (weights missing or different)."""
        ...

    def embed(
        self, name: str, fingerprint: dict[str, Any], files: list[str]
    ) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
        """(indices into ``files``, embeddings, (index, why) of failures) per batch, made by the
        backbone the fingerprint names."""
        ...

    def for_worker(self) -> Images:
        """This object fitted to the Dask worker it runs on (threads, loader, GPU)."""
        ...
