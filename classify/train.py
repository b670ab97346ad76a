"""Training a head on stored features: data, split, estimator, optional CV search, fit, evaluate, save."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from penult.classify.data import (
    DataError,
    Dataset,
    StreamingData,
    ensure_split,
    eval_mask,
    load_dataset,
)
from penult.classify.heads import make_head, search_grid
from penult.classify.hierarchy import HierarchicalClassifier, taxonomy_from_columns
from penult.classify.manifest import BackboneUse, Manifest, Refit, TrainedOn
from penult.classify.metrics import classification_metrics
from penult.classify.model import Model, Predictions
from penult.classify.novelty import fit_novelty
from penult.classify.options import (
    TrainOptions,
    parse_levels,
    parse_param,
    parse_pca,
    parse_threshold,
)
from penult.classify.ovr import UNKNOWN, ThresholdedOneVsRest, valid_threshold
from penult.classify.quantify import OutOfFold
from penult.classify.thresholds import tune
from penult.core import TRAIN, OptionError, PenultError
from penult.features import FeatureStore
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline

__all__ = [
    "Plan",
    "TrainOptions",
    "TrainResult",
    "model_manifest",
    "scored",
    "build_estimator",
    "class_counts",
    "counted",
    "default_backbones",
    "parse_levels",
    "parse_param",
    "parse_pca",
    "parse_threshold",
    "join_taxonomy",
    "prepare",
    "resolve_levels",
    "score",
    "summary",
    "train",
]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: Model  # the model to save (refit on every labelled image with refit_all or cv)
    metrics: dict[str, Any]  # held-out (or pooled out-of-fold) metrics
    fit_seconds: float
    n_train: int
    n_eval: int
    eval_split: str
    search: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    scored: Model | None = None  # the train-split model the metrics are of, when not ``model``
    cv: dict[str, Any] | None = None  # folds, per-fold headline numbers, their mean and spread
    truth: np.ndarray | None = None  # the labels ``metrics["predictions"]`` are scored against
    paths: list[str] | None = None  # the images (store keys) scored, in the predictions' order


def default_backbones(store: FeatureStore, backbones: tuple[str, ...]) -> tuple[str, ...]:
    if backbones:
        return backbones
    names = sorted(store.backbones())
    if len(names) == 1:
        return (names[0],)
    have = ", ".join(names) or "none"
    raise DataError(f"{store.path}: say which backbone(s) to use with --backbone (it has: {have})")


def build_estimator(
    opts: TrainOptions, taxonomy: dict[str, tuple[str, ...]] | None, levels: list[str]
) -> Pipeline:
    """Preprocessing steps + the classifier, wrapped for one-vs-rest or hierarchy as asked."""
    if opts.ovr and opts.hierarchical:
        raise DataError("choose either --hierarchical or --ovr (one-vs-rest), not both")
    if opts.ovr and not valid_threshold(opts.threshold):
        raise DataError(
            f"--threshold {opts.threshold!r}: use 'f1' or a probability strictly between 0 and 1"
        )
    if opts.hierarchical and taxonomy is None:
        raise DataError(
            "--hierarchical needs coarse levels: --levels family,genus (coarse first), "
            "--taxonomy CSV, or --levels auto"
        )
    head = make_head(
        opts.head,
        preprocess=opts.preprocess,
        pca=opts.pca,
        whiten=opts.whiten,
        class_weight=opts.class_weight,
        **dict(opts.params),
    )
    clf: BaseEstimator = head.steps[-1][1]
    if opts.ovr:
        clf = ThresholdedOneVsRest(clf, thresholds=opts.threshold, n_jobs=_jobs(opts))
    elif opts.hierarchical:
        clf = HierarchicalClassifier(clf, taxonomy=taxonomy, level_names=levels)
    return Pipeline([*head.steps[:-1], ("clf", clf)])


def _jobs(opts: TrainOptions) -> int:
    return opts.n_jobs or os.cpu_count() or 1


SMALL_EVAL = 100  # held-out images under which `train` suggests --cv
RANKS = ("domain", "kingdom", "phylum", "division", "class", "order", "suborder", "superfamily",
         "family", "subfamily", "tribe", "genus", "subgenus")  # fmt: skip


def taxonomy_levels(data: Dataset | StreamingData, label: str, split: str = "split") -> list[str]:
    """The store's label columns that group ``label``'s classes into a tree, coarse first: each
    a function of the next finer one (every image of a class has one value) with fewer values
    (a renaming such as an English name is not a level). Of several such chains the longest,
    then the one with most columns named as taxonomic ranks (cub100's ``name_group`` also
    nests under ``genus``). Samples, their metadata, the split and columns that leave some
    images empty are not levels."""
    from penult.core.labels import sample_columns

    y = np.asarray(data.column(label)).astype(str)
    keep = y != ""
    skip = {label, split, *sample_columns({k: list(v) for k, v in data.labels.items()})}
    leaf = np.unique(y[keep], return_inverse=True)[1]
    cols = [(label, leaf, int(leaf.max()) + 1 if len(leaf) else 0)]
    for col, values in data.labels.items():
        v = np.asarray(values).astype(str)[keep]
        if col not in skip and not (v == "").any():
            names, codes = np.unique(v, return_inverse=True)
            if len(names) >= 2:
                cols.append((col, codes, len(names)))
    cols[1:] = sorted(cols[1:], key=lambda t: (-t[2], t[0]))  # finest first

    def under(fine: int, coarse: int) -> bool:  # coarse is a function of fine, with fewer values
        (_, f, nf), (_, c, nc) = cols[fine], cols[coarse]
        first = np.full(nf, -1, np.int64)
        first[f] = c
        return nc < nf and bool((first[f] == c).all())

    best: dict[int, tuple[int, int, list[str]]] = {0: (0, 0, [])}  # column -> chain from label
    for i in range(1, len(cols)):
        name = cols[i][0]
        for j in [0, *range(1, i)]:
            if j in best and under(j, i):
                n, ranks, chain = best[j]
                got = (n + 1, ranks + (name.lower() in RANKS), [*chain, name])
                if i not in best or got[:2] > best[i][:2]:
                    best[i] = got
    return max(best.values(), key=lambda t: t[:2])[2][::-1]  # ties: the finer columns first


def resolve_levels(
    data: Dataset | StreamingData, levels: tuple[str, ...], label: str = "label",
    split: str = "split",
) -> list[str]:  # fmt: skip
    """Coarse level columns, coarse first; "auto" means the nested-folder levels (level0, level1...)."""
    if tuple(levels) == ("auto",):
        found = sorted(
            (c for c in data.labels if c.startswith("level") and c[5:].isdigit()),
            key=lambda c: int(c[5:]),
        )
        if not found:
            raise DataError(
                "--levels auto needs nested class folders (root/<coarse>/.../<class>/image)"
            )
        return found
    for c in levels:
        if c not in data.labels:
            have = taxonomy_levels(data, label, split)
            other = sorted(set(data.labels) - {*have, label})
            raise DataError(
                f"no label column {c!r}; the store's taxonomy levels above {label!r}, coarse "
                f"first: {', '.join(have) or 'none'}; its other label columns: "
                f"{', '.join(other) or 'none'}"
            )
    return list(levels)


def join_taxonomy(data: Dataset, csv_path: str, label: str) -> str:
    """Add the levels of a class -> coarse-levels CSV to ``data`` (rules: core.labels)."""
    from penult.core.labels import read_taxonomy

    columns = read_taxonomy(csv_path).columns(data.column(label).tolist())
    for level, values in columns.items():
        data.labels[level] = np.array(values, dtype=str)
    return f"taxonomy {csv_path}: columns {', '.join(columns)}"


def _check_classes(
    train: tuple[np.ndarray, np.ndarray], held: tuple[np.ndarray, np.ndarray], notes: list[str]
) -> None:
    """``train`` and ``held``: (classes, counts) of the training and the evaluation split."""
    classes, counts = train
    if len(classes) < 2:
        raise DataError(
            f"the training split has {len(classes)} class(es); a classifier needs 2 or more"
        )
    ones = classes[counts == 1]
    if len(ones):
        notes.append(f"{len(ones)} classes have a single training image, e.g. {str(ones[0])!r}")
    unseen = sorted(set(held[0].tolist()) - set(classes.tolist()))
    if unseen:
        notes.append(
            f"{len(unseen)} classes appear only in the evaluation split and can never be predicted, "
            f"e.g. {str(unseen[0])!r}"
        )


def _search(
    est: Pipeline, opts: TrainOptions, X: np.ndarray, y: np.ndarray
) -> tuple[Pipeline, dict]:
    prefix = "clf__" + ("estimator__" if opts.ovr or opts.hierarchical else "")
    grid = search_grid(opts.head, prefix)
    if not grid:
        raise DataError(f"head {opts.head!r} has nothing to search")
    folds = max(2, min(opts.search_cv, int(np.unique(y, return_counts=True)[1].min())))
    cv = StratifiedKFold(folds, shuffle=True, random_state=opts.seed)
    gs = GridSearchCV(est, grid, cv=cv, scoring="accuracy", n_jobs=_jobs(opts), refit=True)
    gs.fit(X, y)
    table = [
        {"params": {k.split("__")[-1]: v for k, v in p.items()}, "cv_accuracy": float(m)}
        for p, m in zip(gs.cv_results_["params"], gs.cv_results_["mean_test_score"], strict=True)
    ]
    best = {k.split("__")[-1]: v for k, v in gs.best_params_.items()}
    return gs.best_estimator_, {"folds": folds, "best": best, "results": table}


@dataclass
class Plan:
    """What a training run is: the unfitted estimator, labels and the train/eval split."""

    estimator: Pipeline
    y: np.ndarray
    train: np.ndarray  # bool mask
    eval: np.ndarray  # bool mask
    eval_split: str
    levels: list[str]
    taxonomy: dict[str, tuple[str, ...]] | None
    notes: list[str]


def prepare(
    store_path: str | os.PathLike[str], data: Dataset | StreamingData, opts: TrainOptions
) -> Plan:
    """Check everything that can be refused, then (only then) make and store the split."""
    y = data.column(opts.label)
    classes, counts = data.classes(opts.label)
    if len(classes) < 2:
        raise DataError(
            f"{store_path}: every labelled image is {str(y[0])!r}; a classifier needs 2 or more classes"
        )
    tax_note = join_taxonomy(data, opts.taxonomy, opts.label) if opts.taxonomy else None
    levels = resolve_levels(data, opts.levels, opts.label, opts.split)
    found = None
    if opts.hierarchical and not levels:  # the store's own taxonomy, coarse first
        levels = taxonomy_levels(data, opts.label, opts.split)
        if not levels:
            other = ", ".join(sorted(set(data.labels) - {opts.label})) or "none"
            raise DataError(
                f"--hierarchical needs coarse levels and {store_path} has no label column that "
                f"groups the {opts.label!r} classes (its other label columns: {other}): give "
                "--levels family,genus (coarse first), --taxonomy CSV, or --levels auto for "
                "nested class folders"
            )
        found = f"--hierarchical on the store's taxonomy, coarse first: {' > '.join(levels)} > "
        found += f"{opts.label} (pin other levels with --levels)"
    taxonomy = taxonomy_from_columns(y, {c: data.column(c) for c in levels}) if levels else None
    est = build_estimator(opts, taxonomy, levels)
    notes = list(data.notes)
    if tax_note:
        notes.append(tax_note)
    if found:
        notes.append(found)
    if opts.cv:  # every labelled image trains and is scored, fold by fold; no split is stored
        if counts.min() < 2:
            raise DataError(
                f"{store_path}: --cv needs 2 or more images of every class; "
                f"{str(classes[counts.argmin()])!r} has 1"
            )
        every = np.ones(len(y), bool)
        return Plan(est, y, every, every, f"{opts.cv}-fold CV", levels, taxonomy, notes)
    split = ensure_split(
        store_path,
        data,
        column=opts.split,
        label=opts.label,
        test_size=opts.test_size,
        seed=opts.seed,
    )
    ev, ev_name = eval_mask(split, opts.eval_split)
    tr = split == TRAIN
    _check_classes(data.classes(opts.label, tr), data.classes(opts.label, ev), notes)
    return Plan(est, y, tr, ev, ev_name, levels, taxonomy, notes)


def train(
    store_path: str | os.PathLike[str],
    opts: TrainOptions = TrainOptions(),  # noqa: B008
    *,
    progress: Callable[[str, float], None] | None = None,
) -> TrainResult:
    """Fit a head on the train split of a store and score it on the held-out split (or by K
    folds with ``cv``); with ``refit_all`` or ``cv`` the model returned to save is then fitted on
    every labelled image, and its manifest says which estimate its metrics are. ``progress``
    hears each stage's name and the share of the work before it (the review page's bar)."""
    say = progress or (lambda stage, share: None)
    say("reading features", 0.0)
    if opts.class_thresholds and not opts.quantifier_folds:
        raise OptionError(
            "--class-thresholds are tuned on out-of-fold posteriors: they need "
            "--quantifier-folds 2 or more"
        )
    store = FeatureStore(store_path)
    backbones = default_backbones(store, opts.backbones)
    data = load_dataset(store_path, backbones, label=opts.label, status=opts.status)
    plan = prepare(store_path, data, opts)
    y, tr, ev = plan.y, plan.train, plan.eval
    _check_pca(opts, int(tr.sum()), data.X.shape[1])
    say("fitting", 0.2)
    with _head_settings(opts):
        est, search, fit_seconds = _fit(plan.estimator, opts, data.X[tr], y[tr])
    manifest = model_manifest(store, data, opts, plan.taxonomy, plan.levels, est, plan.eval_split)
    model, counts = Model(est, manifest), class_counts(y[tr])
    result = TrainResult(
        model, {}, fit_seconds, int(tr.sum()), int(ev.sum()), plan.eval_split, search, plan.notes
    )
    if not opts.cv and result.n_eval < SMALL_EVAL:  # one split's score of a few images is noise
        half = 100 * 1.96 * (0.25 / max(result.n_eval, 1)) ** 0.5
        result.notes.append(
            f"only {result.n_eval} held-out images: a score on them is good to about +-{half:.0f} "
            f"points; --cv 5 scores every one of the {len(y[tr | ev])} labelled images, in 5 folds"
        )
    if not opts.cv:  # the model scored is calibrated as the one saved will be
        say("calibrating counts and the open-set score", 0.5)
        _calibrate(model, data.X[tr], y[tr], opts, result.notes)
    say("scoring the held-out images", 0.85)
    with _head_settings(opts):
        if opts.cv:  # ``est`` already saw every image: the folds refit clones of the plan
            result.metrics, result.cv, result.truth, result.paths = _cross_validate(
                plan, data, opts
            )
            manifest.cv = result.cv
        else:
            result.metrics = score(model, data.subset(ev), train_counts=counts)
            result.truth, result.paths = y[ev], [data.paths[i] for i in np.flatnonzero(ev)]
    manifest.metrics = summary(result.metrics)
    manifest.train_counts = counts
    manifest.fit_seconds = fit_seconds
    if opts.refit_all and not opts.cv:
        result.scored = model
        result.model = _refit(plan, data, opts, manifest)
    if opts.cv or opts.refit_all:  # the saved model saw every labelled image
        say("calibrating the refitted model", 0.9)
        said: list[str] = []
        _calibrate(result.model, data.X, y, opts, said)
        result.notes += [n for n in said if n not in result.notes]  # (the split's said them)
        result.model.manifest.refit_all = Refit(
            images=len(y),
            metrics_from=plan.eval_split,
            note="fitted on every labelled image of the store after it was scored "
            f"({plan.eval_split}); the metrics are that held-out estimate",
        )
    say("done", 1.0)
    return result


def _calibrate(model: Model, X: np.ndarray, y: np.ndarray, opts: TrainOptions, notes: list[str]):
    """What `penult count` and "not one of my classes" need, from the images ``model`` was
    fitted on: out-of-fold posteriors (``--quantifier-folds``) calibrate the counts, and the
    open-set score's threshold is set to keep ``--keep`` of held-out known images."""
    oof = None
    if opts.quantifier_folds:
        try:
            with _head_settings(opts):
                oof = OutOfFold.of(
                    clone(model.estimator), X, y,
                    folds=opts.quantifier_folds, seed=opts.seed, n_jobs=_jobs(opts),
                )  # fmt: skip
            model.manifest.quantifier = oof.calibration().to_json()
        except OptionError as e:  # a class of one image: the model counts by CC only
            notes.append(f"counts will not be corrected for another class mix: {e}")
    if opts.class_thresholds and oof is not None:
        thresholds, table = tune(oof, opts.class_thresholds)
        model.manifest.class_thresholds = {
            "rule": opts.class_thresholds,
            "thresholds": np.round(thresholds, 9).tolist(),
            "table": table,
        }
    elif opts.class_thresholds:
        notes.append(
            "no class thresholds: they are tuned on out-of-fold posteriors, and there are none"
        )
    if opts.unknown_score != "none":
        try:
            model.novelty = fit_novelty(
                opts.unknown_score, X, opts.keep, y=y, seed=opts.seed,
                out_of_fold=None if oof is None else oof.posteriors,
            )  # fmt: skip
            model.manifest.novelty = model.novelty.summary()
        except OptionError as e:
            notes.append(f"no open-set score ('not one of my classes'): {e}")


