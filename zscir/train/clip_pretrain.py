"""Contrastive (CLIP-loss) pretraining of a small open_clip model: the offline stand-in for a pretrained CLIP.

By default it trains the built-in ``zscir-tiny`` config on captioned scenes of
the shapes world; ``--captions captions.jsonl --image-root DIR`` trains on any
image-caption corpus instead. The result is a backbone folder
(``config.json`` + ``backbone.safetensors``) that ``load_backbone`` reads.

:func:`pretrained_tiny_clip` caches that folder in the user cache
(``$ZSCIR_CACHE_DIR`` or ``~/.cache/zscir``), keyed by every setting that
changes the weights, so the demo and the tests train it once per machine.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import atomic_write_json
from ..config import Config
from ..losses import clamped_scale, clip_contrastive
from ..models.backbone import Backbone, default_device, load_backbone
from ..precision import resolve_precision
from .engine import TrainConfig, Trainer, TrainTask

logger = logging.getLogger(__name__)

__all__ = ["PRESETS", "ClipPretrainConfig", "ClipPretrainModule", "ClipPretrainTask", "FolderCaptionSource",
           "ShapesCaptionSource", "config_key", "default_cache_dir", "evaluate_text_to_image", "pretrain",
           "pretrained_tiny_clip"]


@dataclasses.dataclass
class ClipPretrainConfig(Config):
    """What to pretrain on: the shapes world (default) or an image-caption corpus."""

    model_name: str = "zscir-tiny"
    world_seed: int = 0
    image_size: int = 64
    num_scenes: int = 100_000
    captions_file: Optional[str] = None  # JSONL {"image": path, "caption": str}; replaces the shapes world
    image_root: Optional[str] = None
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(steps=400, batch_size=256, lr=2e-3, weight_decay=0.1, warmup_steps=30)
    )


PRESETS: Dict[str, ClipPretrainConfig] = {
    "default": ClipPretrainConfig(
        train=TrainConfig(steps=350, batch_size=256, lr=2e-3, weight_decay=0.1, warmup_steps=30),
    ),
    "fast": ClipPretrainConfig(  # the tests and benchmarks
        num_scenes=40_000,
        train=TrainConfig(steps=200, batch_size=256, lr=2e-3, weight_decay=0.1, warmup_steps=20),
    ),
    "quick": ClipPretrainConfig(  # `zscir demo --fast`, so a fresh machine finishes in 4 minutes
        num_scenes=40_000,
        train=TrainConfig(steps=120, batch_size=256, lr=2e-3, weight_decay=0.1, warmup_steps=20),
    ),
}


def default_cache_dir() -> Path:
    """The user cache folder of zscir (``$ZSCIR_CACHE_DIR`` or ``~/.cache/zscir``)."""
    return Path(os.environ.get("ZSCIR_CACHE_DIR") or Path.home() / ".cache" / "zscir")


class ClipPretrainModule(nn.Module):
    """Wraps a trainable backbone: batch -> normalised image and text features + logit scale."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Features of one batch of (pixels, token ids)."""
        img = self.backbone.encode_image(batch["pixels"], with_patches=False).pooled
        txt = self.backbone.encode_text(batch["ids"])
        return {
            "image": F.normalize(img, dim=-1),
            "text": F.normalize(txt, dim=-1),
            "logit_scale": self.backbone.model.logit_scale,
        }


