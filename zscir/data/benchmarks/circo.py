"""CIRCO in its official layout (val and test splits).

Layout (miccunifi/CIRCO plus the COCO 2017 unlabeled images)::

    <root>/annotations/{val,test}.json
        [{"id": 0, "reference_img_id": 271520, "relative_caption": "...", "shared_concept": "...",
          "target_img_id": 355099, "gt_img_ids": [355099, ...],
          "semantic_aspects": ["cardinality", ...]}, ...]            (test: no targets, no aspects)
    <root>/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json
        {"images": [{"id": 123, "file_name": "000000000123.jpg", ...}, ...]}
    <root>/COCO2017_unlabeled/unlabeled2017/<file_name>

Protocol: the gallery is every image of the COCO list (the reference is not
removed, as in the official SEARLE evaluation); mAP@{5,10,25,50} over all
``gt_img_ids`` and Recall@{5,10,25,50} on ``target_img_id``.  The query text is
the relative caption; ``use_shared_concept=True`` prepends the shared concept
("<shared concept> <relative caption>").

Each val query carries its ``semantic_aspects`` (:data:`CIRCO_SEMANTIC_ASPECTS`);
the official evaluation (miccunifi/CIRCO ``src/evaluation.py``) also reports
mAP@10 per aspect: the mean AP@10 over the queries that have that aspect.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

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

__all__ = ["CIRCO_SPLITS", "CIRCO_SEMANTIC_ASPECTS", "COCO_INFO_PATH", "COCO_IMAGE_DIR", "circo_text", "load_circo"]

CIRCO_SPLITS: Tuple[str, ...] = ("val", "test")
COCO_INFO_PATH = Path("COCO2017_unlabeled") / "annotations" / "image_info_unlabeled2017.json"
COCO_IMAGE_DIR = Path("COCO2017_unlabeled") / "unlabeled2017"
# The semantic aspects in the order the official evaluation script lists (and reports) them.
CIRCO_SEMANTIC_ASPECTS: Tuple[str, ...] = (
    "cardinality", "addition", "negation", "direct_addressing", "compare_change", "comparative_statement",
    "statement_with_conjunction", "spatial_relations_background", "viewpoint",
)


def circo_text(relative_caption: str, shared_concept: str, use_shared_concept: bool = False) -> str:
    """The query text of a CIRCO query: the relative caption, optionally preceded by the shared concept."""
    if use_shared_concept and shared_concept.strip():
        return f"{shared_concept.strip()} {relative_caption}"
    return relative_caption


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_circo(root: PathLike, split: str = "val", use_shared_concept: bool = False) -> CIRSplit:
    """Load CIRCO `split`; image ids are COCO ints and query ids the annotation ids as strings."""
    root = Path(root)
    if split not in CIRCO_SPLITS:
        raise ValueError(f"CIRCO split must be one of {CIRCO_SPLITS}, got {split!r}")
    what = f"CIRCO {split} split at {root}"
    if not root.is_dir():
        raise AnnotationError(what, [f"{root}: folder not found"])
    log = ProblemLog()

    info_file = root / COCO_INFO_PATH
    info = read_json_file(info_file, log)
    image_dir = root / COCO_IMAGE_DIR
    gallery: List[ImageId] = []
    image_paths: Dict[ImageId, Path] = {}
    if info is not None:
        images = info.get("images") if isinstance(info, dict) else None
        if not isinstance(images, list):
            log.add(f"{info_file}: expected a COCO object with an 'images' list")
        else:
            for index, entry in enumerate(images):
                where = f"{info_file} images[{index}]"
                if not isinstance(entry, dict):
                    log.add(f"{where}: expected an object, got {type(entry).__name__}")
                    continue
                image_id, file_name = entry.get("id"), entry.get("file_name")
                if not _is_int(image_id):
                    log.add(f"{where}: field 'id' must be an integer, got {image_id!r}")
                    continue
                if not isinstance(file_name, str) or not file_name or "/" in file_name or "\\" in file_name:
                    log.add(f"{where}: field 'file_name' must be a plain file name, got {file_name!r}")
                    continue
                if image_id in image_paths:
                    log.add(f"{where}: image id {image_id} is listed twice")
                    continue
                gallery.append(image_id)
                image_paths[image_id] = image_dir / file_name
            if not gallery:
                log.add(f"{info_file}: lists no images (the gallery would be empty)")
    known = image_paths.keys()

    ann_file = root / "annotations" / f"{split}.json"
    rows = read_json_file(ann_file, log)
    if rows is not None and not isinstance(rows, list):
        log.add(f"{ann_file}: expected a JSON list of queries, got {type(rows).__name__}")
        rows = None
    if rows is not None and not rows:
        log.add(f"{ann_file}: contains no queries")
    labelled = split == "val"
    queries: List[CIRQuery] = []
    first_index_of: Dict[int, int] = {}
    for index, row in enumerate(rows or []):
        where = f"{ann_file}[{index}]"
        if not isinstance(row, dict):
            log.add(f"{where}: expected a JSON object, got {type(row).__name__}")
            continue
        ok = True
        query_id = row.get("id")
        if not _is_int(query_id):
            log.add(f"{where}: field 'id' must be an integer, got {query_id!r}")
            ok = False
        elif query_id in first_index_of:
            log.add(f"{where}: duplicate id {query_id} (first at index {first_index_of[query_id]})")
            ok = False
        else:
            first_index_of[query_id] = index
        reference = row.get("reference_img_id")
        if not _is_int(reference):
            log.add(f"{where}: field 'reference_img_id' must be an integer, got {reference!r}")
            ok = False
        elif info is not None and reference not in known:
            log.add(f"{where}: reference_img_id {reference} is not in {info_file.name}")
            ok = False
        caption, concept = row.get("relative_caption"), row.get("shared_concept", "")
        if not isinstance(caption, str) or not caption.strip():
            log.add(f"{where}: field 'relative_caption' must be a non-empty string, got {caption!r}")
            ok = False
        if not isinstance(concept, str):
            log.add(f"{where}: field 'shared_concept' must be a string, got {concept!r}")
            ok = False
        targets: Tuple[int, ...] = ()
        if labelled:
            target, gts = row.get("target_img_id"), row.get("gt_img_ids")
            if not _is_int(target):
                log.add(f"{where}: field 'target_img_id' must be an integer, got {target!r}")
                ok = False
            if not isinstance(gts, list) or not gts or not all(_is_int(g) for g in gts):
                log.add(f"{where}: field 'gt_img_ids' must be a non-empty list of integers, got {gts!r}")
                ok = False
            elif _is_int(target):
                if target not in gts:
                    log.add(f"{where}: target_img_id {target} is not among gt_img_ids {gts}")
                    ok = False
                absent = [g for g in gts if g not in known] if info is not None else []
                if absent:
                    log.add(f"{where}: gt_img_ids {absent} are not in {info_file.name}")
                    ok = False
                # Target first (Recall@K counts it alone), then the other ground truths without repeats.
                targets = tuple([target] + [g for g in dict.fromkeys(gts) if g != target])
        aspects = row.get("semantic_aspects", [])
        if not isinstance(aspects, list) or not all(isinstance(a, str) and a for a in aspects):
            log.add(f"{where}: field 'semantic_aspects' must be a list of aspect names, got {aspects!r}")
            ok = False
        if not ok:
            continue
        queries.append(
            CIRQuery(
                query_id=str(query_id),
                reference=reference,
                texts=(circo_text(caption, concept, use_shared_concept),),
                targets=targets,
                source=where,
                aspects=tuple(aspects),
            )
        )
    log.raise_if_any(what)

    checker = FileChecker()
    missing = {i: p for i, p in image_paths.items() if not checker.exists(p)}
    return CIRSplit(
        dataset="circo",
        split=split,
        root=root,
        queries=queries,
        galleries={"all": gallery},
        image_paths=image_paths,
        missing=missing,
        has_targets=labelled,
        exclude_reference=False,
        info={"use_shared_concept": use_shared_concept},
    )
