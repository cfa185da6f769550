"""The shared in-memory form of composed-image-retrieval evaluation sets, and the checks every loader uses.

Every benchmark loader (FashionIQ, CIRR, CIRCO, generic; :mod:`zscir.data.benchmarks`)
returns a :class:`CIRSplit`: a list of :class:`CIRQuery` (reference image id, one or
more modification texts, ground-truth ids) plus one or more galleries of image ids
and a map from image id to file.  The evaluator in :mod:`zscir.eval.evaluate` only
ever sees this form.  Loaders collect every bad row in a :class:`ProblemLog` and
raise one :class:`AnnotationError` listing them all.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

ImageId = Union[str, int]
PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "ImageId",
    "PathLike",
    "AnnotationError",
    "ProblemLog",
    "FileChecker",
    "CIRQuery",
    "CIRSplit",
    "read_json_file",
    "relative_image_path",
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


def relative_image_path(value: Any, where: str, field_name: str, log: ProblemLog) -> Optional[str]:
    """`value` as a normalised relative POSIX path inside its folder, or None with a problem recorded in `log`."""
    if not isinstance(value, str) or not value.strip():
        log.add(f"{where}: field {field_name!r} must be a non-empty relative path string, got {value!r}")
        return None
    text = value.strip()
    posix = PurePosixPath(text.replace("\\", "/"))
    # absolute, drive-qualified ("C:/x") or climbing names would load files outside the dataset folder
    if posix.is_absolute() or PureWindowsPath(text).drive or ".." in posix.parts:
        log.add(f"{where}: field {field_name!r} must be a path inside the folder, got {value!r}")
        return None
    return posix.as_posix()


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
    ranks.  `gallery` names the gallery the query is ranked against.  `aspects`
    are labels a protocol reports metrics per label for (CIRCO's semantic aspects).
    """

    query_id: str
    reference: ImageId
    texts: Tuple[str, ...]
    targets: Tuple[ImageId, ...] = ()
    subset: Optional[Tuple[ImageId, ...]] = None
    kind: Optional[str] = None
    gallery: str = "all"
    source: str = ""
    aspects: Tuple[str, ...] = ()


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
