"""The classification stage: heads on stored features, evaluation, reports, saved models, scoring."""

from classify.data import DataError, Dataset, load_dataset
from classify.evaluate import compare, compare_table, evaluate
from classify.heads import HEADS, HeadError, make_head
from classify.hierarchy import HierarchicalClassifier, TaxonomyError
from classify.model import Model, ModelError, load_model, save_model
from classify.ovr import ThresholdedOneVsRest
from classify.predict import PredictOptions, predict_files, predict_images, weights_for
from classify.train import TrainOptions, TrainResult, train

__all__ = [
    "HEADS",
    "DataError",
    "Dataset",
    "HeadError",
    "HierarchicalClassifier",
    "Model",
    "ModelError",
    "PredictOptions",
    "TaxonomyError",
    "ThresholdedOneVsRest",
    "TrainOptions",
    "TrainResult",
    "compare",
    "compare_table",
    "evaluate",
    "load_dataset",
    "load_model",
    "make_head",
    "predict_files",
    "predict_images",
    "weights_for",
    "save_model",
    "train",
]
