"""Galleries to serve: an image folder embedded into an index (through the gallery feature cache), and the shapes
world's held-out queries rendered into a folder."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union

from ..checkpoint import atomic_write_text
from ..composer import Composer
from ..data.images import list_images
from ..search import IMAGE_ROOT_FILE, INDEX_META, EmbeddingIndex, EmbeddingIndexError

logger = logging.getLogger(__name__)
PathLike = Union[str, "os.PathLike[str]"]


def serve_cache_dir() -> Path:
    """Where ``zscir serve`` keeps the indexes and shapes galleries it builds: ``<zscir cache>/serve``."""
    from ..train.clip_pretrain import default_cache_dir

    return default_cache_dir() / "serve"


def index_folder(composer: Composer, images: PathLike, index_dir: Optional[PathLike] = None,
                 cache_dir: Optional[PathLike] = None, batch_size: int = 64, precision: str = "no",
                 progress: bool = True) -> EmbeddingIndex:
    """Index every image under `images` (ids: relative paths) and return the index; only new images are embedded.

    Embeddings go through the evaluation's gallery feature cache (`cache_dir`, default
    ``~/.cache/zscir/gallery``), so a restart, or ``zscir eval`` on the same files, reuses them.
    `index_dir` (default: a folder under :func:`serve_cache_dir` keyed by the model and the files, their sizes
    and times) is created, or extended with the images it lacks. Images that cannot be read are skipped and recorded.
    """
    from ..eval.encode import default_cache_dir, encode_gallery, gallery_cache_key

    root = Path(images)
    paths = list_images(root)
    ids = [p.relative_to(root).as_posix() for p in paths]
    key = composer.cache_key
    if index_dir is None:
        index_dir = serve_cache_dir() / f"index-{gallery_cache_key(key, paths)[:24]}"  # same files, same index
    folder = Path(index_dir)
    index = EmbeddingIndex.open(folder, model_key=key) if (folder / INDEX_META).is_file() else None
    todo = [i for i, item in enumerate(ids) if index is None or item not in index]
    if todo:
        logger.info("embedding %d of %d images of %s into %s", len(todo), len(ids), root, folder)
        feats, failures = encode_gallery(composer, [ids[i] for i in todo], [paths[i] for i in todo],
                                         batch_size=batch_size, cache_dir=cache_dir or default_cache_dir(),
                                         progress=progress, precision=precision)
        good = [j for j, i in enumerate(todo) if ids[i] not in failures]
        skipped = [{"id": item, "reason": reason} for item, reason in failures.items()]
        if good:
            if index is None:
                index = EmbeddingIndex.create(folder, int(feats.shape[1]), key)
            index.add([ids[todo[j]] for j in good], feats[good], skipped=skipped)
        elif index is not None and skipped:
            index.add([], feats[:0], skipped=skipped)
        if failures:
            logger.warning("%d image(s) of %s could not be read and are not served, e.g. %s", len(failures), root,
                           next(iter(failures.values())))
    if index is None:
        raise EmbeddingIndexError(f"no image under {root} could be embedded")
    atomic_write_text(folder / IMAGE_ROOT_FILE, str(root.resolve()) + "\n")
    if index.meta["backends"]:
        index.sync_backends()
    return index


def shapes_gallery(n_queries: int, folder: Optional[PathLike] = None, seed: int = 0, image_size: int = 64,
                   progress: bool = True) -> Path:
    """The shapes world's held-out queries (the demo's test set for seed 0) rendered in the generic CIR format, once.

    The gallery holds each query's reference and target, sibling edits and random scenes (about 5 images per
    query); ``queries.jsonl`` lists the queries. A folder rendered before is reused.
    """
    from ..shapes import ShapesWorld, ShapesWorldConfig

    if n_queries < 1:
        raise ValueError(f"the shapes gallery needs at least one query, got {n_queries}")
    folder = Path(folder) if folder is not None else serve_cache_dir() / f"shapes-seed{seed}-{image_size}px-{n_queries}"
    if (folder / "queries.jsonl").is_file() and (folder / "shapes_world.json").is_file():
        return folder  # export_generic writes these last
    world = ShapesWorld(ShapesWorldConfig(seed=seed, image_size=image_size))
    eval_set = world.make_eval_set(n_queries, family="eval", progress=progress)
    return world.export_generic(eval_set, folder, progress=progress)


__all__ = ["index_folder", "serve_cache_dir", "shapes_gallery"]
