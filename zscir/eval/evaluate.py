"""Zero-shot evaluation on FashionIQ, CIRR, CIRCO and generic CIR folders, with test-server files.

>>> results = evaluate(model, "cirr", "val", root="/data/cirr")          # doctest: +SKIP
>>> results["metrics"]["R@1"]                                             # doctest: +SKIP

Pipeline: load the split (:mod:`zscir.data`), refuse to go on if annotated
images are missing (unless ``allow_missing``), encode every gallery once
(cached on disk by model, file list and file sizes + times), encode the queries in
batches (several texts per query are averaged after normalisation), rank with
:func:`zscir.index.exact_topk` (reference removed where the protocol says so),
score with :mod:`zscir.eval.metrics`, then print a table and optionally write
results JSON, per-query top-50 rankings and test-server submission files.

Protocols (one :class:`Benchmark` per data set in :data:`BENCHMARKS`):

=========  ==========================================  =====================================
data set   metrics                                     ranking
=========  ==========================================  =====================================
fashioniq  R@10, R@50 per category + their means       per-category gallery, reference kept
cirr       R@1,5,10,50; Rsubset@1,2,3; avg(R@5,Rs@1)   split gallery, reference removed
circo      mAP@5,10,25,50; R@5,10,25,50 (target only)  COCO unlabeled gallery, reference kept
generic    R@1,5,10,50 (any target); mAP@5,10,25,50;   folder gallery, reference removed
           per-kind recalls and their mean             unless it is a target
=========  ==========================================  =====================================
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import torch
import torch.nn.functional as F

from ..checkpoint import CheckpointError, atomic_write_json, load_tensors, save_tensors
from ..data.benchmarks.circo import load_circo
from ..data.benchmarks.cirr import load_cirr
from ..data.benchmarks.fashioniq import CAPTION_ORDERS, FASHIONIQ_CATEGORIES, load_fashioniq
from ..data.benchmarks.generic import load_generic
from ..data.schema import AnnotationError, CIRQuery, CIRSplit, ImageId
from ..registry import Registry
from . import metrics as M
from .submission import write_circo_submission, write_cirr_submission, write_rankings

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
RANKING_DEPTH = 50
CACHE_ENV = "ZSCIR_CACHE_DIR"
_MAX_LISTED = 20

__all__ = [
    "RetrievalModel",
    "EvaluationError",
    "MissingImagesError",
    "Benchmark",
    "BENCHMARKS",
    "load_benchmark",
    "default_cache_dir",
    "gallery_cache_key",
    "encode_gallery",
    "encode_queries",
    "rank_split",
    "compute_metrics",
    "evaluate",
    "format_table",
    "load_model",
    "add_arguments",
    "run",
]


@runtime_checkable
class RetrievalModel(Protocol):
    """What the evaluator needs from a model (e.g. :class:`zscir.composer.Composer`)."""

    cache_key: str  # identifies the weights and image pipeline; part of the gallery-feature cache key

    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """[N, D] L2-normalised embeddings of PIL images."""
        ...

    def encode_query(self, images: Sequence[Any], texts: Sequence[str]) -> torch.Tensor:
        """[N, D] L2-normalised composed-query embeddings of reference images + modification texts."""
        ...


class EvaluationError(RuntimeError):
    """Evaluation cannot produce honest numbers (bad model output, unusable inputs, bad options)."""


class MissingImagesError(EvaluationError):
    """Images the annotations refer to are missing or unreadable; lists them (use allow_missing to skip)."""

    def __init__(self, what: str, problems: Mapping[ImageId, str]) -> None:
        self.problems = dict(problems)
        lines = [f"{image_id}: {reason}" for image_id, reason in list(self.problems.items())[:_MAX_LISTED]]
        more = len(self.problems) - _MAX_LISTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"{what}: {len(self.problems)} image(s) missing or unreadable:\n  " + "\n  ".join(lines) + tail
            + "\nRefusing to report numbers that silently skip queries; pass allow_missing=True "
            "(--allow-missing) to skip the affected queries and report how many were skipped."
        )


# --------------------------------------------------------------------------- benchmarks
@dataclass(frozen=True)
class Benchmark:
    """One data set's loader and protocol: which metrics, how queries are grouped, which server files."""

    name: str
    load: Callable[..., CIRSplit]
    recall_ks: Tuple[int, ...]
    map_ks: Tuple[int, ...] = ()
    subset_ks: Tuple[int, ...] = ()
    recall_counts: str = "primary"  # "primary": only targets[0] counts for Recall@K; "any": any target
    group_by: Optional[str] = None  # "gallery": per-gallery metrics + mean; "kind": per-kind recalls + mean
    submission: Optional[str] = None  # "cirr" / "circo": test-server file format
    summary: Tuple[str, ...] = ()  # metrics whose mean is reported as "avg" (CIRR: R@5 and Rsubset@1)
    options: Tuple[str, ...] = field(default_factory=tuple)  # loader keyword arguments it accepts


