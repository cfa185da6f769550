"""`zscir eval`: zero-shot evaluation of a model folder on FashionIQ, CIRR, CIRCO or a generic CIR set."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from ..checkpoint import CheckpointError
from ..data.benchmarks.fashioniq import CAPTION_ORDER_ALIASES, CAPTION_ORDERS, FASHIONIQ_CATEGORIES
from ..data.benchmarks.generic import GENERIC_FIELDS
from ..data.schema import AnnotationError
from ..data.sources import parse_columns
from ..eval.encode import CACHE_ENV, PathLike, RetrievalModel
from ..eval.evaluate import evaluate
from ..eval.protocols import BENCHMARKS, EvaluationError, load_benchmark
from .common import (SOURCE_HELP, add_cache_argument, add_data_arguments, add_device_argument, add_model_argument,
                     add_out_argument, add_precision_argument, add_workers_argument, resolve_cli_precision)

RESULTS_NAME = "results.json"
#: The splits of the official benchmarks (a generic data set may name any split it has).
OFFICIAL_SPLITS = ("val", "test")

# each benchmark's loader options, from its own flags
_DATASET_OPTIONS: Dict[str, Callable[[argparse.Namespace], Dict[str, Any]]] = {
    "fashioniq": lambda a: {"categories": tuple(a.fiq_categories), "caption_order": a.fiq_caption_order},
    "circo": lambda a: {"use_shared_concept": bool(a.circo_shared_concept)},
    "generic": lambda a: {"exclude_reference": not a.keep_reference,
                          "columns": parse_columns(a.columns, GENERIC_FIELDS), "image_root": a.image_root},
}


def load_model(model_dir: PathLike, device: Optional[str] = None, revision: Optional[str] = None) -> RetrievalModel:
    """Load the model of ``zscir eval --model`` (a folder or Hub repo id; a :class:`zscir.composer.Composer`)."""
    from ..composer import Composer
    from ..models.backbone import default_device

    return Composer.from_pretrained(model_dir, device=device or default_device(), revision=revision)


def results_file(out: Optional[Path]) -> Optional[Path]:
    """Where `--out` puts the results: OUT/results.json (a path ending in .json: that file, the old meaning)."""
    if out is None:
        return None
    return out if out.suffix.lower() == ".json" else out / RESULTS_NAME


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``zscir eval`` options to `parser`."""
    parser.add_argument("--dataset", required=True, choices=BENCHMARKS.names(), help="benchmark to evaluate on")
    parser.add_argument("--root", required=True, metavar="SOURCE",
                        help="folder of the data set in its official layout; generic: a folder with queries.jsonl, "
                             f"or a data set of queries ({', '.join(GENERIC_FIELDS)}): {SOURCE_HELP}")
    add_data_arguments(parser, GENERIC_FIELDS, "of generic queries",
                       image_root_help="generic data set: folder its image paths are relative to (default: the "
                                       "data set's folder)",
                       split_help="split: val or test for FashionIQ, CIRR (test means test1) and CIRCO; generic: "
                                  "the queries' subfolder, or a split of a generic data set", split_default="val")
    add_model_argument(parser)
    parser.add_argument("--batch-size", type=int, default=64, help="images / queries per model call")
    add_device_argument(parser)
    add_precision_argument(parser, "encoding images and queries")
    add_workers_argument(parser)
    parser.add_argument("--save-rankings", metavar="FILE", help="write each query's top-50 gallery ids to FILE (JSON)")
    parser.add_argument("--submission", metavar="DIR", help="write the CIRR / CIRCO test-server JSON files into DIR")
    parser.add_argument("--submission-name", default="zscir", help="file-name prefix of the submission files")
    add_out_argument(parser, help=f"folder for the results (OUT/{RESULTS_NAME}, what save_pretrained(results=...) "
                     "takes)", required=False)
    parser.add_argument("--allow-missing", action="store_true",
                        help="skip queries whose images are missing or unreadable (and report how many)")
    add_cache_argument(parser, "--gallery-cache",
                       f"gallery feature cache folder (default ${CACHE_ENV} or ~/.cache/zscir/gallery)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the gallery feature cache")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--fiq-categories", nargs="+", choices=list(FASHIONIQ_CATEGORIES),
                        default=list(FASHIONIQ_CATEGORIES), help="FashionIQ categories to evaluate")
    parser.add_argument("--fiq-caption-order", choices=list(CAPTION_ORDERS) + list(CAPTION_ORDER_ALIASES),
                        default="both",
                        help="FashionIQ query text from captions c1, c2: 'both' = 'c1 and c2' and 'c2 and c1', captions "
                             "stripped of '.?, ', features averaged (SEARLE/LinCIR); 'c1-and-c2' = the one text "
                             "'c1 and c2', stripped (FashionIQ start kit, CLIP4Cir; old name 'single'); 'pic2word' = "
                             "'c2 and c1' with the captions unstripped (Pic2Word's evaluation)")
    parser.add_argument("--circo-shared-concept", action="store_true",
                        help="CIRCO: prepend the shared concept to the relative caption")
    parser.add_argument("--keep-reference", action="store_true",
                        help="generic: keep each query's reference image in its ranking")


def run(args: argparse.Namespace) -> int:
    """Run ``zscir eval``: load the model, evaluate, print the table; exit code 1 on data errors."""
    precision = resolve_cli_precision(args)  # before loading: a bad flag costs no model load
    if args.dataset != "generic" and args.split not in OFFICIAL_SPLITS:
        raise ValueError(f"--split {args.split}: {args.dataset} has the splits {', '.join(OFFICIAL_SPLITS)}")
    if args.dataset != "generic" and (args.columns or args.image_root):
        raise ValueError(f"--columns and --image-root apply to --dataset generic; {args.dataset} is read in its "
                         "official layout")
    options = _DATASET_OPTIONS.get(args.dataset, lambda a: {})(args)
    try:
        # the annotations first: a bad split, column or file costs no model load
        data = load_benchmark(args.dataset, args.root, args.split, **options)
        model = load_model(args.model, getattr(args, "device", None), **({"revision": args.revision}
                                                                          if args.revision else {}))
        evaluate(
            model,
            data,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            allow_missing=args.allow_missing,
            save_rankings=args.save_rankings,
            submission_dir=args.submission,
            submission_name=args.submission_name,
            out=results_file(args.out),
            cache_dir=args.gallery_cache,
            use_cache=not args.no_cache,
            progress=not args.no_progress,
            precision=precision,
        )
    except (AnnotationError, EvaluationError, CheckpointError) as err:
        print(f"zscir eval: error: {err}", file=sys.stderr)
        return 1
    return 0
