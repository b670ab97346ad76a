"""penult's Python API for notebooks: open a store, look at it as a DataFrame, train, predict, count.

Everything here is the CPU stage (no torch is imported) except :func:`predict` on image files
that the store does not hold, which embeds them with the model's backbones first::

    import penult

    store = penult.open_store("birds.h5")
    store.table()                                  # one row per image: path, sizes, error, labels
    result = penult.train(store, head="lr")        # held-out metrics in result.metrics
    scored = penult.predict(result.model, store)   # every stored image the model has features for
    penult.count(scored, by="split")               # images per predicted class and split
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from penult.classify import (
    Model,
    TrainOptions,
    TrainResult,
    answers,
    load_model,
    predict_files,
    resolve_backbones,
)
from penult.classify import train as _train
from penult.core import OptionError
from penult.features import FeatureStore

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Store", "count", "load_model", "open_store", "predict", "train"]


@dataclass
class Store:
    """A feature store opened for reading (``features`` is the full :class:`FeatureStore`)."""

    path: Path
    features: FeatureStore

    @property
    def backbones(self) -> list[str]:
        return sorted(self.features.backbones())

    def table(self) -> pd.DataFrame:
        """One row per stored image, indexed by row number: ``path`` (relative to ``root``),
        ``root``, ``sha256``, ``width``, ``height``, ``error`` ("" when it was read), one column
        per label column, and ``has_<backbone>`` (whether that backbone embedded it)."""
        import pandas as pd

        t = self.features.images()
        cols: dict[str, Any] = {
            "path": t.path, "root": t.root, "sha256": t.sha256,
            "width": t.width, "height": t.height, "error": t.error,
        }  # fmt: skip
        cols |= {name: values for name, values in sorted(t.labels.items())}
        cols |= {f"has_{b}": self.features.valid(b) for b in self.backbones}
        return pd.DataFrame(cols)

    def embeddings(self, backbone: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(X, rows)``: the embeddings of every row ``backbone`` holds (the store's only one by
        default) and their row numbers in :meth:`table`."""
        name = backbone or _only(self)
        rows = np.flatnonzero(self.features.valid(name))
        return self.features.embeddings(name, rows), rows


def open_store(path: str | os.PathLike[str]) -> Store:
    """Open a feature store for reading (a clear error when it is not one)."""
    fs = FeatureStore(path)
    return Store(fs.path, fs)


def train(store: Store | str | os.PathLike[str], **options: Any) -> TrainResult:
    """Train a head as ``penult train`` does; ``options`` are :class:`TrainOptions` fields
    (``head="svm"``, ``backbones=("resnet50",)``, ``hierarchical=True``, ``cv=5``, ...).
    Save ``result.model`` with ``penult.classify.save_model``."""
    unknown = sorted(set(options) - set(TrainOptions.__dataclass_fields__))
    if unknown:
        fields = ", ".join(sorted(TrainOptions.__dataclass_fields__))
        raise OptionError(f"train: no option {', '.join(unknown)} (options: {fields})")
    if isinstance(options.get("backbones"), str):
        options["backbones"] = (options["backbones"],)
    return _train(_path(store), TrainOptions(**options))


def predict(
    model: Model | str | os.PathLike[str],
    store: Store | str | os.PathLike[str] | None = None,
    *,
    files: list[str] | None = None,
) -> pd.DataFrame:
    """The model's answer for every image of ``store`` that has its features (CPU only; images
    joined across backbones as `penult train` joins them), or for image ``files`` (embedded
    first with the model's backbones: torch is loaded then). Columns: ``path``, ``label`` (the
    model's unknown label where a one-vs-rest model passes no class), ``probability`` (of that
    label, as `penult predict` writes it), and the store's own label columns for stored images."""
    import pandas as pd

    model = model if isinstance(model, Model) else load_model(model)
    if (store is None) == (files is None):
        raise OptionError("predict: give a store or files, not both")
    if files is not None:
        from penult.extract import Featuriser

        out = predict_files(model, list(files), Featuriser(), top_k=1)
        return pd.DataFrame(
            {
                "path": list(files),
                "label": [o["label"] for o in out],
                "probability": [o["probability"] for o in out],
                "error": [o["error"] for o in out],
            }
        )
    s = store if isinstance(store, Store) else open_store(store)
    names = resolve_backbones(model, s.features)
    rows, _ = s.features.fused_rows(names)
    said = list(answers(model.predict(s.features.fused_embeddings(names, rows)), 1))
    first = rows[0]
    t = s.features.images(first)  # the rows answered for, not the whole table
    frame = pd.DataFrame(
        {
            "path": t.path,
            "label": [label for label, *_ in said],
            "probability": [prob for _, prob, *_ in said],
        },
        index=first,
    )
    for c, values in t.labels.items():
        frame["true_label" if c == "label" else c] = np.asarray(values)
    return frame


def count(frame: pd.DataFrame, *, by: str | None = None, column: str = "label") -> pd.DataFrame:
    """Images per class of ``column`` (predicted labels by default), one column per value of
    ``by`` (a sample or split column) when given, classes sorted; a ``total`` row at the end."""
    import pandas as pd

    for c in (column, by):
        if c is not None and c not in frame.columns:
            raise OptionError(
                f"count: no column {c!r} (columns: {', '.join(map(str, frame.columns))})"
            )
    if by is None:
        out = frame[column].value_counts().sort_index().to_frame("images")
    else:
        out = pd.crosstab(frame[column], frame[by])
    out.loc["total"] = out.sum()
    return out


def _path(store: Store | str | os.PathLike[str]) -> Path:
    return store.path if isinstance(store, Store) else Path(store)


def _only(store: Store) -> str:
    if len(store.backbones) != 1:
        raise OptionError(
            f"{store.path}: name a backbone (the store has {', '.join(store.backbones) or 'none'})"
        )
    return store.backbones[0]
