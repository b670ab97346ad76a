"""What an extraction did, for its report: counts, timings, engines and failures."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

FAILED_KEPT = 1000  # failures named in a summary; a run of 100 M images must not hold them all


@dataclass
class ExtractSummary:
    store: Path
    backbone: str
    device: str = ""
    precision: str = ""
    listed: int = 0
    extracted: int = 0
    reused: int = 0  # same bytes already embedded under another path: copied, not recomputed
    skipped: int = 0  # already in the store
    previously_failed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # the first FAILED_KEPT
    failed_count: int = 0  # all of them (each is recorded in the store with its reason)
    ignored: list[str] = field(default_factory=list)  # (a streamed listing names the first ones)
    ignored_count: int = 0
    optimize: str = "eager"
    seconds: float = 0.0
    loop_seconds: float = 0.0
    compile_seconds: float = 0.0
    warmup_seconds: float = 0.0  # loader start + first batch (compile is timed apart, before)
    warmup_images: int = 0
    interrupted: bool = False
    resize: str = ""  # what --resize auto chose, and why
    engine: str = ""
    engine_note: str = ""  # what --engine auto measured
    cache_notes: list[str] = field(default_factory=list)  # engine cache entries found bad, remade
    publishing: list[str] = field(default_factory=list)  # how a cluster run's parts were published
    relabelled: dict[str, int] = field(default_factory=dict)  # stored images given a new value

    def add_failed(self, failed: list[tuple[str, str]], count: int | None = None) -> None:
        """Count ``failed`` ((path, why); ``count`` of them where more were left out) and keep
        the first FAILED_KEPT of the run."""
        self.failed += failed[: max(0, FAILED_KEPT - len(self.failed))]
        self.failed_count += len(failed) if count is None else count

    @property
    def images_per_s(self) -> float:
        """End to end: model build, hashing, compile and commits included."""
        return self.extracted / self.seconds if self.seconds else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """After the first batch: the rate a long run settles at."""
        t = self.loop_seconds - self.warmup_seconds
        return (self.extracted - self.warmup_images) / t if t > 0 else 0.0

    def report(self, max_failed: int = 20) -> str:
        lines = [
            f"{self.backbone} -> {self.store} on {self.device} ({self.precision}, {self.engine}"
            + (f", {self.optimize})" if self.engine == "torch" else ")")
            + (
                "  INTERRUPTED: finished batches are saved; run again to resume"
                if self.interrupted
                else ""
            ),
            f"  listed {self.listed}: extracted {self.extracted}, already stored {self.skipped}, "
            f"copied from identical files {self.reused}, failed {self.failed_count}"
            + (
                f", skipped as failed before {self.previously_failed} (--retry-failed)"
                if self.previously_failed
                else ""
            ),
            f"  time {self.seconds:.1f} s, {self.images_per_s:.1f} images/s"
            + (
                f" ({self.steady_images_per_s:.1f}/s after the first batch)"
                if self.warmup_images and self.extracted > self.warmup_images  # one batch: no rate
                else ""
            )
            + (f", compile {self.compile_seconds:.0f} s" if self.compile_seconds else ""),
        ]
        if self.relabelled:
            what = ", ".join(f"{c} {n}" for c, n in self.relabelled.items())
            lines.append(
                f"  labels changed for stored images: {what} (labels a person set in review "
                "are kept)"
            )
        if self.resize:
            lines.append(f"  resize {self.resize}; pin it with --resize")
        if self.engine_note:
            lines.append(f"  engine {self.engine} ({self.engine_note}); pin it with --engine")
        lines += [f"  engine cache: {n}" for n in self.cache_notes]
        lines += [f"  parts: {n}" for n in self.publishing]
        if self.ignored:
            n = max(self.ignored_count, len(self.ignored))
            lines.append(f"  ignored {n} non-image files, e.g. {self.ignored[0]}")
        for p, why in self.failed[:max_failed]:
            lines.append(f"  FAILED {p}: {why}")
        if self.failed_count > max_failed:
            lines.append(f"  ... and {self.failed_count - max_failed} more (see `penult info`)")
        return "\n".join(lines)