BENCHMARKS: Registry[Benchmark] = Registry("CIR benchmark")
BENCHMARKS.add("fashioniq", Benchmark("fashioniq", load_fashioniq, recall_ks=(10, 50), group_by="gallery",
                                      options=("categories", "caption_order")))
BENCHMARKS.add("cirr", Benchmark("cirr", load_cirr, recall_ks=(1, 5, 10, 50), subset_ks=(1, 2, 3), submission="cirr",
                                 summary=("R@5", "Rsubset@1")))
BENCHMARKS.add("circo", Benchmark("circo", load_circo, recall_ks=(5, 10, 25, 50), map_ks=(5, 10, 25, 50),
                                  submission="circo", options=("use_shared_concept",)))
BENCHMARKS.add("generic", Benchmark("generic", load_generic, recall_ks=(1, 5, 10, 50), map_ks=(5, 10, 25, 50),
                                    recall_counts="any", group_by="kind", options=("exclude_reference",)))


def load_benchmark(name: str, root: PathLike, split: str = "val", **options: Any) -> CIRSplit:
    """Load split `split` of benchmark `name` from `root`; unknown options are an error naming them."""
    bench = BENCHMARKS.get(name)
    unknown = sorted(set(options) - set(bench.options))
    if unknown:
        raise TypeError(f"{name} does not take option(s) {unknown}; it takes {list(bench.options) or 'none'}")
    return bench.load(root, split, **options)


# ----------------------------------------------------------------------------- helpers
def _as_features(out: Any, expected_rows: int, what: str) -> torch.Tensor:
    """Check a model output is a [N, D] tensor and return it as float32 CPU, L2-normalised."""
    if not isinstance(out, torch.Tensor):
        raise EvaluationError(f"{what}: the model returned {type(out).__name__}, expected a torch.Tensor")
    if out.dim() != 2 or out.shape[0] != expected_rows:
        raise EvaluationError(f"{what}: the model returned shape {tuple(out.shape)}, expected [{expected_rows}, D]")
    out = out.detach().float().cpu()
    # normalising again is harmless for normalised outputs and keeps cosine ranking for sloppy models
    return F.normalize(out, dim=-1)


def _nonfinite_rows(features: torch.Tensor) -> List[int]:
    return torch.nonzero(~torch.isfinite(features).all(dim=1)).flatten().tolist()


