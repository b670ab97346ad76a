"""What the classification commands are asked: their options declared once (flags, defaults,
--help), in a module that imports neither scikit-learn nor torch, so that `penult CMD --help` and
argument errors answer at once (they took 4-9 s when the CLI built them from the modules that
do the work)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from penult.classify.novelty import DEFAULT_SCORE, SCORES
from penult.classify.quantify import METHODS
from penult.classify.thresholds import parse_class_thresholds
from penult.core.errors import OptionError
from penult.core.options import COUNT, FRACTION, POSITIVE, option, ranged

__all__ = [
    "DEFAULT_METHOD",
    "HEAD_HELP",
    "KINDS",
    "METRICS",
    "PREPROCESS",
    "STATUS_CHOICES",
    "CountOptions",
    "MistakeOptions",
    "PredictOptions",
    "StreamOptions",
    "TrainOptions",
    "parse_levels",
    "parse_param",
    "parse_pca",
    "parse_threshold",
]

# the heads classify.heads builds (it checks it builds exactly these), and what each is
HEAD_HELP = {
    "lr": "multinomial logistic regression (lbfgs)",
    "svm": "linear SVM (dual, cosine features), temperature-calibrated probabilities",
    "mlp": "one hidden layer of 512, early stopping",
    "knn": "k nearest neighbours, cosine (L2-normalised), distance-weighted",
    "nn": "k-NN on a faiss index (cosine), 1 neighbour by default",
    "centroid": "nearest class centroid, cosine (L2-normalised)",
}
PREPROCESS = ("standard", "l2", "l2+standard", "none")
STATUS_CHOICES = ("validated", "all")
DEFAULT_METHOD = "emq"
METRICS = ("cosine", "l2")  # nearest-neighbour indexes
KINDS = ("auto", "flat", "ivf", "ivfpq", "ivf-hnsw", "ivf-disk")


def parse_param(text: str) -> tuple[str, object]:
    """``KEY=VALUE``: an int, a float, none/true/false, else the text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise OptionError(f"{text!r}: expected KEY=VALUE, e.g. C=0.1")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"none": None, "true": True, "false": False}.get(value.lower(), value)


def parse_pca(text: str) -> int | float:
    """PCA size: components (an integer >= 1) or the variance to keep (a fraction in (0, 1))."""
    if "." in text or "e" in text.lower():
        return FRACTION(text)
    return POSITIVE(text)


def parse_threshold(text: str) -> str | float:
    """--ovr threshold: 'f1', or one probability strictly between 0 and 1."""
    return text if text == "f1" else FRACTION(text)


