"""Configuration dataclasses that round-trip to JSON.

Every trainable part of zscir is described by a dataclass deriving from
:class:`Config`. ``cfg.to_json(path)`` / ``Cls.from_json(path)`` round-trip
exactly; unknown keys are an error that names the key, so a typo in a config
file never silently falls back to a default. A field that was removed is listed
in the class's ``DROPPED_FIELDS``: files written before still load, the key is
ignored.

Values are checked against the field types (a string where an int belongs is an
error naming the field, the expected and the given type). Files of a class with
``COMPLETE = True`` (a model folder's ``config.json``, written whole by
``save_pretrained``) must hold every field, nested configs included: a missing
field is an error, except those in the class's ``OPTIONAL_FIELDS`` (fields added
after such files were first written; old files load with their defaults). Other
configs (a training ``--config``, component options) are overrides: fields left
out keep their defaults.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any, ClassVar, Dict, Optional, Tuple, Type, TypeVar, Union, get_type_hints

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A configuration file or dict is malformed."""


@dataclasses.dataclass
class Config:
    """Base class: JSON round trip, strict key checking, readable repr."""

    # removed fields that files written by older versions still hold: name -> why it went (ignored on reading)
    DROPPED_FIELDS: ClassVar[Dict[str, str]] = {}
    # files of this class are written whole: reading one, every field (nested configs' too) must be there ...
    COMPLETE: ClassVar[bool] = False
    # ... except these, added after such files were first written (older files get the field's default)
    OPTIONAL_FIELDS: ClassVar[Tuple[str, ...]] = ()

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
    def from_dict(cls: Type[C], data: Dict[str, Any], source: str = "config", complete: Optional[bool] = None) -> C:
        """Build from a dict; unknown keys, wrong types and (complete files) missing fields raise ConfigError.

        ``complete``: every field not in OPTIONAL_FIELDS must be present (default: the class's COMPLETE);
        nested configs inherit it.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object for {cls.__name__}, got {type(data).__name__}")
        complete = cls.COMPLETE if complete is None else complete
        names = {f.name: f for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k not in cls.DROPPED_FIELDS}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(
                f"{source}: unknown field(s) {unknown} for {cls.__name__}; known fields: {sorted(names)}"
            )
        if complete:
            missing = [n for n in names if n not in data and n not in cls.OPTIONAL_FIELDS]
            if missing:
                may = f"; only {list(cls.OPTIONAL_FIELDS)} may be left out" if cls.OPTIONAL_FIELDS else ""
                raise ConfigError(f"{source}: missing field(s) {missing} for {cls.__name__} (this file must name "
                                  f"every field, so that none silently takes a default{may})")
        hints = get_type_hints(cls)
        kwargs: Dict[str, Any] = {}
        for key, value in data.items():
            hint = hints.get(key, Any)
            try:
                kwargs[key] = _convert(value, hint, f"{source}.{key}", complete)
            except _WrongType:
                raise ConfigError(f"{source}: field {key!r} of {cls.__name__} must be {_type_name(hint)}, "
                                  f"got {type(value).__name__} {_short(value)}") from None
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
        from .checkpoint import read_json

        return cls.from_dict(read_json(path, ConfigError, missing="config file not found"), source=str(path))

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def with_overrides(self: C, overrides: Dict[str, Any]) -> C:
        """A copy with dotted-key overrides applied to nested configs ({"train.steps": 900, "phi.num_tokens": 1})."""
        cfg = self
        for key, value in overrides.items():
            node, path = cfg, key.split(".")
            chain = []
            for name in path:
                if not (dataclasses.is_dataclass(node) and any(f.name == name for f in dataclasses.fields(node))):
                    raise ConfigError(f"{type(node).__name__} has no field {name!r} (override {key!r})")
                chain.append(node)
                node = getattr(node, name)
            for node, name in reversed(list(zip(chain, path))):
                value = dataclasses.replace(node, **{name: value})
            cfg = value
        return cfg


class _WrongType(Exception):
    """A value does not have its field's type (turned into a ConfigError naming the field)."""


def _convert(value: Any, hint: Any, source: str, complete: bool) -> Any:
    """`value` checked against the type `hint` (JSON lists become tuples, dicts nested configs), else _WrongType."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, source, complete)
            except _WrongType:
                continue
        raise _WrongType
    if isinstance(hint, type) and issubclass(hint, Config):
        if not isinstance(value, dict):
            raise _WrongType
        return hint.from_dict(value, source=source, complete=complete)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is str:
        ok = isinstance(value, str)
    elif hint is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _WrongType
        if args and args[-1] is Ellipsis:
            return tuple(_convert(v, args[0], source, complete) for v in value)
        if args:
            if len(args) != len(value):
                raise _WrongType
            return tuple(_convert(v, a, source, complete) for v, a in zip(value, args))
        return tuple(value)
    elif hint is list or origin is list:
        if not isinstance(value, list):
            raise _WrongType
        return [_convert(v, args[0], source, complete) for v in value] if args else value
    elif hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise _WrongType
        if args and args[1] is not Any:
            return {k: _convert(v, args[1], source, complete) for k, v in value.items()}
        return value
    else:  # a type this checker does not know: the dataclass's own checks apply
        return value
    if not ok:
        raise _WrongType
    return value


def _type_name(hint: Any) -> str:
    """A readable name of a field type for error messages ("int", "list of str", "object or null")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if hint is tuple or hint is list or origin in (tuple, list):
        return f"list of {_type_name(args[0])}" if args and (origin is list or args[-1] is Ellipsis) else "list"
    if hint is dict or origin is dict:
        return "object"
    if isinstance(hint, type) and issubclass(hint, Config):
        return f"{hint.__name__} (an object)"
    return getattr(hint, "__name__", str(hint))


def _short(value: Any, limit: int = 60) -> str:
    """repr of `value`, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
