"""`zscir pretrain-clip`, `train-stage1`, `train-stage2`, `train-bank`: flags, configs from flags, and runs."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from ..train.bank import BankStageConfig
from ..train.clip_pretrain import PRESETS
from ..train.stage1 import STAGE1_LOSSES, Stage1Config
from ..train.stage2 import Stage2Config
from .common import (add_device_argument, add_model_argument, add_out_argument, add_precision_argument,
                     add_train_arguments, resolve_cli_precision, resolve_device, train_config_from_args)

__all__ = [
    "bank_add_arguments", "bank_config_from_args", "bank_run", "pretrain_clip_add_arguments", "pretrain_clip_run",
    "stage1_add_arguments", "stage1_config_from_args", "stage1_run", "stage2_add_arguments", "stage2_config_from_args",
    "stage2_run",
]


# ------------------------------------------------------------------------------------------ pretrain-clip

def pretrain_clip_add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of ``zscir pretrain-clip``."""
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS), help="training budget preset")
    add_out_argument(parser, "output folder (default: the user cache)", required=False)
    parser.add_argument("--captions", default=None, help="JSONL of {image, caption} to train on instead of the shapes world")
    parser.add_argument("--image-root", default=None, help="folder the caption file's image paths are relative to")
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps")
    parser.add_argument("--seed", type=int, default=0)
    add_precision_argument(parser, "training (a precision other than no trains another cached model)")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if a state exists")


def pretrain_clip_run(args: argparse.Namespace) -> int:
    """Entry point of ``zscir pretrain-clip``."""
    from ..train.clip_pretrain import config_key, default_cache_dir, pretrain, pretrained_tiny_clip

    precision = resolve_cli_precision(args)
    cfg = PRESETS[args.preset]
    cfg = dataclasses.replace(cfg, world_seed=args.seed, captions_file=args.captions, image_root=args.image_root,
                              train=dataclasses.replace(cfg.train, seed=args.seed, mixed_precision=precision,
                                                        steps=args.steps or cfg.train.steps))
    if args.out is None and args.captions is None and args.steps is None:
        folder, report = pretrained_tiny_clip(args.preset, seed=args.seed, precision=precision)
    else:
        out = args.out or default_cache_dir() / "tiny_clip" / f"custom-{config_key(cfg)}"
        report = pretrain(cfg, out, resume=not args.no_resume)
        folder = out / "backbone"
    print(f"backbone folder: {folder}")
    ev = report.get("heldout_text_to_image")
    if ev:
        print(f"held-out text->image R@1 {ev['R@1']:.3f}  R@5 {ev['R@5']:.3f}  (train {report['train_seconds']:.0f}s)")
    return 0


# ------------------------------------------------------------------------------------------- train-stage1

def stage1_add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of ``zscir train-stage1``."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of unlabeled images (searched recursively)")
    src.add_argument("--file-list", help="text file with one image path per line")
    src.add_argument("--hf-dataset", help="Hugging Face datasets name or local path (image column: --image-column)")
    src.add_argument("--shapes", type=int, metavar="N", help="N unlabeled images of the built-in shapes world")
    parser.add_argument("--image-column", default="image")
    add_device_argument(parser, "feature caching")
    add_model_argument(parser, "open_clip model name or backbone folder (default: tiny CLIP)", default="zscir-tiny")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or weight file (e.g. openai)")
    add_out_argument(parser, "output folder (model in OUT/model)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature cache folder")
    parser.add_argument("--config", type=Path, default=None, help="Stage1Config JSON")
    add_train_arguments(parser)
    parser.add_argument("--num-tokens", type=int, default=None)
    parser.add_argument("--loss", choices=STAGE1_LOSSES.names(), default=None)
    parser.add_argument("--no-vsi", action="store_true", help="disable visual semantic injection")
    parser.add_argument("--concept-weight", type=float, default=None)
    parser.add_argument("--concepts", type=Path, default=None, help="concept phrases, one per line")
    parser.add_argument("--patch-grid", type=int, default=None,
                        help="phi reads patch tokens pooled to GxG (0: full grid; default: phi.patch_grid, 4)")


