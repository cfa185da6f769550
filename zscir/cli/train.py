"""`zscir pretrain-clip`, `train-stage1`, `train-stage2`, `train-bank`: flags, configs from flags, and runs."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..checkpoint import file_sha256, read_json
from ..data.sources import is_dataset_source
from ..data.triplets import ALLOWED_FIELDS as TRIPLET_FIELDS
from ..runs import RunFolder, data_fingerprint, folder_fingerprint
from ..train.bank import BankStageConfig
from ..train.clip_pretrain import PRESETS
from ..train.stage1 import (CAPTION_CONCEPTS, CAPTION_DEFAULTS, MINED_CONCEPTS, STAGE1_LOSSES, STAGE1_TARGETS,
                             Stage1Config)
from ..train.stage2 import Stage2Config
from .common import (RESUME_FREE, SOURCE_HELP, add_again_arguments, add_cache_argument, add_data_arguments, add_device_argument,
                     add_model_argument, add_out_argument, add_report_argument, add_train_arguments,
                     add_train_precision_argument, check_report_to, columns_of, open_training_run,
                     resolve_cli_precision, resolve_device, resolve_model, tracking, train_config_from_args)
from .flags import add_old_spelling

logger = logging.getLogger(__name__)

__all__ = [
    "TINY_CLIP", "Stage1Backbone", "bank_add_arguments", "bank_config_from_args", "bank_run",
    "pretrain_clip_add_arguments", "pretrain_clip_run", "stage1_add_arguments", "stage1_backbone",
    "stage1_config_from_args", "stage1_run", "stage2_add_arguments", "stage2_config_from_args", "stage2_run",
]

#: `--backbone` name of the shapes world's trained tiny CLIP (`tiny-clip:PRESET` for another pretrain-clip preset).
TINY_CLIP = "tiny-clip"
STAGE1_MODEL_CHOICES = (
    "an open_clip name with its weights, --pretrained TAG or FILE (e.g. --backbone ViT-L-14 --pretrained openai); "
    "an open_clip Hub name hf-hub:org/repo; a backbone folder (zscir pretrain-clip); or tiny-clip[:PRESET], the "
    "shapes world's trained tiny CLIP (the cached `zscir pretrain-clip --preset PRESET` model, PRESET default "
    "unless given; trained on first use)"
)
#: Fields train-stage1 reads from a data set (or a caption file's columns).
CAPTION_COLUMNS = ("image", "id", "caption")
#: Outputs of `pretrain-clip --out DIR` (a run folder like the other training commands').
PRETRAIN_OUTPUTS = ("training", "backbone", "report.json", "logs")


def _hub_datasets(*sources: Optional[str]) -> List[str]:
    """The sources that are Hub data set ids (for the model card's metadata)."""
    return [s for s in sources if isinstance(s, str) and not Path(s).exists() and is_dataset_source(s)]


def _label(source: str, split: Optional[str]) -> str:
    return f"{source} [{split}]" if split else source


def _record_card(model_dir: Path, stage: str, summary: str, datasets: Sequence[str] = ()) -> None:
    """Add this stage's training data to the model card of a folder a training command wrote."""
    from ..hub import write_model_card

    write_model_card(model_dir, read_json(model_dir / "config.json"), training_data={stage: summary},
                     datasets=datasets)


# ------------------------------------------------------------------------------------------ pretrain-clip

def pretrain_clip_add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of ``zscir pretrain-clip``."""
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS), help="training budget preset")
    add_out_argument(parser, "output folder (backbone in OUT/backbone; default: the zscir cache, where a run with "
                     "the same settings is reused or continued)", required=False)
    parser.add_argument("--captions", default=None, help="JSONL of {image, caption} to train on instead of the shapes world")
    parser.add_argument("--image-root", default=None, help="folder the caption file's image paths are relative to")
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps")
    parser.add_argument("--seed", type=int, default=0)
    add_train_precision_argument(parser, "training (a precision other than no trains another cached model)")
    add_report_argument(parser)
    add_again_arguments(parser)
    add_old_spelling(parser, "--no-resume", "--overwrite")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def pretrain_clip_run(args: argparse.Namespace) -> int:
    """Entry point of ``zscir pretrain-clip``."""
    from ..train.clip_pretrain import config_key, default_cache_dir, pretrain, pretrained_tiny_clip

    precision = resolve_cli_precision(args)
    check_report_to(args)
    cfg = PRESETS[args.preset]
    cfg = dataclasses.replace(cfg, world_seed=args.seed, captions_file=args.captions, image_root=args.image_root,
                              train=dataclasses.replace(cfg.train, seed=args.seed, mixed_precision=precision,
                                                        steps=args.steps or cfg.train.steps))
    if args.out is None and args.captions is None and args.steps is None:
        if args.resume or args.overwrite:
            raise ValueError("--resume and --overwrite apply to --out DIR; the cached tiny CLIP is reused or "
                             "continued by itself")
        folder, report = pretrained_tiny_clip(args.preset, seed=args.seed, precision=precision,
                                              progress=not args.no_progress)
    elif args.out is None:  # a keyed cache entry: the same settings continue the same run
        out = default_cache_dir() / "tiny_clip" / f"custom-{config_key(cfg)}"
        with tracking(argparse.Namespace(report_to=args.report_to, out=out), {"preset": args.preset}):
            report = pretrain(cfg, out, resume=True, progress=not args.no_progress)
        folder = out / "backbone"
    else:
        run = RunFolder(args.out, "pretrain-clip", {"config": cfg.to_dict()}, PRETRAIN_OUTPUTS, free=RESUME_FREE,
                        info={"preset": args.preset, "captions": args.captions})
        resume = run.open(resume=args.resume, overwrite=args.overwrite)
        with tracking(args, {"preset": args.preset}):
            report = pretrain(cfg, args.out, resume=resume, progress=not args.no_progress)
        run.finish()
        folder = args.out / "backbone"
    print(f"backbone folder: {folder}")
    ev = report.get("heldout_text_to_image")
    if ev:
        print(f"held-out text->image R@1 {ev['R@1']:.3f}  R@5 {ev['R@5']:.3f}  (train {report['train_seconds']:.0f}s)")
    return 0


# ------------------------------------------------------------------------------------------- train-stage1

def stage1_add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of ``zscir train-stage1``."""
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--images", metavar="SOURCE",
                     help=f"the images: an image folder (searched recursively), a text file with one image "
                          f"path per line, or a data set with an image column (and optionally a caption column, "
                          f"a string or a list of strings per row): {SOURCE_HELP}")
    src.add_argument("--shapes", type=int, metavar="N", help="N unlabeled images of the built-in shapes world")
    add_old_spelling(src, "--file-list", "--images", parser=parser)
    add_old_spelling(src, "--hf-dataset", "--images", parser=parser)
    parser.add_argument("--captions", metavar="FILE", default=None,
                        help="captions of the images: a .jsonl ({\"image\": ID, \"caption\": TEXT or \"captions\": "
                             "[...]}) or .csv (image,caption) file, several rows per image allowed; ID is the path "
                             "relative to the --images folder (or to --image-root / the file's folder). Without "
                             "--images, the images are the ones it names")
    parser.add_argument("--shapes-captions", type=int, default=0, metavar="K",
                        help="with --shapes: up to K captions per image from the world (0: unlabeled)")
    add_data_arguments(parser, CAPTION_COLUMNS, "--images",
                       image_root_help="folder that relative paths in a file list, a caption file or a data set's "
                                       "image column start from (default: the list's folder)")
    parser.add_argument("--image-column", default=None, help=argparse.SUPPRESS)  # old spelling of --columns image=
    add_device_argument(parser, "feature caching")
    parser.add_argument("--backbone", default=None, help=f"the CLIP to train phi on (required): {STAGE1_MODEL_CHOICES}")
    add_old_spelling(parser, "--model", "--backbone")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or weight file (e.g. openai)")
    parser.add_argument("--random-init", action="store_true",
                        help="the open_clip architecture --backbone names with random weights, seeded by --seed "
                             "(smoke tests only: nothing learnt on it transfers)")
    add_out_argument(parser, "output folder (model in OUT/model)")
    add_cache_argument(parser, "--feature-cache", "Stage-I image feature cache (default: OUT/features)")
    parser.add_argument("--config", type=Path, default=None, help="Stage1Config JSON")
    add_train_arguments(parser)
    parser.add_argument("--num-tokens", type=int, default=None)
    parser.add_argument("--loss", choices=STAGE1_LOSSES.names(), default=None)
    parser.add_argument("--no-vsi", action="store_true", help="disable visual semantic injection")
    parser.add_argument("--targets", choices=STAGE1_TARGETS.names(), default=None,
                        help=f"soft targets of the alignment: image similarity, caption fit, or both (default: "
                             f"{Stage1Config().targets} without captions, {CAPTION_DEFAULTS['targets']} with them)")
    parser.add_argument("--text-weight", type=float, default=None,
                        help="weight of the text-space term against the batch's captions (default: "
                             f"{CAPTION_DEFAULTS['text_weight']} with captions)")
    parser.add_argument("--caption-pooling", choices=("sample", "mean"), default=None,
                        help="caption feature of an image: one of its captions drawn per step, or their mean "
                             f"(default with captions: {CAPTION_DEFAULTS['caption_pooling']})")
    parser.add_argument("--caption-tau", type=float, default=None,
                        help=f"temperature of the caption targets (default {Stage1Config().caption_tau})")
    parser.add_argument("--concept-weight", type=float, default=None)
    parser.add_argument("--concepts", default=None, metavar="FILE|mined|shipped",
                        help="concept phrases of the concept term: a file with one per line, 'mined' (the "
                             f"{MINED_CONCEPTS} most frequent phrases of the captions), or 'shipped' (zscir's "
                             "list of common objects); default: the world's own list with --shapes, "
                             f"{CAPTION_CONCEPTS} with captions, else shipped")
    parser.add_argument("--patch-grid", type=int, default=None,
                        help="phi reads patch tokens pooled to GxG (0: full grid; default: phi.patch_grid, 4)")


