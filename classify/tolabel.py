"""What to label next: unlabelled or predicted images ranked by the model's doubt, without
near-duplicates (`penult next`).

Uncertainty sampling by margin (the gap between the model's top two scores, as stored by
`penult annotate`): an image the model hesitates over teaches it most once labelled. Alone it
picks clumps (fifty frames of the same drifting particle), so the queue is filled greedily, most
uncertain first, skipping an image whose embedding is within ``--similarity`` (cosine) of one
already queued.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from penult.classify.clusters import is_open
from penult.classify.csvout import SafeWriter, open_csv
from penult.classify.data import DataError
from penult.classify.train import default_backbones
from penult.core import atomic_path, check_out_folder
from penult.features import STATUSES, FeatureStore

__all__ = ["Queue", "diverse_order", "label_queue", "write_queue"]


def diverse_order(X: np.ndarray, doubt: np.ndarray, n: int, similarity: float) -> np.ndarray:
    """Up to ``n`` positions, most doubtful first, none within cosine ``similarity`` of one
    chosen before it. ``X`` (m, d) embeddings, ``doubt`` (m,) higher first."""
    Z = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    chosen: list[int] = []
    for i in np.argsort(-doubt, kind="stable"):
        if len(chosen) >= n:
            break
        if chosen and float((Z[chosen] @ Z[i]).max()) >= similarity:
            continue
        chosen.append(int(i))
    return np.asarray(chosen, np.int64)


@dataclass
class Queue:
    paths: list[str]
    status: list[str]
    first: np.ndarray  # (n,) the model's first choice
    first_p: np.ndarray
    second: np.ndarray
    second_p: np.ndarray
    candidates: int  # unlabelled or predicted images with a stored prediction
    skipped_similar: int  # doubtful images left out as near-duplicates of one queued


def label_queue(
    store_path: str | os.PathLike[str],
    *,
    n: int = 200,
    level: str = "label",
    similarity: float = 0.95,
    backbone: str | None = None,
) -> Queue:
    """The ``n`` unlabelled or predicted images to label next (see the module docstring)."""
    store = FeatureStore(store_path)
    status = store.provenance(level).status
    pred = store.predictions(level)
    has = pred.labels[:, 0] != ""
    pool = np.flatnonzero(is_open(status) & has)
    if not len(pool):
        raise DataError(
            f"{store.path}: no unlabelled image has a stored prediction; run "
            f"`penult annotate MODEL {store.path}` first"
        )
    name = default_backbones(store, (backbone,) if backbone else ())[0]
    pool = pool[store.valid(name)[pool]]
    s = np.nan_to_num(pred.scores[pool], nan=0.0)
    doubt = 1.0 - (s[:, 0] - s[:, 1])
    # only the most doubtful few thousand can be chosen: look no further than those
    first = np.argsort(-doubt, kind="stable")[: max(20 * n, 2000)]
    srt = np.argsort(pool[first])
    look, d = pool[first][srt], doubt[first][srt]  # store order: contiguous reads
    pick = diverse_order(store.embeddings(name, look), d, n, similarity)
    rows = look[pick]
    more_doubt = int((d >= d[pick].min()).sum()) - len(pick) if len(pick) else 0
    sorted_rows = np.sort(rows)
    where = np.searchsorted(sorted_rows, rows)
    paths = np.asarray(store.paths(sorted_rows), dtype=object)[where].tolist()
    return Queue(
        paths=paths,
        status=[STATUSES[status[r]] for r in rows],
        first=pred.labels[rows, 0],
        first_p=pred.scores[rows, 0],
        second=pred.labels[rows, 1],
        second_p=pred.scores[rows, 1],
        candidates=len(pool),
        skipped_similar=max(more_doubt, 0),
    )


FIELDS = ("rank", "path", "status", "first", "first_p", "second", "second_p", "margin")


def write_queue(q: Queue, out: str | os.PathLike[str]) -> None:
    out = Path(out)
    check_out_folder(out)
    with atomic_path(out) as tmp, open_csv(tmp) as f:
        w = SafeWriter(f)
        w.writerow(FIELDS)
        for i, p in enumerate(q.paths):
            p1, p2 = float(q.first_p[i]), float(np.nan_to_num(q.second_p[i]))
            w.writerow([i + 1, p, q.status[i], q.first[i], f"{p1:.4f}", q.second[i],
                        f"{p2:.4f}", f"{p1 - p2:.4f}"])  # fmt: skip
