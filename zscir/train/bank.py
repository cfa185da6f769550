"""SPN's second stage (``zscir train-bank``): fine-tune the query side against a static image bank.

Feng et al., "Improving Composed Image Retrieval via Contrastive Learning with
Scaling Positives and Negatives" (ACM MM 2024) scale *negatives* in a second
fine-tuning stage: the image side is frozen, every gallery/training image is
encoded once into a static bank, and the query side is trained with InfoNCE
whose denominator runs over the whole bank. (SPN's *positives*, image pairs
from a mid-rank similarity window plus templates or an LLM, are the
``similarity-pair`` mode of :mod:`zscir.data.triplet_gen`.)

Here the stage is plain Stage II (:func:`zscir.train.stage2.train_stage2`, the
shared engine: resumable, several GPUs) on an already trained Stage-II model
with the ``bank`` component (:class:`zscir.train.components.spn.BankNegatives`)
switched on and the bank passed as the task's corpus. Trainable: the adapters
(and phi with ``train_phi``); the CLIP towers stay frozen, so bank features
never go stale. The bank is deduplicated first: an image whose cosine to an
already kept image is >= ``dedup_threshold`` is merged into it (greedy, in
order), so one scene photographed twice is not two negatives; bank entries that
duplicate a query's target or reference are masked in its loss.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..composer import Composer
from ..config import Config
from .engine import TrainConfig
from .features import Corpus, TripletFeatures
from .stage2 import Stage2Config, train_stage2

logger = logging.getLogger(__name__)

__all__ = ["BankStageConfig", "build_bank", "deduplicate", "stage2_config", "train_bank", "triplet_bank_parts"]


@dataclasses.dataclass
class BankStageConfig(Config):
    """The bank stage: bank construction, the bank loss and optimisation."""

    dedup_threshold: float = 0.98  # cosine at which two bank images are merged
    negatives: int = 0  # bank negatives per step (shared by the batch); 0: the whole bank
    bank_weight: float = 1.0  # weight of the bank InfoNCE next to the in-batch InfoNCE
    include_triplet_images: bool = True  # add the triplets' references and targets to the bank
    # further Stage-II components kept on ("bank" is always added); "reference" stays off as in Stage II
    # (the reference image as a negative cost 8 R@10 in the Stage-II ablation, docs/results.md)
    components: Tuple[str, ...] = ()
    component_options: Dict[str, Any] = dataclasses.field(default_factory=dict)
    train_phi: bool = False
    dup_threshold: float = 0.98  # in-batch / bank duplicates of a query's target or reference are masked
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(steps=200, batch_size=128, lr=2e-4, weight_decay=0.01, warmup_steps=10)
    )


@torch.no_grad()
def deduplicate(features: torch.Tensor, threshold: float, block: int = 1024, progress: bool = False) -> torch.Tensor:
    """Indices of the rows kept by greedy deduplication (a row is dropped if its cosine to a kept earlier row >= threshold).

    Rows are processed in blocks: each block is compared with the kept rows of
    earlier blocks in one matrix product, then resolved in order within itself.
    """
    from tqdm.auto import tqdm

    feats = F.normalize(features.float(), dim=-1)
    kept: List[torch.Tensor] = []
    kept_feats: List[torch.Tensor] = []
    for s in tqdm(range(0, len(feats), block), desc="deduplicate bank", disable=not progress):
        chunk = feats[s: s + block]
        alive = torch.ones(len(chunk), dtype=torch.bool)
        for prev in kept_feats:
            alive &= ~((chunk @ prev.T) >= threshold).any(1)
        inner = (chunk @ chunk.T) >= threshold
        inner.fill_diagonal_(False)
        for i in range(len(chunk)):
            if alive[i]:
                later = inner[i].clone()
                later[: i + 1] = False
                alive &= ~later
        idx = torch.nonzero(alive).flatten() + s
        kept.append(idx)
        kept_feats.append(feats[idx])
    return torch.cat(kept) if kept else torch.empty(0, dtype=torch.long)


def build_bank(parts: Sequence[Tuple[torch.Tensor, Sequence[str]]], threshold: float,
               progress: bool = False) -> Corpus:
    """A deduplicated, normalised bank from (features [N, D], ids) parts, in order (earlier parts win merges)."""
    parts = [(f, list(i)) for f, i in parts if len(f)]
    if not parts:
        raise ValueError("the bank is empty: give corpus images and/or include the triplet images")
    dims = {int(f.shape[1]) for f, _ in parts}
    if len(dims) != 1:
        raise ValueError(f"bank parts have different feature widths {sorted(dims)}")
    for f, ids in parts:
        if len(f) != len(ids):
            raise ValueError(f"a bank part has {len(f)} features but {len(ids)} ids")
    feats = torch.cat([F.normalize(f.float(), dim=-1) for f, _ in parts])
    ids = [i for _, part_ids in parts for i in part_ids]
    keep = deduplicate(feats, threshold, progress=progress)
    return Corpus(feats[keep].contiguous(), [ids[i] for i in keep.tolist()])


def triplet_bank_parts(triplets: TripletFeatures,
                       image_targets: Optional[Sequence[bool]] = None) -> List[Tuple[torch.Tensor, List[str]]]:
    """The triplets' reference and target image features as bank parts (ids: the image ids).

    ``image_targets[i]`` False marks a text-only target (its feature is a caption
    feature, not an image), which stays out of the bank.
    """
    keep = list(range(len(triplets))) if image_targets is None else [i for i, m in enumerate(image_targets) if m]
    targets = triplets.target[torch.tensor(keep, dtype=torch.long)] if keep else triplets.target[:0]
    return [(triplets.ref_pooled, list(triplets.ref_ids)), (targets, [triplets.target_ids[i] for i in keep])]


def stage2_config(cfg: BankStageConfig) -> Stage2Config:
    """The Stage2Config that runs the bank stage."""
    components = tuple(c for c in cfg.components if c != "bank") + ("bank",)
    options = dict(cfg.component_options)
    options["bank"] = {"negatives": cfg.negatives, "weight": cfg.bank_weight, **options.get("bank", {})}
    return Stage2Config(train_phi=cfg.train_phi, dup_threshold=cfg.dup_threshold, components=components,
                        component_options=options, train=cfg.train)


def train_bank(composer: Composer, triplets: TripletFeatures, bank: Corpus, cfg: BankStageConfig,
               output_dir: Optional[Path] = None, resume: bool = False, progress: bool = True) -> Tuple[Composer, Any]:
    """Fine-tune a Stage-II composer's query side with InfoNCE over the bank; saves ``output_dir/model``."""
    if composer.config.adapters is None:
        raise ValueError("train-bank fine-tunes a Stage-II model (with adapters); train Stage II first (zscir train-stage2)")
    if bank.features.shape[1] != triplets.target.shape[1]:
        raise ValueError(f"bank features have width {bank.features.shape[1]} but the triplets' targets "
                         f"{triplets.target.shape[1]}")
    logger.info("bank stage: %d bank images, %s negatives per step", len(bank.ids),
                "all" if cfg.negatives == 0 else cfg.negatives)
    return train_stage2(composer, triplets, stage2_config(cfg), corpus=bank, output_dir=output_dir, resume=resume,
                        progress=progress)