def stage1_config_from_args(args: argparse.Namespace, with_captions: bool = False) -> Stage1Config:
    """Stage1Config from a JSON file and command-line overrides (the caption defaults when there are captions)."""
    cfg = Stage1Config.from_json(args.config) if args.config else Stage1Config()
    if with_captions and not args.config:
        cfg = dataclasses.replace(cfg, **CAPTION_DEFAULTS)
    for field in ("targets", "text_weight", "caption_tau", "caption_pooling"):
        if getattr(args, field, None) is not None:
            cfg = dataclasses.replace(cfg, **{field: getattr(args, field)})
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


@dataclasses.dataclass
class Stage1Backbone:
    """The backbone `--model`, `--pretrained` and `--random-init` name, checked, not yet loaded."""

    model: str  # open_clip name or folder (for the tiny CLIP: found when loading)
    pretrained: Optional[str] = None
    random_init: bool = False
    tiny_preset: Optional[str] = None
    settings: Dict[str, Any] = dataclasses.field(default_factory=dict)  # the run's "model" settings entry

    def load(self, phi: Any, device: str, precision: str, progress: bool, seed: int) -> Any:
        """The Composer over this backbone with an untrained phi, both initialised from `seed`."""
        from ..composer import Composer

        name = self.model
        if self.tiny_preset is not None:
            from ..train.clip_pretrain import pretrained_tiny_clip

            folder, _ = pretrained_tiny_clip(self.tiny_preset, progress=progress, precision=precision)
            name = str(folder)
        if self.random_init:
            logger.warning("--random-init: the %s backbone has random weights (seed %d); a phi trained on it "
                           "learns nothing that transfers (smoke tests only)", self.model, seed)
        torch.manual_seed(seed)  # random backbone weights and phi's initialisation: the same run, the same model
        return Composer.from_clip(name, self.pretrained, phi=phi, device=device)


