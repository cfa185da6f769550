"""`zscir shapes`: export shapes-world data (evaluation set, triplets or captions) to a folder."""
from __future__ import annotations

import argparse

from ..shapes import FAMILIES, LONG_TAIL_WEIGHTS, ShapesWorld, ShapesWorldConfig
from .common import add_out_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the `shapes` export command."""
    parser.add_argument("what", choices=("eval", "triplets", "captions"), help="what to export")
    add_out_argument(parser, "output folder")
    parser.add_argument("--n", type=int, default=1000, help="number of queries / triplets / captions")
    parser.add_argument("--seed", type=int, default=0, help="world seed")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--min-objects", type=int, default=1)
    parser.add_argument("--max-objects", type=int, default=4)
    parser.add_argument("--family", choices=FAMILIES, default=None, help="phrasing family (default: eval for eval sets, train for triplets)")
    parser.add_argument("--n-random", type=int, default=None, help="random gallery distractors (eval; default n // 4)")
    parser.add_argument("--siblings", type=int, default=3, help="sibling hard negatives per query (eval)")
    parser.add_argument("--long-tail", action="store_true", help="draw kinds with LONG_TAIL_WEIGHTS")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    """Export a shapes-world eval set, triplet set or caption set to a folder."""
    world = ShapesWorld(
        ShapesWorldConfig(seed=args.seed, image_size=args.image_size, min_objects=args.min_objects, max_objects=args.max_objects)
    )
    progress = not args.no_progress
    weights = LONG_TAIL_WEIGHTS if args.long_tail else None
    if args.what == "eval":
        eval_set = world.make_eval_set(
            args.n, n_random=args.n_random, siblings_per_query=args.siblings, family=args.family or "eval", kind_weights=weights, progress=progress
        )
        folder = world.export_generic(eval_set, args.out, progress=progress)
        print(f"wrote {len(eval_set.queries)} queries and a {len(eval_set.gallery)}-image gallery to {folder}")
    elif args.what == "triplets":
        edits = world.make_triplets(args.n, family=args.family or "train", kind_weights=weights, progress=progress)
        folder = world.export_triplets(edits, args.out, progress=progress)
        print(f"wrote {len(edits)} triplets to {folder}")
    else:
        pairs = world.captioned_scenes(args.n)
        folder = world.export_captions(pairs, args.out, progress=progress)
        print(f"wrote {len(pairs)} captions to {folder}")
    return 0
