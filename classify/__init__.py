"""The classification stage: heads on stored features, evaluation, reports, saved models, scoring."""

from penult.classify.annotate import AnnotateSummary, annotate_store
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
from penult.classify.tolabel import label_queue, write_queue
from penult.classify.train import TrainOptions, TrainResult, train

__all__ = [
    "HEADS",
    "AnnotateSummary",
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
    "annotate_store",
    "answers",
    "compare",
    "compare_table",
    "count_images",
    "count_store",
    "evaluate",
    "find_mistakes",
    "load_dataset",
    "label_queue",
    "load_model",
    "make_head",
    "predict_files",
    "predict_images",
    "rank_labels",
    "weights_for",
    "write_queue",
    "resolve_backbones",
    "save_model",
    "train",
    "write_mistakes",
]