def stage1_backbone(model: Optional[str], pretrained: Optional[str], random_init: bool,
                    precision: str = "no", flag: str = "--backbone") -> Stage1Backbone:
    """Check `--backbone` / `--pretrained` / `--random-init` of train-stage1: one clear error listing the choices."""
    if not model:
        raise ValueError(f"{flag} is required: {STAGE1_MODEL_CHOICES}; or --random-init with an open_clip name "
                         "for random weights (smoke tests only)")
    name, _, preset = model.partition(":")
    if name == TINY_CLIP:
        preset = preset or "default"
        if preset not in PRESETS:
            raise ValueError(f"{flag} {model}: unknown tiny-CLIP preset {preset!r}; choose one of {sorted(PRESETS)}")
        if pretrained or random_init:
            raise ValueError(f"{flag} {model} is a trained model: it takes neither --pretrained nor --random-init")
        return Stage1Backbone(model, tiny_preset=preset,
                              settings={"tiny_clip": preset, "tiny_clip_precision": precision})
    if Path(model).is_dir():
        if pretrained or random_init:
            raise ValueError(f"{flag} {model} is a folder with its own weights: it takes neither --pretrained "
                             "nor --random-init")
        return Stage1Backbone(model, settings={"folder": folder_fingerprint(Path(model))})
    if model.startswith("hf-hub:"):  # open_clip fetches these with their weights
        if pretrained or random_init:
            raise ValueError(f"{flag} {model} brings its weights from the Hub: it takes neither --pretrained nor "
                             "--random-init")
        return Stage1Backbone(model, settings={"name": model, "weights": "hf-hub"})
    if os.sep in model or model.startswith("."):
        raise FileNotFoundError(f"{flag} {model}: folder not found ({STAGE1_MODEL_CHOICES})")
    import open_clip

    if model not in open_clip.list_models():  # before any data is read
        import difflib

        close = difflib.get_close_matches(model, open_clip.list_models(), n=3)
        raise ValueError(f"{flag} {model}: not an open_clip architecture" + (f" (did you mean {close}?)" if close
                         else " (open_clip.list_models() lists them)") + f"; other choices: {STAGE1_MODEL_CHOICES}")
    if random_init and pretrained:
        raise ValueError("--random-init and --pretrained exclude each other")
    if random_init:
        return Stage1Backbone(model, random_init=True, settings={"name": model, "weights": "random"})
    if not pretrained:
        raise ValueError(f"{flag} {model} names an open_clip architecture without weights: add --pretrained TAG "
                         "or FILE (e.g. openai; open_clip.list_pretrained() lists the tags), or --random-init for "
                         f"random weights seeded by --seed (smoke tests only). Other choices: {STAGE1_MODEL_CHOICES}")
    weights = f"sha256:{file_sha256(pretrained)}" if Path(pretrained).is_file() else pretrained
    return Stage1Backbone(model, pretrained, settings={"name": model, "weights": weights})


