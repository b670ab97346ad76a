"""A trained model on disk: one skops file (the head pipeline) plus a JSON manifest beside it.

The manifest records what the head needs to be used honestly: the classes and taxonomy, the
backbone fingerprints its features came from, metrics, library versions and the SHA-256 of the
model file. The model file carries its own copy of that manifest (format 2), so an edited
``classes`` or fingerprint in the JSON is caught: the two must agree. Loading checks the hash, then
reads the file's schema as plain JSON and lets skops rebuild it only if every node is one of the
exact types penult's own models contain (``classify.safe_types``); anything else (a function, a
constructor call, a foreign or re-exported class) is refused unless the user passes
``trust=True``. No pickle is ever executed.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from penult.classify.manifest import Manifest, ManifestError
from penult.classify.novelty import Novelty
from penult.core.errors import PenultError
from penult.core.files import atomic_path, file_sha256
from penult.features import FeatureStore
from sklearn.base import BaseEstimator

FORMAT = "penult-model"
# 4: the file may hold the open-set score's arrays ({"estimator", "manifest", "novelty"});
# 3: the manifest may hold the quantifier calibration (older penults must not drop it);
# 2: the model file holds {"estimator", "manifest"}; 1: the bare estimator
VERSION = 4
# Manifest fields that describe the file itself, written after it (not part of the embedded copy).
_FILE_FIELDS = ("model_file", "model_sha256")


class ModelError(PenultError, ValueError):
    """A model file is missing, tampered with, unsafe, or does not fit the features offered."""


@dataclass
class Predictions:
    """What a model says about n images."""

    label: np.ndarray  # (n,) predicted class (or the model's unknown label)
    proba: np.ndarray  # (n, n_classes) probabilities in ``classes`` order
    classes: np.ndarray
    path: np.ndarray | None = None  # (n, depth) predicted taxonomy path, coarse first
    unknown: np.ndarray | None = None  # (n,) "not one of my classes" (open-set score or ovr)
    novelty: np.ndarray | None = None  # (n,) the open-set score (higher: less like training)
    below: np.ndarray | None = None  # (n,) the winner's posterior is below its class threshold

    @property
    def flagged(self) -> np.ndarray | None:
        """(n,) given no class: "not one of my classes" (open-set score or ovr), or below its
        class threshold; None where the model can say neither."""
        if self.unknown is None or self.below is None:
            return self.below if self.unknown is None else self.unknown
        return self.unknown | self.below

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, k) labels and probabilities, best first."""
        order = np.argsort(-self.proba, axis=1, kind="stable")[:, :k]
        return self.classes[order], np.take_along_axis(self.proba, order, axis=1)


@dataclass
class Model:
    estimator: BaseEstimator
    manifest: Manifest  # a JSON object (dict) given here is read as one
    novelty: Novelty | None = None  # the open-set score; None: only ovr can say "unknown"

    def __post_init__(self) -> None:
        if isinstance(self.manifest, dict):
            self.manifest = Manifest.from_json(self.manifest)

    @property
    def classes(self) -> np.ndarray:
        return np.asarray(self.manifest.classes, dtype=str)

    @property
    def backbones(self) -> list[str]:
        return self.manifest.backbone_names

    @property
    def levels(self) -> list[str]:
        return list(self.manifest.levels)

    @property
    def paths(self) -> np.ndarray | None:
        """(n_classes, depth) taxonomy path per class, coarse first, class last (None if flat)."""
        p = self.manifest.paths
        return np.asarray(p, dtype=str) if p else None

    @property
    def unknown(self) -> str | None:
        return self.manifest.unknown

    def predict(self, X: np.ndarray) -> Predictions:
        """Run the head on (n, D) features (the backbones' embeddings concatenated in order)."""
        dim = self.manifest.feature_dim
        if X.ndim != 2 or X.shape[1] != dim:
            raise ModelError(
                f"model expects {dim}-d features ({' + '.join(self.backbones)}), got shape {X.shape}"
            )
        proba = self.estimator.predict_proba(X)
        classes = self.classes
        label = np.asarray(self.estimator.predict(X)).astype(str)
        col = {c: i for i, c in enumerate(classes)}
        idx = np.array([col.get(c, -1) for c in label], np.int64)  # -1: ovr's unknown
        path = None
        if self.paths is not None:
            path = self.paths[np.maximum(idx, 0)]
            if self.unknown is not None:
                path[label == self.unknown] = self.unknown
        unknown = novelty = None
        if self.novelty is not None:
            novelty = self.novelty.scores(X, proba)
            unknown = novelty > self.novelty.threshold
        if self.unknown is not None:
            said = label == self.unknown
            unknown = said if unknown is None else unknown | said
        below = None
        if self.manifest.class_thresholds:  # IFCB practice: below its class's threshold
            thr = np.asarray(self.manifest.class_thresholds["thresholds"], float)
            has = idx >= 0
            below = np.zeros(len(label), bool)
            below[has] = proba[has, idx[has]] < thr[idx[has]]
        return Predictions(label, proba, classes, path, unknown, novelty, below)


