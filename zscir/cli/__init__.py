"""The ``zscir`` command line: parsers and flag handling only; the work happens in the library."""
from .main import SUBCOMMANDS, Subcommand, available, build_parser, main

__all__ = ["SUBCOMMANDS", "Subcommand", "available", "build_parser", "main"]