def _stage1_images(args: argparse.Namespace) -> Tuple[Any, Dict[str, Any], Any]:
    """The images of --images / --captions (folder, file list, caption file or data set), their "data" settings
    entry, and their captions (:class:`zscir.data.captions.ImageCaptions`, None without any)."""
    from ..data.captions import captions_from_column, read_caption_file, read_caption_file_images
    from ..data.images import PathSource
    from ..data.sources import DataSourceError, open_images

    columns = columns_of(args, CAPTION_COLUMNS)
    if args.image_column:
        columns.setdefault("image", args.image_column)
    captions = None
    if args.images is None:  # the caption file names the images
        _, paths, captions = read_caption_file_images(args.captions, args.image_root, columns)
        source: Any = paths
        data = {"images": len(paths), "sha256": data_fingerprint([os.path.abspath(p) for p in paths])}
    else:
        # --columns names the data set's columns when --images is one, else the caption file's
        dataset = is_dataset_source(args.images)
        if dataset and args.captions and "caption" in columns:
            raise DataSourceError("captions come from a data set column (--columns caption=...) or from "
                                  "--captions FILE, not both")
        if not dataset and "caption" in columns and not args.captions:
            raise DataSourceError(f"--columns caption={columns['caption']}: {args.images} is not a data set; give "
                                  "the captions of an image folder or file list with --captions FILE")
        images = open_images(args.images, split=args.split, columns=columns if dataset else
                             ({} if args.captions else columns), image_root=args.image_root,
                             extra_fields=() if args.captions else ("caption",))
        if isinstance(images.source, PathSource):  # the fingerprint runs recorded before data sets were sources
            source = images.source.paths
            data = {"images": len(source), "sha256": data_fingerprint([os.path.abspath(p) for p in source])}
        else:
            source = images.source
            data = {"images": len(source), "hf_fingerprint": images.source.fingerprint()}
        if args.captions:
            captions = read_caption_file(args.captions, images.ids, base=images.base, image_root=args.image_root,
                                         columns={} if dataset else {k: v for k, v in columns.items() if k != "id"})
        elif "caption" in images.extra:
            captions = captions_from_column(images.extra["caption"], images.label, images.ids)
    if captions is not None:
        data["captions"] = {"count": captions.report.captions,
                            "sha256": data_fingerprint([json.dumps(c) for c in captions.captions])}
    return source, data, captions


