"""`zscir serve`: a retrieval service and search page over a model and a gallery (flags only; zscir.serve does the work).

FastAPI and uvicorn are imported when the command runs, so ``zscir --help`` stays fast and works without them.
"""
from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from ..search import BACKENDS
from .common import (add_device_argument, add_model_argument, add_precision_argument, resolve_cli_precision,
                     resolve_device, resolve_model)

DEFAULT_SHAPES_QUERIES = 1000  # the demo's test set: a gallery of 4,853 images


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``zscir serve``."""
    add_model_argument(parser, help="trained model: a folder (Composer.save_pretrained), e.g. zscir-demo/model, or a "
                       "Hub repo id user/name")
    gallery = parser.add_argument_group("gallery (give --index, --images or --shapes)")
    gallery.add_argument("--index", default=None,
                         help="index folder written by `zscir index`; with --images or --shapes: where to build the "
                              "index (created, or extended with new images; default: a folder in the zscir cache)")
    source = gallery.add_mutually_exclusive_group()
    source.add_argument("--images", default=None, metavar="DIR",
                        help="index this image folder first (through the gallery feature cache: a restart embeds "
                             "nothing again); a generic CIR queries.jsonl in it gives the page example queries")
    source.add_argument("--shapes", type=int, nargs="?", const=DEFAULT_SHAPES_QUERIES, default=None, metavar="N",
                        help="serve the shapes world's held-out queries as examples, with their gallery (references, "
                             "targets, sibling edits, random scenes: about 5 images per query), rendered once into the "
                             f"zscir cache; N queries (default {DEFAULT_SHAPES_QUERIES}: the demo's test set, 4,853 images)")
    gallery.add_argument("--shapes-seed", type=int, default=0, help="world seed of --shapes (0: the demo's)")
    gallery.add_argument("--image-root", default=None,
                         help="folder the index ids are relative to (default: the index's image_root.txt)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; the service has no login)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--max-k", type=int, default=100, help="most results one query may ask for")
    parser.add_argument("--max-text-chars", type=int, default=300, help="longest modification text accepted")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest uploaded reference image")
    parser.add_argument("--backend", default="exact", choices=BACKENDS.names(),
                        help="index search backend: exact, or a FAISS structure built by `zscir index --backend`")
    add_device_argument(parser)
    add_precision_argument(parser, "encoding queries and gallery images")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars while indexing")


def run(args: argparse.Namespace) -> int:
    """Load the model and the gallery index once, then serve the API and the page until Ctrl-C."""
    if args.index is None and args.images is None and args.shapes is None:
        raise ValueError("give the gallery: --index INDEX (from `zscir index`), --images DIR or --shapes [N]")
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as err:
        raise RuntimeError(f"zscir serve needs FastAPI and uvicorn ({err}): pip install 'zscir[serve]'") from None
    from ..composer import Composer
    from ..search import EmbeddingIndex
    from ..serve import ServeLimits, index_folder, shapes_gallery

    limits = ServeLimits(max_k=args.max_k, max_text_chars=args.max_text_chars,
                         max_upload_bytes=int(args.max_upload_mb * 1024 * 1024))
    precision, device = resolve_cli_precision(args), resolve_device(args)
    model_dir = resolve_model(args)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {args.model}: not a model folder (no config.json); `zscir demo` writes "
                                "zscir-demo/model")
    composer = Composer.from_pretrained(model_dir, device=device)
    images = args.images
    if args.shapes is not None:
        images = shapes_gallery(args.shapes, seed=args.shapes_seed, progress=not args.no_progress)
    if images is not None:
        index = index_folder(composer, images, index_dir=args.index, precision=precision,
                             progress=not args.no_progress)
        image_root = Path(images)
    else:
        index = EmbeddingIndex.open(args.index, model_key=composer.cache_key)
        image_root = Path(args.image_root) if args.image_root else None
    app = create_app(composer, index, image_root=image_root, limits=limits, precision=precision,
                     backend=args.backend, model_name=str(args.model))
    service = app.state.service
    if service.image_root is None:
        print("warning: no image folder for this index (give --image-root): searching works, images are not shown",
              file=sys.stderr)
    if not _is_loopback(args.host):
        print(f"warning: listening on {args.host}: anyone who can reach this address can query the gallery and "
              "see its images (there is no login)", file=sys.stderr)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {len(index)} gallery images with {args.model} on http://{shown}:{args.port}/ "
          f"({len(service.examples)} example queries; API schema at /openapi.json; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
