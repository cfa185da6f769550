"""`zscir make-triplets`: generate synthetic (reference, modification, target) triplets from flags."""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import load_tensors
from ..data.schema import PathLike
from ..data.triplet_gen import GENERATION_MODES, OUTPUT_NAME, TripletGenConfig, make_triplets
from ..data.triplet_gen.corpus import CAPTION_FIELDS
from .common import SOURCE_HELP, add_data_arguments, add_out_argument, columns_of


def _import_callable(spec: str, what: str) -> Callable[..., Any]:
    """Import ``module:attribute`` (e.g. ``mypkg.llm:edit``) and check that it is callable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} must be given as module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what}: cannot import module {module_name!r} ({err})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what}: {spec} is not callable")
    return obj


def _load_embeddings(path: PathLike) -> torch.Tensor:
    """The image embeddings in a safetensors file: its 'embeddings' tensor, or its only tensor."""
    tensors = load_tensors(path)
    if "embeddings" in tensors:
        return tensors["embeddings"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise ValueError(f"{path}: expected a tensor named 'embeddings' (found {sorted(tensors)})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``zscir make-triplets``."""
    add_out_argument(parser, "output folder (gets triplets.jsonl and make_triplets.json)")
    parser.add_argument("--captions", metavar="SOURCE",
                        help='image-caption corpus: JSONL with {"image": path, "caption": text} per line, or a data '
                             f"set with image-path and caption columns: {SOURCE_HELP}")
    add_data_arguments(parser, CAPTION_FIELDS, "--captions",
                       image_root_help="folder the corpus image paths are relative to (default: the captions "
                                       "file's folder)")
    parser.add_argument("--modes", default="", help=f"comma-separated modes out of {GENERATION_MODES.names()} "
                        "(default: every mode whose input is given)")
    parser.add_argument("--lexicon", help="word-class lexicon JSON (default: zscir/assets/lexicon.json)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same output)")
    parser.add_argument("--max", type=int, default=None, dest="max_triplets", help="keep at most N triplets (seeded random subset)")
    parser.add_argument("--edits-per-caption", type=int, default=1, help="caption-edit: edits per caption")
    parser.add_argument("--pairs-per-image", type=int, default=1, help="pair modes: targets per reference (caption-pair: per reference caption and lexicon word in it)")
    parser.add_argument("--window", type=int, nargs=2, default=(5, 50), metavar=("LO", "HI"),
                        help="similarity-pair: similarity ranks [LO, HI) to draw targets from (0 = nearest)")
    parser.add_argument("--embeddings", help="similarity-pair: safetensors file with an 'embeddings' tensor "
                        "[num_images, dim], rows in the order images first appear in --captions")
    parser.add_argument("--text-editor", help="llm-edit: module:function taking a caption, returning (modification, target caption) or None")
    parser.add_argument("--pair-describer", help="pair modes: module:function taking (reference caption, target caption), returning a modification or None")
    parser.add_argument("--negatives", type=int, default=3, metavar="K",
                        help="hard negatives per triplet (0: none): caption-edit, other words of the edited class in "
                        "the edited slot; caption-pair, images with a third word there; similarity-pair, images in the "
                        "target-relative band (--negative-band); shapes, the reference and K sibling edits; llm-edit: none")
    parser.add_argument("--negative-band", type=float, nargs=2, default=(-0.05, 0.05), metavar=("LO", "HI"),
                        help="similarity-pair negatives: images c with LO <= s(r, c) - s(r, t) <= HI (cosine; "
                        "never the reference, the target or a near duplicate of it)")
    parser.add_argument("--shapes", type=int, default=0, metavar="N", help="add N shapes-world triplets (training phrasing)")
    parser.add_argument("--long-tail", action="store_true", help="shapes: draw edit kinds with LONG_TAIL_WEIGHTS")
    parser.add_argument("--shapes-image-size", type=int, default=64, help="shapes: image side in pixels")
    parser.add_argument("--no-check-images", action="store_true", help="do not check that corpus image files exist")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    """Generate a triplet set from the parsed command-line arguments and print counts."""
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    for mode in modes:  # unknown names fail before the corpus is read
        GENERATION_MODES.get(mode)
    config = TripletGenConfig(
        captions=args.captions,
        image_root=args.image_root,
        lexicon=args.lexicon,
        modes=modes,
        seed=args.seed,
        max_triplets=args.max_triplets,
        edits_per_caption=args.edits_per_caption,
        pairs_per_image=args.pairs_per_image,
        window_lo=args.window[0],
        window_hi=args.window[1],
        shapes=args.shapes,
        long_tail=args.long_tail,
        shapes_image_size=args.shapes_image_size,
        check_images=not args.no_check_images,
        negatives=args.negatives,
        negative_lo=args.negative_band[0],
        negative_hi=args.negative_band[1],
        split=args.split,
        columns=columns_of(args, CAPTION_FIELDS),
    )
    embeddings = _load_embeddings(args.embeddings) if args.embeddings else None
    editor = _import_callable(args.text_editor, "--text-editor") if args.text_editor else None
    describer = _import_callable(args.pair_describer, "--pair-describer") if args.pair_describer else None
    result = make_triplets(config, args.out, embeddings, editor, describer, progress=not args.no_progress)
    print(result.summary())
    print(f"wrote {Path(args.out) / OUTPUT_NAME}")
    return 0