def _stage1_concepts(args: argparse.Namespace, captions: Any, world: Any) -> Tuple[Optional[List[str]], str]:
    """The concept phrases --concepts names (or the default for this data) and how they were chosen."""
    from ..data.captions import mine_concepts

    choice = args.concepts or ("world" if world is not None and captions is None else
                               CAPTION_CONCEPTS if captions is not None else "shipped")
    if choice == "mined":
        if captions is None:
            raise ValueError("--concepts mined needs captions (--captions, a caption column or --shapes-captions)")
        concepts = mine_concepts(captions.texts(), top_k=MINED_CONCEPTS)
        if not concepts:
            raise ValueError("--concepts mined: the captions hold no phrase seen 3 times or more; give a file")
        return concepts, f"mined ({len(concepts)} phrases)"
    if choice == "world":
        return world.concept_phrases(), "the shapes world's list"
    if choice == "shipped":
        return None, "zscir's shipped list"
    path = Path(choice)
    if not path.is_file():
        raise FileNotFoundError(f"--concepts {choice}: no such file (or give 'mined' or 'shipped')")
    concepts = [w.strip() for w in path.read_text().splitlines() if w.strip() and not w.startswith("#")]
    if not concepts:
        raise ValueError(f"--concepts {choice}: the file lists no phrase")
    return concepts, str(path)


