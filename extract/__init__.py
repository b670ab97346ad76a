"""The extraction stage (the only code that builds torch models)."""

from penult.extract.embed import EmbeddedBatch, backbone_from_fingerprint, embed_files
from penult.extract.embedder import Embedder
from penult.extract.featurise import Featuriser
from penult.extract.images import ImageError, decode_image
from penult.extract.model import Backbone, build_backbone
from penult.extract.options import ExtractOptions, SampleOptions
from penult.extract.registry import DEFAULT_BACKBONE, REGISTRY, UnknownBackboneError, get_spec
from penult.extract.run import extract
from penult.extract.sources import Listing, SourceError, list_images
from penult.extract.summary import ExtractSummary
from penult.extract.weights import WeightsError

__all__ = [
    "DEFAULT_BACKBONE",
    "REGISTRY",
    "Backbone",
    "EmbeddedBatch",
    "Embedder",
    "ExtractOptions",
    "SampleOptions",
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
