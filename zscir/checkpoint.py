"""Atomic, pickle-free checkpoints: ``config.json`` + ``*.safetensors``.

Files are written to a temporary name in the same folder and renamed into
place, so an interrupted write never leaves a half-written checkpoint behind.
Loading uses safetensors only; nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Type, Union

import torch

PathLike = Union[str, os.PathLike]
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint folder or file is missing, corrupt or does not match its config."""


def _atomic_write(path: PathLike, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write bytes to `path` atomically (temp file + rename)."""
    _atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write text to `path` atomically (temp file + rename)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: PathLike, error: Optional[Type[Exception]] = None, missing: str = "file not found") -> Any:
    """Parse a JSON file; a missing file ("<missing>: <path>") or invalid JSON raises `error` (CheckpointError)."""
    error = error or CheckpointError
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{missing}: {path}") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: invalid JSON ({err})") from None


def read_json_object(path: PathLike, error: Type[Exception], what: str = "", hint: str = "") -> Dict[str, Any]:
    """The JSON object in `path`; an unreadable file or another JSON value raises `error` naming the file, what it
    should be and `hint` (how to recover)."""
    tail = f"; {hint}" if hint else ""
    kind = f" {what}" if what else ""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise error(f"{path}: unreadable{kind} ({err}){tail}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object{f' ({what})' if what else ''}{tail}")
    return data


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write an object as pretty JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_tensors(path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> str:
    """Save a flat dict of tensors as safetensors, atomically; return the SHA-256 of the file written."""
    from safetensors.torch import save

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = save(clean, metadata=metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in chunks (large checkpoints never sit in memory twice)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def load_tensors(path: PathLike) -> Dict[str, torch.Tensor]:
    """Load a safetensors file; a missing or corrupt file raises CheckpointError naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file not found: {path}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several types for corrupt headers
        raise CheckpointError(f"corrupt or unreadable safetensors file {path}: {err}") from None


def save_folder(
    folder: PathLike,
    config: Dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    weights_name: str = WEIGHTS_NAME,
) -> Path:
    """Write ``config.json`` and a safetensors weight file into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / weights_name, tensors)
    atomic_write_json(folder / CONFIG_NAME, config)
    return folder


def load_folder(folder: PathLike, weights_name: str = WEIGHTS_NAME) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Read ``config.json`` and weights from `folder`, with errors that name the missing file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({err})") from None
    return config, load_tensors(folder / weights_name)


def load_state_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load `state` into `module`, raising CheckpointError on missing, unexpected or mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape_bad = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]}")
    if shape_bad:
        k = shape_bad[0]
        problems.append(f"{len(shape_bad)} shape mismatch(es), e.g. {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)
