"""Zero-shot evaluation on FashionIQ, CIRR, CIRCO and generic CIR folders, with test-server files.

>>> results = evaluate(model, "cirr", "val", root="/data/cirr")          # doctest: +SKIP
>>> results["metrics"]["R@1"]                                             # doctest: +SKIP

Pipeline: load the split (:mod:`zscir.data`), refuse to go on if annotated
images are missing (unless ``allow_missing``), encode every gallery once and
the queries in batches (:mod:`zscir.eval.encode`; gallery features cached on
disk by model, file list and file sizes + times), rank with
:func:`zscir.search.exact_topk` and score as the benchmark's protocol says
(:mod:`zscir.eval.protocols`), then print a table and optionally write results
JSON, per-query top-50 rankings and test-server submission files.
"""
from __future__ import annotations

import time
from collections import Counter, OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from ..checkpoint import atomic_write_json
from ..data.schema import CIRQuery, CIRSplit, ImageId
from ..precision import resolve_precision
from ..search.shards import current_workers
from .encode import PathLike, RetrievalModel, default_cache_dir, encode_gallery, encode_queries, model_device
from .protocols import (ASPECT_PREFIX, BENCHMARKS, RANKING_DEPTH, EvaluationError, MissingImagesError, compute_metrics,
                        load_benchmark, rank_split, skip_reason, write_submission)
from .submission import write_rankings

Galleries = Dict[str, Tuple[List[ImageId], torch.Tensor]]


def format_table(results: Mapping[str, Any]) -> str:
    """A readable text table of an :func:`evaluate` result."""
    title = f"{results['dataset']} {results['split']}: {results['num_queries']} queries"
    if results.get("precision", "no") != "no":
        title += f", encoded in {results['precision']}"
    if results.get("num_skipped"):
        title += f" ({results['num_skipped']} skipped: {dict(results.get('skipped', {}))})"
    lines = [title]
    metrics = results.get("metrics") or {}
    if not metrics:
        lines.append("  (no ground truth on this split: no metrics; see the rankings / submission files)")
    plain = {k: v for k, v in metrics.items() if not k.startswith(ASPECT_PREFIX)}
    width = max((len(k) for k in plain), default=0)
    for key, value in plain.items():
        lines.append(f"  {key.ljust(width)}  {value:7.2f}")
    # "aspect/<aspect>/<metric>" rows as a sub-table: one line per aspect, metric name in the heading
    aspects = [key[len(ASPECT_PREFIX):].rpartition("/") for key in metrics if key.startswith(ASPECT_PREFIX)]
    for metric in dict.fromkeys(m for _, _, m in aspects):
        rows = [(aspect, metrics[f"{ASPECT_PREFIX}{aspect}/{metric}"]) for aspect, _, m in aspects if m == metric]
        lines.append(f"  {metric} per semantic aspect:")
        name_width = max(len(aspect) for aspect, _ in rows)
        for aspect, value in rows:
            lines.append(f"    {aspect.ljust(name_width)}  {value:7.2f}")
    for label, key in (("rankings", "rankings_file"), ("results", "results_file")):
        if results.get(key):
            lines.append(f"  {label}: {results[key]}")
    for path in results.get("submission_files") or []:
        lines.append(f"  submission: {path}")
    for warning in results.get("warnings") or []:
        lines.append(f"  warning: {warning}")
    return "\n".join(lines)


def _load_split(dataset: Union[str, CIRSplit], split: str, root: Optional[PathLike],
                dataset_options: Optional[Mapping[str, Any]]) -> CIRSplit:
    """The split to evaluate: given, or loaded by benchmark name from `root`."""
    if isinstance(dataset, CIRSplit):
        if dataset_options:
            raise TypeError("dataset_options only apply when the dataset is given by name")
        return dataset
    if root is None:
        raise TypeError(f"evaluate: give root= the folder of the {dataset} data set")
    return load_benchmark(dataset, root, split, **dict(dataset_options or {}))


