"""FashionIQ in its official layout (val and test splits).

Layout (as distributed by the FashionIQ authors)::

    <root>/captions/cap.{dress,shirt,toptee}.{val,test}.json
        [{"target": "B00...", "candidate": "B00...", "captions": ["c1", "c2"]}, ...]
        (test files have no "target")
    <root>/image_splits/split.{dress,shirt,toptee}.{val,test}.json   ["B00...", ...]
    <root>/images/<name>.png   (or .jpg / .jpeg)

Protocol: each category is ranked against its own split gallery (the reference is
not removed), Recall@10 and Recall@50 per category and their mean over
categories.  The query text follows SEARLE / LinCIR: both caption orders
"c1 and c2" and "c2 and c1" (each caption stripped of the characters ``.?, `` at
its ends) are encoded and the two normalised query features averaged.
``caption_order="single"`` gives the single "c1 and c2" query (Pic2Word style).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from ..schema import (
    AnnotationError,
    CIRQuery,
    CIRSplit,
    FileChecker,
    ImageId,
    PathLike,
    ProblemLog,
    read_json_file,
)

__all__ = ["FASHIONIQ_CATEGORIES", "CAPTION_ORDERS", "fashioniq_texts", "load_fashioniq"]

FASHIONIQ_CATEGORIES: Tuple[str, ...] = ("dress", "shirt", "toptee")
CAPTION_ORDERS: Tuple[str, ...] = ("both", "single")
IMAGE_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg")
SPLITS: Tuple[str, ...] = ("val", "test")


def _clean(caption: str) -> str:
    # SEARLE strips these characters from both ends of each caption before joining.
    return caption.strip(".?, ")


def fashioniq_texts(captions: Sequence[str], caption_order: str = "both") -> Tuple[str, ...]:
    """Query text(s) for a FashionIQ caption pair: both orders ("both") or only "c1 and c2" ("single")."""
    if len(captions) != 2:
        raise ValueError(f"a FashionIQ query has exactly 2 captions, got {len(captions)}")
    first, second = _clean(captions[0]), _clean(captions[1])
    if caption_order == "both":
        return (f"{first} and {second}", f"{second} and {first}")
    if caption_order == "single":
        return (f"{first} and {second}",)
    raise ValueError(f"caption_order must be one of {CAPTION_ORDERS}, got {caption_order!r}")


def load_fashioniq(
    root: PathLike,
    split: str = "val",
    categories: Sequence[str] = FASHIONIQ_CATEGORIES,
    caption_order: str = "both",
) -> CIRSplit:
    """Load FashionIQ `split` for `categories`; one gallery per category, queries ids "<category>/<index>"."""
    root = Path(root)
    what = f"FashionIQ {split} split at {root}"
    if split not in SPLITS:
        raise ValueError(f"FashionIQ split must be one of {SPLITS}, got {split!r}")
    if caption_order not in CAPTION_ORDERS:
        raise ValueError(f"caption_order must be one of {CAPTION_ORDERS}, got {caption_order!r}")
    unknown = [c for c in categories if c not in FASHIONIQ_CATEGORIES]
    if unknown or not categories:
        raise ValueError(f"FashionIQ categories must be a non-empty subset of {FASHIONIQ_CATEGORIES}, got {list(categories)}")
    if not root.is_dir():
        raise AnnotationError(what, [f"{root}: folder not found"])

    log = ProblemLog()
    galleries: Dict[str, List[ImageId]] = {}
    queries: List[CIRQuery] = []
    labelled_counts = {"with": 0, "without": 0}
    for category in categories:
        split_file = root / "image_splits" / f"split.{category}.{split}.json"
        names = read_json_file(split_file, log)
        gallery: List[ImageId] = []
        if names is not None:
            if not isinstance(names, list):
                log.add(f"{split_file}: expected a JSON list of image names, got {type(names).__name__}")
            else:
                seen = set()
                for index, name in enumerate(names):
                    if not isinstance(name, str) or not name.strip():
                        log.add(f"{split_file}[{index}]: expected a non-empty image name, got {name!r}")
                    elif name in seen:
                        log.add(f"{split_file}[{index}]: image {name!r} is listed twice")
                    else:
                        seen.add(name)
                        gallery.append(name)
                if not gallery:
                    log.add(f"{split_file}: the gallery is empty")
        galleries[category] = gallery
        in_gallery = set(gallery)

        caption_file = root / "captions" / f"cap.{category}.{split}.json"
        rows = read_json_file(caption_file, log)
        if rows is None:
            continue
        if not isinstance(rows, list):
            log.add(f"{caption_file}: expected a JSON list of queries, got {type(rows).__name__}")
            continue
        for index, row in enumerate(rows):
            where = f"{caption_file}[{index}]"
            if not isinstance(row, dict):
                log.add(f"{where}: expected a JSON object, got {type(row).__name__}")
                continue
            candidate = row.get("candidate")
            captions = row.get("captions")
            target = row.get("target")
            ok = True
            if not isinstance(candidate, str) or not candidate:
                log.add(f"{where}: field 'candidate' must be an image name, got {candidate!r}")
                ok = False
            elif names is not None and candidate not in in_gallery:
                log.add(f"{where}: candidate {candidate!r} is not in {split_file.name}")
                ok = False
            if not isinstance(captions, list) or len(captions) != 2 or not all(isinstance(c, str) for c in captions):
                log.add(f"{where}: field 'captions' must be a list of 2 strings, got {captions!r}")
                ok = False
            if "target" in row:
                labelled_counts["with"] += 1
                if not isinstance(target, str) or not target:
                    log.add(f"{where}: field 'target' must be an image name, got {target!r}")
                    ok = False
                elif names is not None and target not in in_gallery:
                    log.add(f"{where}: target {target!r} is not in {split_file.name}")
                    ok = False
            else:
                labelled_counts["without"] += 1
                if split == "val":
                    log.add(f"{where}: missing field 'target' (required on the val split)")
                    ok = False
            if not ok:
                continue
            queries.append(
                CIRQuery(
                    query_id=f"{category}/{index}",
                    reference=candidate,
                    texts=fashioniq_texts(captions, caption_order),
                    targets=(target,) if isinstance(target, str) else (),
                    gallery=category,
                    source=where,
                )
            )
    if labelled_counts["with"] and labelled_counts["without"] and split != "val":
        log.add(f"{split} captions mix queries with and without 'target' ({labelled_counts['with']} with, {labelled_counts['without']} without)")
    log.raise_if_any(what)

    image_dir = root / "images"
    checker = FileChecker()
    image_paths: Dict[ImageId, Path] = {}
    missing: Dict[ImageId, Path] = {}
    for gallery in galleries.values():
        for name in gallery:
            if name in image_paths:
                continue
            found = next((image_dir / f"{name}{ext}" for ext in IMAGE_EXTENSIONS if checker.exists(image_dir / f"{name}{ext}")), None)
            if found is None:
                image_paths[name] = image_dir / f"{name}{IMAGE_EXTENSIONS[0]}"
                missing[name] = image_paths[name]
            else:
                image_paths[name] = found
    has_targets = labelled_counts["with"] > 0
    return CIRSplit(
        dataset="fashioniq",
        split=split,
        root=root,
        queries=queries,
        galleries=galleries,
        image_paths=image_paths,
        missing=missing,
        has_targets=has_targets,
        exclude_reference=False,
        info={"categories": list(categories), "caption_order": caption_order},
    )
