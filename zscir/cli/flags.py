"""How every zscir command spells its flags: defaults shown in help, old spellings kept as hidden aliases.

Light on purpose (argparse only): ``zscir --help`` imports this module and nothing heavy.
"""
from __future__ import annotations

import argparse
import copy
from typing import Any, List, Optional, Sequence, Tuple, Union

__all__ = ["HelpFormatter", "OLD_SPELLINGS", "add_old_spelling", "old_spellings_used"]

#: Namespace attribute where the old spellings a command line used are collected (for one note each).
OLD_SPELLINGS = "_old_spellings"
Container = Union[argparse.ArgumentParser, "argparse._ActionsContainer"]


def _shows_default(action: argparse.Action) -> bool:
    """Whether a flag has a default worth showing (not None, False, empty or suppressed; not a positional)."""
    default = action.default
    return bool(action.option_strings) and action.nargs != 0 and default not in (None, False, argparse.SUPPRESS) \
        and default != [] and default != ""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default (flags without a help text too) unless it is empty or the help already names it."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and _shows_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not _shows_default(action) or "%(default)" in text or "default" in text.lower():
            return text
        return f"{text} (default: %(default)s)"


class _OldSpelling(argparse.Action):
    """A hidden earlier name of a flag: stores into the new flag's destination and remembers it was used."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, const: Any = None,
                 nargs: Any = None, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=nargs, const=const, default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        used: List[Tuple[str, str]] = list(getattr(namespace, OLD_SPELLINGS, None) or [])
        used.append((option_string or self.option_strings[0], self.new))
        setattr(namespace, OLD_SPELLINGS, used)


def add_old_spelling(container: Container, old: str, new: str, parser: Optional[argparse.ArgumentParser] = None,
                     value: Any = None) -> None:
    """Accept `old` (hidden from help) as the flag `new` of the same container, with the same meaning.

    `value`: for flags that take no value (store_true), what `old` stores (default: the new flag's const).
    `parser` is the parser owning `new` when `container` is one of its groups.
    """
    owner = parser or container
    try:
        action = owner._option_string_actions[new]  # noqa: SLF001 - argparse has no public lookup
    except KeyError:
        raise KeyError(f"add_old_spelling: {new} is not a flag of this parser") from None
    takes_value = action.nargs != 0
    kwargs = {"type": action.type, "choices": action.choices, "metavar": action.metavar} if takes_value else {}
    container.add_argument(old, action=_OldSpelling, dest=action.dest, new=new,
                           nargs=action.nargs if takes_value else 0,
                           const=None if takes_value else (action.const if value is None else value), **kwargs)


def old_spellings_used(args: argparse.Namespace) -> List[Tuple[str, str]]:
    """(old, new) for each old flag spelling the command line used."""
    return list(getattr(args, OLD_SPELLINGS, None) or [])
