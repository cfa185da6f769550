"""DQE-CIR (distinctive query embeddings, 2026) as Stage-II components.

``dqe_mid_zone``   target-relative mid-zone negative sampling
``dqe_pairwise``   pairwise -log sigmoid((s_t - s_n) / tau) objective
``dqe_attributes`` attribute-aware sub-queries with text-predicted weights + margin loss

Notation: q_i composed query, t_i target, r_i reference (all unit-norm), e_i the
frozen CLIP text feature of the modification text of triplet i, s(a, b) = <a, b>.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...config import Config
from ...losses import clamped_scale, duplicate_mask, margin_loss, pairwise_logistic_loss
from ...search.zones import mid_zone_table  # shared with make-triplets; re-exported here
from .base import STAGE2_COMPONENTS, ComponentContext, Stage2Component, parse_options

__all__ = [
    "AttributeOptions", "AttributeQueries", "AttributeQueryHead", "MidZoneNegatives", "MidZoneOptions", "PairwiseObjective",
    "PairwiseOptions", "attribute_weights_by_kind", "mid_zone_table",
]

@dataclasses.dataclass
class MidZoneOptions(Config):
    """Options of ``dqe_mid_zone``."""

    bounds: str = "value"  # "value": lo/hi are deltas in cosine units; "quantile": per-row quantiles of delta
    lo: float = -0.15  # deltas below: easy negatives (skipped)
    hi: float = -0.01  # deltas above: likely false negatives (skipped)
    per_query: int = 4  # negatives per query and step
    pool: int = 32  # zone members kept per triplet at each refresh
    refresh_every: int = 0  # steps between refreshes with the current model; 0: Stage2Config.refresh_every
    warmup_steps: int = 20  # random negatives before the first refresh
    candidates: str = "auto"  # "corpus", "targets" (the triplets' own targets) or "auto" (corpus if given)

    def __post_init__(self) -> None:
        if self.bounds not in ("value", "quantile"):
            raise ValueError(f"bounds must be 'value' or 'quantile', got {self.bounds!r}")
        if self.candidates not in ("auto", "corpus", "targets"):
            raise ValueError(f"candidates must be 'auto', 'corpus' or 'targets', got {self.candidates!r}")
        if self.lo > self.hi:
            raise ValueError(f"lo ({self.lo}) must be <= hi ({self.hi})")
        if self.bounds == "quantile" and not (0 <= self.lo <= 1 and 0 <= self.hi <= 1):
            raise ValueError(f"quantile bounds must be in [0, 1], got lo={self.lo}, hi={self.hi}")
        if self.per_query < 1 or self.pool < 1:
            raise ValueError(f"per_query and pool must be >= 1, got {self.per_query}, {self.pool}")


@STAGE2_COMPONENTS.register("dqe_mid_zone")
class MidZoneNegatives(Stage2Component):
    """DQE-CIR's target-relative negative sampling from a "mid zone".

    Paper: DQE-CIR (distinctive query embeddings, 2026): negatives chosen by
    absolute rank are often false negatives (images as good as the target) or
    trivial; DQE-CIR selects them *relative to the target's score*.
    For triplet i and candidate image c: delta = s(q_i, c) - s(q_i, t_i). Easy
    negatives (delta < lo) teach nothing; likely false negatives (delta > hi,
    near or above 0: the model already ranks them like the target) are skipped;
    near duplicates of the target (cosine >= dup_threshold) never count. Every
    ``refresh_every`` steps all queries are re-encoded with the current model
    (``ctx.queries()``) and up to ``pool`` zone members per triplet
    are kept; each step samples ``per_query`` of them per row as extra negatives
    of the main InfoNCE. For the first ``warmup_steps`` the negatives are random
    candidates. Candidates: the corpus if given, else the triplets' own targets.
    Where ours differs: the zone is refreshed periodically, not every step, and
    an empty zone falls back to the hardest easy negatives.
    """

    name = "dqe_mid_zone"

    def __init__(self, ctx: ComponentContext, options: Dict[str, Any]) -> None:
        super().__init__(ctx, options)
        self.opts = o = parse_options(MidZoneOptions, self.name, options)
        use_corpus = o.candidates == "corpus" or (o.candidates == "auto" and ctx.corpus is not None)
        if use_corpus and ctx.corpus is None:
            raise ValueError("dqe_mid_zone: candidates='corpus' needs a corpus (corpus=Corpus(...))")
        self.candidates = (ctx.corpus.features if use_corpus else ctx.triplets.target).float()
        self.refresh_every = o.refresh_every or ctx.cfg.refresh_every
        self.table: Optional[torch.Tensor] = None
        self.zone_size = 0.0
        self._seed = ctx.cfg.train.seed * 6151 + 5

    def refresh(self, step: int) -> None:
        """Re-encode every query and re-sample each triplet's mid-zone pool."""
        queries = self.ctx.queries().float().cpu()
        g = torch.Generator().manual_seed(self._seed + step)
        table, sizes = mid_zone_table(queries, self.ctx.triplets.target.float(), self.candidates, self.opts.lo,
                                      self.opts.hi, self.opts.pool, self.opts.bounds, self.ctx.cfg.dup_threshold, g)
        self.table = table
        self.zone_size = float(sizes.float().mean())

    def prepare_batch(self, batch: Dict[str, Any], indices: torch.Tensor) -> None:
        """Attach [B, per_query, D] negatives (random during warm-up) and their invalid mask."""
        step = batch["step"]
        k = self.opts.per_query
        g = torch.Generator().manual_seed(self._seed * 3 + step)
        if step < self.opts.warmup_steps:
            chosen = torch.randint(0, len(self.candidates), (len(indices), k), generator=g)
        else:
            if self.table is None:
                self.refresh(step)
            pool = self.table[indices.cpu()]
            # sample among each row's valid entries
            counts = (pool >= 0).sum(1, keepdim=True).clamp_min(1)
            pick = (torch.rand(len(indices), k, generator=g) * counts).long()
            chosen = torch.gather(pool, 1, pick)
        invalid = chosen < 0
        feats = self.candidates[chosen.clamp_min(0)]
        target = self.ctx.triplets.target[indices.cpu()].float()
        invalid |= torch.einsum("bd,bkd->bk", target, feats) >= self.ctx.cfg.dup_threshold
        dev = batch["target"].device
        batch["dqe_neg"] = feats.to(dev)
        batch["dqe_neg_invalid"] = invalid.to(dev)

    def forward(self, module: nn.Module, batch: Dict[str, Any], out: Dict[str, torch.Tensor]) -> None:
        """Pass the negatives through (gathered with the batch)."""
        out["dqe_neg"] = batch["dqe_neg"]
        out["dqe_neg_invalid"] = batch["dqe_neg_invalid"]

    def extra_negatives(self, out: Dict[str, torch.Tensor],
                        batch: Dict[str, Any]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The sampled mid-zone negatives."""
        return out["dqe_neg"].to(out["query"].dtype), out["dqe_neg_invalid"]

    def loss(self, out: Dict[str, torch.Tensor], batch: Dict[str, Any], step: int,
             main_logits: torch.Tensor) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
        """No extra term; logs the mean zone size."""
        return None, {"dqe_zone_size": self.zone_size}

    def on_step_end(self, step: int) -> None:
        """Refresh every ``refresh_every`` steps after the warm-up."""
        w = self.opts.warmup_steps
        if step >= w and (step - w) % self.refresh_every == 0:
            self.refresh(step)

    def state(self) -> Dict[str, torch.Tensor]:
        """The current pool table."""
        return {} if self.table is None else {"table": self.table}

    def load(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Restore the pool table."""
        if "table" in tensors:
            self.table = tensors["table"]


# ======================================================================== DQE: pairwise

@dataclasses.dataclass
class PairwiseOptions(Config):
    """Options of ``dqe_pairwise``."""

    tau: float = 0.05
    weight: float = 1.0
    negatives: str = "auto"  # "mid_zone", "in_batch" (hardest in-batch targets) or "auto" (mid-zone if on, else in-batch)
    in_batch_k: int = 1  # hardest in-batch negatives per row

    def __post_init__(self) -> None:
        if self.negatives not in ("auto", "mid_zone", "in_batch"):
            raise ValueError(f"negatives must be 'auto', 'mid_zone' or 'in_batch', got {self.negatives!r}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")


@STAGE2_COMPONENTS.register("dqe_pairwise")
class PairwiseObjective(Stage2Component):
    """DQE-CIR's pairwise objective: each negative is compared with the target alone.

    loss = weight * mean over (i, n) of -log sigmoid((s(q_i, t_i) - s(q_i, n)) / tau),
    which equals KL([1, 0] || softmax([s_t, s_n] / tau)), the 2-way softmax CE.
    Unlike InfoNCE, a hard negative's gradient is not diluted by the many easy
    ones. Negatives: the ``dqe_mid_zone`` samples (when that component is on) or
    the ``in_batch_k`` hardest in-batch targets (near duplicates excluded).
    Combined with the main InfoNCE through ``weight``.
    """

    name = "dqe_pairwise"

    def __init__(self, ctx: ComponentContext, options: Dict[str, Any]) -> None:
        super().__init__(ctx, options)
        self.opts = parse_options(PairwiseOptions, self.name, options)
        if self.opts.negatives == "mid_zone" and "dqe_mid_zone" not in ctx.cfg.components:
            raise ValueError("dqe_pairwise: negatives='mid_zone' needs the 'dqe_mid_zone' component")

    def loss(self, out: Dict[str, torch.Tensor], batch: Dict[str, Any], step: int,
             main_logits: torch.Tensor) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
        """weight * pairwise logistic loss."""
        q, t = out["query"], out["target"]
        pos = (q * t).sum(-1)
        use_zone = "dqe_neg" in out and self.opts.negatives in ("auto", "mid_zone")
        if use_zone:
            neg = torch.einsum("bd,bkd->bk", q, out["dqe_neg"].to(q.dtype))
            valid = ~out["dqe_neg_invalid"]
        else:
            sims = q @ t.T
            eye = torch.eye(len(q), dtype=torch.bool, device=q.device)
            banned = duplicate_mask(t, self.ctx.cfg.dup_threshold, out["target_code"]) | eye
            k = min(self.opts.in_batch_k, len(q) - 1)
            if k < 1:
                return None, {}
            top = sims.masked_fill(banned, float("-inf")).topk(k, dim=1)
            valid = torch.isfinite(top.values)
            neg = sims.gather(1, top.indices)
        term = pairwise_logistic_loss(pos, neg.masked_fill(~valid, 0.0), self.opts.tau, valid)
        return self.opts.weight * term, {"dqe_pairwise": float(term.detach())}


# ====================================================================== DQE: attributes

class AttributeQueryHead(nn.Module):
    """Attribute sub-queries q_a = normalise(q + U_a V_a q), mixed by weights softmax(W e + b) from the text feature."""

    def __init__(self, dim: int, num_attributes: int, rank: int = 16) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(num_attributes, dim, rank) / math.sqrt(dim))
        self.up = nn.Parameter(torch.zeros(num_attributes, rank, dim))
        self.weights = nn.Linear(dim, num_attributes)

    def forward(self, query: torch.Tensor, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sub-queries [B, A, D], attribute weights [B, A], combined query [B, D]); all queries unit-norm."""
        delta = torch.einsum("bd,adr,are->bae", query, self.down, self.up)
        sub = F.normalize(query.unsqueeze(1) + delta, dim=-1)
        w = self.weights(text.to(query.dtype)).softmax(dim=-1)
        combined = F.normalize((w.unsqueeze(-1) * sub).sum(1), dim=-1)
        return sub, w, combined


@dataclasses.dataclass
class AttributeOptions(Config):
    """Options of ``dqe_attributes``."""

    attributes: Tuple[str, ...] = ("color", "shape", "size", "position")
    prompt: str = "the {attribute} changes"  # text whose CLIP feature initialises each attribute's weight row
    prompt_temperature: float = 0.1
    rank: int = 16
    margin: float = 0.1
    weight: float = 0.5
    hard_negatives: int = 3  # hardest in-batch targets used by the margin loss (besides the reference)

    def __post_init__(self) -> None:
        self.attributes = tuple(self.attributes)
        if len(self.attributes) < 2 or len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"attributes must be at least two distinct names, got {list(self.attributes)}")
        if "{attribute}" not in self.prompt:
            raise ValueError(f"prompt must contain '{{attribute}}', got {self.prompt!r}")


@STAGE2_COMPONENTS.register("dqe_attributes")
class AttributeQueries(Stage2Component):
    """DQE-CIR's learnable attribute weights over attribute-aware sub-queries, with an attribute margin loss.

    Paper: DQE-CIR (2026) makes the query distinctive along the attributes the
    modification is about: sub-queries per attribute, weighted by what the text
    mentions.

    Our choice: sub-query q_a = normalise(q + U_a V_a q) with a learned low-rank
    per-attribute map (U_a zero-initialised, so q_a = q at the start), *not* a
    re-encoding of "a photo of $ that {modification}, the {attribute} matters"
    (which costs one extra text-encoder pass per attribute and step). Weights
    w = softmax(W e + b) from the frozen modification-text feature e; row a of W
    is initialised to CLIP("the {attribute} changes") / prompt_temperature, so a
    text mentioning colours starts with a high colour weight. Combined query
    c = normalise(sum_a w_a q_a). Loss (times ``weight``):
        InfoNCE of c over in-batch targets + the reference,
      + mean_i sum_n relu(margin - (s(c, t_i) - s(c, n))) over n = the reference
        and the ``hard_negatives`` hardest in-batch targets (duplicates excluded).
    Gradients flow through q into the adapters; the head itself is training-time
    only (the deployed query is q), see the module docstring.
    """

    name = "dqe_attributes"
    uses_text_features = True

    def __init__(self, ctx: ComponentContext, options: Dict[str, Any]) -> None:
        super().__init__(ctx, options)
        self.opts = o = parse_options(AttributeOptions, self.name, options)
        dim = int(ctx.triplets.target.shape[1])
        self.head = AttributeQueryHead(dim, len(o.attributes), o.rank)

    def modules(self) -> Dict[str, nn.Module]:
        """The attribute head."""
        return {"head": self.head}

    @torch.no_grad()
    def init_weights_from_prompts(self) -> None:
        """Weight rows = CLIP text features of the attribute prompts / temperature (done before step 0)."""
        prompts = [self.opts.prompt.format(attribute=a) for a in self.opts.attributes]
        feats = self.ctx.composer.backbone.encode_text(prompts, normalize=True).float()
        self.head.weights.weight.copy_(feats / self.opts.prompt_temperature)
        self.head.weights.bias.zero_()

    def prepare_batch(self, batch: Dict[str, Any], indices: torch.Tensor) -> None:
        """Attach the cached modification-text features (initialising the weight head before the first step)."""
        if batch["step"] == 0:
            self.init_weights_from_prompts()
        batch["dqe_text"] = self.ctx.text_features()[indices.cpu()].to(batch["target"].device)

    def forward(self, module: nn.Module, batch: Dict[str, Any], out: Dict[str, torch.Tensor]) -> None:
        """Attribute sub-queries, weights and the combined query."""
        _, w, combined = self.head(out["query"], batch["dqe_text"])
        out["dqe_attr_weights"] = w
        out["dqe_combined"] = combined

    def loss(self, out: Dict[str, torch.Tensor], batch: Dict[str, Any], step: int,
             main_logits: torch.Tensor) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
        """weight * (InfoNCE of the combined query + attribute margin loss)."""
        o = self.opts
        c, t, ref = out["dqe_combined"], out["target"], out["reference"].to(out["dqe_combined"].dtype)
        scale = clamped_scale(out["log_scale"])
        dup = duplicate_mask(t, self.ctx.cfg.dup_threshold, out["target_code"])
        ref_dup = (ref * t).sum(-1, keepdim=True) >= self.ctx.cfg.dup_threshold
        sims = c @ t.T
        ref_sim = (c * ref).sum(-1, keepdim=True)
        logits = torch.cat([(scale * sims).masked_fill(dup, float("-inf")),
                            (scale * ref_sim).masked_fill(ref_dup, float("-inf"))], 1)  # mask after scaling (NaN grads)
        nce = F.cross_entropy(logits, torch.arange(len(c), device=c.device))
        pos = sims.diagonal().unsqueeze(1)
        eye = torch.eye(len(c), dtype=torch.bool, device=c.device)
        k = min(o.hard_negatives, len(c) - 1)
        negs, valid = [ref_sim], [~ref_dup]
        if k > 0:
            top = sims.masked_fill(dup | eye, float("-inf")).topk(k, dim=1)
            negs.append(sims.gather(1, top.indices))
            valid.append(torch.isfinite(top.values))
        neg, ok = torch.cat(negs, 1), torch.cat(valid, 1)
        hinge = margin_loss(pos, neg, o.margin, ok)
        w = out["dqe_attr_weights"].detach()
        entropy = float(-(w * w.clamp_min(1e-8).log()).sum(1).mean())
        return o.weight * (nce + hinge), {"dqe_attr_nce": float(nce.detach()), "dqe_attr_margin": float(hinge.detach()),
                                          "dqe_attr_entropy": entropy}


def attribute_weights_by_kind(task: Any, kinds: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Mean attribute weight per modification kind, from the trained ``dqe_attributes`` head (an interpretability probe)."""
    comp = next((c for c in task.components if isinstance(c, AttributeQueries)), None)
    if comp is None:
        raise ValueError("the task has no 'dqe_attributes' component")
    text = comp.ctx.text_features()
    with torch.no_grad():
        w = comp.head.weights(text.to(comp.head.weights.weight.device)).softmax(-1).cpu()
    out: Dict[str, Dict[str, float]] = {}
    for kind in sorted(set(kinds)):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        mean = w[rows].mean(0)
        out[kind] = {a: float(v) for a, v in zip(comp.opts.attributes, mean)}
    return out
