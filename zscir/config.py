"""Configuration dataclasses that round-trip to JSON.

Every trainable part of zscir is described by a dataclass deriving from
:class:`Config`. ``cfg.to_json(path)`` / ``Cls.from_json(path)`` round-trip
exactly; unknown keys are an error that names the key, so a typo in a config
file never silently falls back to a default. A field that was removed is listed
in the class's ``DROPPED_FIELDS``: files written before still load, the key is
ignored.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Dict, Type, TypeVar, Union, get_type_hints

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A configuration file or dict is malformed."""


@dataclasses.dataclass
class Config:
    """Base class: JSON round trip, strict key checking, readable repr."""

    # removed fields that files written by older versions still hold: name -> why it went (ignored on reading)
    DROPPED_FIELDS: ClassVar[Dict[str, str]] = {}

    def to_dict(self) -> Dict[str, Any]:
        """Plain-dict form (nested configs become dicts)."""
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Config):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls: Type[C], data: Dict[str, Any], source: str = "config") -> C:
        """Build from a dict; unknown keys raise ConfigError naming them and `source`."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object for {cls.__name__}, got {type(data).__name__}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k not in cls.DROPPED_FIELDS}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(
                f"{source}: unknown field(s) {unknown} for {cls.__name__}; known fields: {sorted(names)}"
            )
        hints = get_type_hints(cls)
        kwargs: Dict[str, Any] = {}
        for key, value in data.items():
            hint = hints.get(key)
            if isinstance(hint, type) and issubclass(hint, Config) and isinstance(value, dict):
                value = hint.from_dict(value, source=f"{source}.{key}")
            elif isinstance(getattr(cls, key, None), tuple) and isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)

    def to_json(self, path: Union[str, os.PathLike, None] = None) -> str:
        """Serialise to a JSON string, and write it atomically to `path` if given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            from .checkpoint import atomic_write_text

            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls: Type[C], path: Union[str, os.PathLike]) -> C:
        """Read a JSON file written by :meth:`to_json`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON ({err})") from None
        return cls.from_dict(data, source=str(path))

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)