def _check_pca(opts: TrainOptions, n: int, dim: int) -> None:
    """``--pca N`` within what the data allows, said before anything is fitted."""
    if isinstance(opts.pca, int) and not isinstance(opts.pca, bool) and opts.pca > min(n, dim):
        raise OptionError(
            f"--pca {opts.pca}: at most {min(n, dim)} components here ({n} training images of "
            f"{dim} dimensions); pass a smaller number, or a fraction of variance such as 0.95"
        )


@contextlib.contextmanager
def _head_settings(opts: TrainOptions):
    """A head that refuses its settings for this data (scikit-learn's ValueError, e.g.
    ``--param n_neighbors=1000`` with fewer training images) as one line naming them."""
    try:
        yield
    except ValueError as e:
        if isinstance(e, PenultError):
            raise
        given = " ".join(f"--param {k}={v}" for k, v in opts.params)
        raise OptionError(
            f"the {opts.head} head cannot use its settings on this data ({e})"
            + (f"; check {given}" if given else "")
        ) from None


def class_counts(y: np.ndarray) -> dict[str, int]:
    """Images per class, keyed by the class name (what a manifest's ``train_counts`` holds)."""
    return counted(*np.unique(y, return_counts=True))


def counted(classes: np.ndarray, counts: np.ndarray) -> dict[str, int]:
    """:func:`class_counts` from (classes, counts) already made (``Dataset.classes``)."""
    return {str(k): int(v) for k, v in zip(classes, counts, strict=True)}


