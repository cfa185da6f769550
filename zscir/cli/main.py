"""The ``zscir`` command: one subcommand per job; each command group's flags live in one module of this package.

Subcommand modules are imported only when their command runs (or its help is shown), so ``zscir --help``
lists the commands without loading torch.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Iterable, List, NamedTuple, Optional, Sequence

from .. import __version__
from .flags import HelpFormatter, old_spellings_used


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


#: Exceptions that are a user's mistake or the environment's: one line, not a traceback (--verbose shows it).
USER_ERRORS = (ValueError, KeyError, OSError, RuntimeError, ImportError)


def available() -> dict:
    """Subcommands whose module exists in this installation."""
    import importlib.util

    return {name: sc for name, sc in SUBCOMMANDS.items() if importlib.util.find_spec(sc.module) is not None}


def _command_of(argv: Sequence[str]) -> Optional[str]:
    """The subcommand an argument list names (the first word that is not a top-level option), if any."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in SUBCOMMANDS else None
    return None


def build_parser(commands: Optional[Iterable[str]] = None) -> argparse.ArgumentParser:
    """The top-level parser; the arguments of `commands` (default: every subcommand) are added, the rest only listed."""
    parser = argparse.ArgumentParser(prog="zscir", description="zero-shot composed image retrieval (TSCIR)",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"zscir {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None if commands is None else set(commands)
    for name, sc in available().items():
        sub = subs.add_parser(name, help=sc.help, description=sc.help, formatter_class=HelpFormatter)
        if wanted is None or name in wanted:
            getattr(importlib.import_module(sc.module), sc.add_arguments)(sub)
        sub.set_defaults(_run=(sc.module, sc.run))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Parse arguments and run a subcommand; user errors print one line, not a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    parser = build_parser([command] if command else [])
    args = parser.parse_args(argv)
    # third-party INFO chatter (open_clip logs on the root logger) only with --verbose
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("zscir").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    for old, new in old_spellings_used(args):
        print(f"zscir {args.command}: note: {old} is now spelled {new} (the old spelling still works)",
              file=sys.stderr)
    module, fn = args._run
    try:
        return int(getattr(importlib.import_module(module), fn)(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished steps are kept and the next run resumes from them", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if args.verbose:
            raise
        print(f"zscir {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    """The error's message (a KeyError's without the quotes repr adds)."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]
    return str(err)


if __name__ == "__main__":
    sys.exit(main())