def stage1_run(args: argparse.Namespace) -> int:
    """Entry point of ``zscir train-stage1``."""
    from ..data.features import FeatureCache
    from ..train.features import FeatureSource, caption_features, shapes_features
    from ..train.stage1 import needs_captions, train_stage1

    if args.images is None and args.shapes is None and args.captions is None:
        raise ValueError("train-stage1 needs images: --images SOURCE, --captions FILE (the images it names) "
                         "or --shapes N")
    if args.shapes is not None and args.captions:
        raise ValueError("--captions applies to --images; with --shapes, --shapes-captions K draws the world's own")
    if args.shapes_captions and args.shapes is None:
        raise ValueError("--shapes-captions applies to --shapes")
    check_report_to(args)
    backbone = stage1_backbone(args.backbone, args.pretrained, args.random_init,  # before any data is read
                               stage1_config_from_args(args).train.mixed_precision)
    world = captions = None
    if args.shapes is not None:
        from ..data.captions import captions_from_column
        from ..shapes import ShapesWorld, ShapesWorldConfig

        cfg = stage1_config_from_args(args, with_captions=args.shapes_captions > 0)
        world = ShapesWorld(ShapesWorldConfig(seed=cfg.train.seed))
        scenes = world.scenes(args.shapes, stream="stage1")
        source, data = None, {"shapes": args.shapes, "shapes_captions": args.shapes_captions}
        if args.shapes_captions:
            captions = captions_from_column(world.captions_of(scenes, args.shapes_captions), "shapes world")
    else:
        source, data, captions = _stage1_images(args)
        cfg = stage1_config_from_args(args, with_captions=captions is not None)
    if needs_captions(cfg) and captions is None:
        raise ValueError(f"--targets {cfg.targets} / --text-weight {cfg.text_weight} read captions, but these "
                         "images have none (--captions FILE, a caption column, or --shapes-captions K)")
    concepts, concept_source = _stage1_concepts(args, captions, world)
    settings = {"config": cfg.to_dict(), "model": backbone.settings, "data": data,
                "concepts": data_fingerprint(concepts) if concepts else None}
    run, resume = open_training_run(args, "train-stage1", settings,
                                    info={"backbone": args.backbone, "data": args.images or args.captions})
    if captions is not None:
        logger.info("captions: %s", captions.report.summary())
        for line in captions.report.problems():
            logger.warning("captions: %s", line)
    logger.info("concepts: %s", concept_source)
    composer = backbone.load(cfg.phi, resolve_device(args), cfg.train.mixed_precision, not args.no_progress,
                             cfg.train.seed)
    cfg = dataclasses.replace(cfg, phi=composer.phi.config)
    if world is not None:
        features = shapes_features(composer, scenes, composer.backbone.image_size, progress=not args.no_progress,
                                   precision=cfg.train.mixed_precision)
    else:
        cache_dir = args.feature_cache or args.out / "features"
        cache = FeatureCache.build(composer.backbone, source, cache_dir, patch_grid=composer.phi.config.patch_grid,
                                   progress=not args.no_progress, precision=cfg.train.mixed_precision)
        features = FeatureSource.from_cache(cache)
    text = None
    if captions is not None and needs_captions(cfg):
        text = caption_features(composer.backbone, captions.captions, progress=not args.no_progress,
                                report=captions.report)
        if captions.report.truncated:
            logger.warning("captions: %d caption(s) fill the text encoder's context (%d tokens) and were "
                           "truncated", captions.report.truncated, composer.backbone.context_length)
    with tracking(args, settings):
        train_stage1(composer, features, cfg, output_dir=args.out, concepts=concepts, resume=resume,
                     progress=not args.no_progress, captions=text)
    if run is not None:
        what = "captioned" if captions is not None else "unlabeled"
        summary = (f"{args.shapes} shapes-world images" + (" with captions" if captions is not None else "")
                   if args.shapes else f"{data['images']} {what} images from "
                   f"{_label(args.images, args.split) if args.images else args.captions}")
        _record_card(args.out / "model", "stage1", summary, _hub_datasets(args.images))
        run.finish()
    print(f"stage I model: {args.out / 'model'}")
    return 0


# ------------------------------------------------------------------------------------------- train-stage2

TRIPLET_COLUMNS = tuple(TRIPLET_FIELDS) + ("image",)  # image: the image column of a --corpus data set


def _add_triplet_arguments(parser: argparse.ArgumentParser) -> None:
    """`--triplets`, `--split`, `--columns`, `--image-root` and `--corpus` (train-stage2, train-bank)."""
    parser.add_argument("--triplets", required=True, metavar="SOURCE",
                        help=f"triplets: a .jsonl / .csv file (zscir.data.triplets) or a data set with triplet "
                             f"columns: {SOURCE_HELP}")
    add_data_arguments(parser, TRIPLET_COLUMNS, "--triplets (and --corpus)",
                       image_root_help="folder the triplet image paths are relative to (default: the file's folder)")


def _add_corpus_argument(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--corpus", default=None, metavar="SOURCE", help=f"{help}: an image folder, a file list or "
                        "a data set with an image column (--columns image=COLUMN)")


def _load_triplets(args: argparse.Namespace) -> Tuple[Any, Dict[str, Any]]:
    """The triplet set of `--triplets` and its "triplets" settings entry (a fingerprint of the rows)."""
    from ..data.triplets import load_triplets

    columns = {k: v for k, v in columns_of(args, TRIPLET_COLUMNS).items() if k != "image"}
    triplets = load_triplets(args.triplets, image_root=args.image_root, split=args.split, columns=columns)
    rows = [json.dumps(t.to_dict(), sort_keys=True) for t in triplets]
    return triplets, {"rows": len(rows), "sha256": data_fingerprint(rows)}