def _encode_galleries(model: RetrievalModel, data: CIRSplit, bad_images: Dict[ImageId, str], allow_missing: bool,
                      what: str, **encode: Any) -> Galleries:
    """Usable ids and features of every gallery; images that fail are added to `bad_images`."""
    galleries: Galleries = {}
    for name, ids in data.galleries.items():
        ids_ok = [i for i in ids if i not in bad_images]
        if not ids_ok:
            raise EvaluationError(f"{what}: gallery {name!r} has no readable image")
        feats, failed = encode_gallery(model, ids_ok, [data.image_paths[i] for i in ids_ok],
                                       desc=f"gallery {name}" if len(data.galleries) > 1 else "gallery", **encode)
        if failed and not allow_missing:
            raise MissingImagesError(what, failed)
        bad_images.update(failed)
        keep = [j for j, i in enumerate(ids_ok) if i not in failed]
        if not keep:
            raise EvaluationError(f"{what}: gallery {name!r} has no usable image")
        galleries[name] = ([ids_ok[j] for j in keep], feats[keep])
    return galleries


def _encode_usable_queries(model: RetrievalModel, data: CIRSplit, galleries: Galleries,
                           bad_images: Mapping[ImageId, str], allow_missing: bool, what: str, batch_size: int,
                           progress: bool, num_workers: int, precision: str = "no"
                           ) -> Tuple[List[CIRQuery], torch.Tensor, Counter, List[str]]:
    """The queries that can be evaluated, their features, and the skipped ones (counted by reason, and their ids)."""
    skipped: Counter = Counter()
    skipped_ids: List[str] = []
    candidates: List[CIRQuery] = []
    usable_ids = {name: set(ids) for name, (ids, _) in galleries.items()}
    for q in data.queries:
        reason = skip_reason(q, usable_ids[q.gallery], bad_images, data.has_targets)
        if reason is None:
            candidates.append(q)
        else:
            skipped[reason] += 1
            skipped_ids.append(q.query_id)
    query_feats, failed_queries = encode_queries(model, candidates, data.image_paths, batch_size, progress, num_workers,
                                                 precision)
    if failed_queries and not allow_missing:
        raise MissingImagesError(what, failed_queries)
    for qid, reason in failed_queries.items():
        skipped["reference image unreadable" if reason.startswith("reference unreadable") else "non-finite query embedding"] += 1
        skipped_ids.append(qid)
    keep_rows = [i for i, q in enumerate(candidates) if q.query_id not in failed_queries]
    queries = [candidates[i] for i in keep_rows]
    if not queries:
        raise EvaluationError(f"{what}: no query could be evaluated ({sum(skipped.values())} skipped: {dict(skipped)})")
    return queries, query_feats[keep_rows], skipped, skipped_ids


def _rank(galleries: Galleries, queries: List[CIRQuery], query_feats: torch.Tensor, exclude_reference: bool
          ) -> Tuple[Dict[str, List[ImageId]], Dict[str, Optional[List[ImageId]]]]:
    """Each query's ranking of its own gallery, and its subset ranking, by query id."""
    rankings: Dict[str, List[ImageId]] = {}
    subset_rankings: Dict[str, Optional[List[ImageId]]] = {}
    for name, (ids, feats) in galleries.items():
        rows = [i for i, q in enumerate(queries) if q.gallery == name]
        if not rows:
            continue
        group = [queries[i] for i in rows]
        ranked, subsets = rank_split(query_feats[rows], group, feats, ids, exclude_reference)
        for q, r, s in zip(group, ranked, subsets):
            rankings[q.query_id] = r
            subset_rankings[q.query_id] = s
    return rankings, subset_rankings


def _summary(model: RetrievalModel, data: CIRSplit, galleries: Galleries, queries: List[CIRQuery], skipped: Counter,
             skipped_ids: List[str], missing_images: int) -> Dict[str, Any]:
    """The head of a results dict: what was evaluated, with which model, and what was skipped."""
    results: Dict[str, Any] = OrderedDict()
    results["dataset"] = data.dataset
    results["split"] = data.split
    results["root"] = str(data.root)
    results["model"] = str(getattr(model, "cache_key", type(model).__name__))
    results["num_queries"] = len(queries)
    results["num_queries_total"] = data.num_queries
    results["num_skipped"] = sum(skipped.values())
    results["skipped"] = dict(skipped)
    results["skipped_query_ids"] = skipped_ids
    results["missing_images"] = missing_images
    results["gallery_sizes"] = {name: len(ids) for name, (ids, _) in galleries.items()}
    results["options"] = dict(data.info)
    return results