def stage1_config_from_args(args: argparse.Namespace) -> Stage1Config:
    """Stage1Config from a JSON file and command-line overrides."""
    cfg = Stage1Config.from_json(args.config) if args.config else Stage1Config()
    train = train_config_from_args(cfg.train, args)
    phi = cfg.phi
    if args.num_tokens is not None:
        phi = dataclasses.replace(phi, num_tokens=args.num_tokens)
    if args.no_vsi:
        phi = dataclasses.replace(phi, use_vsi=False)
    if args.patch_grid is not None:
        phi = dataclasses.replace(phi, patch_grid=args.patch_grid)
    cfg = dataclasses.replace(cfg, train=train, phi=phi)
    if args.loss:
        cfg = dataclasses.replace(cfg, loss=args.loss)
    if args.concept_weight is not None:
        cfg = dataclasses.replace(cfg, concept_weight=args.concept_weight)
    return cfg


def stage1_run(args: argparse.Namespace) -> int:
    """Entry point of ``zscir train-stage1``."""
    from ..composer import Composer
    from ..data.features import FeatureCache
    from ..train.features import FeatureSource, shapes_features
    from ..train.stage1 import train_stage1

    cfg = stage1_config_from_args(args)
    composer = Composer.from_clip(args.model, args.pretrained, phi=cfg.phi, device=resolve_device(args))
    cfg = dataclasses.replace(cfg, phi=composer.phi.config)
    concepts = None
    if args.concepts:
        concepts = [w.strip() for w in args.concepts.read_text().splitlines() if w.strip()]
    if args.shapes:
        from ..shapes import ShapesWorld, ShapesWorldConfig

        world = ShapesWorld(ShapesWorldConfig(seed=cfg.train.seed, image_size=composer.backbone.image_size))
        features = shapes_features(composer, world.scenes(args.shapes, stream="stage1"), world.config.image_size,
                                   progress=not args.no_progress, precision=cfg.train.mixed_precision)
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
        cache = FeatureCache.build(composer.backbone, source, cache_dir, patch_grid=composer.phi.config.patch_grid,
                                   progress=not args.no_progress, precision=cfg.train.mixed_precision)
        features = FeatureSource.from_cache(cache)
    train_stage1(composer, features, cfg, output_dir=args.out, concepts=concepts, resume=args.resume,
                 progress=not args.no_progress)
    print(f"stage I model: {args.out / 'model'}")
    return 0


# ------------------------------------------------------------------------------------------- train-stage2

def _add_triplet_arguments(parser: argparse.ArgumentParser) -> None:
    """`--triplets` and `--image-root` (train-stage2, train-bank)."""
    parser.add_argument("--triplets", required=True, help="triplets (.jsonl, .csv, or a Hugging Face dataset path)")
    parser.add_argument("--image-root", default=None, help="folder the triplet image paths are relative to")


def _encode_triplets(composer: Any, args: argparse.Namespace, precision: str) -> Tuple[Any, Any]:
    """The triplet set of `--triplets` (texts fitted to the text tower) and its frozen features, encoded in `precision`."""
    from ..data.triplets import load_triplets
    from ..train.features import encode_triplets
    from ..train.stage2 import fit_to_context

    triplets = fit_to_context(composer, load_triplets(args.triplets, image_root=args.image_root))
    return triplets, encode_triplets(composer, triplets, progress=not args.no_progress, precision=precision)


