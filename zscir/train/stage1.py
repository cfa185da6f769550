"""Stage I — mapping: train the phi-network on unlabeled images (frozen CLIP).

The pseudo sentence "a photo of $" (prompt list configurable), with ``$``
replaced by phi's tokens, is pulled towards its own image in CLIP space with
the soft text alignment objective (see :mod:`zscir.losses`):

    loss = contrastive(hard | soft targets) + concept_weight * KL over concepts

Inputs are cached image features (pooled + patch tokens, a
:class:`zscir.train.features.FeatureSource`), computed once by
:class:`zscir.data.features.FeatureCache` for folders / file lists / Hugging
Face datasets, or in memory for the shapes world. Training runs on the shared
engine (:mod:`zscir.train.engine`): Accelerate, tqdm, resumable full state.

Launch on several processes (same global batch => same result as 1 process):
  CPU, 2 processes:   torchrun --nproc_per_node 2 -m zscir train-stage1 ...
  one GPU:            zscir train-stage1 ...
  several GPUs:       accelerate launch --multi_gpu --num_processes 8 -m zscir train-stage1 ...
  several nodes:      accelerate launch --multi_gpu --num_machines 2 --machine_rank R \\
                        --main_process_ip HOST --main_process_port 29500 --num_processes 16 -m zscir train-stage1 ...
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..composer import Composer
from ..config import Config
from ..losses import clamped_scale, clip_contrastive, concept_alignment, soft_contrastive
from ..models.phi import PhiConfig
from ..registry import Registry
from .engine import TrainConfig, Trainer, TrainTask
from .features import FeatureSource, check_patch_tokens

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_PROMPTS", "STAGE1_LOSSES", "Stage1Config", "Stage1Module", "Stage1Task", "default_concepts",
           "train_stage1"]

DEFAULT_PROMPTS = ("a photo of $",)


@dataclasses.dataclass
class Stage1Config(Config):
    """Stage-I objective and optimisation settings."""

    phi: PhiConfig = dataclasses.field(default_factory=PhiConfig)
    loss: str = "soft"  # "hard" (one-hot InfoNCE) or "soft" (image-similarity soft targets)
    tau_target: float = 0.05
    concept_weight: float = 1.0  # 0 disables soft concept alignment
    concept_tau: float = 0.05
    learnable_scale: bool = True
    init_scale: float = 1 / 0.07
    prompts: Tuple[str, ...] = DEFAULT_PROMPTS
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(steps=400, batch_size=128, lr=5e-4, weight_decay=0.01, warmup_steps=20)
    )


class Stage1Module(nn.Module):
    """phi + frozen CLIP: image features -> normalised pseudo-sentence features."""

    def __init__(self, composer: Composer, cfg: Stage1Config) -> None:
        super().__init__()
        self.composer = composer
        self.prompts = list(cfg.prompts)
        scale = torch.tensor(math.log(cfg.init_scale))
        self.log_scale = nn.Parameter(scale, requires_grad=cfg.learnable_scale)

    def forward(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Pseudo-sentence and image features of one batch."""
        c = self.composer
        tokens = c.phi(batch["pooled"], batch["patches"])
        feats = c.backbone.encode_with_pseudo_tokens(batch["prompts"], tokens, c.config.placeholder, normalize=True)
        return {"pseudo": feats, "image": F.normalize(batch["pooled"], dim=-1), "log_scale": self.log_scale}


STAGE1_LOSSES: Registry = Registry("stage-1 loss")
STAGE1_LOSSES.add("hard", lambda out, cfg, scale: clip_contrastive(out["pseudo"], out["image"], scale))
STAGE1_LOSSES.add("soft", lambda out, cfg, scale: soft_contrastive(out["pseudo"], out["image"], scale,
                                                                   out["image"], cfg.tau_target))


class Stage1Task(TrainTask):
    """Soft text alignment of pseudo sentences with their images."""

    def __init__(self, composer: Composer, features: FeatureSource, cfg: Stage1Config,
                 concepts: Optional[Sequence[str]] = None) -> None:
        check_patch_tokens(composer, features.patches, "the Stage-I image features")
        for p in composer.backbone.parameters():
            p.requires_grad_(False)
        for p in composer.phi.parameters():
            p.requires_grad_(True)
        self.cfg, self.features = cfg, features
        self.module = Stage1Module(composer, cfg)
        STAGE1_LOSSES.get(cfg.loss)
        self.concept_feats: Optional[torch.Tensor] = None
        if cfg.concept_weight > 0:
            concepts = list(concepts or default_concepts())
            with torch.no_grad():
                prompts = [p.replace("$", "{}").format(c) for c in concepts for p in cfg.prompts[:1]]
                self.concept_feats = composer.backbone.encode_text(prompts, normalize=True)

    def num_examples(self) -> int:
        """Number of images with features."""
        return len(self.features)

    def make_batch(self, indices: torch.Tensor, step: int) -> Dict[str, Any]:
        """Features of the indexed images and a prompt per image."""
        pooled, patches = self.features.get(indices.numpy())
        rng = random.Random(step)
        prompts = [rng.choice(self.cfg.prompts) for _ in range(len(indices))]
        dev = self.module.composer.device
        return {"pooled": pooled.to(dev), "patches": None if patches is None else patches.to(dev), "prompts": prompts}

    def loss(self, outputs: Dict[str, torch.Tensor], batch: Any, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Contrastive term (hard or soft) plus optional concept alignment."""
        scale = clamped_scale(outputs["log_scale"])
        loss = STAGE1_LOSSES.get(self.cfg.loss)(outputs, self.cfg, scale)
        logs = {"contrastive": float(loss.detach()), "scale": float(scale.detach())}
        if self.concept_feats is not None:
            kl = concept_alignment(outputs["pseudo"], outputs["image"], self.concept_feats.to(outputs["pseudo"].device),
                                   self.cfg.concept_tau)
            loss = loss + self.cfg.concept_weight * kl
            logs["concept_kl"] = float(kl.detach())
        return loss, logs


def default_concepts() -> List[str]:
    """The concept vocabulary shipped with zscir (common objects, attributes, scenes)."""
    path = Path(__file__).resolve().parents[1] / "assets" / "concepts.txt"
    return [w.strip() for w in path.read_text().splitlines() if w.strip() and not w.startswith("#")]


def train_stage1(composer: Composer, features: FeatureSource, cfg: Stage1Config,
                 output_dir: Optional[Path] = None, concepts: Optional[Sequence[str]] = None,
                 resume: bool = False, progress: bool = True) -> Tuple[Composer, Any]:
    """Train phi in place on cached features; save the model folder to ``output_dir/model`` if given."""
    task = Stage1Task(composer, features, cfg, concepts)
    trainer = Trainer(task, cfg.train, output_dir=output_dir, progress=progress, desc="stage I (mapping)")
    result = trainer.train(resume=resume)
    composer.phi.requires_grad_(False)
    composer.config.stage = "stage1"
    composer.eval()
    if output_dir is not None and trainer.accelerator.is_main_process:
        composer.save_pretrained(Path(output_dir) / "model")
    return composer, result
