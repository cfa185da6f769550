"""Files for the CIRR and CIRCO test servers, plain ranking dumps, and checks that a file will be accepted.

* CIRR (https://cirr.cecs.anu.edu.au): two JSON files,
  ``{"version": "rc2", "metric": "recall", "<pairid>": [top-50 image names]}`` and
  ``{"version": "rc2", "metric": "recall_subset", "<pairid>": [top-3 names]}``;
  the server takes at most 5 MB per file, so the JSON is written compactly.
* CIRCO (https://circo.micc.unifi.it): ``{"<query id>": [top-50 COCO image ids as ints]}``
  for every query, keys as strings (like the official ``submission_examples``).
* Rankings: ``{"dataset", "split", "k", "rankings": {"<query id>": [top-k gallery ids]}}``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from ..checkpoint import atomic_write_text

PathLike = Union[str, "os.PathLike[str]"]
ImageId = Union[str, int]

__all__ = [
    "SubmissionError",
    "CIRR_VERSION",
    "CIRR_TOP_K",
    "CIRR_SUBSET_TOP_K",
    "CIRCO_TOP_K",
    "CIRR_MAX_BYTES",
    "cirr_submissions",
    "write_cirr_submission",
    "check_cirr_submission",
    "circo_submission",
    "write_circo_submission",
    "check_circo_submission",
    "write_rankings",
    "read_rankings",
]

CIRR_VERSION = "rc2"
CIRR_TOP_K = 50
CIRR_SUBSET_TOP_K = 3
CIRCO_TOP_K = 50
CIRR_MAX_BYTES = 5 * 1024 * 1024
_MAX_SHOWN = 20


class SubmissionError(ValueError):
    """A submission object or file would be rejected by the test server; lists every problem."""

    def __init__(self, what: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:_MAX_SHOWN])
        more = len(self.problems) - _MAX_SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{what}: {len(self.problems)} problem(s):\n  {shown}{tail}")


def _compact_json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def cirr_submissions(
    rankings: Mapping[str, Sequence[str]], subset_rankings: Mapping[str, Sequence[str]]
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Build the CIRR recall (top 50) and recall_subset (top 3) submission objects."""
    recall: Dict[str, Any] = {"version": CIRR_VERSION, "metric": "recall"}
    subset: Dict[str, Any] = {"version": CIRR_VERSION, "metric": "recall_subset"}
    for pair_id, ranking in rankings.items():
        recall[str(pair_id)] = [str(name) for name in list(ranking)[:CIRR_TOP_K]]
    for pair_id, ranking in subset_rankings.items():
        subset[str(pair_id)] = [str(name) for name in list(ranking)[:CIRR_SUBSET_TOP_K]]
    return recall, subset


def write_cirr_submission(
    out_dir: PathLike,
    rankings: Mapping[str, Sequence[str]],
    subset_rankings: Mapping[str, Sequence[str]],
    name: str = "zscir",
) -> Tuple[Path, Path]:
    """Write ``<name>_cirr_recall.json`` and ``<name>_cirr_recall_subset.json`` into `out_dir`."""
    out_dir = Path(out_dir)
    recall, subset = cirr_submissions(rankings, subset_rankings)
    recall_path = out_dir / f"{name}_cirr_recall.json"
    subset_path = out_dir / f"{name}_cirr_recall_subset.json"
    atomic_write_text(recall_path, _compact_json(recall))
    atomic_write_text(subset_path, _compact_json(subset))
    return recall_path, subset_path


def _load_if_path(submission: Union[Mapping[str, Any], PathLike], problems: List[str]) -> Tuple[Optional[Mapping[str, Any]], Optional[int]]:
    if isinstance(submission, Mapping):
        return submission, None
    path = Path(submission)
    try:
        raw = path.read_bytes()
    except OSError as err:
        problems.append(f"cannot read {path}: {err}")
        return None, None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        problems.append(f"{path} is not valid JSON: {err}")
        return None, len(raw)
    if not isinstance(obj, dict):
        problems.append(f"{path}: top level must be a JSON object, got {type(obj).__name__}")
        return None, len(raw)
    return obj, len(raw)


