"""The ``zscir`` command: one subcommand per job; each command group's flags live in one module of this package."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, NamedTuple, Optional

from .. import __version__


class Subcommand(NamedTuple):
    """Where a subcommand lives: module, and its add_arguments / run functions."""

    module: str
    help: str
    add_arguments: str = "add_arguments"
    run: str = "run"


SUBCOMMANDS = {
    "demo": Subcommand("zscir.cli.demo", "run the whole pipeline offline on the built-in shapes world"),
    "shapes": Subcommand("zscir.cli.shapes", "export shapes-world data: evaluation set, triplets or captions"),
    "pretrain-clip": Subcommand("zscir.cli.train", "pretrain the tiny CLIP (shapes world or image-caption JSONL)",
                                "pretrain_clip_add_arguments", "pretrain_clip_run"),
    "train-stage1": Subcommand("zscir.cli.train", "Stage I: train the phi-network on unlabeled images",
                               "stage1_add_arguments", "stage1_run"),
    "make-triplets": Subcommand("zscir.cli.triplets", "generate synthetic (reference, modification, target) triplets"),
    "train-stage2": Subcommand("zscir.cli.train", "Stage II: train composing adapters on synthetic triplets",
                               "stage2_add_arguments", "stage2_run"),
    "train-bank": Subcommand("zscir.cli.train", "SPN negatives: fine-tune the query side against a static image bank",
                             "bank_add_arguments", "bank_run"),
    "index": Subcommand("zscir.cli.index", "embed a folder of images into an on-disk gallery index",
                        "index_add_arguments", "index_run"),
    "search": Subcommand("zscir.cli.index", "search a gallery index with a reference image and a modification text",
                         "search_add_arguments", "search_run"),
    "eval": Subcommand("zscir.cli.eval", "zero-shot evaluation on FashionIQ, CIRR, CIRCO or a generic CIR set"),
    "serve": Subcommand("zscir.cli.serve", "serve a gallery: HTTP API and a search page (needs zscir[serve])"),
}


def available() -> dict:
    """Subcommands whose module exists in this installation."""
    import importlib.util

    return {name: sc for name, sc in SUBCOMMANDS.items() if importlib.util.find_spec(sc.module) is not None}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand's arguments."""
    parser = argparse.ArgumentParser(prog="zscir", description="zero-shot composed image retrieval (TSCIR)")
    parser.add_argument("--version", action="version", version=f"zscir {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, sc in available().items():
        module = importlib.import_module(sc.module)
        sub = subs.add_parser(name, help=sc.help, description=sc.help)
        getattr(module, sc.add_arguments)(sub)
        sub.set_defaults(_run=(sc.module, sc.run))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Parse arguments and run a subcommand; user errors print one line, not a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # third-party INFO chatter (open_clip logs on the root logger) only with --verbose
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("zscir").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    module, fn = args._run
    try:
        return int(getattr(importlib.import_module(module), fn)(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished steps are kept and the next run resumes from them", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, PermissionError, OSError, RuntimeError) as err:
        if args.verbose:
            raise
        print(f"zscir {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
