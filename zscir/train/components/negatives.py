"""The built-in Stage-II negatives: the triplets' own, the reference image, query-side negatives, mined corpus images."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ...config import Config
from ...losses import clamped_scale, duplicate_mask, target_to_query_info_nce
from .base import STAGE2_COMPONENTS, ComponentContext, Stage2Component, check_option, parse_options

__all__ = ["ExplicitNegatives", "ExplicitOptions", "MinedNegatives", "QueryNegative", "ReferenceNegative"]


@dataclasses.dataclass
class ExplicitOptions(Config):
    """Options of ``explicit``."""

    in_denominator: bool = True  # False: a separate CE over [target, the row's negatives] weighted by `weight`
    weight: float = 1.0


@STAGE2_COMPONENTS.register("explicit")
class ExplicitNegatives(Stage2Component):
    """The hard negatives the triplet data carries (``TripletFeatures.negatives``), masked where invalid.

    By default they join the denominator of the main InfoNCE. With ``in_denominator: false`` they form a
    separate term instead, ``weight * mean_i CE([s(q_i, t_i), s(q_i, n_i1), ..., s(q_i, n_iK)])``, so their
    pull can be weighed against the in-batch negatives.
    """

    name = "explicit"

    def __init__(self, ctx: ComponentContext, options: Dict[str, Any]) -> None:
        super().__init__(ctx, options)
        self.opts = o = parse_options(ExplicitOptions, self.name, options)
        check_option(o.weight >= 0, self.name, f"weight must be >= 0, got {o.weight}")
        if ctx.triplets.negatives is None:
            raise ValueError("the 'explicit' component needs triplets that carry negatives "
                             "(a 'negatives' field in the triplet file; zscir make-triplets --negatives K)")

    def prepare_batch(self, batch: Dict[str, Any], indices: torch.Tensor) -> None:
        """Attach the batch rows' negatives and their drop-mask."""
        t = self.ctx.triplets
        dev = batch["target"].device
        batch["explicit"] = t.negatives[indices].to(dev)
        batch["explicit_invalid"] = (~t.negative_valid[indices]).to(dev)

    def forward(self, module: Any, batch: Dict[str, Any], out: Dict[str, torch.Tensor]) -> None:
        """Pass the negatives through (gathered with the batch)."""
        out["explicit"] = batch["explicit"]
        out["explicit_invalid"] = batch["explicit_invalid"].float()  # float: all-gathers on gloo

    def extra_negatives(self, out: Dict[str, torch.Tensor],
                        batch: Dict[str, Any]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """[B, K, D] explicit negatives and their drop-mask (when they join the main denominator)."""
        if not self.opts.in_denominator:
            return None
        return out["explicit"], out["explicit_invalid"] > 0

    def loss(self, out: Dict[str, torch.Tensor], batch: Dict[str, Any], step: int,
             main_logits: torch.Tensor) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
        """The separate term (only when ``in_denominator`` is off)."""
        if self.opts.in_denominator:
            return None, {}
        scale = clamped_scale(out["log_scale"])
        q = out["query"]
        pos = (q * out["target"]).sum(-1, keepdim=True)
        neg = torch.einsum("bd,bkd->bk", q, out["explicit"])
        # mask after scaling: a -inf before it would make the scale's gradient 0 * inf = nan
        invalid = torch.cat([torch.zeros_like(pos, dtype=torch.bool), out["explicit_invalid"] > 0], dim=1)
        logits = (scale * torch.cat([pos, neg], dim=1)).masked_fill(invalid, float("-inf"))
        ce = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
        return self.opts.weight * ce, {"explicit": float(ce.detach())}


@STAGE2_COMPONENTS.register("reference")
class ReferenceNegative(Stage2Component):
    """The reference image is a negative for its own query (masked when it is a near duplicate of the target)."""

    name = "reference"

    def extra_negatives(self, out: Dict[str, torch.Tensor],
                        batch: Dict[str, Any]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """[B, 1, D] reference features."""
        ref = out["reference"]
        dup = (ref * out["target"]).sum(-1, keepdim=True) >= self.ctx.cfg.dup_threshold
        return ref.unsqueeze(1), dup


@STAGE2_COMPONENTS.register("query_negative")
class QueryNegative(Stage2Component):
    """Target-to-query InfoNCE where the same reference with another modification is a negative query."""

    name = "query_negative"
    needs_query_negatives = True

    def loss(self, out: Dict[str, torch.Tensor], batch: Dict[str, Any], step: int,
             main_logits: torch.Tensor) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
        """Weighted CE of t_i over [q_i, q'_i, other queries], on the rows that have a q'_i."""
        rows = (out["has_query_neg"] > 0).nonzero().squeeze(1) if "query_neg" in out else None
        if rows is None or not len(rows):
            return None, {}
        scale = clamped_scale(out["log_scale"])
        dup = duplicate_mask(out["target"], self.ctx.cfg.dup_threshold, out["target_code"])
        ce = target_to_query_info_nce(out["query"], out["query_neg"], out["target"], scale, dup, rows)
        w = self.ctx.cfg.query_negative_weight
        return w * ce, {"query_negative": float(ce.detach())}


@STAGE2_COMPONENTS.register("mined")
class MinedNegatives(Stage2Component):
    """Top-ranked non-target corpus images for each query, re-mined every ``refresh_every`` steps."""

    name = "mined"

    def __init__(self, ctx: ComponentContext, options: Dict[str, Any]) -> None:
        super().__init__(ctx, options)
        if ctx.corpus is None:
            raise ValueError("the 'mined' component needs a corpus of cached image features (corpus=...)")
        self.table: Optional[torch.Tensor] = None  # [N, pool] corpus indices

    def refresh(self) -> None:
        """Re-rank the corpus for every triplet with the current model."""
        from ...search.exact import exact_topk

        cfg = self.ctx.cfg
        queries = self.ctx.queries()
        corpus = self.ctx.corpus.features
        k = min(cfg.mined_pool + 8, len(corpus))
        _, idx = exact_topk(queries, corpus, k)
        tgt = self.ctx.triplets.target
        # drop near duplicates of the target (false negatives)
        sims = torch.einsum("nd,nkd->nk", tgt, corpus[idx])
        idx = idx.masked_fill(sims >= cfg.dup_threshold, -1)
        table = torch.full((len(idx), cfg.mined_pool), -1, dtype=torch.long)
        for i in range(len(idx)):
            keep = idx[i][idx[i] >= 0][: cfg.mined_pool]
            table[i, : len(keep)] = keep
        self.table = table

    def prepare_batch(self, batch: Dict[str, Any], indices: torch.Tensor) -> None:
        """Attach this batch's mined negatives (sampled from each query's pool)."""
        if self.table is None:
            self.refresh()
        cfg = self.ctx.cfg
        g = torch.Generator().manual_seed(cfg.train.seed * 31 + batch["step"])
        pool = self.table[indices]
        pick = torch.randint(0, cfg.mined_pool, (len(indices), cfg.mined_per_query), generator=g)
        chosen = torch.gather(pool, 1, pick)
        valid = chosen >= 0
        feats = self.ctx.corpus.features[chosen.clamp_min(0)]
        batch["mined"] = feats.to(batch["target"].device)
        batch["mined_invalid"] = (~valid).to(batch["target"].device)

    def forward(self, module: Any, batch: Dict[str, Any], out: Dict[str, torch.Tensor]) -> None:
        """Pass mined features through (gathered with the batch)."""
        out["mined"] = batch["mined"]
        out["mined_invalid"] = batch["mined_invalid"]

    def extra_negatives(self, out: Dict[str, torch.Tensor],
                        batch: Dict[str, Any]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """[B, M, D] mined negatives and their invalid-slot mask."""
        feats = out["mined"]
        return feats, out["mined_invalid"]

    def state(self) -> Dict[str, torch.Tensor]:
        """The current mined table (so a resumed run uses the same negatives)."""
        return {} if self.table is None else {"table": self.table}

    def load(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Restore the mined table."""
        if "table" in tensors:
            self.table = tensors["table"]

    def on_step_end(self, step: int) -> None:
        """Re-mine every refresh_every steps."""
        if step % self.ctx.cfg.refresh_every == 0:
            self.refresh()
