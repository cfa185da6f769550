"""Target-relative similarity zones (DQE-CIR): candidates that score about as well as the target.

Shared by Stage-II training (``dqe_mid_zone`` refreshes its negatives with the
current queries) and triplet generation (``make-triplets`` picks hard negatives
with the reference image standing in for the query).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["mid_zone_table"]


@torch.no_grad()
def mid_zone_table(queries: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor, lo: float, hi: float,
                   pool: int, bounds: str = "value", dup_threshold: float = 0.98,
                   generator: Optional[torch.Generator] = None, chunk: int = 1024,
                   exclude: Optional[torch.Tensor] = None, fallback: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample up to ``pool`` mid-zone candidates per query; returns (table [N, pool] of indices or -1, zone sizes [N]).

    delta_ij = s(q_i, c_j) - s(q_i, t_i) on unit-norm rows; the zone is
    lo <= delta <= hi (values, or per-row quantiles of delta when
    ``bounds="quantile"``), never a candidate with s(t_i, c_j) >= dup_threshold
    nor one listed in ``exclude`` [N, E] (candidate indices, -1 = none). With
    ``fallback`` a row with an empty zone gets its highest-delta candidates
    below the zone (the hardest easy negatives); without, it gets only -1.
    """
    n, m = len(queries), len(candidates)
    pool = min(pool, m)
    table = torch.full((n, pool), -1, dtype=torch.long)
    sizes = torch.zeros(n, dtype=torch.long)
    cand = candidates.float()
    for s in range(0, n, chunk):
        q, t = queries[s: s + chunk].float(), targets[s: s + chunk].float()
        delta = q @ cand.T - (q * t).sum(-1, keepdim=True)
        banned = (t @ cand.T) >= dup_threshold
        if exclude is not None:
            ex = exclude[s: s + chunk].long()
            rows = torch.arange(len(q)).unsqueeze(1).expand_as(ex)
            keep = ex >= 0
            banned[rows[keep], ex[keep]] = True
        if bounds == "quantile":
            d = delta.masked_fill(banned, float("nan"))
            lo_v = torch.nanquantile(d, lo, dim=1, keepdim=True)
            hi_v = torch.nanquantile(d, hi, dim=1, keepdim=True)
        else:
            lo_v = torch.full((len(q), 1), lo)
            hi_v = torch.full((len(q), 1), hi)
        zone = (delta >= lo_v) & (delta <= hi_v) & ~banned
        sizes[s: s + len(q)] = zone.sum(1)
        noise = torch.rand(delta.shape, generator=generator)
        pick = noise.masked_fill(~zone, float("-inf")).topk(pool, dim=1)
        rows = pick.indices.masked_fill(~torch.isfinite(pick.values), -1)
        if fallback:
            below = delta.masked_fill(~((delta < lo_v) & ~banned), float("-inf")).topk(pool, dim=1)
            easy = below.indices.masked_fill(~torch.isfinite(below.values), -1)
            rows = torch.where((zone.sum(1) == 0).unsqueeze(1), easy, rows)
        table[s: s + len(q)] = rows
    return table, sizes
