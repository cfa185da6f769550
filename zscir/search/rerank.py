"""Inference-time similarity denoising: diffuse a query's top-K scores over the candidates' kNN graph.

A composed query often ranks a few *isolated* hard negatives high: images that
match one word of the text but resemble none of the other good candidates.
The true targets of a query tend to sit in a neighbourhood of mutually similar
good candidates. For one query with top-K candidates (scores s0 [K], features
f [K, D], unit-norm):

    A_ij = max(0, <f_i, f_j>)^power   for j among the k_nn nearest candidates of i (i != j), else 0
    W    = A row-normalised
    s^{n+1} = (1 - alpha) s0 + alpha W s^n,   s^0 = s0,   n = 0..iterations-1

(label propagation / personalised PageRank anchored at the original scores).
An isolated candidate's neighbours score low, so its smoothed score drops; a
candidate inside a cluster of good candidates keeps its score. The candidates
are re-ordered by s^N. Off by default; it is not part of the trained model
(this is our addition, beyond MELT's training-time denoising).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Tuple

import torch
import torch.nn.functional as F

from ..config import Config
from .exact import exact_topk


@dataclasses.dataclass
class RerankConfig(Config):
    """Settings of the kNN-graph score diffusion."""

    k_nn: int = 5  # graph neighbours per candidate
    alpha: float = 0.3  # 0: no change; towards 1: scores come from the neighbours
    iterations: int = 5
    power: float = 3.0  # sharpens affinities so that weak neighbours count little

    def __post_init__(self) -> None:
        if self.k_nn < 1:
            raise ValueError(f"k_nn must be >= 1, got {self.k_nn}")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"alpha must be in [0, 1), got {self.alpha}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if self.power <= 0:
            raise ValueError(f"power must be > 0, got {self.power}")


def knn_affinity(features: torch.Tensor, k_nn: int, power: float = 1.0) -> torch.Tensor:
    """Row-normalised kNN affinity W [Q, K, K] among each query's candidates [Q, K, D] (no self loops)."""
    f = F.normalize(features.float(), dim=-1)
    sims = torch.einsum("qkd,qjd->qkj", f, f)
    k = f.shape[1]
    eye = torch.eye(k, dtype=torch.bool, device=f.device)
    sims = sims.masked_fill(eye, float("-inf"))
    nn_k = min(k_nn, k - 1)
    affinity = torch.zeros_like(sims)
    if nn_k > 0:
        top = sims.topk(nn_k, dim=-1)
        affinity.scatter_(-1, top.indices, top.values.clamp_min(0).pow(power))
    return affinity / affinity.sum(-1, keepdim=True).clamp_min(1e-12)


def rerank(scores: torch.Tensor, candidate_features: torch.Tensor, config: RerankConfig = RerankConfig(),
           **overrides: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """Diffuse top-K scores [Q, K] (or [K]) over the candidates' kNN graph; returns (order, new scores) [Q, K].

    ``order[q]`` lists positions into the candidate list, best first;
    ``new_scores[q]`` are the diffused scores in that order. ``candidate_features``
    is [Q, K, D] (or [K, D]); ``overrides`` replace config fields (e.g. alpha=0.5).
    A row whose candidates are padding (score -inf) keeps them last.
    """
    cfg = dataclasses.replace(config, **overrides) if overrides else config
    single = scores.ndim == 1
    if single:
        scores, candidate_features = scores.unsqueeze(0), candidate_features.unsqueeze(0)
    if scores.ndim != 2 or candidate_features.ndim != 3 or candidate_features.shape[:2] != scores.shape:
        raise ValueError(f"scores must be [Q, K] and candidate_features [Q, K, D]; got {tuple(scores.shape)} "
                         f"and {tuple(candidate_features.shape)}")
    s0 = scores.float()
    pad = ~torch.isfinite(s0)
    base = s0.masked_fill(pad, 0.0)
    w = knn_affinity(candidate_features, cfg.k_nn, cfg.power)
    w = w.masked_fill(pad.unsqueeze(1), 0.0)  # padding never lends its score
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    s = base
    for _ in range(cfg.iterations):
        s = (1 - cfg.alpha) * base + cfg.alpha * torch.einsum("qkj,qj->qk", w, s)
    s = s.masked_fill(pad, float("-inf"))
    new_scores, order = s.sort(dim=1, descending=True, stable=True)
    if single:
        return order[0], new_scores[0]
    return order, new_scores


@torch.no_grad()
def rerank_search(queries: torch.Tensor, gallery: torch.Tensor, k: int, config: RerankConfig = RerankConfig(),
                  **overrides: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` search of queries [Q, D] in a gallery [N, D], then :func:`rerank`; returns (scores, gallery indices)."""
    scores, idx = exact_topk(queries, gallery, k)
    feats = torch.as_tensor(gallery)[idx.clamp_min(0).cpu()].to(scores.device)
    order, new_scores = rerank(scores, feats, config, **overrides)
    return new_scores, idx.gather(1, order)
