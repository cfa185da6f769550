"""`zscir demo`: flags of the offline end-to-end demo."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..demo import PRESETS, disk_error, run_demo
from .common import add_cache_argument, add_out_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of ``zscir demo``."""
    add_out_argument(parser, "output folder (default: ./zscir-demo)", default=Path("zscir-demo"))
    parser.add_argument("--fast", action="store_true", help="a smaller, quicker run")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace another demo run's folder: removes only what the demo wrote there "
                             "(listed in its demo_run.json) and refuses a folder holding other files")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of Stage I, the triplets and Stage II (the tiny CLIP and the test queries stay fixed)")
    add_cache_argument(parser, "--clip-cache", "where the tiny CLIP is cached (default: $ZSCIR_CACHE_DIR or "
                       "~/.cache/zscir)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``zscir demo``."""
    cfg = dataclasses.replace(PRESETS["fast" if args.fast else "default"], seed=args.seed)
    try:
        run_demo(args.out, cfg, overwrite=args.overwrite, progress=not args.no_progress, cache_dir=args.clip_cache)
    except OSError as err:
        if isinstance(err, FileExistsError):
            raise
        raise disk_error(err, args.out) from None
    return 0