def _corpus(args: argparse.Namespace) -> Tuple[Any, Optional[Dict[str, Any]]]:
    """The images of `--corpus` and its "corpus" settings entry (a fingerprint of its image list); None without one."""
    if not args.corpus:
        return None, None
    from ..data.images import PathSource
    from ..data.sources import open_images

    image = columns_of(args, TRIPLET_COLUMNS).get("image")
    data = open_images(args.corpus, split=args.split if is_dataset_source(args.corpus) else None,
                       columns={"image": image} if image and is_dataset_source(args.corpus) else None)
    if isinstance(data.source, PathSource):  # the fingerprint runs recorded before data sets were sources
        paths = [os.path.abspath(p) for p in data.source.paths]
        return data, {"images": len(paths), "sha256": data_fingerprint(paths)}
    return data, {"images": len(data.ids), "hf_fingerprint": data.source.fingerprint()}


def _corpus_images(data: Any) -> Any:
    """What corpus_features reads: the paths of a folder or list, the source itself for a data set."""
    from ..data.images import PathSource

    return list(data.source.paths) if isinstance(data.source, PathSource) else data.source


def _open_triplet_run(args: argparse.Namespace, command: str, cfg: Any, model_dir: Path,
                      triplet_settings: Dict[str, Any], corpus_settings: Optional[Dict[str, Any]]) -> Tuple[Any, bool]:
    """The run in --out of a command trained on triplets (train-stage2, train-bank); and whether it resumes."""
    settings = {"config": cfg.to_dict(), "model": {"folder": folder_fingerprint(model_dir)},
                "triplets": triplet_settings, "corpus": corpus_settings}
    return open_training_run(args, command, settings,
                             info={"model": args.model, "triplets": args.triplets, "corpus": args.corpus})


def _triplet_summary(args: argparse.Namespace, triplets: Any) -> str:
    corpus = f"; negatives from {args.corpus}" if args.corpus else ""
    return f"{len(triplets)} triplets from {_label(args.triplets, args.split)}{corpus}"


def _encode_triplets(composer: Any, triplets: Any, args: argparse.Namespace, precision: str) -> Tuple[Any, Any]:
    """The triplets (texts fitted to the text tower) and their frozen features, encoded in `precision`."""
    from ..train.features import encode_triplets
    from ..train.stage2 import fit_to_context

    triplets = fit_to_context(composer, triplets)
    return triplets, encode_triplets(composer, triplets, progress=not args.no_progress, precision=precision)


