#!/usr/bin/env python
"""Quickstart: compose a query (reference image + modification text), search a folder of images, plot the top k.

Offline, self-contained (writes a small shapes-world image folder, trains a tiny model on the shapes world,
searches the folder and reports where the known target ranks)::

    python examples/quickstart.py --tiny --out grid.png

Your own model and photos::

    python examples/quickstart.py --model runs/stage2/model --images photos/ \\
        --reference photos/dog.jpg --text "the same dog but on a beach" -k 8 --out grid.png

Add ``--index photos.index`` to keep the gallery embeddings on disk (a
``zscir.search.EmbeddingIndex``, the same format ``zscir index`` writes): the
next run only embeds images that are new. ``--model`` also takes a Hugging Face
Hub repo id (``user/name``). Without ``--model`` (and without ``--tiny``) an
untrained ``Composer.from_clip("zscir-tiny")`` is used, which runs but ranks at
random.

``--tiny`` trains its model (about half a minute on a CPU, kept in
``WORKDIR/model`` and reused): the shapes world's pretrained tiny CLIP
(``zscir pretrain-clip --preset fast``, cached per machine, trained on first use),
Stage I on unlabeled shapes images, Stage II on shapes triplets phrased differently
from the queries.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

from zscir.composer import Composer
from zscir.data.images import iter_image_batches, list_images, load_image
from zscir.search import INDEX_META, EmbeddingIndex, exact_topk, model_key_of

Hit = Tuple[str, float]  # (gallery id = path relative to the image folder, cosine score)


@dataclass
class TinyQuery:
    """A shapes-world query written to disk: reference, modification text and the correct answers."""

    images: Path
    reference: Path
    text: str
    targets: List[str]


def write_tiny_world(folder: Path, image_size: int = 64, n_queries: int = 6, seed: int = 0) -> TinyQuery:
    """Export a small shapes-world evaluation set to `folder` and return its first query."""
    import json

    from zscir.shapes import ShapesWorld, ShapesWorldConfig

    world = ShapesWorld(ShapesWorldConfig(seed=seed, image_size=image_size))
    eval_set = world.make_eval_set(n_queries, n_random=n_queries * 2, siblings_per_query=3, stream="quickstart")
    world.export_generic(eval_set, folder, progress=False)
    first = json.loads((folder / "queries.jsonl").read_text().splitlines()[0])
    # the export's paths are "images/<name>.png"; gallery ids are relative to the images/ folder it searches
    targets = [Path(t).relative_to("images").as_posix() for t in first["targets"]]
    return TinyQuery(folder / "images", folder / first["reference"], first["modification"], targets)


def train_tiny_model(folder: Path, seed: int = 0, progress: bool = False) -> Path:
    """A small trained model in `folder` (reused when it is there): tiny CLIP + Stage I + Stage II on the shapes world."""
    if (folder / "config.json").is_file():
        return folder
    from zscir.data.triplets import load_triplets
    from zscir.models.adapters import AdapterConfig
    from zscir.models.phi import PhiConfig
    from zscir.shapes import ShapesWorld, ShapesWorldConfig
    from zscir.train.clip_pretrain import pretrained_tiny_clip
    from zscir.train.engine import TrainConfig
    from zscir.train.features import encode_triplets, shapes_features
    from zscir.train.stage1 import Stage1Config, train_stage1
    from zscir.train.stage2 import Stage2Config, fit_to_context, train_stage2

    clip, _ = pretrained_tiny_clip("fast", progress=progress)  # cached per machine
    torch.manual_seed(seed)
    composer = Composer.from_clip(str(clip), phi=PhiConfig(num_tokens=2, vsi_layers=1))
    world = ShapesWorld(ShapesWorldConfig(seed=seed, image_size=composer.backbone.image_size))
    # Stage I: map unlabeled images to pseudo-word tokens
    images = shapes_features(composer, world.scenes(2000, stream="quickstart-stage1"), world.config.image_size)
    stage1 = Stage1Config(phi=composer.phi.config, concept_weight=0.5,
                          train=TrainConfig(steps=100, batch_size=64, lr=1e-3, warmup_steps=10, seed=seed))
    composer, _ = train_stage1(composer, images, stage1, concepts=world.concept_phrases(), progress=progress)
    # Stage II: compose them with modification texts, on synthetic triplets in the *training* phrasing
    exported = world.export_triplets(world.make_triplets(600, family="train", stream="quickstart-stage2"),
                                     folder.parent / f"{folder.name}-triplets", progress=progress)
    triplets = fit_to_context(composer, load_triplets(exported / "triplets.jsonl"))
    stage2 = Stage2Config(adapters=AdapterConfig(kind="lora", num_layers=2, rank=8),
                          train=TrainConfig(steps=100, batch_size=64, lr=3e-3, warmup_steps=10, seed=seed))
    composer, _ = train_stage2(composer, encode_triplets(composer, triplets, progress=progress), stage2,
                               progress=progress)
    composer.save_pretrained(folder, training_data={"stage1": "2,000 shapes-world images",
                                                    "stage2": "600 shapes-world triplets (training phrasing)"})
    return folder


def load_composer(model: Optional[str], backbone: str, seed: int = 0) -> Composer:
    """The trained model folder, or an untrained Composer over `backbone` (seeded, with a warning)."""
    if model:
        return Composer.from_pretrained(model)
    torch.manual_seed(seed)  # the same random weights on every run, so results repeat
    warnings.warn(f"no --model given: using an UNTRAINED Composer.from_clip({backbone!r}); "
                  "its rankings are meaningless (train one with examples/train_from_scratch.sh)", stacklevel=2)
    return Composer.from_clip(backbone)


def gallery_files(images: Path) -> Tuple[List[Path], List[str]]:
    """Image paths under a folder and their ids (posix paths relative to it)."""
    paths = list_images(images)
    if not paths:
        raise FileNotFoundError(f"no images found under {images}")
    return paths, [p.relative_to(images).as_posix() for p in paths]


def embed_in_memory(composer: Composer, paths: Sequence[Path], ids: Sequence[str], batch_size: int,
                    progress: bool) -> Tuple[torch.Tensor, List[str]]:
    """Embeddings [N, D] of the loadable images and their ids (unreadable files are skipped with a warning)."""
    rows, kept = [], []
    for positions, images in iter_image_batches(list(paths), None, batch_size, progress=progress, desc="embedding"):
        rows.append(composer.encode_images(images))
        kept.extend(ids[p] for p in positions.tolist())
    if not rows:
        raise RuntimeError("no gallery image could be loaded")
    return torch.cat(rows), kept


def embed_into_index(composer: Composer, model: str, paths: Sequence[Path], ids: Sequence[str], folder: Path,
                     batch_size: int, progress: bool) -> EmbeddingIndex:
    """Open (or create) an on-disk index keyed by this model (as `zscir index` keys it) and add the images it lacks."""
    key = model_key_of(composer, model)
    index = EmbeddingIndex.open(folder, model_key=key) if (folder / INDEX_META).is_file() else None
    todo = [i for i, item in enumerate(ids) if index is None or item not in index]
    print(f"index {folder}: {len(ids) - len(todo)} of {len(ids)} images already embedded, {len(todo)} to add")
    if todo:
        emb, kept = embed_in_memory(composer, [paths[i] for i in todo], [ids[i] for i in todo], batch_size, progress)
        if index is None:
            index = EmbeddingIndex.create(folder, int(emb.shape[1]), key)
        index.add(kept, emb)
    if index is None:
        raise RuntimeError(f"nothing to index in {folder}")
    return index


def search(composer: Composer, reference: Path, text: str, gallery: Union[EmbeddingIndex, Tuple[torch.Tensor, List[str]]],
           k: int, exclude: Optional[str]) -> List[Hit]:
    """Top-k (id, score) of one composed query; `exclude` (the reference's own id) is never returned."""
    query = composer.encode_query([load_image(reference)], [text])
    if isinstance(gallery, EmbeddingIndex):
        banned = [[exclude]] if exclude is not None and exclude in gallery else None
        return gallery.search(query, k, exclude_ids=banned)[0]
    emb, ids = gallery
    banned_rows = [[ids.index(exclude)]] if exclude in ids else None
    scores, rows = exact_topk(query, emb, k, exclude=banned_rows)
    return [(ids[r], float(s)) for s, r in zip(scores[0].tolist(), rows[0].tolist()) if r >= 0]


def plot_grid(reference: Path, text: str, hits: Sequence[Hit], images: Path, out: Path,
              targets: Sequence[str] = ()) -> None:
    """Save a PNG: the reference with its text, then the ranked results (correct ones framed in green)."""
    from zscir.viz import GridRow, save_retrieval_grid

    results = [(load_image(images / item), f"{score:.3f}", item in targets) for item, score in hits]
    save_retrieval_grid(out, [GridRow(load_image(reference), text, results)])


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the quickstart."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="trained model folder (Composer.save_pretrained) or Hub repo id; default: "
                   "untrained tiny CLIP (--tiny: a tiny model trained on the shapes world)")
    p.add_argument("--backbone", default="zscir-tiny", help="open_clip model for the untrained fallback")
    p.add_argument("--images", type=Path, help="folder of gallery images (searched recursively)")
    p.add_argument("--reference", type=Path, help="reference image (default: the first gallery image)")
    p.add_argument("--text", help="modification text, e.g. 'make it red'")
    p.add_argument("-k", "--top-k", type=int, default=5, help="number of results")
    p.add_argument("--index", type=Path, help="keep the gallery embeddings in this index folder (created if missing)")
    p.add_argument("--keep-reference", action="store_true", help="allow the reference image itself among the results")
    p.add_argument("--out", type=Path, default=Path("grid.png"), help="PNG grid of the query and its results")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="seed of the untrained fallback model and of --tiny data")
    p.add_argument("--tiny", action="store_true", help="offline demo: write a shapes-world folder, train a tiny model "
                   "and search the folder")
    p.add_argument("--workdir", type=Path, help="--tiny: where to write the images and the model (default: a "
                   "temporary folder)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def run(args: argparse.Namespace, workdir: Optional[Path]) -> int:
    """Compose, search, print and plot."""
    targets: List[str] = []
    if args.tiny:
        query = write_tiny_world(workdir, seed=args.seed)
        args.images, args.reference = query.images, args.reference or query.reference
        args.text, targets = args.text or query.text, query.targets
        print(f"tiny shapes world written to {workdir}")
        if not args.model:
            args.model = str(train_tiny_model(workdir / "model", seed=args.seed, progress=not args.no_progress))
            print(f"tiny model (tiny CLIP + Stage I + Stage II): {args.model}")
    if args.images is None or args.text is None:
        raise ValueError("give --images DIR and --text TEXT (or --tiny)")
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    paths, ids = gallery_files(args.images)
    reference = args.reference or paths[0]
    if not reference.is_file():
        raise FileNotFoundError(f"reference image not found: {reference}")
    composer = load_composer(args.model, args.backbone, args.seed)  # after the cheap checks: loading takes a while
    try:
        ref_id: Optional[str] = reference.resolve().relative_to(args.images.resolve()).as_posix()
    except ValueError:  # the reference lives outside the gallery folder
        ref_id = None
    progress = not args.no_progress
    if args.index:
        gallery: Union[EmbeddingIndex, Tuple[torch.Tensor, List[str]]] = embed_into_index(
            composer, args.model or args.backbone, paths, ids, args.index, args.batch_size, progress)
    else:
        gallery = embed_in_memory(composer, paths, ids, args.batch_size, progress)
    hits = search(composer, reference, args.text, gallery, args.top_k, None if args.keep_reference else ref_id)
    print(f"query: {reference} + {args.text!r}")
    print(f"{'rank':>4}  {'score':>7}  id")
    for rank, (item, score) in enumerate(hits, start=1):
        print(f"{rank:>4}  {score:7.4f}  {item}{'   <- target' if item in targets else ''}")
    if targets:
        found = [r for r, (item, _) in enumerate(hits, start=1) if item in targets]
        print(f"target rank: {found[0] if found else f'not in the top {args.top_k}'}")
    plot_grid(reference, args.text, hits, args.images, args.out, targets)
    print(f"grid: {args.out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; user errors print one line and return 1."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.tiny and args.workdir is None:
            with tempfile.TemporaryDirectory(prefix="zscir-quickstart-") as tmp:
                return run(args, Path(tmp))
        if args.tiny:
            args.workdir.mkdir(parents=True, exist_ok=True)
        return run(args, args.workdir)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        print(f"quickstart: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