def parse_levels(text: str) -> tuple[str, ...]:
    """Comma-separated column names, coarse first."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


@dataclass(frozen=True)
class TrainOptions:
    head: str = option("lr", f"classifier head: {', '.join(HEAD_HELP)}")
    backbones: tuple[str, ...] = option(
        (),
        "store entry to train on; repeat to fuse several (rows joined by content hash). "
        "Default: the store's only backbone",
        flags="--backbone",
        repeat=True,
    )
    label: str = option("label", "label column to predict")
    status: str = option(
        "validated",
        "labels to learn from: validated (from folders and manifests, or validated in review; "
        "not those marked dubious) or all",
        choices=STATUS_CHOICES,
    )
    levels: tuple[str, ...] = option(
        (),
        "coarse label columns, coarse first (e.g. family,genus), or 'auto' for nested folders; "
        "reported per level, and used top-down with --hierarchical (which, without --levels, "
        "uses the store's taxonomy: the label columns that group the classes)",
        parse=parse_levels,
    )
    hierarchical: bool = option(False, "coarse classifier, then one per group")
    taxonomy: str | None = option(None, "CSV class,<coarse columns...> to join at training time")
    ovr: bool = option(False, "one-vs-rest with per-class thresholds and 'unknown'")
    threshold: str | float = option(
        "f1",
        "--ovr thresholds: 'f1' (tuned per class on out-of-fold scores) or a probability",
        parse=parse_threshold,
    )
    class_weight: str | None = option(
        None, "reweight rare classes (lr, svm)", choices=("balanced",)
    )
    preprocess: str | None = option(None, "default per head", choices=PREPROCESS)
    pca: int | float | None = option(
        None, "PCA components (int) or kept variance (0-1)", parse=parse_pca
    )
    whiten: bool = option(False, "whiten the PCA components")
    search: bool = option(False, "grid-search the head's main parameter by CV")
    search_cv: int = option(3, "folds of the --search grid search", parse=ranged(int, 2))
    quantifier_folds: int = option(
        5,
        "folds of the out-of-fold predictions that calibrate the model's counts (ACC, PACC, "
        "EMQ: corrected for another class mix); 0: none (counts are then classify-and-count)",
        parse=COUNT,
        metavar="K",
    )
    unknown_score: str = option(
        DEFAULT_SCORE,
        "open-set score that flags images as 'not one of my classes': mahalanobis (distance to "
        "the nearest class mean), knn (to the nearest training images), msp (one minus the top "
        "probability), or none",
        choices=(*SCORES, "none"),
    )
    keep: float = option(
        0.95,
        "share of known images the open-set threshold keeps (calibrated on held-out folds of "
        "the training images)",
        parse=FRACTION,
    )
    class_thresholds: str | None = option(
        None,
        "one threshold per class, tuned on the out-of-fold posteriors: f1 (each class's best "
        "F1) or precision:P (the lowest threshold whose precision reaches P); below it an "
        "image is unclassified (IFCB practice)",
        parse=parse_class_thresholds,
        metavar="RULE",
    )
    cv: int | None = option(
        None,
        "score by K stratified folds over every labelled image (mean and spread, for small data "
        "sets where one split leaves few test images) instead of one split; the saved model is "
        "then fitted on every labelled image",
        parse=ranged(int, 2),
        metavar="K",
    )
    refit_all: bool = option(
        False,
        "after scoring on the held-out split, refit on every labelled image and save that model "
        "(its manifest says so; `evaluate` then refuses to score it on this store)",
    )
    split: str = option(
        "split", "label column with train/test (made if missing)", flags="--split-column"
    )
    eval_split: str | None = option(None, "split to score on (default test, else val)")
    test_size: float = option(0.3, "test fraction when a split is made", parse=FRACTION)
    seed: int = option(0, "seed of a split made here", parse=COUNT)
    n_jobs: int | None = option(
        None, "parallel processes (default: all cores)", flags="--jobs", parse=POSITIVE
    )
    params: tuple[tuple[str, Any], ...] = option(
        (), "classifier KEY=VALUE, repeatable", flags="--param", parse=parse_param, repeat=True
    )


@dataclass(frozen=True)
class PredictOptions:
    top_k: int = option(5, "labels per image", parse=POSITIVE)
    store: str | None = option(None, "feature store whose cached embeddings to reuse")
    chunk: int = option(  # bounds memory
        2048,
        "images per step (per Dask task with --cluster)",
        flags="--partition-size",
        parse=POSITIVE,
        metavar="N",
    )
    progress: bool = option(True, "no progress bar", flags=("-q", "--quiet"))
    cluster: str | None = option(
        None,
        "score on Dask, as `extract --cluster` (local[:N], tcp://HOST:PORT, slurm[:JOBS]); the "
        "CSV is still in input order and written only when every image is scored",
        metavar="SPEC",
    )


@dataclass(frozen=True)
class StreamOptions:
    memory_mb: int = option(256, "MB of features held at once (the shuffle buffer)", parse=POSITIVE)
    epochs: int = option(20, "passes of the streamed lr over the training split", parse=POSITIVE)
    subsample: int = option(50_000, "training images for heads that cannot stream", parse=POSITIVE)
    max_eval: int = 200_000  # held-out images scored (a seeded sample beyond that)


@dataclass(frozen=True)
class MistakeOptions:
    backbones: tuple[str, ...] = option(
        (), "store entry whose features to use (default: the store's only one)",
        flags="--backbone", repeat=True,
    )  # fmt: skip
    label: str = option("label", "label column to check")
    head: str = option(
        "svm", "classifier of the out-of-fold probabilities (svm: slower, finds more; lr: faster)",
        choices=("svm", "lr"),
    )  # fmt: skip
    folds: int = option(5, "folds of the out-of-fold probabilities", parse=ranged(int, 2))
    neighbours: int = option(
        5, "nearest images of the own and of other labels compared per image", parse=POSITIVE
    )
    pca: int = option(256, "PCA components of the neighbour search (0: none)", parse=ranged(int, 0))
    seed: int = option(0, "seed of the folds and the PCA", parse=ranged(int, 0))
    n_jobs: int | None = option(
        None, "parallel fits (default: all cores)", flags="--jobs", parse=POSITIVE
    )


@dataclass(frozen=True)
class CountOptions:
    method: str | None = option(
        None,
        "how a sample's class shares are estimated: cc (classify and count), pcc (mean "
        f"posterior), acc, pacc (adjusted), emq (EM prior adjustment). Default: {DEFAULT_METHOD}; "
        "cc for a model trained without the quantifier calibration",
        choices=METHODS,
    )
    level: str | None = option(
        None, "count at a coarser level of the model's taxonomy (e.g. genus)", metavar="LEVEL"
    )
    bootstrap: int = option(
        200,
        "resamples of each sample's images for the 95 percent intervals (0: no intervals)",
        parse=COUNT,
        metavar="B",
    )
    em_images: int = option(
        20_000,
        "images per sample that EM and the bootstrap run on: a uniform random subset of larger "
        "samples (counts, cc, pcc, acc and pacc use every image)",
        parse=POSITIVE,
        metavar="N",
    )
    seed: int = option(0, "seed of the bootstrap and of the subsets")
    top: int = option(10, "taxa drawn in the plot (the rest summed as 'other')", parse=POSITIVE)
    plot: bool = option(True, "no PNG/HTML plot", flags="--no-plot")
