"""The extraction stage (the only code that builds torch models)."""

from __future__ import annotations

from penult.core.lazy import lazy_package

# name -> the module defining it, imported on first use (PEP 562): `penult CMD --help` imports a
# light module of this package without pulling in what the others import (torch, scikit-learn)
_WHERE = {
    "EmbeddedBatch": "penult.extract.embed",
    "backbone_from_fingerprint": "penult.extract.embed",
    "embed_files": "penult.extract.embed",
    "Embedder": "penult.extract.embedder",
    "Featuriser": "penult.extract.featurise",
    "ImageError": "penult.extract.images",
    "decode_image": "penult.extract.images",
    "Backbone": "penult.extract.model",
    "build_backbone": "penult.extract.model",
    "ExtractOptions": "penult.extract.options",
    "SampleOptions": "penult.extract.options",
    "DEFAULT_BACKBONE": "penult.extract.names",
    "REGISTRY": "penult.extract.registry",
    "UnknownBackboneError": "penult.extract.registry",
    "get_spec": "penult.extract.registry",
    "extract": "penult.extract.run",
    "FolderStream": "penult.extract.walk",
    "Listing": "penult.extract.listing",
    "SourceError": "penult.extract.listing",
    "list_images": "penult.extract.sources",
    "open_source": "penult.extract.sources",
    "ExtractSummary": "penult.extract.summary",
    "WeightsError": "penult.extract.weights",
}


__getattr__, __dir__ = lazy_package(__name__, _WHERE)


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
    "FolderStream",
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
    "open_source",
]
