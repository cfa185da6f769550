"""Mixed precision: what each device supports, what ``auto`` means, and the autocast block that applies it.

A precision is ``"no"`` (float32), ``"fp16"``, ``"bf16"`` or ``"auto"``:
bf16 on a GPU that supports it, float32 everywhere else. Training passes the
resolved value to Accelerate; encoding (evaluation, indexing, feature caches)
runs the model under :func:`autocast` and keeps the embeddings in float32 after
normalisation. ``"no"`` is a no-op block, so float32 numerics are unchanged.

Training that names no precision uses Accelerate's (:func:`accelerate_precision`):
what ``accelerate launch --mixed_precision`` passes on, else the ``mixed_precision``
of ``accelerate config``'s default file, else float32.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, ContextManager, Dict, Optional, Tuple, Union

import torch

Device = Union[str, torch.device, None]

PRECISIONS = ("auto", "no", "fp16", "bf16")
DTYPES: Dict[str, torch.dtype] = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class PrecisionError(ValueError):
    """A precision that is unknown or not supported on the device it was asked for."""


def _cuda_precisions() -> Tuple[str, ...]:
    # torch.cuda.is_bf16_supported() is False on GPUs before Ampere (e.g. V100, T4)
    return ("no", "fp16", "bf16") if torch.cuda.is_bf16_supported() else ("no", "fp16")


# device type -> the precisions its autocast runs (CPU autocast has bf16 but no fp16 kernels worth using)
_SUPPORTED: Dict[str, Callable[[], Tuple[str, ...]]] = {
    "cpu": lambda: ("no", "bf16"),
    "cuda": _cuda_precisions,
}
# device type -> what `auto` picks when the device supports it; float32 otherwise
_AUTO: Dict[str, str] = {"cuda": "bf16"}


def device_type(device: Device) -> str:
    """The device type of `device` ("cuda:1" -> "cuda"); None is the CPU."""
    if device is None:
        return "cpu"
    return torch.device(device).type


def describe_device(device: Device) -> str:
    """The device as a person reads it in an error (the GPU's name included)."""
    kind = device_type(device)
    if kind == "cuda" and torch.cuda.is_available():
        index = torch.device(device).index
        return f"{device} ({torch.cuda.get_device_name(index if index is not None else torch.cuda.current_device())})"
    return str(device or "cpu")


def supported_precisions(device: Device) -> Tuple[str, ...]:
    """The precisions `device` supports ("no" only on device types without autocast support here)."""
    return _SUPPORTED.get(device_type(device), lambda: ("no",))()


def resolve_precision(requested: str, device: Device, name: str = "precision") -> str:
    """"no", "fp16" or "bf16" for `requested` on `device` ("auto": bf16 on a GPU with bf16, else "no").

    An unknown or unsupported precision raises :class:`PrecisionError` naming
    `name` (the flag or field it came from) and the device.
    """
    if requested not in PRECISIONS:
        raise PrecisionError(f"{name} {requested!r} is not a precision; choose one of {', '.join(PRECISIONS)}")
    supported = supported_precisions(device)
    if requested == "auto":
        chosen = _AUTO.get(device_type(device), "no")
        return chosen if chosen in supported else "no"
    if requested not in supported:
        raise PrecisionError(f"{name} {requested} is not supported on device {describe_device(device)}; "
                             f"it supports {', '.join(supported)} (or auto)")
    return requested


ACCELERATE_ENV = "ACCELERATE_MIXED_PRECISION"  # what `accelerate launch` sets from its flags and config file


def accelerate_config_file() -> Path:
    """Where ``accelerate config`` writes its default settings ($HF_HOME/accelerate/default_config.yaml)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "accelerate" / "default_config.yaml"


def accelerate_precision() -> Optional[str]:
    """The mixed precision Accelerate is configured with (``accelerate launch``, else ``accelerate config``), if any."""
    value = os.environ.get(ACCELERATE_ENV)
    if not value:
        path = accelerate_config_file()
        if not path.is_file():
            return None
        try:
            if path.suffix == ".json":
                data = json.loads(path.read_text())
            else:
                import yaml

                data = yaml.safe_load(path.read_text())
        except Exception as err:  # a broken file is Accelerate's to report; name it here too
            raise PrecisionError(f"{path}: unreadable Accelerate config ({err}); fix it (accelerate config) or "
                                 "pass --mixed-precision") from None
        value = data.get("mixed_precision") if isinstance(data, dict) else None
    if value is None:
        return None
    value = str(value).lower()
    if value not in PRECISIONS:
        source = ACCELERATE_ENV if os.environ.get(ACCELERATE_ENV) else str(accelerate_config_file())
        raise PrecisionError(f"Accelerate's mixed precision {value!r} ({source}) is not one zscir runs; choose one "
                             f"of {', '.join(PRECISIONS)} with --mixed-precision")
    return value


def autocast(precision: str, device: Device) -> ContextManager[None]:
    """A block that runs `device`'s operations in `precision` (a no-op block for "no")."""
    resolved = resolve_precision(precision, device)
    if resolved == "no":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type(device), dtype=DTYPES[resolved])


__all__ = ["ACCELERATE_ENV", "DTYPES", "PRECISIONS", "PrecisionError", "accelerate_config_file",
           "accelerate_precision", "autocast", "describe_device", "device_type", "resolve_precision",
           "supported_precisions"]
