"""Evaluation: benchmark protocols, query/gallery encoding with an on-disk cache, metrics, test-server files.

``protocols`` (per-benchmark rules) and ``encode`` (model -> features) feed
``evaluate`` (orchestration); ``metrics`` and ``submission`` are the scoring
and file formats; ``shapes_eval`` scores the built-in shapes world. The
function ``evaluate`` stays in :mod:`zscir.eval.evaluate` (exported here, its
name would hide the module).
"""
from .encode import CACHE_ENV, RetrievalModel, default_cache_dir, encode_gallery, encode_queries, gallery_cache_key
from .evaluate import format_table
from .protocols import (ASPECT_PREFIX, BENCHMARKS, METRIC_GROUPINGS, RANKING_DEPTH, SUBMISSION_FORMATS, Benchmark,
                        EvaluationError, MissingImagesError, compute_metrics, load_benchmark, rank_split, skip_reason,
                        write_submission)

__all__ = [
    "ASPECT_PREFIX",
    "BENCHMARKS",
    "Benchmark",
    "CACHE_ENV",
    "EvaluationError",
    "METRIC_GROUPINGS",
    "MissingImagesError",
    "RANKING_DEPTH",
    "RetrievalModel",
    "SUBMISSION_FORMATS",
    "compute_metrics",
    "default_cache_dir",
    "encode_gallery",
    "encode_queries",
    "format_table",
    "gallery_cache_key",
    "load_benchmark",
    "rank_split",
    "skip_reason",
    "write_submission",
]
