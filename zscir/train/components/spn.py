"""SPN (Feng et al., "Scaling Positives and Negatives", ACM MM 2024) as a Stage-II component.

SPN's positives are :mod:`zscir.data.triplet_gen` (``similarity-pair`` mode);
its negatives are ``bank``: a static, deduplicated image bank (the second stage
itself is :mod:`zscir.train.bank`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import torch

from ...config import Config
from ...losses import bank_info_nce, clamped_scale
from .base import STAGE2_COMPONENTS, ComponentContext, Stage2Component, check_option, parse_options

__all__ = ["BankNegatives", "BankOptions"]

@dataclasses.dataclass
class BankOptions(Config):
    """Options of ``bank``."""

    negatives: int = 0  # bank negatives per step (shared by the batch); 0: the whole bank
    weight: float = 1.0
    dup_threshold: float = -1.0  # cosine at which a bank image counts as the target/reference; <0: Stage2Config's


@STAGE2_COMPONENTS.register("bank")
class BankNegatives(Stage2Component):
    """SPN's static negative bank: InfoNCE whose denominator runs over a pre-encoded image bank.

    Paper: Feng et al., "Improving Composed Image Retrieval via Contrastive
    Learning with Scaling Positives and Negatives" (ACM MM 2024), second stage:
    with the image side frozen, every gallery/training image is encoded once
    into a static bank and the query side is fine-tuned with InfoNCE over
    [target, whole bank]. Bank = ``ctx.corpus`` (normalised, deduplicated by
    :func:`zscir.train.bank.deduplicate`).

    Term = weight * mean_i CE([s_it, s_ij for j in bank or a sample of ``negatives``]),
    scaled by the learnable logit scale, bank entries with cosine >= dup_threshold
    to the target or the reference masked. Where ours differs: the bank term is
    added to (not a replacement of) the in-batch InfoNCE of Stage II, and a
    sampled bank is shared by the whole batch (one index draw per step).
    """

    name = "bank"

    def __init__(self, ctx: ComponentContext, options: Dict[str, Any]) -> None:
        super().__init__(ctx, options)
        self.opts = o = parse_options(BankOptions, self.name, options)
        if ctx.corpus is None or len(ctx.corpus.features) == 0:
            raise ValueError("the 'bank' component needs a bank of image features (corpus=Corpus(...))")
        check_option(o.negatives >= 0, self.name, f"negatives must be >= 0, got {o.negatives}")
        self.threshold = o.dup_threshold if o.dup_threshold >= 0 else ctx.cfg.dup_threshold
        self._seed = ctx.cfg.train.seed * 104729 + 11
        self._device_bank: Optional[torch.Tensor] = None

    def bank_features(self, device: torch.device) -> torch.Tensor:
        """The bank on the training device (moved once)."""
        if self._device_bank is None or self._device_bank.device != device:
            self._device_bank = self.ctx.corpus.features.to(device)
        return self._device_bank

    def loss(self, out: Dict[str, torch.Tensor], batch: Dict[str, Any], step: int,
             main_logits: torch.Tensor) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
        """weight * InfoNCE over [target, bank]."""
        q = out["query"]
        bank = self.bank_features(q.device)
        if 0 < self.opts.negatives < len(bank):
            g = torch.Generator().manual_seed(self._seed + step)
            bank = bank[torch.randperm(len(bank), generator=g)[: self.opts.negatives].to(q.device)]
        scale = clamped_scale(out["log_scale"])
        ce = bank_info_nce(q, out["target"], out["reference"], bank, scale, self.threshold)
        return self.opts.weight * ce, {"bank": float(ce.detach())}
