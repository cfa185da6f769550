"""FashionIQ in its official layout (val and test splits).

Layout (as distributed by the FashionIQ authors)::

    <root>/captions/cap.{dress,shirt,toptee}.{val,test}.json
        [{"target": "B00...", "candidate": "B00...", "captions": ["c1", "c2"]}, ...]
        (test files have no "target")
    <root>/image_splits/split.{dress,shirt,toptee}.{val,test}.json   ["B00...", ...]
    <root>/images/<name>.png   (or .jpg / .jpeg)

Protocol: each category is ranked against its own split gallery (the reference is
not removed, as in the official code of CLIP4Cir, SEARLE and Pic2Word), Recall@10
and Recall@50 per category and their mean over categories.

Query text (``caption_order``; each query has two captions c1, c2):

* ``"both"`` (default): SEARLE / LinCIR.  Both orders "c1 and c2" and "c2 and c1",
  each caption stripped of the characters ``.?, `` at its ends (``str.strip('.?, ')``),
  are encoded and the two normalised query features averaged and normalised again
  (SEARLE ``src/validate.py``, ``fiq_generate_val_predictions``).
* ``"c1-and-c2"`` (old name ``"single"``): one text "c1 and c2", captions stripped as
  above.  The order of the FashionIQ start kit (``start_kit/data_loader.py`` joins the
  lower-cased tokens of c1, ``<and>``, c2) and of CLIP4Cir's validation, which also
  applies ``str.capitalize()`` to c1; zscir does not (CLIP's tokenizer lower-cases
  anyway).
* ``"pic2word"``: one text "c2 and c1" with the captions unstripped, as Pic2Word's
  evaluation builds it (google-research/composed_image_retrieval ``src/data.py``,
  ``FashionIQ.return_all``: ``'a photo of * , {} and {}'.format(cap2, cap1)``; the
  prompt around it is the model's business).
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
    relative_image_path,
)

__all__ = ["FASHIONIQ_CATEGORIES", "CAPTION_ORDERS", "CAPTION_ORDER_ALIASES", "canonical_caption_order",
           "fashioniq_texts", "load_fashioniq"]

FASHIONIQ_CATEGORIES: Tuple[str, ...] = ("dress", "shirt", "toptee")
CAPTION_ORDERS: Tuple[str, ...] = ("both", "c1-and-c2", "pic2word")
CAPTION_ORDER_ALIASES: Dict[str, str] = {"single": "c1-and-c2"}  # older spellings still accepted
IMAGE_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg")
SPLITS: Tuple[str, ...] = ("val", "test")


def _clean(caption: str) -> str:
    # SEARLE and CLIP4Cir strip these characters from both ends of each caption before joining.
    return caption.strip(".?, ")


def canonical_caption_order(caption_order: str) -> str:
    """The name in CAPTION_ORDERS for `caption_order` (an old alias maps to its current name)."""
    name = CAPTION_ORDER_ALIASES.get(caption_order, caption_order)
    if name not in CAPTION_ORDERS:
        raise ValueError(f"caption_order must be one of {CAPTION_ORDERS} "
                         f"(or an old alias: {sorted(CAPTION_ORDER_ALIASES)}), got {caption_order!r}")
    return name


def fashioniq_texts(captions: Sequence[str], caption_order: str = "both") -> Tuple[str, ...]:
    """Query text(s) for a FashionIQ caption pair in `caption_order` (see the module docstring)."""
    if len(captions) != 2:
        raise ValueError(f"a FashionIQ query has exactly 2 captions, got {len(captions)}")
    order = canonical_caption_order(caption_order)
    if order == "pic2word":
        return (f"{captions[1]} and {captions[0]}",)
    first, second = _clean(captions[0]), _clean(captions[1])
    if order == "both":
        return (f"{first} and {second}", f"{second} and {first}")
    return (f"{first} and {second}",)


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
    caption_order = canonical_caption_order(caption_order)
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
                    # names become files under <root>/images: the rule of every loader keeps them inside it
                    if relative_image_path(name, f"{split_file}[{index}]", "image name", log) is None:
                        continue
                    if name in seen:
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
