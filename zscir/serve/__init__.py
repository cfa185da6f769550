"""``zscir serve``: a retrieval service and a search page over one model and one gallery index.

``service`` (:class:`SearchService`: checked queries, gallery images by id; no web framework) <- ``app``
(FastAPI routes, the page's static files, :class:`BackgroundServer`); ``gallery`` builds what is served (an image
folder's index through the gallery feature cache, the shapes world's held-out queries, example queries).
FastAPI and uvicorn are the optional extra ``zscir[serve]``: ``create_app``, ``build_app`` and
``BackgroundServer`` import them when first used.
"""
from typing import Any

from .gallery import index_folder, serve_cache_dir, shapes_gallery
from .service import (Example, Hit, InvalidInput, SearchResult, SearchService, ServeError, ServeLimits, TooLarge,
                      UnknownImage, decode_base64_image, load_examples)

_APP_NAMES = ("BackgroundServer", "build_app", "create_app")


def __getattr__(name: str) -> Any:
    """The FastAPI-based names, imported on first use (a clear error without the ``serve`` extra)."""
    if name not in _APP_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from . import app
    except ImportError as err:
        raise ImportError(f"zscir.serve.{name} needs FastAPI and uvicorn ({err}); install them with "
                          "pip install 'zscir[serve]'") from None
    return getattr(app, name)


__all__ = ["BackgroundServer", "Example", "Hit", "InvalidInput", "SearchResult", "SearchService", "ServeError",
           "ServeLimits", "TooLarge", "UnknownImage", "build_app", "create_app", "decode_base64_image", "index_folder",
           "load_examples", "serve_cache_dir", "shapes_gallery"]
