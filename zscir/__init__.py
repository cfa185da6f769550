"""zscir: zero-shot composed image retrieval (TSCIR: from mapping to composing).

``Composer`` and ``ComposerConfig`` are imported on first use, so ``zscir --help`` does not load torch.
"""
from typing import Any

__version__ = "0.1.0"

__all__ = ["Composer", "ComposerConfig", "__version__"]

_LAZY = {"Composer": "zscir.composer", "ComposerConfig": "zscir.composer"}


def __getattr__(name: str) -> Any:
    """Import the public classes on first access (PEP 562)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zscir' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(list(globals()) + list(_LAZY))
