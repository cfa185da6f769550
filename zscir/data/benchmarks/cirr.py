"""CIRR in its official layout (val and test1 splits).

Layout (branch ``cirr_dataset`` of Cuberick-Orion/CIRR plus the NLVR2 images)::

    <root>/captions/cap.rc2.{val,test1}.json
        [{"pairid": 12060, "reference": "dev-244-0-img0", "target_hard": "dev-1028-1-img1",
          "target_soft": {...}, "caption": "...", "img_set": {"id": 36, "members": [6 names], ...}}, ...]
        (test1 has no target_hard / target_soft)
    <root>/image_splits/split.rc2.{val,test1}.json   {"dev-244-0-img0": "./dev/dev-244-0-img0.png", ...}
    <root>/img_raw/{train,dev,test1}/...            the images; the split files' paths are relative to img_raw

Also accepted: annotations under ``<root>/cirr/`` (the CLIP4Cir / SEARLE layout)
and images relative to ``<root>`` itself instead of ``<root>/img_raw``; the image
folder that holds most of the split's files is used.

Protocol: rank the whole split gallery with the reference image removed,
Recall@{1,5,10,50}; Recall_subset@{1,2,3} ranks only the query's ``img_set``
members (reference removed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

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

__all__ = ["CIRR_SPLITS", "load_cirr", "cirr_split_name"]

CIRR_SPLITS: Tuple[str, ...] = ("val", "test1")
GROUP_SIZE = 6
_SAMPLE_FOR_LAYOUT = 32


def cirr_split_name(split: str) -> str:
    """Map a user-facing split name to CIRR's file name ("test" -> "test1")."""
    name = "test1" if split == "test" else split
    if name not in CIRR_SPLITS:
        raise ValueError(f"CIRR split must be 'val' or 'test' (alias 'test1'), got {split!r}")
    return name


def _annotation_dir(root: Path) -> Path:
    for candidate in (root, root / "cirr"):
        if (candidate / "captions").is_dir():
            return candidate
    return root


def _image_base(root: Path, annotations: Path, relpaths: List[str], checker: FileChecker) -> Path:
    """Pick the folder the split's relative paths resolve against: the one where most sample files exist."""
    candidates: List[Path] = []
    for base in (root / "img_raw", root, annotations / "img_raw", annotations):
        if base not in candidates:
            candidates.append(base)
    sample = relpaths[:_SAMPLE_FOR_LAYOUT]
    best, best_hits = candidates[0], -1
    for base in candidates:
        hits = sum(checker.exists(base / rel) for rel in sample)
        if hits > best_hits:
            best, best_hits = base, hits
    return best


