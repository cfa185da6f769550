"""`zscir index` (embed a gallery into an index folder) and `zscir search` (one composed query against it)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..search import BACKENDS, IMAGE_ROOT_FILE, INDEX_META, METRICS, EmbeddingIndex, EmbeddingIndexError, model_key_of
from ..search.export import export_parquet
from ..search.shards import SHARDS_DIR, ShardedRun, current_workers
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
    parser.add_argument("--export", default=None, metavar="FILE.parquet",
                        help="also write the index's ids and embeddings (float32) to a Parquet file, for vector "
                             "databases or datasets.Dataset.from_parquet")


def _open_index(folder: Path, key: str) -> Optional[EmbeddingIndex]:
    """The index in `folder` (refused if another model built it), or None if there is none yet."""
    return EmbeddingIndex.open(folder, model_key=key) if (folder / INDEX_META).is_file() else None


def _encode_into(folder: Path, key: str, metric: str, composer: Any, paths: Sequence[Path], ids: Sequence[Id],
                 todo: Sequence[int], args: argparse.Namespace, bad_log: Path, progress: bool) -> List[Dict[str, Any]]:
    """Embed images `todo` (positions in `paths`) and append them to the index in `folder`; returns the failures."""
    from ..data.images import iter_image_batches, subset

    precision, device = resolve_cli_precision(args), resolve_device(args)
    index = _open_index(folder, key)
    failed: List[Dict[str, Any]] = []
    buffer_ids: List[Id] = []
    buffer_emb: List[torch.Tensor] = []
    buffer_bad: List[Dict[str, Any]] = []

    def commit() -> None:
        nonlocal index
        if not buffer_ids:
            return  # failures wait for rows: a new index needs an embedding to learn its dimension
        emb = torch.cat(buffer_emb)
        if index is None:
            index = EmbeddingIndex.create(folder, int(emb.shape[1]), key, metric=metric)
        index.add(list(buffer_ids), emb, skipped=list(buffer_bad))
        buffer_ids.clear()
        buffer_emb.clear()
        buffer_bad.clear()

    def record_bad(failure: Any) -> None:
        item = {"id": ids[todo[failure.index]], "reason": failure.reason}
        buffer_bad.append(item)
        failed.append(item)

    if todo:
        for positions, images in iter_image_batches(
            subset(paths, todo), None, args.batch_size, num_workers=args.num_workers,
            log=bad_log, progress=progress, on_failure=record_bad, desc="indexing",
        ):
            with torch.no_grad(), autocast(precision, device):
                emb = composer.encode_images(images)
            buffer_emb.append(torch.as_tensor(emb).detach().float().cpu())
            buffer_ids.extend(ids[todo[p]] for p in positions.tolist())
            if len(buffer_ids) >= args.commit_every:
                commit()
        commit()
    if buffer_bad and index is not None:  # failures after the last embedded image
        index.add([], torch.empty(0, index.dim), skipped=list(buffer_bad))
    return failed


def _merge_part(folder: Path, key: str, metric: str, part: Path, info: Dict[str, Any]) -> None:
    """Append one part's shard index (and its failures) to the index in `folder`, creating it from the first part."""
    index = _open_index(folder, key)
    shard = _open_index(part, key)
    if shard is not None and len(shard):
        if index is None:
            index = EmbeddingIndex.create(folder, shard.dim, key, metric=metric)
        if shard.dim != index.dim or shard.metric != index.metric:
            raise EmbeddingIndexError(f"shard {part} holds dim {shard.dim} / {shard.metric} rows, the index {folder} "
                                      f"dim {index.dim} / {index.metric}: they cannot be merged")
        index.store.extend(shard.store)
    failed = [item for item in info.get("skipped", []) if index is None or item["id"] not in index]
    if failed and index is not None:
        index.add([], torch.empty(0, index.dim), skipped=failed)