class ShapesCaptionSource:
    """Captioned shapes-world scenes, rendered on the fly; a different caption phrasing per visit."""

    def __init__(self, world_seed: int, num_scenes: int, image_size: int, stream: str = "clip",
                 full_fraction: float = 0.5) -> None:
        from ..shapes import ShapesWorld, ShapesWorldConfig

        self.world = ShapesWorld(ShapesWorldConfig(seed=world_seed, image_size=image_size))
        self.image_size = image_size
        self.scenes = self.world.scenes(num_scenes, stream=stream)
        self.seed = world_seed
        self.full_fraction = full_fraction

    def __len__(self) -> int:
        return len(self.scenes)

    def batch(self, indices: Sequence[int], step: int) -> Tuple[np.ndarray, List[str]]:
        """uint8 images [B, H, W, 3] and one caption each."""
        from ..shapes import caption, full_caption, render_array

        scenes = [self.scenes[i] for i in indices]
        captions = []
        for i, scene in zip(indices, scenes):
            rng = random.Random((self.seed * 1_000_003 + int(i)) * 100_003 + step)
            # half complete descriptions (the content), half the world's varied phrasings (the vocabulary)
            captions.append(full_caption(scene, rng) if rng.random() < self.full_fraction else caption(scene, rng))
        return render_array(scenes, self.image_size), captions


class FolderCaptionSource:
    """Image-caption pairs from a JSONL file (``{"image": path, "caption": str}`` per line)."""

    def __init__(self, captions_file: str, image_root: Optional[str], preprocess: Any) -> None:
        path = Path(captions_file)
        root = Path(image_root) if image_root else path.parent
        self.items: List[Tuple[Path, str]] = []
        bad = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                self.items.append((root / row["image"], str(row["caption"])))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                bad.append(f"{path}:{lineno}: {err}")
        if bad:
            raise ValueError("malformed caption rows:\n" + "\n".join(bad[:50]))
        if not self.items:
            raise ValueError(f"{path} lists no image-caption pairs")
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, indices: Sequence[int], step: int) -> Tuple[torch.Tensor, List[str]]:
        """Preprocessed pixels and captions; unreadable images are replaced by the next readable one."""
        from ..data.images import ImageLoadError, load_image

        pixels, captions = [], []
        for i in indices:
            j = int(i)
            for _ in range(len(self.items)):
                path, caption = self.items[j]
                try:
                    pixels.append(self.preprocess(load_image(path)))
                    captions.append(caption)
                    break
                except ImageLoadError as err:
                    logger.warning("skipping %s", err)
                    j = (j + 1) % len(self.items)
        return torch.stack(pixels), captions


