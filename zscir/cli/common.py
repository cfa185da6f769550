"""Flags shared by several commands, defined once, and how they become library arguments.

One name per concept on every command: ``--model`` is a zscir model folder or Hub repo id (``--revision``),
``--backbone`` / ``--pretrained`` an open_clip CLIP, ``--out`` always a folder, ``--num-workers`` decoding
processes, ``--image-root`` the folder relative image paths start from, ``--split`` / ``--columns`` pick a
split and map columns of a data set, and each cache has its own name (``--feature-cache``,
``--gallery-cache``, ``--clip-cache``). Earlier spellings stay accepted, hidden (zscir.cli.flags).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from ..precision import PRECISIONS, accelerate_precision, resolve_precision
from ..runs import RunFolder
from ..train.engine import REPORT_TO, TrainConfig
from .flags import add_old_spelling

PRECISION_FLAG = "--mixed-precision"
#: What a training command writes in --out: replaced by --overwrite ...
TRAIN_OUTPUTS = ("state", "model", "logs")
#: ... and what it writes there but keeps (keyed caches a new run reuses when they match).
TRAIN_KEPT = ("features",)
#: Settings a continued run may change (the engine allows them too): more steps, other checkpoint/log spacing.
RESUME_FREE = ("config.train.steps", "config.train.save_every", "config.train.log_every")
MODEL_HELP = "zscir model folder (Composer.save_pretrained) or Hugging Face Hub repo id user/name"
SOURCE_HELP = ("a folder, a file, a save_to_disk folder, a .parquet file or a Hub data set id user/name "
               "(--split, --columns)")


def add_model_argument(parser: argparse.ArgumentParser, help: str = MODEL_HELP, required: bool = True,
                       default: Optional[str] = None) -> None:
    """`--model` (a model folder or Hub repo id) and `--revision` (the repo's branch, tag or commit)."""
    parser.add_argument("--model", required=required and default is None, default=default, help=help)
    parser.add_argument("--revision", default=None,
                        help="branch, tag or commit of a Hub --model (the HF cache, HF_HUB_OFFLINE and HF_TOKEN apply)")


def resolve_model(args: argparse.Namespace, flag: str = "--model") -> Path:
    """The local folder of `--model`: the folder itself, or the Hub repo in the HF cache (downloaded if needed)."""
    from ..hub import resolve_model_folder

    return resolve_model_folder(args.model, revision=getattr(args, "revision", None), what=flag)


def load_composer(args: argparse.Namespace) -> Any:
    """The Composer of `--model` / `--revision` on the command's device (a Hub repo id resolved by from_pretrained)."""
    from ..composer import Composer

    revision = getattr(args, "revision", None)
    return Composer.from_pretrained(args.model, device=resolve_device(args), **({"revision": revision} if revision else {}))


def add_device_argument(parser: argparse.ArgumentParser, what: str = "") -> None:
    """`--device`: cuda or cpu, default cuda when available."""
    suffix = f" for {what}" if what else ""
    parser.add_argument("--device", default=None, help=f"cuda or cpu{suffix} (default: cuda when available)")


def add_out_argument(parser: argparse.ArgumentParser, help: str, required: bool = True,
                     default: Optional[Path] = None, metavar: str = "DIR") -> None:
    """`--out DIR`: the folder a command writes into."""
    parser.add_argument("--out", type=Path, required=required and default is None, default=default,
                        metavar=metavar, help=help)


def add_workers_argument(parser: argparse.ArgumentParser) -> None:
    """`--num-workers` (old spelling `--workers`): image decoding processes."""
    parser.add_argument("--num-workers", type=int, default=0,
                        help="image decoding processes (0: decode in the main process)")
    add_old_spelling(parser, "--workers", "--num-workers")


def add_cache_argument(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """One named cache folder flag (`--feature-cache`, `--gallery-cache`, `--clip-cache`); `--cache-dir` is its old name."""
    parser.add_argument(flag, type=Path, default=None, metavar="DIR", help=help)
    add_old_spelling(parser, "--cache-dir", flag)


def add_data_arguments(parser: argparse.ArgumentParser, fields: Sequence[str], what: str,
                       image_root_help: Optional[str] = None, split_help: Optional[str] = None,
                       split_default: Optional[str] = None) -> None:
    """`--split`, `--columns` (and `--image-root`) of a data source."""
    parser.add_argument("--split", default=split_default,
                        help=split_help or f"split of a data set {what} (default: train, or its only split)")
    parser.add_argument("--columns", default=None, metavar="FIELD=COLUMN,...",
                        help=f"data set columns to read as zscir's fields ({', '.join(fields)}), e.g. "
                             f"{fields[0]}=my_column; other columns are then ignored")
    if image_root_help is not None:
        parser.add_argument("--image-root", default=None, help=image_root_help)


def columns_of(args: argparse.Namespace, fields: Sequence[str]) -> Dict[str, str]:
    """`--columns` as {field: column}, checked against the fields this command reads."""
    from ..data.sources import parse_columns

    return parse_columns(getattr(args, "columns", None), fields)


def resolve_device(args: argparse.Namespace) -> str:
    """The device a command runs on: `--device`, else cuda when available."""
    from ..models.backbone import default_device

    return getattr(args, "device", None) or default_device()


def add_precision_argument(parser: argparse.ArgumentParser, what: str = "encoding") -> None:
    """`--mixed-precision` of an encoding command: auto (bf16 on a GPU that supports it, float32 on the CPU)."""
    parser.add_argument(PRECISION_FLAG, choices=PRECISIONS, default="auto",
                        help=f"numeric precision for {what}: auto (default) is bf16 on a GPU that supports it and "
                             "float32 (no) on the CPU; the CPU also runs bf16, fp16 needs a GPU")


def add_train_precision_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """`--mixed-precision` of a training command: unset, Accelerate's setting decides."""
    parser.add_argument(PRECISION_FLAG, choices=PRECISIONS, default=None,
                        help=f"numeric precision for {what} (default: the --config file's, else what `accelerate "
                             "launch --mixed_precision` or `accelerate config` set, else float32); auto is bf16 on "
                             "a GPU that supports it; the CPU runs no and bf16 (autocast), fp16 needs a GPU")


def resolve_cli_precision(args: argparse.Namespace, configured: Optional[str] = None) -> str:
    """The precision a command runs in ("no", "fp16" or "bf16") on its device.

    `--mixed-precision` wins; a training command without it takes `configured` (its --config file's), then
    Accelerate's setting, then float32.
    """
    from ..precision import ACCELERATE_ENV, accelerate_config_file

    given = getattr(args, "mixed_precision", None)
    requested, source = given, PRECISION_FLAG
    if not requested and configured:
        requested, source = configured, "train.mixed_precision of --config"
    if not requested:
        requested = accelerate_precision()
        source = f"Accelerate's mixed precision ({ACCELERATE_ENV})" if os.environ.get(ACCELERATE_ENV) else \
            f"Accelerate's mixed_precision in {accelerate_config_file()}"
    try:
        return resolve_precision(requested or "no", resolve_device(args), source)
    except ValueError as err:
        if source == PRECISION_FLAG:
            raise
        raise type(err)(f"{err}; pass --mixed-precision to override it") from None


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The optimisation flags every training command shares (override the JSON config)."""
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--save-every", type=int, default=None, help="steps between resumable checkpoints")
    add_train_precision_argument(parser, "training and feature encoding (overrides train.mixed_precision of --config)")
    parser.add_argument("--seed", type=int, default=None)
    add_report_argument(parser)
    add_again_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_report_argument(parser: argparse.ArgumentParser) -> None:
    """`--report-to`: Accelerate experiment trackers for the training curves (OUT/logs)."""
    parser.add_argument("--report-to", default="none", metavar="|".join(REPORT_TO),
                        help="also send the logged loss, learning rate and gradient norm to these trackers "
                             "(comma-separated; files in OUT/logs; wandb follows its own WANDB_MODE / login)")


def add_again_arguments(parser: argparse.ArgumentParser) -> None:
    """`--resume` / `--overwrite` for an output folder that already holds a run."""
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in OUT from its last checkpoint (OUT/state); the settings recorded in "
                            "OUT/run.json (config, data, model) must match, except --steps, --save-every; with "
                            "nothing to resume it says so and starts")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run in OUT: removes only what zscir wrote there (run.json, state/, model/, "
                            "logs/; the keyed feature cache OUT/features is kept) and refuses a folder holding "
                            "other files")


def train_config_from_args(train: TrainConfig, args: Any) -> TrainConfig:
    """`train` with the command-line overrides of :func:`add_train_arguments` applied (the precision resolved)."""
    for name in ("steps", "batch_size", "lr", "save_every", "seed"):
        value = getattr(args, name, None)
        if value is not None:
            train = dataclasses.replace(train, **{name: value})
    return dataclasses.replace(train, mixed_precision=resolve_cli_precision(args, train.mixed_precision))


def check_report_to(args: argparse.Namespace) -> Tuple[str, ...]:
    """The trackers of `--report-to`, checked installed (before any expensive work)."""
    from ..train.engine import check_trackers

    return check_trackers(getattr(args, "report_to", None))


def tracking(args: argparse.Namespace, settings: Dict[str, Any]) -> Any:
    """The block in which training reports to `--report-to`'s trackers, writing under OUT/logs."""
    from ..train.engine import experiment_tracking

    return experiment_tracking(getattr(args, "report_to", None), Path(args.out) / "logs", config=settings)


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