def evaluate(
    model: RetrievalModel,
    dataset: Union[str, CIRSplit],
    split: str = "val",
    root: Optional[PathLike] = None,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    allow_missing: bool = False,
    save_rankings: Optional[PathLike] = None,
    submission_dir: Optional[PathLike] = None,
    submission_name: str = "zscir",
    out: Optional[PathLike] = None,
    cache_dir: Optional[PathLike] = None,
    use_cache: bool = True,
    progress: bool = True,
    print_results: bool = True,
    dataset_options: Optional[Mapping[str, Any]] = None,
    precision: str = "no",
) -> Dict[str, Any]:
    """Evaluate `model` on a benchmark split and return the results dict (metrics in percent).

    `dataset` is a benchmark name (then `root` is its folder and `split` the
    split) or an already loaded :class:`CIRSplit` (`split` and `root` unused).  Missing or unreadable images raise
    :class:`MissingImagesError` unless `allow_missing`, which skips the affected
    queries and reports ``num_skipped``.  `save_rankings` writes every query's
    top-50 ids; `submission_dir` writes the CIRR/CIRCO server files.
    `num_workers` processes decode images (0: in this process). `precision` ("no", "bf16", "fp16",
    "auto") is the autocast the model encodes under; embeddings are ranked in float32.
    """
    started = time.time()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for attr in ("encode_images", "encode_query"):
        if not callable(getattr(model, attr, None)):
            raise TypeError(f"model has no {attr}() method; it must follow the RetrievalModel protocol")
    precision = resolve_precision(precision, model_device(model))  # an unsupported one fails before any work
    data = _load_split(dataset, split, root, dataset_options)
    bench = BENCHMARKS.get(data.dataset)
    data.validate()
    if submission_dir is not None and bench.submission is None:
        raise EvaluationError(f"{bench.name} has no test-server file format; use save_rankings (--save-rankings) instead")
    what = f"{data.dataset} {data.split} ({data.root})"

    bad_images: Dict[ImageId, str] = {i: f"file not found: {p}" for i, p in data.missing.items()}
    if bad_images and not allow_missing:
        raise MissingImagesError(what, bad_images)
    if cache_dir is None and use_cache:
        cache_dir = default_cache_dir()
    galleries = _encode_galleries(model, data, bad_images, allow_missing, what, batch_size=batch_size,
                                  cache_dir=cache_dir if use_cache else None, progress=progress, num_workers=num_workers,
                                  precision=precision)
    queries, query_feats, skipped, skipped_ids = _encode_usable_queries(
        model, data, galleries, bad_images, allow_missing, what, batch_size, progress, num_workers, precision)
    rankings, subset_rankings = _rank(galleries, queries, query_feats, data.exclude_reference)

    results = _summary(model, data, galleries, queries, skipped, skipped_ids, len(bad_images))
    results["precision"] = precision
    results["metrics"] = compute_metrics(
        bench, queries, [rankings[q.query_id] for q in queries], [subset_rankings[q.query_id] for q in queries]
    ) if data.has_targets else OrderedDict()
    warnings: List[str] = []
    if results["num_skipped"]:
        warnings.append(f"{results['num_skipped']} of {data.num_queries} queries were skipped (allow_missing): "
                        "the metrics are not comparable with published numbers")
    if not current_workers().is_main:  # under torchrun every process evaluates; the first one writes and prints
        save_rankings = submission_dir = out = None
        print_results = False
    if save_rankings is not None:
        results["rankings_file"] = str(write_rankings(save_rankings, rankings, data.dataset, data.split, RANKING_DEPTH))
    if submission_dir is not None:
        files = write_submission(bench, submission_dir, rankings, subset_rankings, submission_name, data.split)
        results["submission_files"] = [str(p) for p in files]
        if results["num_skipped"]:
            warnings.append("the submission files lack the skipped queries; the server may reject them")
    results["warnings"] = warnings
    results["elapsed_s"] = round(time.time() - started, 3)
    if out is not None:
        results["results_file"] = str(out)
        atomic_write_json(out, results)
    if print_results:
        print(format_table(results))
    return dict(results)


__all__ = ["evaluate", "format_table"]
