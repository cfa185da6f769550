"""Text augmentation of the modification during Stage II (``text_augment``): word dropout and clause order.

Synthetic triplets come in a few phrasing templates; a user's queries do not.
Dropping words and swapping the order of coordinated clauses makes the adapters
rely on the content words ("purple", "diamond") rather than on one template's
function words, which is what has to carry over to unseen phrasings.
"""
from __future__ import annotations

import dataclasses
import random
import re
from typing import Any, Dict, List

import torch

from ...config import Config
from .base import STAGE2_COMPONENTS, ComponentContext, Stage2Component, check_option, parse_options

__all__ = ["TextAugment", "TextAugmentOptions", "augment_text"]

_CLAUSE_SPLIT = re.compile(r",? and |, then |; |, ")


@dataclasses.dataclass
class TextAugmentOptions(Config):
    """Options of ``text_augment``."""

    word_dropout: float = 0.15  # each word is dropped with this probability (at least one word stays)
    shuffle_clauses: float = 0.5  # probability of shuffling coordinated clauses ("A and B" -> "B and A")
    fraction: float = 1.0  # share of rows that are augmented at all


def augment_text(text: str, rng: random.Random, word_dropout: float, shuffle_clauses: float) -> str:
    """One augmented copy of `text`: clauses possibly reordered, then words dropped."""
    clauses = [c for c in _CLAUSE_SPLIT.split(text) if c.strip()]
    if len(clauses) > 1 and rng.random() < shuffle_clauses:
        rng.shuffle(clauses)
        text = " and ".join(clauses)
    words = text.split()
    kept = [w for w in words if rng.random() >= word_dropout]
    return " ".join(kept) if kept else rng.choice(words)


@STAGE2_COMPONENTS.register("text_augment")
class TextAugment(Stage2Component):
    """Replaces each batch row's modification by an augmented copy (seeded by run seed, step and triplet)."""

    name = "text_augment"

    def __init__(self, ctx: ComponentContext, options: Dict[str, Any]) -> None:
        super().__init__(ctx, options)
        self.opts = o = parse_options(TextAugmentOptions, self.name, options)
        for field in ("word_dropout", "shuffle_clauses", "fraction"):
            value = getattr(o, field)
            check_option(0.0 <= value <= 1.0, self.name, f"{field} must be in [0, 1], got {value}")

    def prepare_batch(self, batch: Dict[str, Any], indices: torch.Tensor) -> None:
        """Augment the batch's modification texts in place."""
        o, seed, step = self.opts, self.ctx.cfg.train.seed, batch["step"]
        out: List[str] = []
        for i, text in zip(indices.tolist(), batch["modifications"]):
            rng = random.Random(f"{seed}|{step}|{i}")  # per triplet: N processes draw what 1 process draws
            out.append(augment_text(text, rng, o.word_dropout, o.shuffle_clauses) if rng.random() < o.fraction else text)
        batch["modifications"] = out