def stage2_add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of ``zscir train-stage2``."""
    add_model_argument(parser, "Stage-I model: a folder (zscir train-stage1 OUT/model) or Hub repo id user/name")
    _add_triplet_arguments(parser)
    add_device_argument(parser, "feature encoding")
    add_out_argument(parser, "output folder (model in OUT/model)")
    parser.add_argument("--config", type=Path, default=None, help="Stage2Config JSON")
    parser.add_argument("--adapter", choices=["bottleneck", "lora", "full"], default=None)
    parser.add_argument("--adapter-layers", type=int, default=None)
    parser.add_argument("--adapter-rank", type=int, default=None)
    parser.add_argument("--components", default=None,
                        help="comma-separated Stage-II components, e.g. reference,query_negative (default: the "
                             "config's, text_augment)")
    _add_corpus_argument(parser, "images whose features serve as mined/bank negatives")
    add_cache_argument(parser, "--feature-cache", "feature cache of the --corpus images (default: OUT/features)")
    parser.add_argument("--train-phi", action=argparse.BooleanOptionalAction, default=None,
                        help="train phi with the adapters (default: the config's, on)")
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
        cfg = dataclasses.replace(cfg, components=tuple(c.strip() for c in args.components.split(",") if c.strip()))
    if args.train_phi is not None:
        cfg = dataclasses.replace(cfg, train_phi=args.train_phi)
    from ..train.components import STAGE2_COMPONENTS

    for name in cfg.components:  # unknown names fail here, before any triplet is encoded
        try:
            STAGE2_COMPONENTS.get(name)
        except KeyError as err:
            raise ValueError(f"--components: {err.args[0]}") from None
    return cfg


def stage2_run(args: argparse.Namespace) -> int:
    """Entry point of ``zscir train-stage2``."""
    from ..composer import Composer
    from ..train.features import Corpus, corpus_features
    from ..train.stage2 import train_stage2

    cfg = stage2_config_from_args(args)
    check_report_to(args)
    model_dir = resolve_model(args)
    triplets, triplet_settings = _load_triplets(args)
    corpus_data, corpus_settings = _corpus(args)
    run, resume = _open_triplet_run(args, "train-stage2", cfg, model_dir, triplet_settings, corpus_settings)
    composer = Composer.from_pretrained(model_dir, device=resolve_device(args))
    _, feats = _encode_triplets(composer, triplets, args, cfg.train.mixed_precision)
    corpus = None
    if corpus_data is not None:
        # cached on disk; corrupt corpus images are logged and skipped
        corpus = Corpus(*corpus_features(composer, _corpus_images(corpus_data), args.feature_cache or args.out / "features",
                                         progress=not args.no_progress, precision=cfg.train.mixed_precision))
    with tracking(args, {"config": cfg.to_dict()}):
        train_stage2(composer, feats, cfg, corpus=corpus, output_dir=args.out, resume=resume,
                     progress=not args.no_progress)
    if run is not None:
        _record_card(args.out / "model", "stage2", _triplet_summary(args, triplets),
                     _hub_datasets(args.triplets, args.corpus))
        run.finish()
    print(f"stage II model: {args.out / 'model'}")
    return 0


# --------------------------------------------------------------------------------------------- train-bank

def bank_add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of ``zscir train-bank``."""
    add_model_argument(parser, "Stage-II model: a folder (zscir train-stage2 OUT/model) or Hub repo id user/name")
    _add_triplet_arguments(parser)
    _add_corpus_argument(parser, "images added to the bank (gallery or training images)")
    add_cache_argument(parser, "--feature-cache", "feature cache of the --corpus images (default: OUT/features)")
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
    check_report_to(args)
    model_dir = resolve_model(args)
    triplets, triplet_settings = _load_triplets(args)
    corpus_data, corpus_settings = _corpus(args)
    composer = Composer.from_pretrained(model_dir, device=resolve_device(args))
    if composer.config.adapters is None:
        raise ValueError(f"{args.model}: not a Stage-II model (no adapters); run zscir train-stage2 first")
    run, resume = _open_triplet_run(args, "train-bank", cfg, model_dir, triplet_settings, corpus_settings)
    triplets, feats = _encode_triplets(composer, triplets, args, cfg.train.mixed_precision)
    parts: List[Tuple[torch.Tensor, List[str]]] = []
    if corpus_data is not None:
        parts.append(corpus_features(composer, _corpus_images(corpus_data), args.feature_cache or args.out / "features",
                                     progress=not args.no_progress, precision=cfg.train.mixed_precision))
    if cfg.include_triplet_images:
        parts.extend(triplet_bank_parts(feats, [bool(r.target) for r in triplets]))
    bank = build_bank(parts, cfg.dedup_threshold, progress=not args.no_progress)
    total = sum(len(p[0]) for p in parts)
    print(f"bank: {len(bank.ids)} images after deduplication ({total - len(bank.ids)} merged at cosine >= {cfg.dedup_threshold})")
    with tracking(args, {"config": cfg.to_dict()}):
        train_bank(composer, feats, bank, cfg, output_dir=args.out, resume=resume, progress=not args.no_progress)
    if run is not None:
        _record_card(args.out / "model", "bank", _triplet_summary(args, triplets),
                     _hub_datasets(args.triplets, args.corpus))
        run.finish()
    print(f"bank-stage model: {args.out / 'model'}")
    return 0
