"""Per-benchmark evaluation protocols: which queries count, how they are ranked and scored, which server files.

One :class:`Benchmark` per data set in :data:`BENCHMARKS`; the parts that differ
between protocols are looked up by name in small registries
(:data:`METRIC_GROUPINGS`, :data:`SUBMISSION_FORMATS`) instead of branching on
the data set:

=========  ==========================================  =====================================
data set   metrics                                     ranking
=========  ==========================================  =====================================
fashioniq  R@10, R@50 per category + their means       per-category gallery, reference kept
cirr       R@1,5,10,50; Rsubset@1,2,3; avg(R@5,Rs@1)   split gallery, reference removed
circo      mAP@5,10,25,50; R@5,10,25,50 (target only)  COCO unlabeled gallery, reference kept
           mAP@10 per semantic aspect (val)
generic    R@1,5,10,50 (any target); mAP@5,10,25,50;   folder gallery, reference removed
           per-kind recalls and their mean             unless it is a target
=========  ==========================================  =====================================

Test-server files are checked with the server's rules right after they are
written (:func:`write_submission`), so a file the server would refuse is an
error at evaluation time, not at upload.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..data.benchmarks.circo import CIRCO_SEMANTIC_ASPECTS, load_circo
from ..data.benchmarks.cirr import load_cirr
from ..data.benchmarks.fashioniq import load_fashioniq
from ..data.benchmarks.generic import load_generic
from ..data.schema import CIRQuery, CIRSplit, ImageId
from ..registry import Registry
from ..search.exact import exact_topk
from . import metrics as M
from .submission import (CIRCO_TOP_K, CIRR_SUBSET_TOP_K, CIRR_TOP_K, SubmissionError, check_circo_submission,
                         check_cirr_submission, write_circo_submission, write_cirr_submission)

PathLike = Union[str, "os.PathLike[str]"]
RANKING_DEPTH = 50
ASPECT_PREFIX = "aspect/"  # per-aspect metric keys: "aspect/<aspect>/mAP@<k>"
_MAX_LISTED = 20


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
    group_by: Optional[str] = None  # a METRIC_GROUPINGS name: None, "gallery" (per gallery + mean), "kind"
    submission: Optional[str] = None  # a SUBMISSION_FORMATS name: test-server file format
    summary: Tuple[str, ...] = ()  # metrics whose mean is reported as "avg" (CIRR: R@5 and Rsubset@1)
    aspect_map_k: Optional[int] = None  # mAP@K reported per query aspect, "aspect/<aspect>/mAP@K" (CIRCO: 10)
    aspect_order: Tuple[str, ...] = ()  # known aspects in report order; others follow, sorted
    options: Tuple[str, ...] = field(default_factory=tuple)  # loader keyword arguments it accepts


BENCHMARKS: Registry[Benchmark] = Registry("CIR benchmark")
BENCHMARKS.add("fashioniq", Benchmark("fashioniq", load_fashioniq, recall_ks=(10, 50), group_by="gallery",
                                      options=("categories", "caption_order")))
BENCHMARKS.add("cirr", Benchmark("cirr", load_cirr, recall_ks=(1, 5, 10, 50), subset_ks=(1, 2, 3), submission="cirr",
                                 summary=("R@5", "Rsubset@1")))
BENCHMARKS.add("circo", Benchmark("circo", load_circo, recall_ks=(5, 10, 25, 50), map_ks=(5, 10, 25, 50),
                                  submission="circo", aspect_map_k=10, aspect_order=CIRCO_SEMANTIC_ASPECTS,
                                  options=("use_shared_concept",)))
BENCHMARKS.add("generic", Benchmark("generic", load_generic, recall_ks=(1, 5, 10, 50), map_ks=(5, 10, 25, 50),
                                    recall_counts="any", group_by="kind",
                                    options=("exclude_reference", "columns", "image_root")))


def load_benchmark(name: str, root: PathLike, split: str = "val", **options: Any) -> CIRSplit:
    """Load split `split` of benchmark `name` from `root`; unknown options are an error naming them."""
    bench = BENCHMARKS.get(name)
    unknown = sorted(set(options) - set(bench.options))
    if unknown:
        raise TypeError(f"{name} does not take option(s) {unknown}; it takes {list(bench.options) or 'none'}")
    return bench.load(root, split, **options)


def skip_reason(q: CIRQuery, gallery_ok: set, bad_images: Mapping[ImageId, str], has_targets: bool) -> Optional[str]:
    """Why a query cannot be evaluated (an image it needs is unusable), or None."""
    if q.reference in bad_images:
        return "reference image missing or unreadable"
    if has_targets and any(t not in gallery_ok for t in q.targets):
        return "target image missing or unreadable"
    if q.subset is not None and any(m not in gallery_ok for m in q.subset):
        return "subset member missing or unreadable"
    return None


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
Rankings = Sequence[Sequence[ImageId]]
SubsetRankings = Sequence[Optional[Sequence[ImageId]]]


def _recall_truths(bench: Benchmark, queries: Sequence[CIRQuery]) -> List[Tuple[ImageId, ...]]:
    if bench.recall_counts == "primary":
        return [q.targets[:1] for q in queries]
    return [q.targets for q in queries]


def _plain_metrics(bench: Benchmark, queries: Sequence[CIRQuery], rankings: Rankings,
                   subset_rankings: SubsetRankings) -> "OrderedDict[str, float]":
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


def _per_aspect_map(bench: Benchmark, queries: Sequence[CIRQuery], rankings: Rankings) -> "OrderedDict[str, float]":
    """``aspect/<aspect>/mAP@K``: mean AP@K over the queries that have each aspect (official CIRCO evaluation)."""
    out: "OrderedDict[str, float]" = OrderedDict()
    k = bench.aspect_map_k
    if k is None:
        return out
    members: Dict[str, List[int]] = {}
    for i, q in enumerate(queries):
        for aspect in q.aspects:
            members.setdefault(aspect, []).append(i)
    known = [a for a in bench.aspect_order if a in members]
    for aspect in known + sorted(set(members) - set(known)):
        idx = members[aspect]
        value = M.mean_average_precision_at_ks([rankings[i] for i in idx], [queries[i].targets for i in idx], [k])[k]
        out[f"{ASPECT_PREFIX}{aspect}/mAP@{k}"] = value
    return out


def _overall_metrics(bench: Benchmark, queries: Sequence[CIRQuery], rankings: Rankings,
                     subset_rankings: SubsetRankings) -> "OrderedDict[str, float]":
    """One set of metrics over all queries, the benchmark's summary mean as ``avg``, and per-aspect mAP."""
    out = _plain_metrics(bench, queries, rankings, subset_rankings)
    if bench.summary:
        out["avg"] = sum(out[key] for key in bench.summary) / len(bench.summary)
    out.update(_per_aspect_map(bench, queries, rankings))
    return out