class ClipPretrainTask(TrainTask):
    """CLIP loss on image-caption batches."""

    def __init__(self, backbone: Backbone, source: Any) -> None:
        self.backbone = backbone
        self.source = source
        self.module = ClipPretrainModule(backbone)

    def num_examples(self) -> int:
        """Number of image-caption pairs."""
        return len(self.source)

    def make_batch(self, indices: torch.Tensor, step: int) -> Dict[str, torch.Tensor]:
        """Pixels and token ids of the indexed pairs."""
        images, captions = self.source.batch(indices.tolist(), step)
        pixels = self.backbone.pixels_from_uint8(images) if isinstance(images, np.ndarray) else images
        return {"pixels": pixels, "ids": self.backbone.tokenize(captions)}

    def loss(self, outputs: Dict[str, torch.Tensor], batch: Any, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Symmetric InfoNCE with the learnable temperature (clamped at 100 as in CLIP)."""
        scale = clamped_scale(outputs["logit_scale"])
        return clip_contrastive(outputs["image"], outputs["text"], scale), {"scale": float(scale.detach())}


@torch.no_grad()
def evaluate_text_to_image(backbone: Backbone, world_seed: int = 0, num_scenes: int = 1000,
                           image_size: int = 64, stream: str = "clip-heldout") -> Dict[str, Any]:
    """Text->image R@1/R@5 over held-out scenes with their full captions, overall and by object count."""
    from ..shapes import ShapesWorld, ShapesWorldConfig, full_caption, render_array

    world = ShapesWorld(ShapesWorldConfig(seed=world_seed, image_size=image_size))
    scenes = world.scenes(num_scenes, stream=stream)
    backbone.eval()
    img_feats, txt_feats = [], []
    for s in range(0, len(scenes), 250):
        chunk = scenes[s: s + 250]
        img_feats.append(F.normalize(backbone.encode_image(backbone.pixels_from_uint8(render_array(chunk, image_size)),
                                                           with_patches=False).pooled, dim=-1))
        txt_feats.append(backbone.encode_text([full_caption(sc) for sc in chunk], normalize=True))
    img, txt = torch.cat(img_feats), torch.cat(txt_feats)
    sims = txt @ img.T
    # a hit is any image with the same content (duplicates among random scenes are possible)
    keys = [sc.key for sc in scenes]
    order = sims.argsort(dim=1, descending=True)[:, :5]
    hit1 = [keys[order[i, 0]] == keys[i] for i in range(len(scenes))]
    hit5 = [any(keys[j] == keys[i] for j in order[i].tolist()) for i in range(len(scenes))]
    by_count: Dict[str, Dict[str, float]] = {}
    for n in sorted({len(sc.objects) for sc in scenes}):
        rows = [i for i, sc in enumerate(scenes) if len(sc.objects) == n]
        by_count[str(n)] = {"R@1": float(np.mean([hit1[i] for i in rows])), "R@5": float(np.mean([hit5[i] for i in rows])), "n": len(rows)}
    return {"R@1": float(np.mean(hit1)), "R@5": float(np.mean(hit5)), "by_num_objects": by_count}


def config_key(cfg: ClipPretrainConfig) -> str:
    """Hash of every setting that changes the pretrained weights."""
    import open_clip

    blob = json.dumps({"cfg": cfg.to_dict(), "model": open_clip.get_model_config(cfg.model_name), "v": 1}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def pretrain(cfg: ClipPretrainConfig, output_dir: Path, resume: bool = True, progress: bool = True) -> Dict[str, Any]:
    """Train a CLIP from scratch, save it as a backbone folder in `output_dir`, return a report."""
    output_dir = Path(output_dir)
    torch.manual_seed(cfg.train.seed)
    backbone = load_backbone(cfg.model_name, freeze=False)
    if cfg.captions_file:
        source: Any = FolderCaptionSource(cfg.captions_file, cfg.image_root, backbone.preprocess)
    else:
        source = ShapesCaptionSource(cfg.world_seed, cfg.num_scenes, backbone.image_size)
    task = ClipPretrainTask(backbone, source)
    trainer = Trainer(task, cfg.train, output_dir=output_dir / "training", progress=progress, desc="pretrain tiny CLIP")
    result = trainer.train(resume=resume)
    for p in backbone.parameters():
        p.requires_grad_(False)
    backbone.invalidate_cache_key()
    backbone.save_pretrained(output_dir / "backbone")
    report: Dict[str, Any] = {"train_seconds": result.seconds, "steps": cfg.train.steps, "config": cfg.to_dict(),
                              "history": result.history}
    if not cfg.captions_file:
        report["heldout_text_to_image"] = evaluate_text_to_image(backbone, cfg.world_seed, image_size=cfg.image_size)
    atomic_write_json(output_dir / "report.json", report)
    return report


def pretrained_tiny_clip(preset: str = "default", cache_dir: Optional[Path] = None, progress: bool = True,
                         seed: int = 0, precision: str = "no") -> Tuple[Path, Dict[str, Any]]:
    """Backbone folder of the cached tiny CLIP for `preset`, training (or resuming) it in `precision` if needed."""
    if preset not in PRESETS:
        raise KeyError(f"unknown tiny-CLIP preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]
    # the precision is part of the cache key: a bf16-trained model is another model
    precision = resolve_precision(precision, default_device(), "pretrained_tiny_clip: precision")
    cfg = dataclasses.replace(cfg, world_seed=seed, train=dataclasses.replace(cfg.train, seed=seed,
                                                                              mixed_precision=precision))
    folder = (cache_dir or default_cache_dir()) / "tiny_clip" / f"{preset}-{config_key(cfg)}"
    done = folder / "report.json"
    if done.is_file() and (folder / "backbone" / "config.json").is_file():
        return folder / "backbone", json.loads(done.read_text())
    report = pretrain(cfg, folder, resume=True, progress=progress)
    shutil.rmtree(folder / "training", ignore_errors=True)
    return folder / "backbone", report
