"""Flags shared by several commands, defined once, and how they become library arguments."""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..precision import PRECISIONS, resolve_precision
from ..runs import RunFolder
from ..train.engine import TrainConfig

PRECISION_FLAG = "--mixed-precision"
#: What a training command writes in --out: replaced by --overwrite ...
TRAIN_OUTPUTS = ("state", "model")
#: ... and what it writes there but keeps (keyed caches a new run reuses when they match).
TRAIN_KEPT = ("features",)
#: Settings a continued run may change (the engine allows them too): more steps, other checkpoint/log spacing.
RESUME_FREE = ("config.train.steps", "config.train.save_every", "config.train.log_every")


def add_model_argument(parser: argparse.ArgumentParser, help: str, required: bool = True,
                       default: Optional[str] = None) -> None:
    """`--model`: a model folder or open_clip model name."""
    parser.add_argument("--model", required=required and default is None, default=default, help=help)


def add_device_argument(parser: argparse.ArgumentParser, what: str = "") -> None:
    """`--device`: cuda or cpu, default cuda when available."""
    suffix = f" for {what}" if what else ""
    parser.add_argument("--device", default=None, help=f"cuda or cpu{suffix} (default: cuda when available)")


def add_out_argument(parser: argparse.ArgumentParser, help: str, required: bool = True,
                     default: Optional[Path] = None, metavar: Optional[str] = None) -> None:
    """`--out`: where a command writes its result."""
    parser.add_argument("--out", type=Path, required=required and default is None, default=default,
                        metavar=metavar, help=help)


def resolve_device(args: argparse.Namespace) -> str:
    """The device a command runs on: `--device`, else cuda when available."""
    from ..models.backbone import default_device

    return getattr(args, "device", None) or default_device()


def add_precision_argument(parser: argparse.ArgumentParser, what: str = "encoding") -> None:
    """`--mixed-precision`: no, fp16, bf16 or auto (bf16 on a GPU that supports it, float32 on the CPU)."""
    parser.add_argument(PRECISION_FLAG, choices=PRECISIONS, default="auto",
                        help=f"numeric precision for {what}: auto (default) is bf16 on a GPU that supports it and "
                             "float32 (no) on the CPU; the CPU also runs bf16, fp16 needs a GPU")


def resolve_cli_precision(args: argparse.Namespace) -> str:
    """The precision a command runs in ("no", "fp16" or "bf16"): `--mixed-precision` resolved on its device."""
    return resolve_precision(getattr(args, "mixed_precision", None) or "auto", resolve_device(args), PRECISION_FLAG)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The optimisation flags every training command shares (override the JSON config)."""
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--save-every", type=int, default=None, help="steps between resumable checkpoints")
    add_precision_argument(parser, "training and feature encoding (overrides train.mixed_precision of --config)")
    parser.add_argument("--seed", type=int, default=None)
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in OUT from its last checkpoint (OUT/state); the settings recorded in "
                            "OUT/run.json (config, data, model) must match, except --steps, --save-every; with "
                            "nothing to resume it says so and starts")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run in OUT: removes only what zscir wrote there (run.json, state/, model/; "
                            "the keyed feature cache OUT/features is kept) and refuses a folder holding other files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def train_config_from_args(train: TrainConfig, args: Any) -> TrainConfig:
    """`train` with the command-line overrides of :func:`add_train_arguments` applied (the precision resolved)."""
    for name in ("steps", "batch_size", "lr", "save_every", "seed"):
        value = getattr(args, name, None)
        if value is not None:
            train = dataclasses.replace(train, **{name: value})
    return dataclasses.replace(train, mixed_precision=resolve_cli_precision(args))


def open_training_run(args: argparse.Namespace, command: str, settings: Dict[str, Any],
                      info: Optional[Dict[str, Any]] = None) -> Tuple[Optional[RunFolder], bool]:
    """Check and record the run in `--out` (see zscir.runs); return it (None on other processes) and whether to resume.

    An existing run is refused without --resume or --overwrite. Only the main process touches the folder;
    the others resume when asked (the engine finds the same state).
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return None, bool(args.resume)
    run = RunFolder(args.out, command, settings, TRAIN_OUTPUTS, kept=TRAIN_KEPT, free=RESUME_FREE, info=info or {})
    return run, run.open(resume=args.resume, overwrite=args.overwrite)