def manifest_path(path: str | os.PathLike[str]) -> Path:
    return Path(f"{path}.json")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("penult", "scikit-learn", "numpy", "skops", "h5py", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def save_model(model: Model, path: str | os.PathLike[str]) -> Path:
    """Write ``path`` (skops) and ``path.json`` (manifest with the file's SHA-256), each atomically.

    The manifest is also stored inside the model file, so the JSON cannot be edited unnoticed.
    The folder must exist: a typo in ``--out`` should not create directories.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ModelError(f"{path}: folder {path.parent} does not exist (create it first)")
    import skops.io as sio  # imported here: it pulls in torch (2 s, 600 MB) when imported

    manifest = model.manifest.replace(
        format=FORMAT,
        version=VERSION,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        versions=versions(),
        model_file=None,
        model_sha256=None,
    )
    text = json.dumps(manifest.to_json(), indent=1, default=_json_default)
    with atomic_path(path) as tmp, atomic_path(manifest_path(path)) as mtmp:
        content = {"estimator": model.estimator, "manifest": text}
        if model.novelty is not None:
            content["novelty"] = model.novelty.payload()
        sio.dump(content, tmp, compression=8)
        written = {**json.loads(text), "model_file": path.name, "model_sha256": file_sha256(tmp)}
        mtmp.write_text(json.dumps(written, indent=1))
    model.manifest = Manifest.from_json(written)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot store {type(o).__name__} in a manifest")


def _read_manifest(path: Path) -> tuple[dict[str, Any], Manifest]:
    """The manifest beside ``path``: as read (to compare with the file's own copy), and typed."""
    mpath = manifest_path(path)
    if not mpath.is_file():
        raise ModelError(f"{path}: its manifest {mpath.name} is missing; a model is the pair")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{mpath}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelError(f"{mpath}: not a penult model manifest")
    try:
        version = int(manifest.get("version", 0))
    except (TypeError, ValueError):
        raise ModelError(
            f"{mpath}: model format version {manifest.get('version')!r} is not a number"
        ) from None
    if version > VERSION:
        raise ModelError(f"{mpath}: made by a newer penult (model format {version})")
    try:
        return manifest, Manifest.from_json({**manifest, "version": version})
    except ManifestError as e:
        raise ModelError(f"{mpath}: {e}") from None


def _check_types(path: Path, trust: bool) -> tuple[list[str], bytes | None]:
    """The type names skops must trust to rebuild ``path``; refuses any outside the allow-list.
    A file written before penult's modules moved under ``penult.`` comes back rewritten (bytes)."""
    from penult.classify import safe_types

    try:
        schema = safe_types.read_schema(path)
    except Exception as e:  # noqa: BLE001 - zipfile/json raise many types for non-skops files
        raise ModelError(
            f"{path}: not a readable skops model file ({type(e).__name__}: {e})"
        ) from None
    moved = safe_types.with_schema(path, schema) if safe_types.rehome(schema) else None
    unsafe = safe_types.unsafe_nodes(schema)
    if unsafe and not trust:
        shown = ", ".join(unsafe[:8]) + (f" and {len(unsafe) - 8} more" if len(unsafe) > 8 else "")
        raise ModelError(
            f"{path}: refusing to load, it names types or calls that penult's models never contain "
            f"and that could run code: {shown}. Only if you trust who made the file, pass --trust-model."
        )
    return safe_types.names_in(schema), moved


def _unpack(path: Path, obj: Any, manifest: dict[str, Any], typed: Manifest) -> BaseEstimator:
    """The estimator; for format 2 also checks the JSON manifest (``manifest`` as read, and
    ``typed``) against the embedded copy."""
    if (typed.version or 0) < 2:
        est = obj
    else:
        if not isinstance(obj, dict) or not isinstance(obj.get("manifest"), str):
            raise ModelError(
                f"{path}: a format-2 model file must hold an estimator and its manifest"
            )
        est, inner = obj.get("estimator"), json.loads(obj["manifest"])
        outer = {k: v for k, v in manifest.items() if k not in _FILE_FIELDS}
        diff = sorted(k for k in set(inner) | set(outer) if inner.get(k) != outer.get(k))
        if diff:
            raise ModelError(
                f"{manifest_path(path)}: {', '.join(diff)} differ from the copy inside {path.name}: "
                "the manifest was edited; restore it or retrain"
            )
    have = np.asarray(getattr(est, "classes_", [])).astype(str).tolist()
    if hasattr(est, "classes_") and have != typed.classes:
        raise ModelError(
            f"{manifest_path(path)}: its classes differ from the model's own ({len(have)} classes, "
            f"first {have[:3]}): the manifest was edited or belongs to another model"
        )
    own = _own_paths(est)
    if (
        own is not None
        and typed.paths is not None
        and own != [[str(v) for v in p] for p in typed.paths]
    ):
        raise ModelError(
            f"{manifest_path(path)}: its taxonomy paths differ from the model's own hierarchy "
            "(the coarse labels predict would print): the manifest was edited; restore it or "
            "retrain"
        )
    return est


def _own_paths(est: Any) -> list[list[str]] | None:
    """The taxonomy paths a hierarchical estimator was fitted with (None for other heads)."""
    for step in [est, *(s for _, s in getattr(est, "steps", []))]:
        paths = getattr(step, "paths_", None)
        if paths is not None:
            return np.asarray(paths).astype(str).tolist()
    return None


def load_model(path: str | os.PathLike[str], *, trust: bool = False) -> Model:
    """Load a model, refusing a file whose hash differs from its manifest or that names unsafe types."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    manifest, typed = _read_manifest(path)
    digest = file_sha256(path)
    if digest != typed.model_sha256:
        raise ModelError(
            f"{path}: SHA-256 {digest[:12]}... does not match its manifest "
            f"({str(typed.model_sha256)[:12]}...): the file was modified or corrupted"
        )
    trusted, moved = _check_types(path, trust)
    import skops.io as sio

    try:
        if moved is not None:
            everything = sio.get_untrusted_types(data=moved)
            obj = sio.loads(moved, trusted=everything if trust else trusted)
        else:
            everything = sio.get_untrusted_types(file=path)
            obj = sio.load(path, trusted=everything if trust else trusted)
    except Exception as e:  # noqa: BLE001 - skops raises many types for a malformed file
        raise ModelError(f"{path}: cannot rebuild the model ({type(e).__name__}: {e})") from None
    est = _unpack(path, obj, manifest, typed)
    return Model(est, typed, _novelty(path, obj, typed))


def _novelty(path: Path, obj: Any, typed: Manifest) -> Novelty | None:
    """The open-set score a format-4 file holds, its arrays checked against the features."""
    if not isinstance(obj, dict) or obj.get("novelty") is None:
        if typed.novelty:
            raise ModelError(f"{path}: its manifest names an open-set score the file lacks")
        return None
    try:
        nov = Novelty.from_payload(obj["novelty"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{path}: unreadable open-set score ({type(e).__name__}: {e})") from None
    comp = nov.components
    if comp is not None and (comp.ndim != 2 or comp.shape[1] != typed.feature_dim):
        raise ModelError(f"{path}: its open-set score does not fit {typed.feature_dim}-d features")
    return nov


def resolve_backbones(model: Model, store: FeatureStore) -> list[str]:
    """The store's entries holding the model's features; refuses other weights or preprocessing.

    An entry is matched by name first, then by fingerprint (the same backbone stored under
    another name still fits).
    """
    entries = store.backbones()
    out = []
    for want in model.manifest.backbones:
        fp = want.fingerprint
        same = [n for n, e in entries.items() if e.fingerprint.same_as(fp)]
        if want.name in same:
            out.append(want.name)
        elif same:
            out.append(same[0])
        elif want.name in entries:
            diff = entries[want.name].fingerprint.differences(fp)
            raise ModelError(
                f"{store.path}: backbone {want.name!r} differs from the one the model was trained on "
                f"({', '.join(diff)} differ); the model needs features from {fp.get('architecture')} "
                f"with weights {str(fp.get('weights_sha256'))[:12]}..."
            )
        else:
            raise ModelError(
                f"{store.path} has no features from {want.name!r} ({fp.get('architecture')}); "
                f"run `penult extract {store.path} IMAGES --backbone {want.name}` first"
            )
    return out
