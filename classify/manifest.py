"""What a model file says about itself (``MODEL.json``, and its copy inside the file), typed.

The JSON on disk is unchanged: :meth:`Manifest.from_json` reads it (a model from any penult,
fields this one does not know kept as they were) and :meth:`Manifest.to_json` writes it. Code
reads fields (``m.label``, ``m.trained_on.split_column``), never ``manifest["..."]`` keys, so a
misspelt or moved field is an AttributeError at once, not a KeyError in one command's corner.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from penult.core.errors import PenultError
from penult.features import Fingerprint

__all__ = ["BackboneUse", "Manifest", "ManifestError", "Refit", "TrainedOn"]


class ManifestError(PenultError, ValueError):
    """A manifest field is missing or of the wrong type."""


@dataclass
class BackboneUse:
    """A store backbone whose embeddings make (part of) the model's features."""

    name: str
    fingerprint: Fingerprint

    def __post_init__(self) -> None:
        if not isinstance(self.fingerprint, Fingerprint):
            self.fingerprint = Fingerprint(self.fingerprint)

    @property
    def dim(self) -> int:
        return int(self.fingerprint["dim"])


@dataclass
class TrainedOn:
    store: str | None  # the store trained from (None: features handed in directly)
    split_column: str
    eval_split: str


@dataclass
class Refit:
    """A model fitted again on every labelled image after it was scored (``--refit-all``)."""

    images: int
    metrics_from: str  # the split (or "K-fold CV") its metrics were measured on
    note: str = ""


# Fields written only when they have a value (older files lack them); the rest always.
_OPTIONAL = (
    "cv", "metrics", "train_counts", "fit_seconds", "refit_all", "refit_seconds",
    "refit_search", "out_of_core", "quantifier", "novelty", "class_thresholds", "format", "version", "created_at", "versions",
    "model_file", "model_sha256",
)  # fmt: skip


@dataclass
class Manifest:
    classes: list[str]
    backbones: list[BackboneUse]
    feature_dim: int
    label: str = "label"
    kind: str = "flat"  # flat, hierarchical or ovr
    head: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # the TrainOptions it was fitted with
    levels: list[str] = field(default_factory=list)  # taxonomy columns, coarse first, label last
    paths: list[list[str]] | None = None  # per class its taxonomy path (None: flat)
    unknown: str | None = None  # the label a one-vs-rest model gives "none of my classes"
    trained_on: TrainedOn | None = None
    # what training measured
    metrics: dict[str, Any] | None = None
    train_counts: dict[str, int] | None = None
    fit_seconds: float | None = None
    cv: dict[str, Any] | None = None
    refit_all: Refit | None = None
    refit_seconds: float | None = None
    refit_search: dict[str, Any] | None = None
    out_of_core: dict[str, Any] | None = None
    quantifier: dict[str, Any] | None = None  # quantify.Calibration: counts beyond CC
    novelty: dict[str, Any] | None = None  # novelty.Novelty.summary(): "not one of my classes"
    # thresholds.tune: {"rule", "thresholds" (class order), "table" (per class, out of fold)}
    class_thresholds: dict[str, Any] | None = None
    # about the file (written by save_model)
    format: str | None = None
    version: int | None = None
    created_at: str | None = None
    versions: dict[str, str] | None = None
    model_file: str | None = None
    model_sha256: str | None = None
    other: dict[str, Any] = field(default_factory=dict)  # fields this penult does not know

    @property
    def backbone_names(self) -> list[str]:
        return [b.name for b in self.backbones]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        """The manifest a JSON object describes; ManifestError names a missing or odd field."""
        if not isinstance(d, dict):
            raise ManifestError(f"a manifest is a JSON object, not {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"other"}
        for need in ("classes", "backbones", "feature_dim"):
            if need not in d:
                raise ManifestError(f"field {need!r} is missing")
        try:
            kw = {k: v for k, v in d.items() if k in known}
            kw["classes"] = [str(c) for c in d["classes"]]
            kw["feature_dim"] = int(d["feature_dim"])
            kw["backbones"] = [
                BackboneUse(str(b["name"]), Fingerprint(b["fingerprint"])) for b in d["backbones"]
            ]
            if d.get("trained_on") is not None:
                kw["trained_on"] = TrainedOn(**d["trained_on"])
            if d.get("refit_all") is not None:
                kw["refit_all"] = Refit(**d["refit_all"])
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"a field is malformed ({type(e).__name__}: {e})") from None
        return cls(**kw, other={k: v for k, v in d.items() if k not in known})

    def to_json(self) -> dict[str, Any]:
        """The JSON object (what ``from_json`` reads back equal)."""
        out = dataclasses.asdict(self)
        other = out.pop("other")
        for k in _OPTIONAL:
            if out[k] is None:
                del out[k]
        if self.trained_on is None:
            del out["trained_on"]
        return {**out, **other}

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)
