"""The extraction stage (the only code that builds torch models)."""

from extract.embed import EmbeddedBatch, backbone_from_fingerprint, embed_files
from extract.featurise import Featuriser
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
    "EmbeddedBatch",
    "Embedder",
    "ExtractOptions",
    "ExtractSummary",
    "Featuriser",
    "ImageError",
    "Listing",
    "SourceError",
    "UnknownBackboneError",
    "WeightsError",
    "backbone_from_fingerprint",
    "build_backbone",
    "decode_image",
    "embed_files",
    "extract",
    "get_spec",
    "list_images",
]
