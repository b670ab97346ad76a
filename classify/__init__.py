"""The classification stage: heads on stored features, evaluation, reports, saved models, scoring."""

from penult.classify.count import CountOptions, CountSummary, count_images, count_store
from penult.classify.data import DataError, Dataset, load_dataset
from penult.classify.evaluate import compare, compare_table, evaluate
from penult.classify.heads import HEADS, HeadError, make_head
from penult.classify.hierarchy import HierarchicalClassifier, TaxonomyError
from penult.classify.mistakes import MistakeOptions, find_mistakes, rank_labels, write_mistakes
from penult.classify.model import Model, ModelError, load_model, resolve_backbones, save_model
from penult.classify.ovr import ThresholdedOneVsRest
from penult.classify.predict import (
    PredictOptions,
    answers,
    predict_files,
    predict_images,
    weights_for,
)
from penult.classify.train import TrainOptions, TrainResult, train

__all__ = [
    "HEADS",
    "CountOptions",
    "CountSummary",
    "DataError",
    "Dataset",
    "HeadError",
    "HierarchicalClassifier",
    "MistakeOptions",
    "Model",
    "ModelError",
    "PredictOptions",
    "TaxonomyError",
    "ThresholdedOneVsRest",
    "TrainOptions",
    "TrainResult",
    "answers",
    "compare",
    "compare_table",
    "count_images",
    "count_store",
    "evaluate",
    "find_mistakes",
    "load_dataset",
    "load_model",
    "make_head",
    "predict_files",
    "predict_images",
    "rank_labels",
    "weights_for",
    "resolve_backbones",
    "save_model",
    "train",
    "write_mistakes",
]