def _per_gallery_metrics(bench: Benchmark, queries: Sequence[CIRQuery], rankings: Rankings,
                         subset_rankings: SubsetRankings) -> "OrderedDict[str, float]":
    """``<gallery>/<metric>`` per gallery, ``average/<metric>`` over galleries and their mean ``average``."""
    out: "OrderedDict[str, float]" = OrderedDict()
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


def _per_kind_metrics(bench: Benchmark, queries: Sequence[CIRQuery], rankings: Rankings,
                      subset_rankings: SubsetRankings) -> "OrderedDict[str, float]":
    """The overall metrics, plus ``kind/<kind>/R@K`` and ``mean_over_kinds/R@K`` when queries have a kind."""
    out = _overall_metrics(bench, queries, rankings, subset_rankings)
    if not any(q.kind is not None for q in queries):
        return out
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


METRIC_GROUPINGS: Registry[Callable[..., Any]] = Registry("metric grouping")
METRIC_GROUPINGS.add("none", _overall_metrics)
METRIC_GROUPINGS.add("gallery", _per_gallery_metrics)
METRIC_GROUPINGS.add("kind", _per_kind_metrics)


def compute_metrics(
    bench: Union[str, Benchmark],
    queries: Sequence[CIRQuery],
    rankings: Rankings,
    subset_rankings: Optional[SubsetRankings] = None,
) -> "OrderedDict[str, float]":
    """The benchmark's metrics (percent) for ranked labelled queries, as a flat ordered dict.

    FashionIQ: ``<category>/R@10``, ``<category>/R@50``, ``average/R@10``,
    ``average/R@50`` and ``average`` (mean of the two).  CIRR: ``R@K``,
    ``Rsubset@K`` and ``avg`` = (R@5 + Rsubset@1) / 2.  CIRCO: ``mAP@K``, ``R@K`` and,
    when queries carry semantic aspects (val), ``aspect/<aspect>/mAP@10``.
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
    return METRIC_GROUPINGS.get(bench.group_by or "none")(bench, queries, rankings, subset_rankings)


# --------------------------------------------------------------------------- submission
def _expected_length(rankings: Mapping[str, Optional[Sequence[ImageId]]], top_k: int) -> int:
    """The list length the server wants (top_k), or fewer when the gallery itself is smaller."""
    return min(top_k, max((len(r) for r in rankings.values() if r is not None), default=top_k))


def _cirr_files(folder: PathLike, rankings: Mapping[str, Sequence[ImageId]],
                subset_rankings: Mapping[str, Optional[Sequence[ImageId]]], name: str, split: str) -> Tuple[Path, ...]:
    subsets = {k: v for k, v in subset_rankings.items() if v is not None}
    recall_path, subset_path = write_cirr_submission(folder, rankings, subsets, name)
    check_cirr_submission(recall_path, "recall", pair_ids=rankings, length=_expected_length(rankings, CIRR_TOP_K))
    check_cirr_submission(subset_path, "recall_subset", pair_ids=subsets,
                          length=_expected_length(subsets, CIRR_SUBSET_TOP_K))
    return recall_path, subset_path


def _circo_files(folder: PathLike, rankings: Mapping[str, Sequence[ImageId]],
                 subset_rankings: Mapping[str, Optional[Sequence[ImageId]]], name: str, split: str) -> Tuple[Path, ...]:
    path = write_circo_submission(folder, rankings, name, split)
    check_circo_submission(path, query_ids=rankings, length=_expected_length(rankings, CIRCO_TOP_K))
    return (path,)


SUBMISSION_FORMATS: Registry[Callable[..., Tuple[Path, ...]]] = Registry("test-server file format")
SUBMISSION_FORMATS.add("cirr", _cirr_files)
SUBMISSION_FORMATS.add("circo", _circo_files)


def write_submission(bench: Benchmark, folder: PathLike, rankings: Mapping[str, Sequence[ImageId]],
                     subset_rankings: Mapping[str, Optional[Sequence[ImageId]]], name: str, split: str) -> List[Path]:
    """Write the benchmark's test-server files into `folder` and check them as the server would; returns their paths.

    A written file the server would reject raises :class:`EvaluationError`
    listing its problems.
    """
    if bench.submission is None:
        raise EvaluationError(f"{bench.name} has no test-server file format; use save_rankings (--save-rankings) instead")
    try:
        return list(SUBMISSION_FORMATS.get(bench.submission)(folder, rankings, subset_rankings, name, split))
    except SubmissionError as err:
        raise EvaluationError(f"the {bench.name} submission files just written would be rejected by the server: "
                              f"{err}") from err


__all__ = [
    "ASPECT_PREFIX",
    "BENCHMARKS",
    "Benchmark",
    "EvaluationError",
    "METRIC_GROUPINGS",
    "MissingImagesError",
    "RANKING_DEPTH",
    "SUBMISSION_FORMATS",
    "compute_metrics",
    "load_benchmark",
    "rank_split",
    "skip_reason",
    "write_submission",
]
