"""The generic composed-image-retrieval folder format.

The folder holds::

    queries.jsonl   one JSON object per line:
                    {"id": "q1", "reference": "imgs/a.png", "modification": "make it red",
                     "targets": ["imgs/b.png"], "kind": "color"}        # kind is optional
    gallery.txt     optional; one relative image path per line (default: every
                    reference and target image, sorted)
    <images>        at the relative paths named above

Image ids are the normalised relative paths.  ``queries.jsonl`` may also live in
``<root>/<split>/``.  Unknown keys in a query line are ignored, so exporters can
carry extra information.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..schema import (AnnotationError, CIRQuery, CIRSplit, FileChecker, ImageId, PathLike, ProblemLog,
                      relative_image_path)

__all__ = ["load_generic", "write_generic"]


def _find_generic_file(root: Path, split: str) -> Path:
    for candidate in (root / "queries.jsonl", root / split / "queries.jsonl"):
        if candidate.is_file():
            return candidate
    raise AnnotationError(
        f"generic CIR folder {root}",
        [f"no queries.jsonl found (looked for {root / 'queries.jsonl'} and {root / split / 'queries.jsonl'})"],
    )


def load_generic(root: PathLike, split: str = "val", exclude_reference: bool = True) -> CIRSplit:
    """Load a generic CIR folder (``queries.jsonl`` + images + optional ``gallery.txt``).

    With `exclude_reference` (default) a query's reference image is removed from
    its ranking unless it is also one of its targets.
    """
    root = Path(root)
    if not root.is_dir():
        raise AnnotationError(f"generic CIR folder {root}", ["folder not found"])
    queries_file = _find_generic_file(root, split)
    base = queries_file.parent
    log = ProblemLog()
    records: List[Tuple[str, Dict[str, Any]]] = []
    first_line_of: Dict[str, int] = {}
    with queries_file.open("r", encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{queries_file}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                log.add(f"{where}: invalid JSON ({err.msg} at column {err.colno})")
                continue
            if not isinstance(row, dict):
                log.add(f"{where}: expected a JSON object, got {type(row).__name__}")
                continue
            ok = True
            for required in ("id", "reference", "modification", "targets"):
                if required not in row:
                    log.add(f"{where}: missing field {required!r}")
                    ok = False
            if not ok:
                continue
            raw_id = row["id"]
            if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or (isinstance(raw_id, str) and not raw_id.strip()):
                log.add(f"{where}: field 'id' must be a non-empty string or an integer, got {raw_id!r}")
                continue
            query_id = str(raw_id)
            if query_id in first_line_of:
                log.add(f"{where}: duplicate id {query_id!r} (first used on line {first_line_of[query_id]})")
                continue
            first_line_of[query_id] = line_no
            reference = relative_image_path(row["reference"], where, "reference", log)
            text = row["modification"]
            if not isinstance(text, str) or not text.strip():
                log.add(f"{where}: field 'modification' must be a non-empty string, got {text!r}")
                ok = False
            targets_raw = row["targets"]
            targets: List[str] = []
            if not isinstance(targets_raw, list) or not targets_raw:
                log.add(f"{where}: field 'targets' must be a non-empty list of relative paths, got {targets_raw!r}")
                ok = False
            else:
                for t in targets_raw:
                    norm = relative_image_path(t, where, "targets", log)
                    if norm is None:
                        ok = False
                    elif norm not in targets:  # a target listed twice is still one ground truth
                        targets.append(norm)
            kind = row.get("kind")
            if kind is not None and (not isinstance(kind, str) or not kind.strip()):
                log.add(f"{where}: optional field 'kind' must be a non-empty string, got {kind!r}")
                ok = False
            if reference is None or not ok:
                continue
            records.append((where, {"id": query_id, "reference": reference, "text": text, "targets": targets, "kind": kind}))

    gallery_file = base / "gallery.txt"
    gallery: List[str] = []
    if gallery_file.is_file():
        first_gallery_line: Dict[str, int] = {}
        for line_no, line in enumerate(gallery_file.read_text(encoding="utf-8").splitlines(), start=1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            where = f"{gallery_file}:{line_no}"
            norm = relative_image_path(entry, where, "path", log)
            if norm is None:
                continue
            if norm in first_gallery_line:
                log.add(f"{where}: {norm!r} is listed twice (first on line {first_gallery_line[norm]})")
                continue
            first_gallery_line[norm] = line_no
            gallery.append(norm)
        if not gallery:
            log.add(f"{gallery_file}: lists no images (the gallery would be empty)")
        gallery_set = set(gallery)
        for where, rec in records:
            for t in rec["targets"]:
                if t not in gallery_set:
                    log.add(f"{where}: target {t!r} is not listed in {gallery_file.name}")
    else:
        gallery = sorted({rec["reference"] for _, rec in records} | {t for _, rec in records for t in rec["targets"]})
    if not records and not log:
        log.add(f"{queries_file}: contains no queries")
    log.raise_if_any(f"generic CIR folder {root}")

    queries = [
        CIRQuery(
            query_id=rec["id"],
            reference=rec["reference"],
            texts=(rec["text"],),
            targets=tuple(rec["targets"]),
            kind=rec["kind"],
            source=where,
        )
        for where, rec in records
    ]
    all_ids = set(gallery) | {q.reference for q in queries}
    image_paths: Dict[ImageId, Path] = {i: base / i for i in sorted(all_ids)}
    checker = FileChecker()
    missing = {i: p for i, p in image_paths.items() if not checker.exists(p)}
    return CIRSplit(
        dataset="generic",
        split=split,
        root=base,
        queries=queries,
        galleries={"all": gallery},
        image_paths=image_paths,
        missing=missing,
        has_targets=True,
        exclude_reference=exclude_reference,
        info={"queries_file": str(queries_file), "gallery_file": str(gallery_file) if gallery_file.is_file() else None},
    )


def write_generic(folder: PathLike, queries: Iterable[Mapping[str, Any]], gallery: Optional[Sequence[str]] = None) -> Path:
    """Write ``queries.jsonl`` (and ``gallery.txt`` if given) into `folder` atomically; returns the queries file."""
    from ...checkpoint import atomic_write_text

    folder = Path(folder)
    lines = []
    for index, row in enumerate(queries):
        for required in ("id", "reference", "modification", "targets"):
            if required not in row:
                raise ValueError(f"write_generic: query #{index} lacks field {required!r}")
        lines.append(json.dumps(dict(row), ensure_ascii=False, sort_keys=True))
    path = folder / "queries.jsonl"
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    if gallery is not None:
        atomic_write_text(folder / "gallery.txt", "".join(f"{p}\n" for p in gallery))
    return path
