"""Composed-image-retrieval evaluation sets: the shared in-memory form and the generic folder format.

Every benchmark loader (FashionIQ, CIRR, CIRCO, generic) returns a
:class:`CIRSplit`: a list of :class:`CIRQuery` (reference image id, one or more
modification texts, ground-truth ids) plus one or more galleries of image ids and
a map from image id to file.  The evaluator in :mod:`zscir.eval.evaluate` only
ever sees this form.

The *generic* format is a folder::

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
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

ImageId = Union[str, int]
PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "ImageId",
    "AnnotationError",
    "ProblemLog",
    "FileChecker",
    "CIRQuery",
    "CIRSplit",
    "read_json_file",
    "load_generic",
    "write_generic",
]

MAX_PROBLEMS_SHOWN = 40


class AnnotationError(ValueError):
    """Annotation files are missing or malformed; the message lists every problem found."""

    def __init__(self, what: str, problems: Sequence[str]) -> None:
        self.what = what
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:MAX_PROBLEMS_SHOWN])
        more = len(self.problems) - MAX_PROBLEMS_SHOWN
        tail = f"\n  ... and {more} more problem(s)" if more > 0 else ""
        super().__init__(f"{what}: {len(self.problems)} problem(s) found:\n  {shown}{tail}")


class ProblemLog:
    """Collects validation problems so that a loader can report all bad rows at once."""

    def __init__(self) -> None:
        self.problems: List[str] = []

    def add(self, message: str) -> None:
        """Record one problem (it should name the file, the row and the field)."""
        self.problems.append(message)

    def __bool__(self) -> bool:
        return bool(self.problems)

    def raise_if_any(self, what: str) -> None:
        """Raise :class:`AnnotationError` listing every recorded problem, if there are any."""
        if self.problems:
            raise AnnotationError(what, self.problems)


class FileChecker:
    """Answers "does this file exist?" for many files cheaply by listing each folder once."""

    def __init__(self) -> None:
        self._listings: Dict[Path, Set[str]] = {}

    def exists(self, path: Path) -> bool:
        """True if `path` is an existing file (symlinks followed)."""
        parent = path.parent
        names = self._listings.get(parent)
        if names is None:
            names = set()
            try:
                with os.scandir(parent) as entries:
                    for entry in entries:
                        try:
                            if entry.is_file():
                                names.add(entry.name)
                        except OSError:  # a broken entry counts as missing
                            continue
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                pass
            self._listings[parent] = names
        return path.name in names


@dataclass(frozen=True)
class CIRQuery:
    """One composed query: a reference image, modification text(s) and, on labelled splits, ground truths.

    `texts` holds one or more phrasings of the modification; their query
    features are averaged (FashionIQ uses both caption orders).  `targets[0]` is
    the primary target (the one Recall@K counts for CIRCO); all of `targets` are
    ground truths for mAP@K.  `subset` is the CIRR group the Recall_subset protocol
    ranks.  `gallery` names the gallery the query is ranked against.
    """

    query_id: str
    reference: ImageId
    texts: Tuple[str, ...]
    targets: Tuple[ImageId, ...] = ()
    subset: Optional[Tuple[ImageId, ...]] = None
    kind: Optional[str] = None
    gallery: str = "all"
    source: str = ""


@dataclass
class CIRSplit:
    """A loaded evaluation split: queries, galleries (lists of image ids) and where each image lives."""

    dataset: str
    split: str
    root: Path
    queries: List[CIRQuery]
    galleries: Dict[str, List[ImageId]]
    image_paths: Dict[ImageId, Path]
    missing: Dict[ImageId, Path] = field(default_factory=dict)
    has_targets: bool = True
    exclude_reference: bool = False
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_queries(self) -> int:
        """Number of queries in the split."""
        return len(self.queries)

    def validate(self) -> None:
        """Check internal consistency (unique ids, known images, targets inside their gallery)."""
        log = ProblemLog()
        what = f"{self.dataset} {self.split} split at {self.root}"
        if not self.queries:
            log.add("the split has no queries")
        for name, gallery in self.galleries.items():
            if not gallery:
                log.add(f"gallery {name!r} is empty")
            dupes = _duplicates(gallery)
            if dupes:
                log.add(f"gallery {name!r} lists {len(dupes)} image id(s) more than once, e.g. {dupes[:3]}")
            unknown = [i for i in gallery if i not in self.image_paths]
            if unknown:
                log.add(f"gallery {name!r} has {len(unknown)} id(s) with no image path, e.g. {unknown[:3]}")
        members = {name: set(g) for name, g in self.galleries.items()}
        seen: Dict[str, str] = {}
        for q in self.queries:
            where = q.source or f"query {q.query_id!r}"
            if q.query_id in seen:
                log.add(f"{where}: duplicate query id {q.query_id!r} (first at {seen[q.query_id]})")
            else:
                seen[q.query_id] = where
            if q.gallery not in members:
                log.add(f"{where}: unknown gallery {q.gallery!r}; galleries: {sorted(members)}")
                continue
            if q.reference not in self.image_paths:
                log.add(f"{where}: reference {q.reference!r} has no image path")
            if not q.texts or any(not isinstance(t, str) for t in q.texts):
                log.add(f"{where}: needs at least one modification text")
            if self.has_targets:
                if not q.targets:
                    log.add(f"{where}: has no target on a labelled split")
                for t in q.targets:
                    if t not in members[q.gallery]:
                        log.add(f"{where}: target {t!r} is not in gallery {q.gallery!r}")
            if q.subset is not None:
                for m in q.subset:
                    if m not in members[q.gallery]:
                        log.add(f"{where}: subset member {m!r} is not in gallery {q.gallery!r}")
                if self.has_targets and q.targets and q.targets[0] not in q.subset:
                    log.add(f"{where}: target {q.targets[0]!r} is not among its subset members")
        log.raise_if_any(what)


def _duplicates(items: Iterable[Any]) -> List[Any]:
    seen: Set[Any] = set()
    dupes: List[Any] = []
    for item in items:
        if item in seen and item not in dupes:
            dupes.append(item)
        seen.add(item)
    return dupes


def read_json_file(path: Path, log: ProblemLog) -> Any:
    """Parse a JSON file, recording a problem (and returning None) if it is missing or invalid."""
    if not path.is_file():
        log.add(f"{path}: file not found")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        log.add(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}")
    except UnicodeDecodeError as err:
        log.add(f"{path}: not UTF-8 text ({err})")
    return None


def _relative_image_path(value: Any, where: str, field_name: str, log: ProblemLog) -> Optional[str]:
    """Normalise a relative image path; record a problem if it is not a safe relative path."""
    if not isinstance(value, str) or not value.strip():
        log.add(f"{where}: field {field_name!r} must be a non-empty relative path string, got {value!r}")
        return None
    posix = PurePosixPath(value.strip().replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts:
        log.add(f"{where}: field {field_name!r} must be a path inside the folder, got {value!r}")
        return None
    return posix.as_posix()


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
            reference = _relative_image_path(row["reference"], where, "reference", log)
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
                    norm = _relative_image_path(t, where, "targets", log)
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
            norm = _relative_image_path(entry, where, "path", log)
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
    from ..checkpoint import atomic_write_text

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