def stage2_add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of ``zscir train-stage2``."""
    add_model_argument(parser, "Stage-I model folder")
    _add_triplet_arguments(parser)
    add_device_argument(parser, "feature encoding")
    add_out_argument(parser, "output folder (model in OUT/model)")
    parser.add_argument("--config", type=Path, default=None, help="Stage2Config JSON")
    parser.add_argument("--adapter", choices=["bottleneck", "lora", "full"], default=None)
    parser.add_argument("--adapter-layers", type=int, default=None)
    parser.add_argument("--adapter-rank", type=int, default=None)
    parser.add_argument("--components", default=None, help="comma-separated Stage-II components, e.g. reference,query_negative")
    parser.add_argument("--corpus", default=None, help="image folder whose features serve as mined/bank negatives")
    add_train_arguments(parser)


def stage2_config_from_args(args: argparse.Namespace) -> Stage2Config:
    """Stage2Config from a JSON file and overrides."""
    cfg = Stage2Config.from_json(args.config) if args.config else Stage2Config()
    train = train_config_from_args(cfg.train, args)
    ad = cfg.adapters
    if args.adapter:
        ad = dataclasses.replace(ad, kind=args.adapter)
    if args.adapter_layers:
        ad = dataclasses.replace(ad, num_layers=args.adapter_layers)
    if args.adapter_rank:
        ad = dataclasses.replace(ad, rank=args.adapter_rank)
    cfg = dataclasses.replace(cfg, train=train, adapters=ad)
    if args.components is not None:
        cfg = dataclasses.replace(cfg, components=tuple(c for c in args.components.split(",") if c))
    return cfg


def stage2_run(args: argparse.Namespace) -> int:
    """Entry point of ``zscir train-stage2``."""
    from ..composer import Composer
    from ..train.features import Corpus, corpus_features
    from ..train.stage2 import train_stage2

    cfg = stage2_config_from_args(args)
    composer = Composer.from_pretrained(args.model, device=resolve_device(args))
    _, feats = _encode_triplets(composer, args, cfg.train.mixed_precision)
    corpus = None
    if args.corpus:
        # cached on disk; corrupt corpus images are logged and skipped
        corpus = Corpus(*corpus_features(composer, args.corpus, args.out / "features", progress=not args.no_progress,
                                         precision=cfg.train.mixed_precision))
    train_stage2(composer, feats, cfg, corpus=corpus, output_dir=args.out, resume=args.resume,
                 progress=not args.no_progress)
    print(f"stage II model: {args.out / 'model'}")
    return 0


# --------------------------------------------------------------------------------------------- train-bank

def bank_add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of ``zscir train-bank``."""
    add_model_argument(parser, "Stage-II model folder (from zscir train-stage2)")
    _add_triplet_arguments(parser)
    parser.add_argument("--corpus", default=None, help="image folder added to the bank (gallery or training images)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature cache of the corpus (default: OUT/features)")
    add_out_argument(parser, "output folder (model in OUT/model)")
    parser.add_argument("--config", type=Path, default=None, help="BankStageConfig JSON")
    parser.add_argument("--negatives", type=int, default=None, help="bank negatives per step; 0 = the whole bank")
    parser.add_argument("--dedup-threshold", type=float, default=None, help="cosine at which bank images are merged")
    parser.add_argument("--no-triplet-images", action="store_true", help="bank = corpus images only")
    parser.add_argument("--train-phi", action="store_true", help="also fine-tune the phi-network")
    add_device_argument(parser)
    add_train_arguments(parser)


def bank_config_from_args(args: argparse.Namespace) -> BankStageConfig:
    """BankStageConfig from a JSON file and command-line overrides."""
    cfg = BankStageConfig.from_json(args.config) if args.config else BankStageConfig()
    changes: Dict[str, Any] = {"train": train_config_from_args(cfg.train, args)}
    if args.negatives is not None:
        if args.negatives < 0:
            raise ValueError(f"--negatives must be >= 0, got {args.negatives}")
        changes["negatives"] = args.negatives
    if args.dedup_threshold is not None:
        changes["dedup_threshold"] = args.dedup_threshold
    if args.no_triplet_images:
        changes["include_triplet_images"] = False
    if args.train_phi:
        changes["train_phi"] = True
    return dataclasses.replace(cfg, **changes)


def bank_run(args: argparse.Namespace) -> int:
    """Entry point of ``zscir train-bank``."""
    from ..composer import Composer
    from ..train.bank import build_bank, train_bank, triplet_bank_parts
    from ..train.features import corpus_features

    cfg = bank_config_from_args(args)
    composer = Composer.from_pretrained(args.model, device=resolve_device(args))
    if composer.config.adapters is None:
        raise ValueError(f"{args.model}: not a Stage-II model (no adapters); run zscir train-stage2 first")
    triplets, feats = _encode_triplets(composer, args, cfg.train.mixed_precision)
    parts: List[Tuple[torch.Tensor, List[str]]] = []
    if args.corpus:
        parts.append(corpus_features(composer, args.corpus, args.cache_dir or args.out / "features",
                                     progress=not args.no_progress, precision=cfg.train.mixed_precision))
    if cfg.include_triplet_images:
        parts.extend(triplet_bank_parts(feats, [bool(r.target) for r in triplets]))
    bank = build_bank(parts, cfg.dedup_threshold, progress=not args.no_progress)
    total = sum(len(p[0]) for p in parts)
    print(f"bank: {len(bank.ids)} images after deduplication ({total - len(bank.ids)} merged at cosine >= {cfg.dedup_threshold})")
    train_bank(composer, feats, bank, cfg, output_dir=args.out, resume=args.resume, progress=not args.no_progress)
    print(f"bank-stage model: {args.out / 'model'}")
    return 0