def default_cache_dir() -> Path:
    """Gallery feature cache folder: ``$ZSCIR_CACHE_DIR`` or ``~/.cache/zscir/gallery``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "zscir" / "gallery"


def gallery_cache_key(model_key: str, paths: Sequence[Path]) -> str:
    """Hex digest of (model cache key, sorted file list, each file's size and modification time).

    A replaced or edited image changes its size or time and so the key; a
    touched file only costs one recomputation.
    """
    h = hashlib.sha256()
    h.update(f"zscir-gallery-v1\n{model_key}\n".encode("utf-8"))
    for p in sorted(os.path.abspath(p) for p in paths):
        try:
            st = os.stat(p)
            stamp = f"{st.st_size}\t{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{p}\t{stamp}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# ---------------------------------------------------------------------------- encoding
def _image_batches(
    paths: Sequence[Path], batch_size: int, num_workers: int, progress: bool, desc: str, failures: Dict[int, str]
) -> Iterator[Tuple[torch.Tensor, List[Any]]]:
    """Decoded images in batches (bad ones recorded in `failures` by position), via zscir.data.images."""
    from ..data.images import iter_image_batches

    def record(failure: Any) -> None:
        failures[failure.index] = f"cannot load {failure.path}: {failure.reason}"

    batches = iter_image_batches(list(paths), None, batch_size, num_workers=num_workers, progress=progress,
                                 on_failure=record, desc=desc)
    try:
        yield from batches
    except RuntimeError as err:  # every one of the first images failed: a wrong folder, not a few bad files
        raise EvaluationError(f"{desc}: {err}") from None


def encode_gallery(
    model: RetrievalModel,
    ids: Sequence[ImageId],
    paths: Sequence[Path],
    batch_size: int = 64,
    cache_dir: Optional[PathLike] = None,
    progress: bool = True,
    desc: str = "gallery",
    num_workers: int = 0,
) -> Tuple[torch.Tensor, Dict[ImageId, str]]:
    """Embed gallery images ([N, D], rows of unusable images are NaN) and return the failures by id.

    With `cache_dir` the features of a fully readable gallery are stored as
    safetensors keyed by :func:`gallery_cache_key` and reused on the next call.
    `num_workers` decoding processes feed the model (0: decode in this process).
    """
    if len(ids) != len(paths):
        raise ValueError(f"encode_gallery: {len(ids)} ids but {len(paths)} paths")
    if not ids:
        raise EvaluationError(f"{desc}: the gallery is empty")
    model_key = getattr(model, "cache_key", None)
    cache_file: Optional[Path] = None
    order: List[int] = []
    if cache_dir is not None and model_key:
        # the cache stores rows in sorted-path order, so the same files in another order still hit
        absolute = [os.path.abspath(p) for p in paths]
        order = sorted(range(len(paths)), key=absolute.__getitem__)
        key = gallery_cache_key(str(model_key), paths)
        cache_file = Path(cache_dir) / f"gallery-{key[:32]}.safetensors"
        if cache_file.is_file():
            try:
                cached = load_tensors(cache_file)["features"]
                if cached.shape[0] == len(ids) and not _nonfinite_rows(cached):
                    features = torch.empty_like(cached)
                    features[torch.tensor(order)] = cached
                    logger.info("loaded %d gallery features from %s", len(ids), cache_file)
                    return features, {}
                logger.warning("ignoring gallery cache %s: it holds %d rows, expected %d", cache_file, cached.shape[0], len(ids))
            except (CheckpointError, KeyError) as err:
                logger.warning("ignoring unreadable gallery cache %s: %s", cache_file, err)

    load_failures: Dict[int, str] = {}
    failures: Dict[ImageId, str] = {}
    rows: List[Optional[torch.Tensor]] = [None] * len(ids)
    with torch.inference_mode():
        for positions, images in _image_batches(paths, batch_size, num_workers, progress, desc, load_failures):
            positions = positions.tolist()
            feats = _as_features(model.encode_images(images), len(images), f"{desc}: encode_images")
            bad = set(_nonfinite_rows(feats))
            for row, i in enumerate(positions):
                if row in bad:
                    failures[ids[i]] = f"the model returned a non-finite embedding for {paths[i]}"
                else:
                    rows[i] = feats[row]
    failures.update({ids[i]: reason for i, reason in load_failures.items()})
    dim = next((r.shape[0] for r in rows if r is not None), None)
    if dim is None:
        raise EvaluationError(f"{desc}: none of the {len(ids)} gallery images could be embedded, e.g. {next(iter(failures.values()))}")
    nan_row = torch.full((dim,), float("nan"))
    features = torch.stack([r if r is not None else nan_row for r in rows])
    if cache_file is not None and not failures:
        save_tensors(cache_file, {"features": features[torch.tensor(order)]},
                     metadata={"model": str(model_key), "count": str(len(ids))})
    return features, failures


def encode_queries(
    model: RetrievalModel,
    queries: Sequence[CIRQuery],
    image_paths: Mapping[ImageId, Path],
    batch_size: int = 64,
    progress: bool = True,
    num_workers: int = 0,
) -> Tuple[torch.Tensor, Dict[str, str]]:
    """Embed composed queries ([Q, D]; a query with several texts averages their normalised features).

    Returns the features and the failures by query id (unreadable reference or
    non-finite output); failed rows are NaN.
    """
    if not queries:
        return torch.empty(0, 0), {}
    load_failures: Dict[int, str] = {}
    failures: Dict[str, str] = {}
    rows: List[Optional[torch.Tensor]] = [None] * len(queries)
    paths = [image_paths[q.reference] for q in queries]
    with torch.inference_mode():
        for positions, images in _image_batches(paths, batch_size, num_workers, progress, "queries", load_failures):
            positions = positions.tolist()
            summed: Optional[torch.Tensor] = None
            for t in range(max(len(queries[i].texts) for i in positions)):
                members = [j for j, i in enumerate(positions) if len(queries[i].texts) > t]
                feats = _as_features(
                    model.encode_query([images[j] for j in members], [queries[positions[j]].texts[t] for j in members]),
                    len(members), "queries: encode_query",
                )
                if summed is None:
                    summed = torch.zeros(len(positions), feats.shape[1])
                summed[members] += feats
            # SEARLE protocol: normalise((normalise(f1) + normalise(f2)) / 2); the /2 cancels out
            combined = F.normalize(summed, dim=-1)
            bad = set(_nonfinite_rows(combined))
            for row, i in enumerate(positions):
                if row in bad:
                    failures[queries[i].query_id] = "the model returned a non-finite query embedding"
                else:
                    rows[i] = combined[row]
    for i, reason in load_failures.items():
        failures[queries[i].query_id] = f"reference unreadable: {reason}"
    dim = next((r.shape[0] for r in rows if r is not None), 0)
    nan_row = torch.full((dim,), float("nan"))
    return torch.stack([r if r is not None else nan_row for r in rows]), failures


# ----------------------------------------------------------------------------- ranking
def rank_split(
    query_features: torch.Tensor,
    queries: Sequence[CIRQuery],
    gallery_features: torch.Tensor,
    gallery_ids: Sequence[ImageId],
    exclude_reference: bool,
    depth: int = RANKING_DEPTH,
) -> Tuple[List[List[ImageId]], List[Optional[List[ImageId]]]]:
    """Top-`depth` gallery ids for each query (ties: lower gallery index first), plus its subset ranking.

    With `exclude_reference` each query's reference is removed from its ranking
    unless it is also one of its targets.  A query's subset ranking (CIRR) orders
    its `subset` members by score with the same tie rule.
    """
    from ..index import exact_topk

    if not queries:
        return [], []
    position = {g: i for i, g in enumerate(gallery_ids)}
    exclude: Optional[List[List[int]]] = None
    if exclude_reference:
        exclude = [
            [position[q.reference]] if q.reference in position and q.reference not in q.targets else []
            for q in queries
        ]
    _, indices = exact_topk(query_features, gallery_features, depth, exclude=exclude)
    rankings = [[gallery_ids[i] for i in row if i >= 0] for row in indices.tolist()]
    subset_rankings: List[Optional[List[ImageId]]] = []
    for row, q in enumerate(queries):
        if q.subset is None:
            subset_rankings.append(None)
            continue
        members = sorted(position[m] for m in q.subset)
        scores = gallery_features[members] @ query_features[row]
        order = M.rank_scores(scores).tolist()
        subset_rankings.append([gallery_ids[members[i]] for i in order])
    return rankings, subset_rankings


# ----------------------------------------------------------------------------- metrics
def _recall_truths(bench: Benchmark, queries: Sequence[CIRQuery]) -> List[Tuple[ImageId, ...]]:
    if bench.recall_counts == "primary":
        return [q.targets[:1] for q in queries]
    return [q.targets for q in queries]


def _plain_metrics(bench: Benchmark, queries: Sequence[CIRQuery], rankings: Sequence[Sequence[ImageId]],
                   subset_rankings: Sequence[Optional[Sequence[ImageId]]]) -> "OrderedDict[str, float]":
    out: "OrderedDict[str, float]" = OrderedDict()
    if bench.map_ks:
        for k, v in M.mean_average_precision_at_ks(rankings, [q.targets for q in queries], bench.map_ks).items():
            out[f"mAP@{k}"] = v
    for k, v in M.recall_at_ks(rankings, _recall_truths(bench, queries), bench.recall_ks).items():
        out[f"R@{k}"] = v
    if bench.subset_ks:
        subset = [r if r is not None else [] for r in subset_rankings]
        for k, v in M.recall_subset_at_ks(subset, [q.targets[0] for q in queries], bench.subset_ks).items():
            out[f"Rsubset@{k}"] = v
    return out


def compute_metrics(
    bench: Union[str, Benchmark],
    queries: Sequence[CIRQuery],
    rankings: Sequence[Sequence[ImageId]],
    subset_rankings: Optional[Sequence[Optional[Sequence[ImageId]]]] = None,
) -> "OrderedDict[str, float]":
    """The benchmark's metrics (percent) for ranked labelled queries, as a flat ordered dict.

    FashionIQ: ``<category>/R@10``, ``<category>/R@50``, ``average/R@10``,
    ``average/R@50`` and ``average`` (mean of the two).  CIRR: ``R@K``,
    ``Rsubset@K`` and ``avg`` = (R@5 + Rsubset@1) / 2.  CIRCO: ``mAP@K``, ``R@K``.
    Generic: ``mAP@K``, ``R@K`` and, when queries have a kind,
    ``kind/<kind>/R@K`` and ``mean_over_kinds/R@K``.
    """
    bench = BENCHMARKS.get(bench) if isinstance(bench, str) else bench
    if subset_rankings is None:
        subset_rankings = [None] * len(queries)
    if not (len(queries) == len(rankings) == len(subset_rankings)):
        raise ValueError(f"compute_metrics: {len(queries)} queries, {len(rankings)} rankings, {len(subset_rankings)} subset rankings")
    if not queries:
        raise EvaluationError("no queries left to score")
    out: "OrderedDict[str, float]" = OrderedDict()
    if bench.group_by == "gallery":
        groups: "OrderedDict[str, List[int]]" = OrderedDict()
        for i, q in enumerate(queries):
            groups.setdefault(q.gallery, []).append(i)
        per_group = OrderedDict()
        for name, idx in groups.items():
            per_group[name] = _plain_metrics(bench, [queries[i] for i in idx], [rankings[i] for i in idx],
                                             [subset_rankings[i] for i in idx])
            for key, value in per_group[name].items():
                out[f"{name}/{key}"] = value
        keys = list(next(iter(per_group.values())))
        for key in keys:
            out[f"average/{key}"] = sum(m[key] for m in per_group.values()) / len(per_group)
        out["average"] = sum(out[f"average/{key}"] for key in keys) / len(keys)
        return out
    out.update(_plain_metrics(bench, queries, rankings, subset_rankings))
    if bench.summary:
        out["avg"] = sum(out[key] for key in bench.summary) / len(bench.summary)
    if bench.group_by == "kind" and any(q.kind is not None for q in queries):
        kinds: "OrderedDict[str, List[int]]" = OrderedDict()
        for i, q in enumerate(queries):
            kinds.setdefault(q.kind if q.kind is not None else "(none)", []).append(i)
        per_kind = OrderedDict()
        for name in sorted(kinds):
            idx = kinds[name]
            per_kind[name] = M.recall_at_ks([rankings[i] for i in idx],
                                            _recall_truths(bench, [queries[i] for i in idx]), bench.recall_ks)
            for k, v in per_kind[name].items():
                out[f"kind/{name}/R@{k}"] = v
        for k in bench.recall_ks:
            out[f"mean_over_kinds/R@{k}"] = sum(m[k] for m in per_kind.values()) / len(per_kind)
    return out


# ----------------------------------------------------------------------------- driver
def _skip_reason(q: CIRQuery, gallery_ok: set, bad_images: Mapping[ImageId, str], has_targets: bool) -> Optional[str]:
    if q.reference in bad_images:
        return "reference image missing or unreadable"
    if has_targets and any(t not in gallery_ok for t in q.targets):
        return "target image missing or unreadable"
    if q.subset is not None and any(m not in gallery_ok for m in q.subset):
        return "subset member missing or unreadable"
    return None


def format_table(results: Mapping[str, Any]) -> str:
    """A readable text table of an :func:`evaluate` result."""
    title = f"{results['dataset']} {results['split']}: {results['num_queries']} queries"
    if results.get("num_skipped"):
        title += f" ({results['num_skipped']} skipped: {dict(results.get('skipped', {}))})"
    lines = [title]
    metrics = results.get("metrics") or {}
    if not metrics:
        lines.append("  (no ground truth on this split: no metrics; see the rankings / submission files)")
    width = max((len(k) for k in metrics), default=0)
    for key, value in metrics.items():
        lines.append(f"  {key.ljust(width)}  {value:7.2f}")
    for label, key in (("rankings", "rankings_file"), ("results", "results_file")):
        if results.get(key):
            lines.append(f"  {label}: {results[key]}")
    for path in results.get("submission_files") or []:
        lines.append(f"  submission: {path}")
    for warning in results.get("warnings") or []:
        lines.append(f"  warning: {warning}")
    return "\n".join(lines)


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
) -> Dict[str, Any]:
    """Evaluate `model` on a benchmark split and return the results dict (metrics in percent).

    `dataset` is a benchmark name (then `root` is its folder and `split` the
    split) or an already loaded :class:`CIRSplit` (`split` and `root` unused).  Missing or unreadable images raise
    :class:`MissingImagesError` unless `allow_missing`, which skips the affected
    queries and reports ``num_skipped``.  `save_rankings` writes every query's
    top-50 ids; `submission_dir` writes the CIRR/CIRCO server files.
    `num_workers` processes decode images (0: in this process).
    """
    started = time.time()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for attr in ("encode_images", "encode_query"):
        if not callable(getattr(model, attr, None)):
            raise TypeError(f"model has no {attr}() method; it must follow the RetrievalModel protocol")
    if isinstance(dataset, CIRSplit):
        data = dataset
        if dataset_options:
            raise TypeError("dataset_options only apply when the dataset is given by name")
    else:
        if root is None:
            raise TypeError(f"evaluate: give root= the folder of the {dataset} data set")
        data = load_benchmark(dataset, root, split, **dict(dataset_options or {}))
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

    galleries: Dict[str, Tuple[List[ImageId], torch.Tensor]] = {}
    for name, ids in data.galleries.items():
        ids_ok = [i for i in ids if i not in bad_images]
        if not ids_ok:
            raise EvaluationError(f"{what}: gallery {name!r} has no readable image")
        feats, failed = encode_gallery(model, ids_ok, [data.image_paths[i] for i in ids_ok], batch_size,
                                       cache_dir if use_cache else None, progress,
                                       desc=f"gallery {name}" if len(data.galleries) > 1 else "gallery",
                                       num_workers=num_workers)
        if failed and not allow_missing:
            raise MissingImagesError(what, failed)
        bad_images.update(failed)
        keep = [j for j, i in enumerate(ids_ok) if i not in failed]
        if not keep:
            raise EvaluationError(f"{what}: gallery {name!r} has no usable image")
        galleries[name] = ([ids_ok[j] for j in keep], feats[keep])

    skipped: Counter = Counter()
    skipped_ids: List[str] = []
    candidates: List[CIRQuery] = []
    usable_ids = {name: set(ids) for name, (ids, _) in galleries.items()}
    for q in data.queries:
        reason = _skip_reason(q, usable_ids[q.gallery], bad_images, data.has_targets)
        if reason is None:
            candidates.append(q)
        else:
            skipped[reason] += 1
            skipped_ids.append(q.query_id)
    query_feats, failed_queries = encode_queries(model, candidates, data.image_paths, batch_size, progress, num_workers)
    if failed_queries and not allow_missing:
        raise MissingImagesError(what, failed_queries)
    for qid, reason in failed_queries.items():
        skipped["reference image unreadable" if reason.startswith("reference unreadable") else "non-finite query embedding"] += 1
        skipped_ids.append(qid)
    keep_rows = [i for i, q in enumerate(candidates) if q.query_id not in failed_queries]
    queries = [candidates[i] for i in keep_rows]
    if not queries:
        raise EvaluationError(f"{what}: no query could be evaluated ({sum(skipped.values())} skipped: {dict(skipped)})")
    query_feats = query_feats[keep_rows]

    rankings: Dict[str, List[ImageId]] = {}
    subset_rankings: Dict[str, Optional[List[ImageId]]] = {}
    for name, (ids, feats) in galleries.items():
        rows = [i for i, q in enumerate(queries) if q.gallery == name]
        if not rows:
            continue
        group = [queries[i] for i in rows]
        ranked, subsets = rank_split(query_feats[rows], group, feats, ids, data.exclude_reference)
        for q, r, s in zip(group, ranked, subsets):
            rankings[q.query_id] = r
            subset_rankings[q.query_id] = s

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
    results["missing_images"] = len(bad_images)
    results["gallery_sizes"] = {name: len(ids) for name, (ids, _) in galleries.items()}
    results["options"] = dict(data.info)
    warnings: List[str] = []
    if data.has_targets:
        results["metrics"] = compute_metrics(
            bench, queries, [rankings[q.query_id] for q in queries], [subset_rankings[q.query_id] for q in queries]
        )
    else:
        results["metrics"] = OrderedDict()
    if results["num_skipped"]:
        warnings.append(f"{results['num_skipped']} of {data.num_queries} queries were skipped (allow_missing): "
                        "the metrics are not comparable with published numbers")
    if save_rankings is not None:
        results["rankings_file"] = str(write_rankings(save_rankings, rankings, data.dataset, data.split, RANKING_DEPTH))
    if submission_dir is not None:
        if bench.submission == "cirr":
            files = write_cirr_submission(submission_dir, rankings,
                                          {k: v for k, v in subset_rankings.items() if v is not None}, submission_name)
        else:
            files = (write_circo_submission(submission_dir, rankings, submission_name, data.split),)
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


# --------------------------------------------------------------------------------- CLI
def load_model(model_dir: PathLike, device: Optional[str] = None) -> RetrievalModel:
    """Load the model folder for ``zscir eval --model DIR`` (a :class:`zscir.composer.Composer`)."""
    from ..composer import Composer
    from ..models.backbone import default_device

    return Composer.from_pretrained(model_dir, device=device or default_device())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``zscir eval`` options to `parser`."""
    parser.add_argument("--dataset", required=True, choices=BENCHMARKS.names(), help="benchmark to evaluate on")
    parser.add_argument("--root", required=True, help="folder of the data set in its official layout")
    parser.add_argument("--split", default="val", choices=["val", "test"], help="split (CIRR test means test1)")
    parser.add_argument("--model", required=True, help="model folder written by Composer.save_pretrained")
    parser.add_argument("--batch-size", type=int, default=64, help="images / queries per model call")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--workers", type=int, default=0, help="image decoding processes (0: decode in the main process)")
    parser.add_argument("--save-rankings", metavar="FILE", help="write each query's top-50 gallery ids to FILE (JSON)")
    parser.add_argument("--submission", metavar="DIR", help="write the CIRR / CIRCO test-server JSON files into DIR")
    parser.add_argument("--submission-name", default="zscir", help="file-name prefix of the submission files")
    parser.add_argument("--out", metavar="FILE", help="write the results as JSON to FILE")
    parser.add_argument("--allow-missing", action="store_true",
                        help="skip queries whose images are missing or unreadable (and report how many)")
    parser.add_argument("--cache-dir", help=f"gallery feature cache folder (default ${CACHE_ENV} or ~/.cache/zscir/gallery)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the gallery feature cache")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--fiq-categories", nargs="+", choices=list(FASHIONIQ_CATEGORIES),
                        default=list(FASHIONIQ_CATEGORIES), help="FashionIQ categories to evaluate")
    parser.add_argument("--fiq-caption-order", choices=list(CAPTION_ORDERS), default="both",
                        help="FashionIQ query text: both caption orders averaged (SEARLE/LinCIR) or 'c1 and c2' only")
    parser.add_argument("--circo-shared-concept", action="store_true",
                        help="CIRCO: prepend the shared concept to the relative caption")
    parser.add_argument("--keep-reference", action="store_true",
                        help="generic: keep each query's reference image in its ranking")


def _dataset_options(args: argparse.Namespace) -> Dict[str, Any]:
    if args.dataset == "fashioniq":
        return {"categories": tuple(args.fiq_categories), "caption_order": args.fiq_caption_order}
    if args.dataset == "circo":
        return {"use_shared_concept": bool(args.circo_shared_concept)}
    if args.dataset == "generic":
        return {"exclude_reference": not args.keep_reference}
    return {}


def run(args: argparse.Namespace) -> int:
    """Run ``zscir eval``: load the model, evaluate, print the table; exit code 1 on data errors."""
    try:
        model = load_model(args.model, getattr(args, "device", None))
        evaluate(
            model,
            args.dataset,
            args.split,
            root=args.root,
            batch_size=args.batch_size,
            num_workers=args.workers,
            allow_missing=args.allow_missing,
            save_rankings=args.save_rankings,
            submission_dir=args.submission,
            submission_name=args.submission_name,
            out=args.out,
            cache_dir=args.cache_dir,
            use_cache=not args.no_cache,
            progress=not args.no_progress,
            dataset_options=_dataset_options(args),
        )
    except (AnnotationError, EvaluationError, CheckpointError) as err:
        print(f"zscir eval: error: {err}", file=sys.stderr)
        return 1
    return 0
