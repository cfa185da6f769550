"""`zscir index` (embed a gallery into an index folder) and `zscir search` (one composed query against it)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..search import BACKENDS, IMAGE_ROOT_FILE, INDEX_META, METRICS, EmbeddingIndex, EmbeddingIndexError, model_key_of
from ..search.store import Id
from ..precision import autocast
from .common import (SOURCE_HELP, add_data_arguments, add_device_argument, add_model_argument, add_out_argument,
                     add_precision_argument, add_workers_argument, columns_of, load_composer, resolve_cli_precision,
                     resolve_device)
from .flags import add_old_spelling

#: What `zscir search --out DIR` writes there.
SEARCH_GRID, SEARCH_RESULTS = "search.png", "search.json"


def _parse_params(items: Optional[Sequence[str]], flag: str) -> Dict[str, Any]:
    """``KEY=VALUE`` strings to a dict (ints and floats converted)."""
    out: Dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        for convert in (int, float):
            try:
                out[key] = convert(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


def _image_list(images: str, root: Optional[str], split: Optional[str] = None,
                columns: Optional[Dict[str, str]] = None) -> Tuple[Any, List[str], Optional[Path]]:
    """Images (paths, or a data set's image source), their ids and the folder ids are relative to (None: a data set)."""
    from ..data.images import PathSource
    from ..data.sources import open_images

    data = open_images(images, split=split, columns=columns, image_root=root)
    items = list(data.source.paths) if isinstance(data.source, PathSource) else data.source
    return items, data.ids, data.base


def _load_composer(model: str, args: argparse.Namespace) -> Any:
    return load_composer(args)


def index_add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``zscir index``: embed a gallery with a trained model into an index folder."""
    parser.add_argument("images", metavar="SOURCE", help="image folder (searched recursively), a text file with one "
                        f"image path per line, or a data set with an image column: {SOURCE_HELP}")
    add_model_argument(parser)
    parser.add_argument("--index", required=True, help="index folder to create or extend (images already in it are skipped)")
    add_data_arguments(parser, ("image", "id"), "SOURCE",
                       image_root_help="folder that relative paths in a file list (or a data set's image column) "
                                       "are relative to (default: the list's folder)")
    add_old_spelling(parser, "--root", "--image-root")
    parser.add_argument("--backend", default="exact", choices=BACKENDS.names(), help="also build this FAISS structure (default: exact only)")
    add_device_argument(parser)
    add_precision_argument(parser, "embedding the images (rows are stored as float16 either way)")
    parser.add_argument("--backend-param", action="append", metavar="KEY=VALUE", help="FAISS build parameter, e.g. nlist=1024 (repeatable)")
    parser.add_argument("--metric", default="cosine", choices=METRICS, help="similarity for a new index")
    parser.add_argument("--batch-size", type=int, default=64)
    add_workers_argument(parser)
    parser.add_argument("--commit-every", type=int, default=4096, help="embeddings buffered between index commits")
    parser.add_argument("--bad-log", default=None, help="where to list images that fail to load (default: INDEX/bad_images.log)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def index_run(args: argparse.Namespace) -> int:
    """Run ``zscir index``: embed new images of the gallery and append them to the index."""
    from ..checkpoint import atomic_write_text
    from ..data.images import iter_image_batches, subset

    backend_params = _parse_params(args.backend_param, "--backend-param")
    if args.batch_size < 1 or args.commit_every < 1:
        raise ValueError("--batch-size and --commit-every must be >= 1")
    precision, device = resolve_cli_precision(args), resolve_device(args)
    paths, ids, base = _image_list(args.images, args.image_root, args.split, columns_of(args, ("image", "id")))
    composer = _load_composer(args.model, args)
    key = model_key_of(composer, args.model)
    folder = Path(args.index)
    index = EmbeddingIndex.open(folder, model_key=key) if (folder / INDEX_META).is_file() else None
    todo = [i for i, item_id in enumerate(ids) if index is None or item_id not in index]
    print(f"{len(paths)} images, {len(paths) - len(todo)} already indexed, {len(todo)} to embed")
    bad_log = Path(args.bad_log) if args.bad_log else folder / "bad_images.log"
    n_bad = 0
    buffer_ids: List[Id] = []
    buffer_emb: List[torch.Tensor] = []
    buffer_bad: List[Dict[str, Any]] = []

    def commit() -> None:
        nonlocal index
        if not buffer_ids:
            return  # failures wait for rows: a new index needs an embedding to learn its dimension
        emb = torch.cat(buffer_emb)
        if index is None:
            index = EmbeddingIndex.create(folder, int(emb.shape[1]), key, metric=args.metric)
        index.add(list(buffer_ids), emb, skipped=list(buffer_bad))
        buffer_ids.clear()
        buffer_emb.clear()
        buffer_bad.clear()

    def record_bad(failure: Any) -> None:
        nonlocal n_bad
        n_bad += 1
        buffer_bad.append({"id": ids[todo[failure.index]], "reason": failure.reason})

    if todo:
        for positions, images in iter_image_batches(
            subset(paths, todo), None, args.batch_size, num_workers=args.num_workers,
            log=bad_log, progress=not args.no_progress, on_failure=record_bad, desc="indexing",
        ):
            with torch.no_grad(), autocast(precision, device):
                emb = composer.encode_images(images)
            buffer_emb.append(torch.as_tensor(emb).detach().float().cpu())
            buffer_ids.extend(ids[todo[p]] for p in positions.tolist())
            if len(buffer_ids) >= args.commit_every:
                commit()
        commit()
    if index is None:
        raise EmbeddingIndexError(f"nothing was indexed into {folder}: no image could be loaded")
    if buffer_bad:  # failures after the last embedded image
        index.add([], torch.empty(0, index.dim), skipped=list(buffer_bad))
    base = base or (Path(args.image_root) if args.image_root else None)
    if base is not None:
        atomic_write_text(folder / IMAGE_ROOT_FILE, str(base.resolve()) + "\n")  # lets `zscir search --out` find them
    if args.backend != "exact":
        print(f"building the {args.backend!r} backend over {len(index)} embeddings")
        index.build_backend(args.backend, **backend_params)
    elif index.meta["backends"]:
        index.sync_backends()
    print(f"index {folder}: {len(index)} embeddings (dim {index.dim}); {n_bad} image(s) skipped"
          + (f", listed in {bad_log}" if n_bad else ""))
    return 0


def search_add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``zscir search``: a composed query (image + text) against an index."""
    parser.add_argument("index", help="index folder written by `zscir index`")
    add_model_argument(parser, help="the model the index was built with: a folder or Hub repo id user/name")
    parser.add_argument("--image", required=True, help="reference image")
    parser.add_argument("--text", required=True, help="modification text")
    parser.add_argument("-k", "--top-k", type=int, default=10, help="number of results")
    parser.add_argument("--backend", default="exact", choices=BACKENDS.names())
    parser.add_argument("--search-param", action="append", metavar="KEY=VALUE", help="e.g. nprobe=64 or efSearch=256")
    parser.add_argument("--exclude", action="append", default=[], metavar="ID", help="gallery id never to return (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    add_device_argument(parser)
    add_precision_argument(parser, "encoding the query")
    add_out_argument(parser, help=f"folder for OUT/{SEARCH_GRID} (reference, text, top-k with scores) and "
                     f"OUT/{SEARCH_RESULTS} (the ranked ids)", required=False)
    parser.add_argument("--image-root", default=None,
                        help="folder the gallery ids are relative to, for --out (default: the folder given to `zscir index`)")


def search_run(args: argparse.Namespace) -> int:
    """Run ``zscir search`` and print the ranked gallery ids."""
    from ..data.images import load_image

    params = _parse_params(args.search_param, "--search-param")
    precision, device = resolve_cli_precision(args), resolve_device(args)
    index = EmbeddingIndex.open(args.index)
    composer = _load_composer(args.model, args)
    key = model_key_of(composer, args.model)
    if key != index.model_key:
        raise EmbeddingIndexError(f"{args.index} was built with model {index.model_key!r}, but --model is {key!r}")
    image = load_image(args.image)
    with torch.no_grad(), autocast(precision, device):
        query = composer.encode_query([image], [args.text])
    query = torch.as_tensor(query).detach().float().cpu()  # the index normalises in float32 (cosine)
    exclude = [list(args.exclude)] if args.exclude else None
    hits = index.search(query, args.top_k, exclude_ids=exclude, backend=args.backend, **params)[0]
    if args.json:
        print(json.dumps([{"rank": r, "id": i, "score": round(s, 6)} for r, (i, s) in enumerate(hits, start=1)], indent=2))
    else:
        print(f"{'rank':>4}  {'score':>8}  id")
        for rank, (item_id, score) in enumerate(hits, start=1):
            print(f"{rank:>4}  {score:8.4f}  {item_id}")
    if args.out:
        root_file = Path(args.index) / IMAGE_ROOT_FILE
        root = Path(args.image_root or (root_file.read_text().strip() if root_file.is_file() else "."))
        grid = args.out if args.out.suffix.lower() == ".png" else args.out / SEARCH_GRID  # .png: the old meaning
        if grid.parent == args.out:
            from ..checkpoint import atomic_write_json

            atomic_write_json(args.out / SEARCH_RESULTS, {"image": str(args.image), "text": args.text, "results": [
                {"rank": r, "id": i, "score": round(s, 6)} for r, (i, s) in enumerate(hits, start=1)]})
        _write_search_grid(grid, root, image, args.text, hits)
    return 0


def _write_search_grid(out: Path, root: Path, image: Any, text: str, hits: Sequence[Tuple[Id, float]]) -> None:
    """PNG of the query and its ranked results; unreadable result images are shown blank."""
    from PIL import Image

    from ..data.images import ImageLoadError, load_image
    from ..viz import GridRow, save_retrieval_grid

    results = []
    for item_id, score in hits:
        try:
            shown = load_image(root / str(item_id))
        except ImageLoadError:
            shown = Image.new("RGB", (64, 64), "gray")
        results.append((shown, f"{score:.3f}", False))
    save_retrieval_grid(out, [GridRow(image, text, results)])
    print(f"wrote {out}")