def _fit(est: Pipeline, opts: TrainOptions, X: np.ndarray, y: np.ndarray):
    """(fitted estimator, CV search table or None, seconds)."""
    t0 = time.perf_counter()
    search = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if opts.search:
            est, search = _search(est, opts, X, y)
        else:
            est.fit(X, y)
    return est, search, time.perf_counter() - t0


def _refit(plan: Plan, data: Dataset, opts: TrainOptions, manifest: Manifest) -> Model:
    """The plan's estimator (searched again, if asked) fitted on every labelled image."""
    est, search, seconds = _fit(clone(plan.estimator), opts, data.X, plan.y)
    return Model(
        est,
        manifest.replace(
            classes=np.asarray(est.classes_).astype(str).tolist(),
            train_counts=class_counts(plan.y),
            refit_seconds=seconds,
            refit_search=search["best"] if search else None,
        ),
    )


def _cross_validate(plan: Plan, data: Dataset, opts: TrainOptions):
    """Pooled out-of-fold metrics (each image predicted by the fold model that did not see it),
    the per-fold headline numbers with their mean and spread, and the pooled true labels."""
    y = plan.y
    folds = min(opts.cv, int(np.unique(y, return_counts=True)[1].min()))
    split = StratifiedKFold(folds, shuffle=True, random_state=opts.seed).split(data.X, y)
    per_fold, preds, order = [], [], []
    for a, b in split:
        est, _, _ = _fit(clone(plan.estimator), opts, data.X[a], y[a])
        model = Model(
            est, model_manifest(None, data, opts, plan.taxonomy, plan.levels, est, "fold")
        )
        held = np.zeros(len(y), bool)
        held[b] = True
        m = score(model, data.subset(held), train_counts=class_counts(y[a]))
        per_fold.append(summary(m))
        preds.append(m["predictions"])
        order.append(np.flatnonzero(held))
    idx = np.concatenate(order)
    paths = [p.path for p in preds]
    pooled = Predictions(
        np.concatenate([p.label for p in preds]),
        np.vstack([p.proba for p in preds]),
        preds[0].classes,
        None if paths[0] is None else np.concatenate(paths),
    )
    metrics = scored(model, y[idx], pooled, class_counts(y))
    keys = ("top1", "top5", "balanced_accuracy", "macro_f1")
    cv = {
        "folds": folds,
        "seed": opts.seed,
        "mean": {k: float(np.mean([f[k] for f in per_fold if k in f])) for k in keys},
        "std": {k: float(np.std([f[k] for f in per_fold if k in f])) for k in keys},
        "per_fold": per_fold,
    }
    return metrics, cv, y[idx], [data.paths[i] for i in idx]


