"""Flags shared by several commands, defined once, and how they become library arguments."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Optional

from ..train.engine import TrainConfig


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


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The optimisation flags every training command shares (override the JSON config)."""
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--save-every", type=int, default=None, help="steps between resumable checkpoints")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/state")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def train_config_from_args(train: TrainConfig, args: Any) -> TrainConfig:
    """`train` with the command-line overrides of :func:`add_train_arguments` applied."""
    for name in ("steps", "batch_size", "lr", "save_every", "mixed_precision", "seed"):
        value = getattr(args, name, None)
        if value is not None:
            train = dataclasses.replace(train, **{name: value})
    return train
