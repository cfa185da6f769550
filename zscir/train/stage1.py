"""Stage I — mapping: train the phi-network on unlabeled images (frozen CLIP).

The pseudo sentence "a photo of $" (prompt list configurable), with ``$``
replaced by phi's tokens, is pulled towards its own image in CLIP space with
the soft text alignment objective (see :mod:`zscir.losses`). With q_i the
pseudo sentence of image i, v_j the frozen image features of the batch and
s_ij = scale * <q_i, v_j>:

    loss = SCE(s; P, C) + concept_weight * KL over concepts + text_weight * L_text

SCE is the symmetric soft cross-entropy
0.5 * (mean_i -sum_j P_ij log softmax_j s_ij + mean_j -sum_i C_ji log softmax_i s_ij).
Its targets come from ``Stage1Config.targets``:

* ``"image"`` (unlabeled images): P_ij = softmax_j(<v_i, v_j> / tau_target), C = P^T;
* ``"caption"`` (image-caption data; c_i = frozen CLIP text feature of a caption
  of image i drawn each step, or the normalised mean of its captions with
  ``caption_pooling="mean"``): P_ij = softmax_j(<c_i, v_j> / caption_tau) — which images
  image i's caption fits — and C_ji = softmax_i(<c_i, v_j> / caption_tau);
  rows of images without a caption use the image targets;
* ``"both"``: (1 - caption_mix) * image targets + caption_mix * caption targets.

``loss="hard"`` uses one-hot targets instead. L_text (needs captions) scores
the pseudo sentences against the batch's captions in text space,
-sum_j softmax_j(<c_i, c_j> / caption_tau) log softmax_j(scale * <q_i, c_j>),
so "a photo of $" lands where the image's own words do.

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
from ..losses import (caption_targets, clamped_scale, clip_contrastive, concept_alignment, soft_cross_entropy,
                      soft_targets, text_alignment)
from ..models.phi import PhiConfig
from ..registry import Registry
from .engine import TrainConfig, Trainer, TrainTask
from .features import CaptionFeatures, FeatureSource, check_patch_tokens

logger = logging.getLogger(__name__)

__all__ = ["CAPTION_CONCEPTS", "CAPTION_DEFAULTS", "DEFAULT_PROMPTS", "MINED_CONCEPTS", "STAGE1_LOSSES", "STAGE1_TARGETS", "Stage1Config",
           "Stage1Module", "Stage1Task", "default_concepts", "needs_captions", "train_stage1"]

DEFAULT_PROMPTS = ("a photo of $",)
#: Stage1Config fields when the images have captions (chosen on validation after Stage II, docs/results.md:
#: +0.9 R@10 over image-only targets on each of 3 seeds).
CAPTION_DEFAULTS: Dict[str, Any] = {"targets": "caption", "caption_pooling": "mean", "text_weight": 0.0}
#: The concept list when the images have captions: mined from them.
CAPTION_CONCEPTS = "mined"
#: Phrases kept when the concept list is mined from captions.
MINED_CONCEPTS = 200


@dataclasses.dataclass
class Stage1Config(Config):
    """Stage-I objective and optimisation settings."""

    phi: PhiConfig = dataclasses.field(default_factory=PhiConfig)
    loss: str = "soft"  # "hard" (one-hot InfoNCE) or "soft" (soft targets from `targets`)
    targets: str = "image"  # soft targets from "image" similarity, "caption" fit, or "both" (captions needed)
    tau_target: float = 0.05
    caption_tau: float = 0.01  # temperature of caption-image and caption-caption targets
    caption_mix: float = 0.5  # share of the caption targets in targets="both"
    caption_pooling: str = "sample"  # c_i: one of the image's captions drawn per step, or the "mean" of them all
    text_weight: float = 0.0  # weight of the text-space term against the batch's captions (captions needed)
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
        return {"pseudo": feats, "image": F.normalize(batch["pooled"], dim=-1), "log_scale": self.log_scale,
                "captions": batch.get("captions"), "has_caption": batch.get("has_caption")}


Targets = Tuple[torch.Tensor, torch.Tensor]  # row targets [B, B] over images, column targets [B, B] over queries


def _image_targets(out: Dict[str, Any], cfg: Stage1Config) -> Targets:
    p = soft_targets(out["image"], cfg.tau_target)
    return p, p.T


def _caption_targets(out: Dict[str, Any], cfg: Stage1Config, image: Optional[Targets] = None) -> Targets:
    rows, cols = caption_targets(out["captions"], out["image"], cfg.caption_tau, out["has_caption"])
    img_rows, img_cols = image or _image_targets(out, cfg)
    has = out["has_caption"].to(rows.device)
    rows = torch.where(has[:, None], rows, img_rows)  # captionless images keep the image target
    if not bool(has.any()):
        cols = img_cols
    return rows, cols


def _mixed_targets(out: Dict[str, Any], cfg: Stage1Config) -> Targets:
    image = _image_targets(out, cfg)
    (ir, ic), (cr, cc) = image, _caption_targets(out, cfg, image)
    return (1 - cfg.caption_mix) * ir + cfg.caption_mix * cr, (1 - cfg.caption_mix) * ic + cfg.caption_mix * cc


#: Where the soft targets of the "soft" loss come from; "caption" and "both" need captions.
STAGE1_TARGETS: Registry = Registry("stage-1 soft targets")
STAGE1_TARGETS.add("image", _image_targets)
STAGE1_TARGETS.add("caption", _caption_targets)
STAGE1_TARGETS.add("both", _mixed_targets)
CAPTION_TARGETS = ("caption", "both")
CAPTION_POOLING = ("sample", "mean")

STAGE1_LOSSES: Registry = Registry("stage-1 loss")
STAGE1_LOSSES.add("hard", lambda out, cfg, scale: clip_contrastive(out["pseudo"], out["image"], scale))
STAGE1_LOSSES.add("soft", lambda out, cfg, scale: soft_cross_entropy(
    scale * out["pseudo"] @ out["image"].T, *STAGE1_TARGETS.get(cfg.targets)(out, cfg)))


def needs_captions(cfg: Stage1Config) -> bool:
    """Whether the objective `cfg` describes reads captions."""
    return (cfg.loss == "soft" and cfg.targets in CAPTION_TARGETS) or cfg.text_weight > 0


class Stage1Task(TrainTask):
    """Soft text alignment of pseudo sentences with their images."""

    def __init__(self, composer: Composer, features: FeatureSource, cfg: Stage1Config,
                 concepts: Optional[Sequence[str]] = None, captions: Optional[CaptionFeatures] = None) -> None:
        check_patch_tokens(composer, features.patches, "the Stage-I image features")
        STAGE1_TARGETS.get(cfg.targets)
        if needs_captions(cfg) and captions is None:
            raise ValueError(f"Stage1Config targets={cfg.targets!r} / text_weight={cfg.text_weight} read captions, "
                             "but none were given (train-stage1 --captions FILE, a caption column, or "
                             "targets='image' with text_weight=0)")
        if captions is not None and len(captions) != len(features.pooled):
            raise ValueError(f"captions are given for {len(captions)} images, but the feature source has "
                             f"{len(features.pooled)} image rows")
        if cfg.caption_pooling not in CAPTION_POOLING:
            raise ValueError(f"Stage1Config.caption_pooling={cfg.caption_pooling!r}; choose one of {CAPTION_POOLING}")
        self.captions = captions if needs_captions(cfg) else None
        self.caption_means = None
        if self.captions is not None and cfg.caption_pooling == "mean":
            self.caption_means = self.captions.means()
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
        batch = {"pooled": pooled.to(dev), "patches": None if patches is None else patches.to(dev), "prompts": prompts}
        if self.captions is not None:
            rows = self.features.indices[indices.numpy()]
            if self.caption_means is not None:
                caps, has = self.caption_means[rows], self.captions.counts(rows) > 0
            else:  # one of each image's captions, drawn per step (resumes draw the same)
                gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + step)
                caps, has = self.captions.sample(rows, gen)
            batch.update(captions=caps.to(dev), has_caption=has.to(dev))
        return batch

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
        if self.cfg.text_weight > 0:
            text = text_alignment(outputs["pseudo"], outputs["captions"], scale, self.cfg.caption_tau,
                                  outputs["has_caption"])
            loss = loss + self.cfg.text_weight * text
            logs["text"] = float(text.detach())
        return loss, logs


def default_concepts() -> List[str]:
    """The concept vocabulary shipped with zscir (common objects, attributes, scenes)."""
    path = Path(__file__).resolve().parents[1] / "assets" / "concepts.txt"
    return [w.strip() for w in path.read_text().splitlines() if w.strip() and not w.startswith("#")]


def train_stage1(composer: Composer, features: FeatureSource, cfg: Stage1Config,
                 output_dir: Optional[Path] = None, concepts: Optional[Sequence[str]] = None,
                 resume: bool = False, progress: bool = True,
                 captions: Optional[CaptionFeatures] = None) -> Tuple[Composer, Any]:
    """Train phi in place on cached features (and the images' captions when the objective reads them); save the
    model folder to ``output_dir/model`` if given."""
    task = Stage1Task(composer, features, cfg, concepts, captions)
    trainer = Trainer(task, cfg.train, output_dir=output_dir, progress=progress, desc="stage I (mapping)")
    result = trainer.train(resume=resume)
    composer.phi.requires_grad_(False)
    composer.config.stage = "stage1"
    composer.eval()
    if output_dir is not None and trainer.accelerator.is_main_process:
        composer.save_pretrained(Path(output_dir) / "model")
    return composer, result
