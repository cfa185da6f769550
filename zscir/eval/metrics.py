"""Retrieval metrics for composed image retrieval: Recall@K, Recall_subset@K and mAP@K.

Conventions (shared by every protocol in :mod:`zscir.eval.evaluate`):

* A *ranking* is a sequence of gallery ids, best first.  Duplicated ids in a
  ranking count once: only the first occurrence is kept (:func:`unique_in_order`),
  so a ranking that repeats the target cannot score twice.
* Rankings may be shorter than K (a gallery with fewer than K items, or a
  submission that stores only the top 50).  Recall@K then asks whether a target
  is anywhere in the ranking; AP@K sums over the positions that exist.
* AP@K follows the official CIRCO definition: the sum of precision@i over the
  positions i <= K that hold a ground truth, divided by min(#ground truths, K).
  The divisor does not shrink when the gallery is smaller than K.
* Ties between equal scores are broken by gallery index, lower index first
  (:func:`rank_scores`), so the same scores always give the same ranking.
* Mean metrics are returned in percent (0-100), as papers report them.
"""
from __future__ import annotations

from typing import Collection, Dict, Hashable, Iterable, List, Optional, Sequence

import torch

__all__ = [
    "unique_in_order",
    "rank_scores",
    "hit_at_k",
    "average_precision_at_k",
    "recall_at_ks",
    "recall_subset_at_ks",
    "mean_average_precision_at_ks",
]


def unique_in_order(ranking: Iterable[Hashable]) -> List[Hashable]:
    """Drop repeated ids from a ranking, keeping each id's first (best) position."""
    seen = set()
    out = []
    for item in ranking:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def rank_scores(scores: torch.Tensor, k: Optional[int] = None) -> torch.Tensor:
    """Indices that sort `scores` ([N] or [Q, N]) best first; ties go to the lower index; top `k` if given."""
    if scores.dim() not in (1, 2):
        raise ValueError(f"rank_scores expects a [N] or [Q, N] tensor, got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("rank_scores: scores contain NaN; a NaN has no place in a ranking")
    # A stable descending sort keeps equal scores in index order (the documented tie rule).
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    if k is not None:
        if k < 0:
            raise ValueError(f"rank_scores: k must be >= 0, got {k}")
        order = order[..., :k]
    return order


def _check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"K must be a positive integer, got {k!r}")


def hit_at_k(ranking: Sequence[Hashable], targets: Collection[Hashable], k: int) -> float:
    """1.0 if any of `targets` is among the first `k` distinct ids of `ranking`, else 0.0."""
    _check_k(k)
    if len(targets) == 0:
        raise ValueError("hit_at_k: a query needs at least one target")
    wanted = set(targets)
    return 1.0 if any(item in wanted for item in unique_in_order(ranking)[:k]) else 0.0


def average_precision_at_k(ranking: Sequence[Hashable], ground_truths: Collection[Hashable], k: int) -> float:
    """CIRCO AP@K of one ranking: sum of precision at each hit in the top K / min(#ground truths, K)."""
    _check_k(k)
    relevant = set(ground_truths)
    if not relevant:
        raise ValueError("average_precision_at_k: a query needs at least one ground truth")
    hits = 0
    precision_sum = 0.0
    for position, item in enumerate(unique_in_order(ranking)[:k], start=1):
        if item in relevant:
            hits += 1
            precision_sum += hits / position
    return precision_sum / min(len(relevant), k)


def _check_lengths(rankings: Sequence, truths: Sequence, what: str) -> None:
    if len(rankings) != len(truths):
        raise ValueError(f"{what}: {len(rankings)} rankings but {len(truths)} ground-truth entries")
    if len(rankings) == 0:
        raise ValueError(f"{what}: no queries to score")


def recall_at_ks(
    rankings: Sequence[Sequence[Hashable]],
    targets: Sequence[Collection[Hashable]],
    ks: Sequence[int],
) -> Dict[int, float]:
    """Mean Recall@K in percent for each K: a query hits when any of its targets is in its top K."""
    _check_lengths(rankings, targets, "recall_at_ks")
    out: Dict[int, float] = {}
    for k in ks:
        _check_k(k)
        hits = 0.0
        for index, (ranking, wanted) in enumerate(zip(rankings, targets)):
            if len(wanted) == 0:
                raise ValueError(f"recall_at_ks: query #{index} has no target")
            hits += hit_at_k(ranking, wanted, k)
        out[k] = 100.0 * hits / len(rankings)
    return out


def recall_subset_at_ks(
    subset_rankings: Sequence[Sequence[Hashable]],
    targets: Sequence[Hashable],
    ks: Sequence[int],
) -> Dict[int, float]:
    """CIRR Recall_subset@K in percent: Recall@K of rankings over each query's own small group.

    Each ranking must contain its query's target (the group members minus the
    reference), otherwise the annotation or the ranking is broken and a
    ValueError names the query.
    """
    _check_lengths(subset_rankings, targets, "recall_subset_at_ks")
    for index, (ranking, target) in enumerate(zip(subset_rankings, targets)):
        if target not in ranking:
            raise ValueError(f"recall_subset_at_ks: query #{index}: target {target!r} is not in its subset ranking {list(ranking)}")
    return recall_at_ks(subset_rankings, [[t] for t in targets], ks)


def mean_average_precision_at_ks(
    rankings: Sequence[Sequence[Hashable]],
    ground_truths: Sequence[Collection[Hashable]],
    ks: Sequence[int],
) -> Dict[int, float]:
    """Mean AP@K in percent for each K (CIRCO definition, several ground truths per query)."""
    _check_lengths(rankings, ground_truths, "mean_average_precision_at_ks")
    out: Dict[int, float] = {}
    for k in ks:
        _check_k(k)
        total = 0.0
        for index, (ranking, relevant) in enumerate(zip(rankings, ground_truths)):
            if len(relevant) == 0:
                raise ValueError(f"mean_average_precision_at_ks: query #{index} has no ground truth")
            total += average_precision_at_k(ranking, relevant, k)
        out[k] = 100.0 * total / len(rankings)
    return out
