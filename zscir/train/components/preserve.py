"""Keep the adapted text encoder's plain-text behaviour (``text_preserve``).

The composing adapters change the text encoder for every input. This term asks
that, on the batch's own modification texts *without* pseudo tokens, the
adapted encoder still gives frozen CLIP's embedding:

    L = weight * mean_i (1 - cos(f_adapted(m_i), f_frozen(m_i)))

over a seeded ``fraction`` of the rows, so that what CLIP knew about language
(phrasings the synthetic triplets never use) survives training.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ...config import Config
from .base import STAGE2_COMPONENTS, ComponentContext, Stage2Component, check_option, parse_options

__all__ = ["TextPreserve", "TextPreserveOptions"]


@dataclasses.dataclass
class TextPreserveOptions(Config):
    """Options of ``text_preserve``."""

    weight: float = 1.0
    fraction: float = 0.25  # share of rows whose plain text is encoded (each costs a text pass)


@STAGE2_COMPONENTS.register("text_preserve")
class TextPreserve(Stage2Component):
    """Cosine distance between adapted and frozen text embeddings of the modification texts."""

    name = "text_preserve"
    uses_text_features = True

    def __init__(self, ctx: ComponentContext, options: Dict[str, Any]) -> None:
        super().__init__(ctx, options)
        self.opts = o = parse_options(TextPreserveOptions, self.name, options)
        check_option(o.weight >= 0, self.name, f"weight must be >= 0, got {o.weight}")
        check_option(0 < o.fraction <= 1, self.name, f"fraction must be in (0, 1], got {o.fraction}")

    def prepare_batch(self, batch: Dict[str, Any], indices: torch.Tensor) -> None:
        """Pick this step's rows (drawn per triplet, so N processes pick what 1 process picks)."""
        self.ctx.text_features()  # frozen features are computed before any adapter update
        g = torch.Generator().manual_seed(self.ctx.cfg.train.seed * 6007 + batch["step"])
        chosen = torch.rand(len(self.ctx.triplets), generator=g)[indices] < self.opts.fraction
        batch["preserve_rows"] = chosen.nonzero().squeeze(1).to(batch["target"].device)

    def forward(self, module: Any, batch: Dict[str, Any], out: Dict[str, torch.Tensor]) -> None:
        """Adapted embeddings of the chosen rows' original texts (zero rows elsewhere, masked)."""
        rows, composer = batch["preserve_rows"], self.ctx.composer
        idx = batch["index"][rows].tolist()
        emb = out["query"].new_zeros(len(batch["index"]), composer.backbone.embed_dim)
        if idx:
            texts = [self.ctx.triplets.modifications[i] or " " for i in idx]
            adapted = composer.backbone.encode_text(texts, normalize=True, adapted=True)  # with gradients
            emb = emb.index_put((rows,), adapted.to(emb.dtype))
        out["preserve_adapted"] = emb
        out["has_preserve"] = torch.zeros(len(emb), device=emb.device).index_fill(0, rows, 1.0)

    def loss(self, out: Dict[str, torch.Tensor], batch: Dict[str, Any], step: int,
             main_logits: torch.Tensor) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
        """weight * mean (1 - cos) over the chosen rows."""
        rows = (out["has_preserve"] > 0).nonzero().squeeze(1)
        if not len(rows):
            return None, {}
        frozen = self.ctx.text_features().to(out["query"].device)[out["index"][rows]]
        dist = 1 - F.cosine_similarity(out["preserve_adapted"][rows].float(), frozen, dim=-1)
        term = dist.mean()
        return self.opts.weight * term, {"text_preserve": float(term.detach())}
