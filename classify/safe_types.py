"""The exact types a penult model file may name, checked on the file's schema before skops runs.

skops rebuilds objects by importing ``module.name`` strings taken from the file, so "any class under
sklearn" is not a safe rule: a module that re-exports ``subprocess.Popen`` or a numpy class that
opens files (``numpy.memmap``) is also "under" those packages, and a constructor node would call it
with the file's arguments. Here every node of ``schema.json`` is read as plain JSON (nothing is
imported from it) and must be one of the node kinds penult's own models use, naming one of the types
below by its *defining* module and name. The allowed names are computed from the objects themselves,
so a re-exported path never matches.
"""

from __future__ import annotations

import importlib
import io
import json
import zipfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

# Classes that penult's heads, hierarchies and one-vs-rest models contain once fitted
# (found by saving every head in every mode; tests/test_model_safety.py checks the list is enough).
_CLASSES = (
    "sklearn.pipeline:Pipeline",
    "sklearn.preprocessing:StandardScaler",
    "sklearn.preprocessing:Normalizer",
    "sklearn.preprocessing:LabelBinarizer",
    "sklearn.preprocessing:LabelEncoder",
    "sklearn.decomposition:PCA",
    "sklearn.linear_model:LogisticRegression",
    "sklearn.svm:LinearSVC",
    "sklearn.calibration:CalibratedClassifierCV",
    "sklearn.calibration:_CalibratedClassifier",
    "sklearn.calibration:_TemperatureScaling",
    "sklearn.calibration:_SigmoidCalibration",
    "sklearn.isotonic:IsotonicRegression",
    "sklearn.neural_network:MLPClassifier",
    "sklearn.neural_network._stochastic_optimizers:AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers:SGDOptimizer",
    "sklearn.neighbors:KNeighborsClassifier",
    "sklearn.neighbors:NearestCentroid",
    "sklearn.neighbors:KDTree",
    "sklearn.neighbors:BallTree",
    "sklearn.multiclass:OneVsRestClassifier",
    "sklearn.multiclass:_ConstantPredictor",
    "penult.classify.hierarchy:HierarchicalClassifier",
    "penult.classify.hierarchy:_Constant",
    "penult.classify.ovr:ThresholdedOneVsRest",
    "penult.classify.knn:FaissKNeighborsClassifier",
    "penult.classify.outofcore:StreamingCentroid",
)
# skops node kinds that only rebuild data or set attributes on an allowed class. Kinds that call
# something named in the file (FunctionNode, MethodNode, PartialNode, ConstructorFromReduceNode,
# OperatorFuncNode, ReduceNode, ...) are not here, so they are refused whatever they name.
_CONTAINERS = {
    "DictNode": "builtins.dict",
    "ListNode": "builtins.list",
    "TupleNode": "builtins.tuple",
    "SetNode": "builtins.set",
}
_PRIMITIVES = (
    "builtins.int",
    "builtins.float",
    "builtins.str",
    "builtins.bool",
    "builtins.NoneType",
)
# The largest schema we parse (penult's schemas are a few hundred kB; arrays live in separate members).
MAX_SCHEMA_BYTES = 64 << 20


def _name(obj: type) -> str:
    return f"{obj.__module__}.{obj.__name__}"


def _resolve(spec: str) -> type | None:
    """The class at ``module:attr`` if this installation has it (private sklearn names move)."""
    module, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) and obj.__qualname__ == obj.__name__ else None


@cache
def allowed() -> dict[str, frozenset[str]]:
    """Node kind -> the type names it may carry."""
    classes = {_name(c) for c in map(_resolve, _CLASSES) if c is not None}
    try:  # the distance metrics a fitted KD/Ball tree holds
        from sklearn.metrics import _dist_metrics as dm

        base = getattr(dm, "DistanceMetric64", None)
        for v in vars(dm).values():
            if isinstance(v, type) and base is not None and issubclass(v, base):
                classes.add(_name(v))
    except ImportError:
        pass
    scalars = {_name(t) for t in set(np.sctypeDict.values())}
    dtypes = {_name(type(np.dtype(t))) for t in set(np.sctypeDict.values())}
    return {
        "ObjectNode": frozenset(classes),
        "CachedNode": frozenset(classes | set(_CONTAINERS.values()) | {"numpy.ndarray"}),
        "NdArrayNode": frozenset(scalars | {"numpy.ndarray"}),
        "DTypeNode": frozenset(dtypes | {"numpy.dtype"}),
        "TypeNode": frozenset(scalars | set(_PRIMITIVES)),
        "JsonNode": frozenset(_PRIMITIVES),
        "RandomStateNode": frozenset({"numpy.random.mtrand.RandomState"}),
        **{k: frozenset({v}) for k, v in _CONTAINERS.items()},
    }


def read_schema(path: str | Path) -> dict[str, Any]:
    """The ``schema.json`` of a skops file, as plain JSON. Raises ValueError if it is not one."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("schema.json")
        if info.file_size > MAX_SCHEMA_BYTES:
            raise ValueError(
                f"schema.json is {info.file_size:,} bytes (limit {MAX_SCHEMA_BYTES:,})"
            )
        return json.loads(z.read(info))


def _nodes(schema: Any) -> Iterator[tuple[str, str]]:
    """(node kind, type name) of every skops node in the schema, depth first."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if "__loader__" in node:
                name = f"{node.get('__module__', '')}.{node.get('__class__', '')}"
                yield str(node["__loader__"]), name
            stack.extend(node.values())


def unsafe_nodes(schema: Any) -> list[str]:
    """'Kind module.name' for every node outside the allow-list (empty: the file is safe to load)."""
    ok = allowed()
    return sorted({f"{k} {n}" for k, n in _nodes(schema) if n not in ok.get(k, ())})


# penult's own modules before they installed under the ``penult.`` namespace
_OLD_HOMES = ("classify.",)


def rehome(schema: Any) -> bool:
    """Point ``__module__`` names of penult's own classes in a schema written before its modules
    moved under ``penult.`` (``classify.hierarchy`` -> ``penult.classify.hierarchy``), in place;
    returns whether any changed. Nothing is imported or trusted here: the names are then checked
    like any other."""
    changed, stack = False, [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            module = node.get("__module__")
            if "__loader__" in node and isinstance(module, str) and module.startswith(_OLD_HOMES):
                node["__module__"] = f"penult.{module}"
                changed = True
            stack.extend(node.values())
    return changed


def with_schema(path: str | Path, schema: Any) -> bytes:
    """The skops file's bytes with ``schema.json`` replaced (the arrays are kept as they are)."""
    out = io.BytesIO()
    with zipfile.ZipFile(path) as z, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as w:
        for info in z.infolist():
            data = json.dumps(schema).encode() if info.filename == "schema.json" else z.read(info)
            w.writestr(info, data)
    return out.getvalue()


def names_in(schema: Any) -> list[str]:
    """Every type name the schema's nodes carry (what skops must be told to trust)."""
    return sorted({n for _, n in _nodes(schema)})
