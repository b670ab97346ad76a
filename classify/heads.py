"""Heads: scikit-learn pipelines (feature preprocessing + classifier) chosen and tuned for speed.

Every head is a plain ``sklearn.pipeline.Pipeline`` so it saves, clones and cross-validates like any
estimator; the preprocessing travels inside the saved model and cannot drift from training.
Settings were timed on cub100 (5,902 x 1,280, 100 classes, 2 cores); see docs/BENCHMARKS.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from penult.classify.options import HEAD_HELP, PREPROCESS
from penult.core.errors import PenultError
from sklearn.base import BaseEstimator
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC


class HeadError(PenultError, ValueError):
    """An unknown head or an option the head cannot honour."""


@dataclass(frozen=True)
class HeadSpec:
    name: str
    build: Callable[..., BaseEstimator]
    preprocess: str  # default preprocessing
    grid: dict[str, list[Any]] = field(default_factory=dict)  # search space, keys without "clf__"
    class_weight: bool = False  # accepts class_weight=
    description: str = ""


def _lr(class_weight: str | None = None, **kw: Any) -> LogisticRegression:
    # lbfgs on standardised features converges in ~100 iterations; C=0.1 was best by 3-fold CV on cub100.
    return LogisticRegression(
        **{"C": 0.1, "max_iter": 300, "tol": 1e-3, "class_weight": class_weight, **kw}
    )


def _svm(class_weight: str | None = None, **kw: Any) -> CalibratedClassifierCV:
    # A plain LinearSVC on standardised features took 130-240 s on cub100 (badly conditioned);
    # on L2-normalised features the dual solver converges in ~4 s. Temperature scaling fitted on
    # held-out folds turns the 100 margins into calibrated probabilities (per-class sigmoids
    # renormalised over 100 classes were badly under-confident: ECE 0.55).
    svc = LinearSVC(
        **{
            "C": 1.0,
            "dual": True,
            "tol": 1e-3,
            "max_iter": 2000,
            "class_weight": class_weight,
            "random_state": 0,  # the dual solver visits samples in random order
            **kw,
        }
    )
    return CalibratedClassifierCV(svc, cv=3, method="temperature", ensemble=True, n_jobs=-1)


def _mlp(**kw: Any) -> MLPClassifier:
    return MLPClassifier(
        **{
            "hidden_layer_sizes": (512,),
            "alpha": 1e-2,
            "batch_size": 256,
            "learning_rate_init": 1e-3,
            "max_iter": 60,
            "early_stopping": True,
            "n_iter_no_change": 8,
            "random_state": 0,
            **kw,
        }
    )


def _knn(**kw: Any) -> KNeighborsClassifier:
    return KNeighborsClassifier(**{"n_neighbors": 10, "weights": "distance", **kw})


def _nn(**kw: Any) -> BaseEstimator:
    from penult.classify.knn import FaissKNeighborsClassifier

    return FaissKNeighborsClassifier(**kw)


HEADS: dict[str, HeadSpec] = {
    s.name: s
    for s in (
        HeadSpec(
            "lr",
            _lr,
            "standard",
            {"C": [0.01, 0.03, 0.1, 0.3, 1.0]},
            class_weight=True,
            description=HEAD_HELP["lr"],
        ),
        HeadSpec(
            "svm",
            _svm,
            "l2",
            {"estimator__C": [0.3, 1.0, 3.0]},
            class_weight=True,
            description=HEAD_HELP["svm"],
        ),
        HeadSpec(
            "mlp",
            _mlp,
            "standard",
            {"alpha": [1e-3, 1e-2, 1e-1]},
            description=HEAD_HELP["mlp"],
        ),
        HeadSpec(
            "knn",
            _knn,
            "l2",
            {"n_neighbors": [5, 10, 20]},
            description=HEAD_HELP["knn"],
        ),
        HeadSpec(
            "nn",
            _nn,
            "none",
            {"n_neighbors": [1, 5, 10]},
            description=HEAD_HELP["nn"],
        ),
        HeadSpec(
            "centroid",
            NearestCentroid,
            "l2",
            description=HEAD_HELP["centroid"],
        ),
    )
}
if tuple(HEADS) != tuple(HEAD_HELP):  # the CLI's --head help comes from HEAD_HELP
    raise RuntimeError(f"classify.options.HEAD_HELP names {tuple(HEAD_HELP)}, not {tuple(HEADS)}")


def _steps(preprocess: str, pca: int | float | None, whiten: bool) -> list[tuple[str, Any]]:
    if preprocess not in PREPROCESS:
        raise HeadError(f"preprocess {preprocess!r} unknown; choose from {', '.join(PREPROCESS)}")
    steps: list[tuple[str, Any]] = []
    if preprocess.startswith("l2"):
        steps.append(("l2", Normalizer()))
    if preprocess.endswith("standard"):
        steps.append(("scale", StandardScaler()))
    if pca is not None or whiten:
        steps.append(("pca", PCA(n_components=pca, whiten=whiten, random_state=0)))
        if preprocess.startswith("l2") and whiten:
            steps.append(("l2_after", Normalizer()))
    return steps


def make_head(
    kind: str = "lr",
    *,
    preprocess: str | None = None,
    pca: int | float | None = None,
    whiten: bool = False,
    class_weight: str | None = None,
    **params: Any,
) -> Pipeline:
    """A fresh, unfitted head: preprocessing steps then the classifier as step ``clf``.

    ``preprocess``: standard (z-score), l2 (unit length, i.e. cosine geometry), l2+standard or none;
    default per head. ``pca``: components (int) or kept variance (float); ``whiten`` rescales them.
    ``class_weight='balanced'`` reweights rare classes (lr, svm). Other keywords go to the classifier.
    """
    if kind not in HEADS:
        raise HeadError(f"unknown head {kind!r}; choose from {', '.join(HEADS)}")
    spec = HEADS[kind]
    if class_weight is not None and not spec.class_weight:
        with_cw = ", ".join(h for h, s in HEADS.items() if s.class_weight)
        raise HeadError(f"head {kind!r} takes no class weights; heads that do: {with_cw}")
    kw = dict(params)
    if class_weight is not None:
        kw["class_weight"] = class_weight
    try:
        clf = spec.build(**kw)
    except TypeError as e:  # a keyword the classifier does not take
        raise HeadError(f"head {kind!r}: {e}") from None
    _check_params(clf, kind)
    return Pipeline([*_steps(preprocess or spec.preprocess, pca, whiten), ("clf", clf)])


def _check_params(clf: Any, kind: str) -> None:
    """Refuse out-of-range values (``--param C=-1``) now, with the head named, rather than as
    a scikit-learn error in the middle of fitting."""
    from sklearn.base import BaseEstimator
    from sklearn.utils._param_validation import InvalidParameterError

    nested = [v for v in clf.get_params(deep=True).values() if isinstance(v, BaseEstimator)]
    try:
        for est in [clf, *nested]:
            if hasattr(est, "_parameter_constraints"):  # our own heads check in fit
                est._validate_params()
    except InvalidParameterError as e:
        raise HeadError(f"head {kind!r}: {e}") from None


def search_grid(kind: str, prefix: str = "clf__") -> dict[str, list[Any]]:
    """The hyper-parameter grid of a head, keyed for ``GridSearchCV`` on its pipeline."""
    return {prefix + k: v for k, v in HEADS[kind].grid.items()}