def index_run(args: argparse.Namespace) -> int:
    """Run ``zscir index``: embed new images of the gallery and append them to the index.

    Under torchrun / accelerate launch every process embeds its part of the new images into
    INDEX/shards/ (resumable per part) and the first process merges them in order.
    """
    from ..checkpoint import atomic_write_text

    backend_params = _parse_params(args.backend_param, "--backend-param")
    if args.batch_size < 1 or args.commit_every < 1:
        raise ValueError("--batch-size and --commit-every must be >= 1")
    precision = resolve_cli_precision(args)
    paths, ids, base = _image_list(args.images, args.image_root, args.split, columns_of(args, ("image", "id")))
    composer = _load_composer(args.model, args)
    key = model_key_of(composer, args.model)
    folder = Path(args.index)
    index = _open_index(folder, key)
    metric = index.metric if index is not None else args.metric
    bad_log = Path(args.bad_log) if args.bad_log else folder / "bad_images.log"
    workers = current_workers()
    run = ShardedRun(folder / SHARDS_DIR, {"model_key": key, "metric": metric, "precision": precision}, workers,
                     error=EmbeddingIndexError, noun="index")
    position = {item_id: i for i, item_id in enumerate(ids)}
    if run.active:
        def todo_ids() -> List[Id]:
            current = _open_index(folder, key)
            return [i for i in ids if current is None or i not in current]

        merged_failures: List[Dict[str, Any]] = []

        def merge(part: Path, info: Dict[str, Any]) -> None:
            _merge_part(folder, key, metric, part, info)
            merged_failures.extend(info.get("skipped", []))

        items = run.begin(todo_ids, merge)
        if workers.is_main:
            print(f"{len(paths)} images, {len(paths) - len(items)} already indexed, {len(items)} to embed "
                  f"by {workers.world} process(es) in {run.plan['parts'] if run.plan else 0} part(s)")
        for part, start, stop, shard in run.my_parts():
            if run.is_done(part):
                continue
            done = _open_index(shard, key)
            todo = [position[i] for i in items[start:stop] if done is None or i not in done]  # a part resumes
            part_failed = _encode_into(shard, key, metric, composer, paths, ids, todo, args, bad_log,
                                       progress=not args.no_progress and workers.is_main)
            run.mark_done(part, skipped=part_failed)
        if items:
            run.finish(merge)
        if not workers.is_main:
            return 0
        n_bad = len(merged_failures)
        index = _open_index(folder, key)
    else:
        todo = [i for i, item_id in enumerate(ids) if index is None or item_id not in index]
        print(f"{len(paths)} images, {len(paths) - len(todo)} already indexed, {len(todo)} to embed")
        n_bad = len(_encode_into(folder, key, metric, composer, paths, ids, todo, args, bad_log,
                                 progress=not args.no_progress))
        index = _open_index(folder, key)
    if index is None:
        raise EmbeddingIndexError(f"nothing was indexed into {folder}: no image could be loaded")
    base = base or (Path(args.image_root) if args.image_root else None)
    if base is not None:
        atomic_write_text(folder / IMAGE_ROOT_FILE, str(base.resolve()) + "\n")  # lets `zscir search --out` find them
    if args.backend != "exact":
        print(f"building the {args.backend!r} backend over {len(index)} embeddings")
        built = index.build_backend(args.backend, **backend_params)
        info = index.meta["backends"][args.backend]
        print(f"{args.backend}: {built.bytes_per_vector():.0f} bytes per vector in memory, "
              f"{info['file_bytes'] / len(index):.1f} bytes per vector on disk ({info['file']})")
    elif index.meta["backends"]:
        index.sync_backends()
    print(f"index {folder}: {len(index)} embeddings (dim {index.dim}); {n_bad} image(s) skipped"
          + (f", listed in {bad_log}" if n_bad else ""))
    if args.export:
        print(f"exported {len(index)} embeddings to {export_parquet(index, args.export)}")
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
