"""`zscir eval`: zero-shot evaluation of a model folder on FashionIQ, CIRR, CIRCO or a generic CIR set."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Dict, Optional

from ..checkpoint import CheckpointError
from ..data.benchmarks.fashioniq import CAPTION_ORDER_ALIASES, CAPTION_ORDERS, FASHIONIQ_CATEGORIES
from ..data.schema import AnnotationError
from ..eval.encode import CACHE_ENV, PathLike, RetrievalModel
from ..eval.evaluate import evaluate
from ..eval.protocols import BENCHMARKS, EvaluationError
from .common import (add_device_argument, add_model_argument, add_out_argument, add_precision_argument,
                     resolve_cli_precision)

# each benchmark's loader options, from its own flags
_DATASET_OPTIONS: Dict[str, Callable[[argparse.Namespace], Dict[str, Any]]] = {
    "fashioniq": lambda a: {"categories": tuple(a.fiq_categories), "caption_order": a.fiq_caption_order},
    "circo": lambda a: {"use_shared_concept": bool(a.circo_shared_concept)},
    "generic": lambda a: {"exclude_reference": not a.keep_reference},
}


def load_model(model_dir: PathLike, device: Optional[str] = None) -> RetrievalModel:
    """Load the model folder for ``zscir eval --model DIR`` (a :class:`zscir.composer.Composer`)."""
    from ..composer import Composer
    from ..models.backbone import default_device

    return Composer.from_pretrained(model_dir, device=device or default_device())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``zscir eval`` options to `parser`."""
    parser.add_argument("--dataset", required=True, choices=BENCHMARKS.names(), help="benchmark to evaluate on")
    parser.add_argument("--root", required=True, help="folder of the data set in its official layout")
    parser.add_argument("--split", default="val", choices=["val", "test"], help="split (CIRR test means test1)")
    add_model_argument(parser, help="model folder written by Composer.save_pretrained")
    parser.add_argument("--batch-size", type=int, default=64, help="images / queries per model call")
    add_device_argument(parser)
    add_precision_argument(parser, "encoding images and queries")
    parser.add_argument("--workers", type=int, default=0, help="image decoding processes (0: decode in the main process)")
    parser.add_argument("--save-rankings", metavar="FILE", help="write each query's top-50 gallery ids to FILE (JSON)")
    parser.add_argument("--submission", metavar="DIR", help="write the CIRR / CIRCO test-server JSON files into DIR")
    parser.add_argument("--submission-name", default="zscir", help="file-name prefix of the submission files")
    add_out_argument(parser, help="write the results as JSON to FILE", required=False, metavar="FILE")
    parser.add_argument("--allow-missing", action="store_true",
                        help="skip queries whose images are missing or unreadable (and report how many)")
    parser.add_argument("--cache-dir", help=f"gallery feature cache folder (default ${CACHE_ENV} or ~/.cache/zscir/gallery)")
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
    try:
        model = load_model(args.model, getattr(args, "device", None))
        evaluate(
            model,
            args.dataset,
            args.split,
            root=args.root,
            batch_size=args.batch_size,
            num_workers=args.workers,
            allow_missing=args.allow_missing,
            save_rankings=args.save_rankings,
            submission_dir=args.submission,
            submission_name=args.submission_name,
            out=args.out,
            cache_dir=args.cache_dir,
            use_cache=not args.no_cache,
            progress=not args.no_progress,
            dataset_options=_DATASET_OPTIONS.get(args.dataset, lambda a: {})(args),
            precision=precision,
        )
    except (AnnotationError, EvaluationError, CheckpointError) as err:
        print(f"zscir eval: error: {err}", file=sys.stderr)
        return 1
    return 0
