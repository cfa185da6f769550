"""zscir: zero-shot composed image retrieval (TSCIR: from mapping to composing)."""
__version__ = "0.1.0"

from .composer import Composer, ComposerConfig  # noqa: E402

__all__ = ["Composer", "ComposerConfig", "__version__"]