def check_cirr_submission(
    submission: Union[Mapping[str, Any], PathLike],
    metric: str,
    pair_ids: Optional[Iterable[Union[str, int]]] = None,
    length: Optional[int] = None,
) -> None:
    """Raise SubmissionError unless `submission` (object or file) is a valid CIRR `metric` file.

    `length` is the required list length (default 50 for "recall", 3 for
    "recall_subset"); `pair_ids`, if given, must match the keys exactly.
    """
    if metric not in ("recall", "recall_subset"):
        raise ValueError(f"metric must be 'recall' or 'recall_subset', got {metric!r}")
    expected_len = length if length is not None else (CIRR_TOP_K if metric == "recall" else CIRR_SUBSET_TOP_K)
    problems: List[str] = []
    obj, size = _load_if_path(submission, problems)
    what = f"CIRR {metric} submission" + ("" if isinstance(submission, Mapping) else f" {submission}")
    if obj is None:
        raise SubmissionError(what, problems)
    if size is not None and size > CIRR_MAX_BYTES:
        problems.append(f"file is {size} bytes; the server accepts at most {CIRR_MAX_BYTES}")
    if obj.get("version") != CIRR_VERSION:
        problems.append(f"'version' must be {CIRR_VERSION!r}, got {obj.get('version')!r}")
    if obj.get("metric") != metric:
        problems.append(f"'metric' must be {metric!r}, got {obj.get('metric')!r}")
    keys = [k for k in obj if k not in ("version", "metric")]
    for key in keys:
        if not key.isdigit():
            problems.append(f"key {key!r} is not a pair id")
        value = obj[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append(f"pair {key}: expected a list of image names, got {type(value).__name__}")
            continue
        if len(value) != expected_len:
            problems.append(f"pair {key}: {len(value)} predictions, expected {expected_len}")
        if len(set(value)) != len(value):
            problems.append(f"pair {key}: repeated image names in its predictions")
    if pair_ids is not None:
        expected = {str(p) for p in pair_ids}
        absent = sorted(expected - set(keys), key=lambda s: (len(s), s))
        extra = sorted(set(keys) - expected, key=lambda s: (len(s), s))
        if absent:
            problems.append(f"{len(absent)} pair id(s) missing, e.g. {absent[:5]}")
        if extra:
            problems.append(f"{len(extra)} unknown pair id(s), e.g. {extra[:5]}")
    if problems:
        raise SubmissionError(what, problems)


def circo_submission(rankings: Mapping[str, Sequence[int]]) -> Dict[str, List[int]]:
    """Build the CIRCO submission object: query id (string) -> top-50 image ids (ints)."""
    out: Dict[str, List[int]] = {}
    for query_id, ranking in rankings.items():
        out[str(query_id)] = [int(i) for i in list(ranking)[:CIRCO_TOP_K]]
    return out


def write_circo_submission(out_dir: PathLike, rankings: Mapping[str, Sequence[int]], name: str = "zscir", split: str = "test") -> Path:
    """Write ``<name>_circo_<split>.json`` into `out_dir` and return its path."""
    path = Path(out_dir) / f"{name}_circo_{split}.json"
    atomic_write_text(path, _compact_json(circo_submission(rankings)))
    return path


def check_circo_submission(
    submission: Union[Mapping[str, Any], PathLike],
    query_ids: Optional[Iterable[Union[str, int]]] = None,
    length: int = CIRCO_TOP_K,
) -> None:
    """Raise SubmissionError unless `submission` is a valid CIRCO file: int ids, `length` unique ones per query.

    Without `query_ids` the keys must be 0..N-1, which is what the official
    evaluation script asserts.
    """
    problems: List[str] = []
    obj, _ = _load_if_path(submission, problems)
    what = "CIRCO submission" + ("" if isinstance(submission, Mapping) else f" {submission}")
    if obj is None:
        raise SubmissionError(what, problems)
    keys = list(obj)
    for key in keys:
        if not isinstance(key, str) or not key.isdigit():
            problems.append(f"key {key!r} is not a query id")
        value = obj[key]
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            problems.append(f"query {key}: expected a list of integer image ids")
            continue
        if len(value) != length:
            problems.append(f"query {key}: {len(value)} predictions, expected {length}")
        if len(set(value)) != len(value):
            problems.append(f"query {key}: repeated image ids in its predictions")
    expected = {str(q) for q in query_ids} if query_ids is not None else {str(i) for i in range(len(keys))}
    absent = sorted(expected - set(keys), key=lambda s: (len(s), s))
    extra = sorted(set(keys) - expected, key=lambda s: (len(s), s))
    if absent:
        problems.append(f"{len(absent)} query id(s) missing, e.g. {absent[:5]}")
    if extra:
        problems.append(f"{len(extra)} unexpected query id(s), e.g. {extra[:5]}")
    if problems:
        raise SubmissionError(what, problems)


def write_rankings(
    path: PathLike,
    rankings: Mapping[str, Sequence[ImageId]],
    dataset: str,
    split: str,
    k: int = 50,
) -> Path:
    """Write each query's top-`k` gallery ids as JSON (ids keep their type: names or ints)."""
    path = Path(path)
    payload = {
        "dataset": dataset,
        "split": split,
        "k": k,
        "rankings": {str(q): list(r)[:k] for q, r in rankings.items()},
    }
    atomic_write_text(path, _compact_json(payload) + "\n")
    return path


def read_rankings(path: PathLike) -> Dict[str, List[ImageId]]:
    """Read a file written by :func:`write_rankings` back into {query id: ranking}."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"rankings file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("rankings"), dict):
        raise ValueError(f"{path}: expected an object with a 'rankings' mapping")
    return {str(q): list(r) for q, r in payload["rankings"].items()}
