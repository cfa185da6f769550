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

The same queries may come from a data set instead of a folder (any source of
:mod:`zscir.data.sources`: a ``save_to_disk`` folder, a ``.parquet`` file, a Hub id;
`split` picks the split): one row per query with the fields above (``targets`` a list
or one path; ``id`` optional, default the row number), renamed from other column
names with `columns`. Its image paths are relative to `image_root` (default: the data
set's folder, or the working directory for a Hub id); the gallery is every reference
and target.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..schema import (AnnotationError, CIRQuery, CIRSplit, FileChecker, ImageId, PathLike, ProblemLog,
                      relative_image_path)
from ..sources import is_dataset_folder, is_dataset_source, load_dataset_source, map_columns

__all__ = ["GENERIC_FIELDS", "load_generic", "write_generic"]

#: Fields of a generic query row (``--columns`` maps data set columns onto them).
GENERIC_FIELDS = ("id", "reference", "modification", "targets", "kind")


def _find_generic_file(root: Path, split: str) -> Path:
    for candidate in (root / "queries.jsonl", root / split / "queries.jsonl"):
        if candidate.is_file():
            return candidate
    raise AnnotationError(
        f"generic CIR folder {root}",
        [f"no queries.jsonl found (looked for {root / 'queries.jsonl'} and {root / split / 'queries.jsonl'})"],
    )


def _parse_rows(rows: Iterable[Tuple[str, Any]], log: ProblemLog, id_required: bool = True
                ) -> List[Tuple[str, Dict[str, Any]]]:
    """Checked query records from raw rows (where, object); every bad row is recorded in `log`."""
    records: List[Tuple[str, Dict[str, Any]]] = []
    first_line_of: Dict[str, str] = {}
    for index, (where, row) in enumerate(rows):
        if not isinstance(row, dict):
            log.add(f"{where}: expected a JSON object, got {type(row).__name__}")
            continue
        ok = True
        for required in ("id", "reference", "modification", "targets") if id_required else \
                ("reference", "modification", "targets"):
            if required not in row:
                log.add(f"{where}: missing field {required!r}")
                ok = False
        if not ok:
            continue
        raw_id = row.get("id", index)
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or (isinstance(raw_id, str) and not raw_id.strip()):
            log.add(f"{where}: field 'id' must be a non-empty string or an integer, got {raw_id!r}")
            continue
        query_id = str(raw_id)
        if query_id in first_line_of:
            log.add(f"{where}: duplicate id {query_id!r} (first used {first_line_of[query_id]})")
            continue
        line = re.search(r":(\d+)$", where)
        first_line_of[query_id] = f"on line {line.group(1)}" if line else f"at {where}"
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
    return records


def _file_rows(queries_file: Path, log: ProblemLog) -> Iterable[Tuple[str, Any]]:
    """(where, parsed object) of every non-blank line of ``queries.jsonl``; invalid JSON is recorded in `log`."""
    with queries_file.open("r", encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{queries_file}:{line_no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                log.add(f"{where}: invalid JSON ({err.msg} at column {err.colno})")


def _dataset_rows(ds: Any, label: str) -> Iterable[Tuple[str, Any]]:
    """(where, row) of a data set's rows; a single target becomes a one-item list, images must be paths."""
    for index, row in enumerate(ds):
        row = dict(row)
        if isinstance(row.get("targets"), str):
            row["targets"] = [row["targets"]]
        for name in ("reference", "targets"):
            values = row.get(name) if isinstance(row.get(name), list) else [row.get(name)]
            if any(v is not None and not isinstance(v, str) for v in values):
                raise AnnotationError(label, [f"column {name!r} holds images, not paths: the generic evaluation "
                                              "reads gallery images from files (give paths relative to --image-root)"])
        yield f"{label} row {index + 1}", row


def _split_of(records: List[Tuple[str, Dict[str, Any]]], log: ProblemLog, gallery: List[str], split: str,
              base: Path, what: str, source: str, exclude_reference: bool, info: Dict[str, Any]) -> CIRSplit:
    """The CIRSplit of checked records over `gallery` (every reference and target when empty); `what` names it."""
    if not records and not log:
        log.add(f"{source}: contains no queries")
    log.raise_if_any(what)
    if not gallery:
        gallery = sorted({rec["reference"] for _, rec in records} | {t for _, rec in records for t in rec["targets"]})
    queries = [
        CIRQuery(query_id=rec["id"], reference=rec["reference"], texts=(rec["text"],), targets=tuple(rec["targets"]),
                 kind=rec["kind"], source=where)
        for where, rec in records
    ]
    all_ids = set(gallery) | {q.reference for q in queries}
    image_paths: Dict[ImageId, Path] = {i: base / i for i in sorted(all_ids)}
    checker = FileChecker()
    missing = {i: p for i, p in image_paths.items() if not checker.exists(p)}
    return CIRSplit(dataset="generic", split=split, root=base, queries=queries, galleries={"all": gallery},
                    image_paths=image_paths, missing=missing, has_targets=True, exclude_reference=exclude_reference,
                    info=info)


def load_generic(root: PathLike, split: str = "val", exclude_reference: bool = True,
                 columns: Optional[Mapping[str, str]] = None, image_root: Optional[PathLike] = None) -> CIRSplit:
    """Load a generic CIR folder (``queries.jsonl`` + images + optional ``gallery.txt``) or data set.

    With `exclude_reference` (default) a query's reference image is removed from
    its ranking unless it is also one of its targets. A data set source (see the
    module doc) takes `split`, `columns` ({field: column}) and `image_root`.
    """
    if is_dataset_source(root) and not (Path(root) / "queries.jsonl").is_file():
        return _load_generic_dataset(root, split, exclude_reference, columns, image_root)
    if columns:
        raise ValueError("--columns applies to a data set of queries; a generic folder's queries.jsonl uses the "
                         "field names of the format")
    root = Path(root)
    if not root.is_dir():
        raise AnnotationError(f"generic CIR folder {root}", ["folder not found"])
    queries_file = _find_generic_file(root, split)
    base = queries_file.parent
    log = ProblemLog()
    records = _parse_rows(_file_rows(queries_file, log), log)

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
    info = {"queries_file": str(queries_file), "gallery_file": str(gallery_file) if gallery_file.is_file() else None}
    return _split_of(records, log, gallery, split, base, f"generic CIR folder {root}", str(queries_file),
                     exclude_reference, info)


def _load_generic_dataset(source: Any, split: str, exclude_reference: bool, columns: Optional[Mapping[str, str]],
                          image_root: Optional[PathLike]) -> CIRSplit:
    """Queries from a data set (one row per query) over images under `image_root`."""
    ds, label = load_dataset_source(source, split, what="generic CIR data set")
    ds = map_columns(ds, dict(columns or {}), label, GENERIC_FIELDS, required=("reference", "modification", "targets"))
    if image_root is not None:
        base = Path(image_root)
    elif isinstance(source, (str, os.PathLike)) and Path(source).exists():
        base = Path(source) if is_dataset_folder(source) else Path(source).parent
    else:
        base = Path.cwd()
    log = ProblemLog()
    records = _parse_rows(_dataset_rows(ds, label), log, id_required=False)
    return _split_of(records, log, [], split, base, f"generic CIR data set {label}", label, exclude_reference,
                     {"queries_file": label, "gallery_file": None})


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
