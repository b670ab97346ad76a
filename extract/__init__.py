"""The extraction stage (the only code that builds torch models)."""

from extract.images import ImageError, decode_image
from extract.model import Backbone, Embedder, build_backbone
from extract.registry import DEFAULT_BACKBONE, REGISTRY, UnknownBackboneError, get_spec
from extract.run import ExtractOptions, ExtractSummary, extract
from extract.sources import Listing, SourceError, list_images
from extract.weights import WeightsError

__all__ = [
    "DEFAULT_BACKBONE",
    "REGISTRY",
    "Backbone",
    "Embedder",
    "ExtractOptions",
    "ExtractSummary",
    "ImageError",
    "Listing",
    "SourceError",
    "UnknownBackboneError",
    "WeightsError",
    "build_backbone",
    "decode_image",
    "extract",
    "get_spec",
    "list_images",
]
