"""A listing: images (relative POSIX paths under a root, sorted) with their label columns, what
extraction runs over. A folder tree too big to hold is a stream of listings (``extract.walk``)."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from penult.core.errors import PenultError

__all__ = ["Listing", "SourceError"]


class SourceError(PenultError):
    """The input cannot be listed (missing, empty, malformed manifest)."""


@dataclass
class Listing:
    root: Path
    paths: list[str]
    labels: dict[str, list[str]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    origin: str = ""  # the folder or file the labels came from (their provenance in the store)
    # An EcoTaxa export's per-image status ("", predicted, validated, dubious) and the category
    # of a predicted one (whose label stays empty: a prediction trains nothing until validated)
    status: list[str] = field(default_factory=list)
    predicted: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def absolute(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    @property
    def hint(self) -> int:
        """How many images a run over this listing sees (a stream's is a survey's count)."""
        return len(self.paths)

    def sample_files(self, n: int) -> list[str]:
        """Up to ``n`` files spread evenly over the listing (absolute paths): what ``--resize
        auto`` and int8 calibration look at."""
        from penult.extract.images import spread

        return [self.absolute(i) for i in spread(len(self), n)]

    def chunks(self) -> Iterator[Listing]:
        """The listing in pieces extraction takes one after another: a listing is one piece."""
        yield self

    def shard(self, i: int, n: int) -> Listing:
        """Shard ``i`` of ``n``: the paths whose CRC-32 is ``i`` modulo ``n`` (the same split for
        every process and every run, whatever else the folder holds)."""
        if not 0 <= i < n:
            raise SourceError(f"shard {i}/{n}: need 0 <= I < N")
        keep = [
            k
            for k, p in enumerate(self.paths)
            if zlib.crc32(p.encode("utf-8", "surrogateescape")) % n == i
        ]
        return Listing(
            root=self.root,
            paths=[self.paths[k] for k in keep],
            labels={c: [v[k] for k in keep] for c, v in self.labels.items()},
            ignored=self.ignored,
            notes=self.notes,
            origin=self.origin,
            status=[self.status[k] for k in keep] if self.status else [],
            predicted=[self.predicted[k] for k in keep] if self.predicted else [],
        )
