"""Data: evaluation-set schema and benchmark loaders, image loading, feature caches, training triplets.

:mod:`.schema` (the :class:`CIRSplit` every benchmark loader returns),
:mod:`.benchmarks` (FashionIQ, CIRR, CIRCO, the generic folder format),
:mod:`.images` (robust image loading and batching), :mod:`.features` (cached
backbone features), :mod:`.triplets` (training triplet files) and
:mod:`.triplet_gen` (synthetic triplet generation, ``zscir make-triplets``).
"""
from .benchmarks import load_circo, load_cirr, load_fashioniq, load_generic, write_generic
from .features import CachedFeatureDataset, FeatureCache, FeatureCacheError
from .images import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    ImageSource,
    as_image_source,
    iter_image_batches,
    list_images,
    load_image,
    read_file_list,
)
from .schema import AnnotationError, CIRQuery, CIRSplit, FileChecker, ImageId, ProblemLog, read_json_file
from .triplet_gen import GENERATION_MODES, GenerationResult, TripletGenConfig, generate_triplets, make_triplets
from .triplets import TRIPLET_FORMATS, Triplet, TripletFileError, TripletSet, load_triplets

__all__ = [
    # schema
    "ImageId",
    "AnnotationError",
    "ProblemLog",
    "FileChecker",
    "CIRQuery",
    "CIRSplit",
    "read_json_file",
    # benchmarks
    "load_fashioniq",
    "load_cirr",
    "load_circo",
    "load_generic",
    "write_generic",
    # images
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "ImageSource",
    "load_image",
    "list_images",
    "read_file_list",
    "as_image_source",
    "iter_image_batches",
    # features
    "FeatureCache",
    "FeatureCacheError",
    "CachedFeatureDataset",
    # triplets
    "Triplet",
    "TripletSet",
    "TripletFileError",
    "TRIPLET_FORMATS",
    "load_triplets",
    # triplet generation
    "TripletGenConfig",
    "GenerationResult",
    "GENERATION_MODES",
    "generate_triplets",
    "make_triplets",
]
