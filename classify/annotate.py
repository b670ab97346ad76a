"""A model's predictions into the store, for review (`penult annotate`).

EcoTaxa keeps the top predictions with their scores beside each object and marks the object
``predicted`` until a person validates it. Here the store keeps each image's top 3 labels and
scores per level, and images without a validated (or dubious) label get status ``predicted``;
their label stays empty, so a prediction never trains a model until someone validates it. Scored
from the stored embeddings: no network runs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
from penult.classify.model import Model, resolve_backbones
from penult.features import VALIDATED, FeatureStore, StoreWriter

__all__ = ["AnnotateSummary", "annotate_store"]


@dataclass
class AnnotateSummary:
    store: str
    model: str
    level: str
    scored: int = 0
    skipped_validated: int = 0
    no_features: int = 0
    top: dict[str, int] = field(default_factory=dict)  # images per predicted label
    seconds: float = 0.0

    def report(self) -> str:
        lines = [
            f"{self.store}: {self.scored} images given model {self.model}'s top 3 {self.level!r} "
            f"labels in {self.seconds:.1f} s",
        ]
        if self.skipped_validated:
            lines.append(
                f"  {self.skipped_validated} images with a validated label left as they are (--all scores them too)"
            )
        if self.no_features:
            lines.append(
                f"  {self.no_features} images lack the model's embeddings (extract them first)"
            )
        for label, n in sorted(self.top.items(), key=lambda kv: -kv[1])[:10]:
            lines.append(f"  {n:7d}  {label}")
        return "\n".join(lines)


def annotate_store(
    model: Model,
    store_path: str | os.PathLike[str],
    *,
    everything: bool = False,
    chunk: int = 4096,
) -> AnnotateSummary:
    """Store ``model``'s top 3 labels of its level for the store's images without a validated
    label (``everything``: for all), one journal shard per ``chunk`` images, one commit."""
    t0 = time.perf_counter()
    store = FeatureStore(store_path)
    names = resolve_backbones(model, store)
    level = model.manifest.label
    tag = str(model.manifest.model_sha256 or "unsaved")[:12]
    s = AnnotateSummary(str(store.path), tag, level)
    rows = store.fused_rows(names)[0]
    s.no_features = len(store) - len(rows[0])
    if not everything and level in store.label_columns():
        open_ = store.provenance(level, rows[0]).status != VALIDATED
        s.skipped_validated = int((~open_).sum())
        rows = [r[open_] for r in rows]
    counts: dict[str, int] = {}
    with StoreWriter(store.path) as w:
        if level not in w.store.label_columns():  # a store without that level yet: make it
            w.set_labels(level, [], [])
        for a in range(0, len(rows[0]), chunk):
            part = [r[a : a + chunk] for r in rows]
            pred = model.predict(store.fused_embeddings(names, part))
            labels, scores = pred.top(3)
            w.predictions(level, store.paths(part[0]), labels, scores, model=tag)
            for k, v in zip(*np.unique(labels[:, 0], return_counts=True), strict=True):
                counts[str(k)] = counts.get(str(k), 0) + int(v)
            s.scored += len(part[0])
    s.top, s.seconds = counts, time.perf_counter() - t0
    return s