def model_manifest(
    store: FeatureStore | None,
    data: Dataset,
    opts: TrainOptions,
    taxonomy: dict[str, tuple[str, ...]] | None,
    levels: list[str],
    est: Pipeline,
    eval_split: str,
) -> Manifest:
    classes = np.asarray(est.classes_).astype(str)
    return Manifest(
        kind="ovr" if opts.ovr else ("hierarchical" if opts.hierarchical else "flat"),
        head=opts.head,
        options={k: v for k, v in asdict(opts).items() if k != "params"}
        | {"params": dict(opts.params)},
        label=opts.label,
        classes=classes.tolist(),
        levels=[*levels, opts.label] if taxonomy else [],
        paths=[[*taxonomy[c], c] for c in classes] if taxonomy else None,
        unknown=UNKNOWN if opts.ovr else None,
        backbones=[BackboneUse(b, data.fingerprints[b]) for b in data.backbones],
        feature_dim=data.dim,
        trained_on=TrainedOn(
            store=None if store is None else str(store.path),
            split_column=opts.split,
            eval_split=eval_split,
        ),
    )


def scored(
    model: Model, y_true: np.ndarray, pred: Predictions, train_counts: dict[str, int] | None = None
) -> dict[str, Any]:
    """The metrics of ``model``'s predictions ``pred`` against ``y_true``, with the predictions
    kept (``["predictions"]``) for reports: the one place every score is made (held-out split,
    folds pooled, out of core, evaluate)."""
    m = classification_metrics(
        y_true, pred.label, pred.proba, pred.classes,
        train_counts=train_counts or model.manifest.train_counts,
        paths=model.paths, levels=model.levels, unknown=model.unknown,
    )  # fmt: skip
    if pred.below is not None and model.manifest.class_thresholds:
        m["class_thresholds"] = model.manifest.class_thresholds["table"]
        m["below_threshold_rate"] = float(pred.below.mean())
    flagged = pred.flagged
    if flagged is not None:  # no class given: "not one of my classes", ovr, class thresholds
        kept = ~flagged
        right = np.asarray(pred.label).astype(str) == np.asarray(y_true).astype(str)
        m["unknown_rate"] = float(flagged.mean())
        m["accuracy_when_known"] = float(right[kept].mean()) if kept.any() else 0.0
    return m | {"predictions": pred}


def score(
    model: Model, data: Dataset, *, train_counts: dict[str, int] | None = None
) -> dict[str, Any]:
    """Metrics of ``model`` on ``data`` (labels in the model's label column)."""
    y = data.column(model.manifest.label)
    return scored(model, y, model.predict(data.X), train_counts)


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers (what goes in a manifest or a comparison row)."""
    keys = (
        "n",
        "top1",
        "top5",
        "balanced_accuracy",
        "macro_f1",
        "ece",
        "macro_auc",
        "unknown_rate",
        "accuracy_when_known",
        "below_threshold_rate",
    )
    out = {k: metrics[k] for k in keys if k in metrics}
    if metrics.get("rare"):
        out["rare_top1"] = metrics["rare"]["top1"]
    if metrics.get("levels"):
        out["level_accuracy"] = metrics["levels"]["accuracy"]
        out["mean_tree_distance"] = metrics["levels"]["mean_tree_distance"]
    return out
