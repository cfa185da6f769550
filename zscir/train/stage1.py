"""Stage I — mapping: train the phi-network on unlabeled images (frozen CLIP).

The pseudo sentence "a photo of $" (prompt list configurable), with ``$``
replaced by phi's tokens, is pulled towards its own image in CLIP space with
the soft text alignment objective (see :mod:`zscir.losses`):

    loss = contrastive(hard | soft targets) + concept_weight * KL over concepts

Inputs are cached image features (pooled + patch tokens), computed once by
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

import argparse
import dataclasses
import logging
import math
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..composer import Composer, ComposerConfig
from ..config import Config
from ..losses import clip_contrastive, concept_alignment, soft_contrastive
from ..models.phi import PhiConfig
from ..registry import Registry
from .engine import TrainConfig, Trainer, TrainTask, add_train_arguments, train_config_from_args

logger = logging.getLogger(__name__)

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


class FeatureSource:
    """Cached image features addressable by index: pooled [N, D] and optional patches [N, P, D]."""

    def __init__(self, pooled: Any, patches: Any = None, indices: Optional[np.ndarray] = None) -> None:
        self.pooled, self.patches = pooled, patches
        self.indices = np.arange(len(pooled)) if indices is None else np.asarray(indices)
        if len(self.indices) == 0:
            raise ValueError("the image corpus is empty (no valid image features)")

    @classmethod
    def from_cache(cls, cache: Any) -> "FeatureSource":
        """Valid rows of a :class:`zscir.data.features.FeatureCache`."""
        return cls(cache.pooled, cache.patches, cache.valid_indices())

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, idx: Sequence[int]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Float32 pooled and patch features of the given rows."""
        rows = np.sort(self.indices[np.asarray(idx)])  # sorted reads are faster on memmaps
        order = np.argsort(np.argsort(self.indices[np.asarray(idx)]))
        pooled = torch.as_tensor(np.asarray(self.pooled[rows]), dtype=torch.float32)[order]
        patches = None
        if self.patches is not None:
            patches = torch.as_tensor(np.asarray(self.patches[rows]), dtype=torch.float32)[order]
        return pooled, patches


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

    def loss(self, outputs: Dict[str, torch.Tensor], batch: Any, step: int):
        """Contrastive term (hard or soft) plus optional concept alignment."""
        scale = outputs["log_scale"].exp().clamp(max=100)
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of ``zscir train-stage1``."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of unlabeled images (searched recursively)")
    src.add_argument("--file-list", help="text file with one image path per line")
    src.add_argument("--hf-dataset", help="Hugging Face datasets name or local path (image column: --image-column)")
    src.add_argument("--shapes", type=int, metavar="N", help="N unlabeled images of the built-in shapes world")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--device", default=None, help="cuda or cpu for feature caching (default: cuda when available)")
    parser.add_argument("--model", default="zscir-tiny", help="open_clip model name or backbone folder (default: tiny CLIP)")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or weight file (e.g. openai)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (model in OUT/model)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature cache folder")
    parser.add_argument("--config", type=Path, default=None, help="Stage1Config JSON")
    add_train_arguments(parser)
    parser.add_argument("--num-tokens", type=int, default=None)
    parser.add_argument("--loss", choices=STAGE1_LOSSES.names(), default=None)
    parser.add_argument("--no-vsi", action="store_true", help="disable visual semantic injection")
    parser.add_argument("--concept-weight", type=float, default=None)
    parser.add_argument("--concepts", type=Path, default=None, help="concept phrases, one per line")
    parser.add_argument("--patch-grid", type=int, default=4, help="cache the patch grid pooled to GxG (0: full)")


def config_from_args(args: argparse.Namespace) -> Stage1Config:
    """Stage1Config from a JSON file and command-line overrides."""
    cfg = Stage1Config.from_json(args.config) if args.config else Stage1Config()
    train = train_config_from_args(cfg.train, args)
    phi = cfg.phi
    if args.num_tokens is not None:
        phi = dataclasses.replace(phi, num_tokens=args.num_tokens)
    if args.no_vsi:
        phi = dataclasses.replace(phi, use_vsi=False)
    cfg = dataclasses.replace(cfg, train=train, phi=phi)
    if args.loss:
        cfg = dataclasses.replace(cfg, loss=args.loss)
    if args.concept_weight is not None:
        cfg = dataclasses.replace(cfg, concept_weight=args.concept_weight)
    return cfg


def run(args: argparse.Namespace) -> int:
    """Entry point of ``zscir train-stage1``."""
    from ..data.features import FeatureCache

    cfg = config_from_args(args)
    from ..models.backbone import default_device

    composer = Composer.from_clip(args.model, args.pretrained, phi=cfg.phi, device=args.device or default_device())
    cfg = dataclasses.replace(cfg, phi=composer.phi.config)
    concepts = None
    if args.concepts:
        concepts = [w.strip() for w in args.concepts.read_text().splitlines() if w.strip()]
    if args.shapes:
        from ..shapes import ShapesWorld, ShapesWorldConfig

        world = ShapesWorld(ShapesWorldConfig(seed=cfg.train.seed, image_size=composer.backbone.image_size))
        features = shapes_features(composer, world.scenes(args.shapes, stream="stage1"), world.config.image_size,
                                   progress=not args.no_progress)
        concepts = concepts or world.concept_phrases()
    else:
        from ..data import images as img

        if args.images:
            source: Any = img.list_images(args.images)
        elif args.file_list:
            source = img.read_file_list(args.file_list)
        else:
            import datasets

            ds = datasets.load_dataset(args.hf_dataset, split="train") if not Path(args.hf_dataset).is_dir() \
                else datasets.load_from_disk(args.hf_dataset)
            source = img.hf_image_source(ds, image_column=args.image_column)
        cache_dir = args.cache_dir or args.out / "features"
        cache = FeatureCache.build(composer.backbone, source, cache_dir,
                                   patch_grid=args.patch_grid or None, progress=not args.no_progress)
        features = FeatureSource.from_cache(cache)
    train_stage1(composer, features, cfg, output_dir=args.out, concepts=concepts, resume=args.resume,
                 progress=not args.no_progress)
    print(f"stage I model: {args.out / 'model'}")
    return 0


@torch.no_grad()
def shapes_features(composer: Composer, scenes: Sequence[Any], image_size: int, batch_size: int = 256,
                    progress: bool = False) -> FeatureSource:
    """In-memory features of shapes-world scenes (rendered on the fly)."""
    from tqdm.auto import tqdm

    from ..shapes import render_array

    bb = composer.backbone
    pooled, patches = [], []
    for s in tqdm(range(0, len(scenes), batch_size), desc="encode images", disable=not progress):
        feats = bb.encode_image(bb.pixels_from_uint8(render_array(scenes[s: s + batch_size], image_size)))
        pooled.append(feats.pooled)
        patches.append(feats.patches)
    return FeatureSource(torch.cat(pooled).numpy(), torch.cat(patches).numpy())