def load_cirr(root: PathLike, split: str = "val") -> CIRSplit:
    """Load CIRR `split` ('val' or 'test'/'test1'); query ids are the pair ids as strings."""
    root = Path(root)
    split = cirr_split_name(split)
    what = f"CIRR {split} split at {root}"
    if not root.is_dir():
        raise AnnotationError(what, [f"{root}: folder not found"])
    annotations = _annotation_dir(root)
    log = ProblemLog()

    split_file = annotations / "image_splits" / f"split.rc2.{split}.json"
    name_to_rel = read_json_file(split_file, log)
    gallery: List[ImageId] = []
    relpaths: List[str] = []
    if name_to_rel is not None:
        if not isinstance(name_to_rel, dict):
            log.add(f"{split_file}: expected a JSON object mapping image names to relative paths")
            name_to_rel = None
        else:
            for name, rel in name_to_rel.items():
                if relative_image_path(rel, str(split_file), f"entry {name!r}", log) is None:
                    continue
                gallery.append(name)
                relpaths.append(rel)
            if not gallery:
                log.add(f"{split_file}: the gallery is empty")
    known = set(gallery)

    caption_file = annotations / "captions" / f"cap.rc2.{split}.json"
    rows = read_json_file(caption_file, log)
    queries: List[CIRQuery] = []
    first_index_of: Dict[int, int] = {}
    labelled = split == "val"
    if rows is not None and not isinstance(rows, list):
        log.add(f"{caption_file}: expected a JSON list of queries, got {type(rows).__name__}")
        rows = None
    for index, row in enumerate(rows or []):
        where = f"{caption_file}[{index}]"
        if not isinstance(row, dict):
            log.add(f"{where}: expected a JSON object, got {type(row).__name__}")
            continue
        ok = True

        def need_name(field_name: str, value: object) -> bool:
            if not isinstance(value, str) or not value:
                log.add(f"{where}: field {field_name!r} must be an image name, got {value!r}")
                return False
            if name_to_rel is not None and value not in known:
                log.add(f"{where}: {field_name} {value!r} is not in {split_file.name}")
                return False
            return True

        pairid = row.get("pairid")
        if isinstance(pairid, bool) or not isinstance(pairid, int):
            log.add(f"{where}: field 'pairid' must be an integer, got {pairid!r}")
            ok = False
        elif pairid in first_index_of:
            log.add(f"{where}: duplicate pairid {pairid} (first at index {first_index_of[pairid]})")
            ok = False
        else:
            first_index_of[pairid] = index
        reference = row.get("reference")
        ok &= need_name("reference", reference)
        caption = row.get("caption")
        if not isinstance(caption, str):
            log.add(f"{where}: field 'caption' must be a string, got {caption!r}")
            ok = False
        img_set = row.get("img_set")
        members: Optional[List[str]] = None
        if not isinstance(img_set, dict) or not isinstance(img_set.get("members"), list):
            log.add(f"{where}: field 'img_set' must be an object with a 'members' list, got {img_set!r}")
            ok = False
        else:
            members = img_set["members"]
            if len(members) != GROUP_SIZE:
                log.add(f"{where}: img_set.members has {len(members)} images, expected {GROUP_SIZE}")
                ok = False
            if len(set(map(str, members))) != len(members):
                log.add(f"{where}: img_set.members repeats an image: {members}")
                ok = False
            for member in members:
                ok &= need_name("img_set.members", member)
            if isinstance(reference, str) and reference not in members:
                log.add(f"{where}: reference {reference!r} is not among img_set.members")
                ok = False
        target = row.get("target_hard")
        if labelled:
            if "target_hard" not in row:
                log.add(f"{where}: missing field 'target_hard' (required on the val split)")
                ok = False
            elif need_name("target_hard", target):
                if target == reference:
                    log.add(f"{where}: target_hard equals the reference {target!r}")
                    ok = False
                if members is not None and target not in members:
                    log.add(f"{where}: target_hard {target!r} is not among img_set.members")
                    ok = False
            else:
                ok = False
        if not ok:
            continue
        # The subset protocol ranks the group without the reference image.
        subset = tuple(m for m in members if m != reference)  # type: ignore[union-attr]
        queries.append(
            CIRQuery(
                query_id=str(pairid),
                reference=reference,
                texts=(caption,),
                targets=(target,) if labelled else (),
                subset=subset,
                source=where,
            )
        )
    if rows is not None and not rows:
        log.add(f"{caption_file}: contains no queries")
    log.raise_if_any(what)

    checker = FileChecker()
    image_base = _image_base(root, annotations, relpaths, checker)
    image_paths: Dict[ImageId, Path] = {name: image_base / rel for name, rel in zip(gallery, relpaths)}
    missing = {name: path for name, path in image_paths.items() if not checker.exists(path)}
    return CIRSplit(
        dataset="cirr",
        split=split,
        root=root,
        queries=queries,
        galleries={"all": gallery},
        image_paths=image_paths,
        missing=missing,
        has_targets=labelled,
        exclude_reference=True,
        info={"image_base": str(image_base), "annotations": str(annotations)},
    )
