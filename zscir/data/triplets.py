"""Synthetic triplet sets for Stage II: (reference image, modification text, target image or caption).

A triplet set is read from one of three formats, all with the same fields:

* **JSONL** (``.jsonl``, or ``.json`` holding JSON lines or one JSON array), one object per line::

      {"reference": "images/a.png", "modification": "make it red", "target": "images/b.png", "kind": "color"}
      {"reference": "images/c.png", "modification": "a wooden chair instead", "target_caption": "a wooden chair"}
      {"reference": "images/a.png", "modification": "make it red", "target": "images/b.png", "negatives": ["images/d.png"]}

* **CSV** (``.csv``) with a header row naming the fields; empty cells are absent values;
  a ``negatives`` cell holds a JSON array or ``|``-separated values.
* **Hugging Face** ``datasets.Dataset`` / ``DatasetDict`` (or any data set source of
  :mod:`zscir.data.sources`: a ``save_to_disk`` folder, a ``.parquet`` file, a Hub id
  ``user/name``; `split` picks the split) with those columns; image columns may hold paths or
  images (``datasets.Image`` features, PIL images or encoded bytes), which are kept in memory and
  referred to by a content id ``mem:<hash>``; ``negatives`` is a list column (of strings or images)
  or a string column.

Other field names map onto these with `columns` ({field: name in the file}, the CLI's
``--columns reference=src,modification=text``) in every format; for data sets, a mapping also
selects the columns read (others are ignored).

Fields (strict: any other field is an error): ``reference`` (required),
``modification`` (required, not blank), ``target`` (image), ``target_caption``,
``kind``, ``id`` and ``negatives`` (optional). At least one of ``target`` / ``target_caption``
is required; when both are given the target image is the training target and
the caption is kept alongside. Relative image paths are resolved against
``image_root`` (default: the folder of the file). Every problem in a file (bad
JSON, unknown fields, blank texts, missing images, ...) is collected and reported
in one :class:`TripletFileError` that names the file and line of each.

``negatives`` are explicit hard negatives of the same type as the training
target: images (resolved like ``target``) when the row has a target image,
captions when it has only ``target_caption``. A bad negative (a missing image,
the target itself, an empty string, a repeat within the row) is not an error:
it is dropped, listed in :attr:`TripletSet.negative_problems` with its file and
line, and counted in one warning.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Sequence as SequenceABC
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union, overload

from PIL import Image

from ..checkpoint import atomic_write_bytes, atomic_write_text
from ..registry import Registry
from .schema import FileChecker
from .images import ImageSource, load_image, to_rgb
from .sources import COLUMNS_FLAG, DATA_FILE_SUFFIXES, is_dataset_source, load_dataset_source, map_columns

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
#: Fields a triplet row may have, in output order.
ALLOWED_FIELDS: Tuple[str, ...] = ("id", "reference", "modification", "target", "target_caption", "kind", "negatives")
REQUIRED_FIELDS: Tuple[str, ...] = ("reference", "modification")
IMAGE_FIELDS: Tuple[str, ...] = ("reference", "target")
#: Prefix of image references that live in memory (images stored inside a dataset), not on disk.
MEMORY_PREFIX = "mem:"
#: At most this many problems are printed in a TripletFileError; the rest are counted.
MAX_PROBLEMS_SHOWN = 50
#: Dropped negatives named in the one warning of :meth:`TripletSet.check_negatives`.
NEGATIVE_PROBLEMS_LOGGED = 5
#: open_clip's end-of-text token id, used when a tokenizer does not name its own.
DEFAULT_EOT_ID = 49407

MemoryImage = Union[bytes, Image.Image]

__all__ = [
    "ALLOWED_FIELDS",
    "MEMORY_PREFIX",
    "Triplet",
    "TripletFileError",
    "TripletSet",
    "TripletFormat",
    "TRIPLET_FORMATS",
    "TripletImageSource",
    "load_triplets",
    "count_tokens",
]


class TripletFileError(ValueError):
    """A triplet source has bad rows; the message lists every problem with its file and line."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:MAX_PROBLEMS_SHOWN])
        more = len(self.problems) - MAX_PROBLEMS_SHOWN
        tail = f"\n  ... and {more} more problem(s)" if more > 0 else ""
        super().__init__(f"{source}: {len(self.problems)} problem(s) found:\n  {shown}{tail}")


@dataclasses.dataclass(frozen=True)
class Triplet:
    """One training example: reference image, modification text, and a target image and/or caption."""

    reference: str
    modification: str
    target: Optional[str] = None
    target_caption: Optional[str] = None
    kind: Optional[str] = None
    line: int = 0
    id: Optional[str] = None
    #: hard negatives: image references when the target is an image, else captions
    negatives: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.negatives, tuple):  # lists from callers; frozen rows stay hashable
            object.__setattr__(self, "negatives", tuple(self.negatives))

    @property
    def has_target_image(self) -> bool:
        """True when the training target is an image (it wins over a caption when both exist)."""
        return self.target is not None

    def to_dict(self) -> Dict[str, Any]:
        """The row as written to JSONL: set fields only (negatives as a list, when any), no line number."""
        out: Dict[str, Any] = {name: getattr(self, name) for name in ALLOWED_FIELDS
                               if name != "negatives" and getattr(self, name) is not None}
        if self.negatives:
            out["negatives"] = list(self.negatives)
        return out


# ------------------------------------------------------------------------- tokens
def count_tokens(tokenizer: Any, texts: Sequence[str], limit: int) -> List[int]:
    """Token counts (start and end-of-text included) of `texts`, exact up to `limit`; longer texts report limit + 1.

    `tokenizer` is open_clip-style: ``tokenizer(texts, context_length=n)`` returns
    ids [B, n] with an end-of-text token (``tokenizer.eot_token_id``, default 49407).
    """
    if not texts:
        return []
    probe = limit + 1
    ids = tokenizer(list(texts), context_length=probe)
    eot = int(getattr(tokenizer, "eot_token_id", DEFAULT_EOT_ID))
    counts = []
    for row in ids.tolist():
        try:
            n = row.index(eot) + 1
        except ValueError:  # no end token: the tokenizer cut it off, so the text is too long
            n = probe
        # a truncating tokenizer puts the end token in the last slot, so a full row means "too long"
        counts.append(n if n < probe else probe)
    return counts


def _fit_text(tokenizer: Any, text: str, limit: int) -> str:
    """The longest word prefix of `text` with at most `limit` tokens (characters of the first word if none fits)."""
    words = text.split()

    def fits(candidate: str) -> bool:
        return count_tokens(tokenizer, [candidate], limit)[0] <= limit

    lo, hi = 0, len(words) - 1  # the answer k lies in [lo, hi]: the whole text is known not to fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(" ".join(words[:mid])):
            lo = mid
        else:
            hi = mid - 1
    if lo > 0:
        return " ".join(words[:lo])
    first = words[0]  # a single giant word (a URL, a run of symbols): cut by characters
    lo, hi = 1, len(first) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(first[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return first[:lo]


# ------------------------------------------------------------------ in-memory images
def _memory_ref(data: MemoryImage) -> str:
    """A content id for an in-memory image, so identical images share one reference."""
    h = hashlib.sha256()
    if isinstance(data, Image.Image):
        h.update(f"pil\n{data.mode}\n{data.size}\n".encode())
        h.update(data.tobytes())
    else:
        h.update(b"bytes\n")
        h.update(bytes(data))
    return MEMORY_PREFIX + h.hexdigest()[:20]


class TripletImageSource(ImageSource):
    """The images of a triplet set (files and in-memory images) as an :class:`ImageSource`."""

    def __init__(self, triplets: "TripletSet", refs: Sequence[str]) -> None:
        self.triplets = triplets
        self.refs = list(refs)

    def __len__(self) -> int:
        return len(self.refs)

    def load(self, index: int) -> Image.Image:
        """Decode image `index` to RGB (ImageLoadError names it on failure)."""
        return self.triplets.open_image(self.refs[index])

    def describe(self, index: int) -> str:
        """The resolved path, or the ``mem:`` id of an in-memory image."""
        ref = self.refs[index]
        return ref if ref.startswith(MEMORY_PREFIX) else str(self.triplets.image_path(ref))

    def fingerprint(self) -> str:
        """SHA-256 over the resolved paths and content ids."""
        h = hashlib.sha256(b"triplet-images\n")
        for i in range(len(self)):
            h.update(self.describe(i).encode("utf-8", "surrogateescape") + b"\n")
        return h.hexdigest()


# ---------------------------------------------------------------------- the set
class TripletSet(SequenceABC):
    """A sequence of :class:`Triplet` plus where their images live (`root`, in-memory images)."""

    def __init__(
        self,
        triplets: Iterable[Triplet],
        root: Optional[PathLike] = None,
        source: str = "<memory>",
        memory_images: Optional[Dict[str, MemoryImage]] = None,
    ) -> None:
        self.triplets: List[Triplet] = list(triplets)
        self.root: Optional[Path] = Path(root) if root is not None else None
        self.source = source
        self.memory_images: Dict[str, MemoryImage] = dict(memory_images or {})
        #: how many texts :meth:`truncate_to_context` shortened
        self.num_truncated = 0
        #: positions whose modification text :meth:`corrupt` replaced
        self.corrupted: Tuple[int, ...] = ()
        #: negatives :meth:`check_negatives` dropped, one "<file>:<line>: <reason>" each
        self.negative_problems: List[str] = []

    # sequence protocol
    def __len__(self) -> int:
        return len(self.triplets)

    @overload
    def __getitem__(self, index: int) -> Triplet: ...

    @overload
    def __getitem__(self, index: slice) -> "TripletSet": ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._derive(self.triplets[index])
        return self.triplets[index]

    def __repr__(self) -> str:
        return f"TripletSet({len(self)} triplets from {self.source}, root={self.root})"

    def _derive(self, triplets: Iterable[Triplet]) -> "TripletSet":
        out = TripletSet(triplets, self.root, self.source, self.memory_images)
        out.num_truncated = self.num_truncated
        out.negative_problems = list(self.negative_problems)
        return out

    # images
    def image_path(self, ref: str) -> Path:
        """The file of an image reference (relative references are resolved against `root`)."""
        if ref.startswith(MEMORY_PREFIX):
            raise ValueError(f"image {ref!r} is held in memory, not in a file; use open_image()")
        path = Path(ref)
        if path.is_absolute() or self.root is None:
            return path
        return self.root / path

    def open_image(self, ref: str) -> Image.Image:
        """Decode the image behind a reference (file or in-memory) to RGB."""
        if ref.startswith(MEMORY_PREFIX):
            try:
                data = self.memory_images[ref]
            except KeyError:
                raise KeyError(f"in-memory image {ref!r} is not part of {self.source}") from None
            if isinstance(data, Image.Image):
                return to_rgb(data.copy())
            return load_image(data, name=ref)
        return load_image(self.image_path(ref))

    def image_refs(self) -> List[str]:
        """Every distinct image reference (references, target and negative images), in order of first appearance."""
        seen: Dict[str, None] = {}
        for t in self.triplets:
            seen.setdefault(t.reference, None)
            if t.target is not None:
                seen.setdefault(t.target, None)
                for ref in t.negatives:
                    seen.setdefault(ref, None)
        return list(seen)

    def image_source(self, refs: Optional[Sequence[str]] = None) -> TripletImageSource:
        """An :class:`ImageSource` over `refs` (default: :meth:`image_refs`), e.g. for feature caching."""
        return TripletImageSource(self, self.image_refs() if refs is None else refs)

    # validation
    def problems(self, check_images: bool = True, where: Optional[Callable[[Triplet], str]] = None) -> List[str]:
        """Every semantic problem of the rows (blank texts, no target, duplicate ids, missing images)."""
        where = where or (lambda t: f"{self.source}:{t.line}")
        out: List[str] = []
        checker = FileChecker()
        ids: Dict[str, int] = {}
        for t in self.triplets:
            at = where(t)
            if not isinstance(t.reference, str) or not t.reference.strip():
                out.append(f"{at}: field 'reference' is empty")
            if not isinstance(t.modification, str) or not t.modification.strip():
                out.append(f"{at}: field 'modification' is empty or whitespace only")
            if t.target is None and t.target_caption is None:
                out.append(f"{at}: neither 'target' nor 'target_caption' is given (one is required)")
            if t.target_caption is not None and not t.target_caption.strip():
                out.append(f"{at}: field 'target_caption' is whitespace only")
            if t.id is not None:
                if t.id in ids:
                    out.append(f"{at}: duplicate id {t.id!r} (first used at line {ids[t.id]})")
                else:
                    ids[t.id] = t.line
            for name in IMAGE_FIELDS:
                ref = getattr(t, name)
                if not ref or not isinstance(ref, str):
                    continue
                if ref.startswith(MEMORY_PREFIX):
                    if ref not in self.memory_images:
                        out.append(f"{at}: {name} {ref!r} names an in-memory image that this set does not hold")
                elif check_images:
                    path = self.image_path(ref)
                    if not checker.exists(path):
                        out.append(f"{at}: {name} image not found: {path}")
        return out

    def _same_key(self, t: Triplet, value: str) -> str:
        """What makes two targets/negatives of `t` the same: the resolved image path, or the normalised caption."""
        if not t.has_target_image:
            return " ".join(value.lower().split())
        if value.startswith(MEMORY_PREFIX):
            return value
        return os.path.normpath(os.path.abspath(self.image_path(value)))

    def check_negatives(self, check_images: bool = True,
                        where: Optional[Callable[[Triplet], str]] = None) -> "TripletSet":
        """A copy without unusable negatives (empty, the target, repeated, missing image), listed in `negative_problems`.

        Image negatives are resolved exactly like the target (relative to `root`,
        absolute, or ``mem:``); with `check_images` their files must exist. One
        warning reports how many were dropped and names the first few.
        """
        where = where or (lambda t: f"{self.source}:{t.line}")
        checker = FileChecker()
        problems: List[str] = []
        rows: List[Triplet] = []
        rows_hit = 0
        for t in self.triplets:
            target = t.target if t.has_target_image else t.target_caption
            if not t.negatives or target is None:
                rows.append(t)
                continue
            at, before = where(t), len(problems)
            target_key = self._same_key(t, target)
            first: Dict[str, int] = {}
            kept: List[str] = []
            for pos, neg in enumerate(t.negatives, 1):
                if not neg.strip():
                    problems.append(f"{at}: negative {pos} is empty")
                    continue
                key = self._same_key(t, neg)
                if key == target_key:
                    problems.append(f"{at}: negative {pos} {neg!r} is the target itself")
                elif key in first:
                    problems.append(f"{at}: negative {pos} {neg!r} repeats negative {first[key]}")
                elif t.has_target_image and neg.startswith(MEMORY_PREFIX) and neg not in self.memory_images:
                    problems.append(f"{at}: negative {pos} {neg!r} names an in-memory image that this set does not hold")
                elif (t.has_target_image and check_images and not neg.startswith(MEMORY_PREFIX)
                      and not checker.exists(self.image_path(neg))):
                    problems.append(f"{at}: negative {pos} image not found: {self.image_path(neg)}")
                else:
                    first[key] = pos
                    kept.append(neg)
            rows_hit += len(problems) > before
            rows.append(dataclasses.replace(t, negatives=tuple(kept)) if len(problems) > before else t)
        out = self._derive(rows)
        out.corrupted = self.corrupted
        out.negative_problems = list(self.negative_problems) + problems
        if problems:
            logger.warning(
                "%s: dropped %d unusable negative(s) in %d triplet(s) (listed in negative_problems); first: %s",
                self.source, len(problems), rows_hit, "; ".join(problems[:NEGATIVE_PROBLEMS_LOGGED]),
            )
        return out

    def validate(self, check_images: bool = True) -> "TripletSet":
        """Raise :class:`TripletFileError` listing every problem; return self when there are none."""
        problems = self.problems(check_images)
        if not self.triplets:
            problems.append(f"{self.source}: no triplets")
        if problems:
            raise TripletFileError(self.source, problems)
        return self

    # transformations
    def truncate_to_context(
        self,
        tokenizer: Any,
        context_length: int,
        prompt_overhead: int = 0,
        caption_overhead: int = 0,
    ) -> "TripletSet":
        """A copy whose texts fit the text tower: cut by words until tokens + overhead <= context_length.

        A modification text may use ``context_length - prompt_overhead`` tokens,
        a target caption (and a caption negative) ``context_length - caption_overhead`` (token counts
        include the start and end-of-text tokens; the overheads are the tokens the
        surrounding prompt adds, pseudo-word slots included). One warning reports
        how many texts were shortened; the copy records it in ``num_truncated``.
        """
        limits = {"modification": context_length - prompt_overhead, "target_caption": context_length - caption_overhead}
        for name, limit in limits.items():
            if limit < 3:  # start + at least one token + end
                raise ValueError(
                    f"context_length={context_length} leaves {limit} token(s) for {name} after the prompt overhead; "
                    "at least 3 are needed"
                )
        # (row, field, negative position or -1) -> shortened text; caption negatives are encoded like target captions
        new_texts: Dict[Tuple[int, str, int], str] = {}
        for name, limit in limits.items():
            slots = [(i, -1) for i, t in enumerate(self.triplets) if getattr(t, name) is not None]
            if name == "target_caption":
                slots += [(i, k) for i, t in enumerate(self.triplets) if not t.has_target_image
                          for k in range(len(t.negatives))]
            texts = [getattr(self.triplets[i], name) if k < 0 else self.triplets[i].negatives[k] for i, k in slots]
            for (i, k), text, n in zip(slots, texts, count_tokens(tokenizer, texts, limit)):
                if n > limit:
                    new_texts[(i, name if k < 0 else "negatives", k)] = _fit_text(tokenizer, text, limit)
        rows = list(self.triplets)
        for (i, name, k), text in new_texts.items():
            if name == "negatives":
                negatives = list(rows[i].negatives)
                negatives[k] = text
                rows[i] = dataclasses.replace(rows[i], negatives=tuple(negatives))
            else:
                rows[i] = dataclasses.replace(rows[i], **{name: text})
        out = self._derive(rows)
        out.num_truncated = self.num_truncated + len(new_texts)
        out.corrupted = self.corrupted
        if new_texts:
            lines = sorted({rows[i].line for i, _, _ in new_texts})
            logger.warning(
                "%s: truncated %d over-long text(s) in %d triplet(s) to fit context length %d "
                "(prompt overhead %d, caption overhead %d); first lines: %s",
                self.source, len(new_texts), len(lines), context_length, prompt_overhead, caption_overhead,
                lines[:10],
            )
        return out

    def corrupt(self, fraction: float, seed: int = 0) -> "TripletSet":
        """A copy where `fraction` of the modification texts are replaced by other triplets' texts (deterministic)."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        count = int(round(fraction * len(self)))
        out = self._derive(self.triplets)
        if count == 0:
            return out
        distinct = sorted({t.modification for t in self.triplets})
        if len(distinct) < 2:
            raise ValueError(f"cannot corrupt {self.source}: all modification texts are identical")
        rng = random.Random(f"corrupt:{seed}")
        chosen = sorted(rng.sample(range(len(self)), count))
        rows = list(self.triplets)
        for i in chosen:
            own = rows[i].modification
            for _ in range(64):  # a random other triplet; retry when it happens to share the text
                j = rng.randrange(len(self))
                if j != i and self.triplets[j].modification != own:
                    text = self.triplets[j].modification
                    break
            else:  # texts are mostly identical: pick among the distinct other texts directly
                text = rng.choice([d for d in distinct if d != own])
            rows[i] = dataclasses.replace(rows[i], modification=text)
        out.triplets = rows
        out.corrupted = tuple(chosen)
        return out

    # output
    def to_jsonl(
        self,
        path: PathLike,
        relative_to: Optional[PathLike] = None,
        image_dir: Optional[PathLike] = None,
    ) -> Path:
        """Write the set as JSONL (atomically) that :func:`load_triplets` reads back without an image root.

        Image paths are written relative to `relative_to` (default: the folder of
        `path`) where possible (image negatives too). In-memory images are saved as PNG files into
        `image_dir` (default: ``<stem>_images`` next to `path`).
        """
        path = Path(path)
        base = Path(relative_to) if relative_to is not None else path.parent
        base_abs = Path(os.path.abspath(base))
        memory_dir = Path(image_dir) if image_dir is not None else path.parent / f"{path.stem}_images"
        written: Dict[str, str] = {}

        def place(ref: Optional[str]) -> Optional[str]:
            if ref is None:
                return None
            if ref in written:
                return written[ref]
            if ref.startswith(MEMORY_PREFIX):
                file = memory_dir / f"{ref[len(MEMORY_PREFIX):]}.png"
                buf = io.BytesIO()
                self.open_image(ref).save(buf, format="PNG")
                atomic_write_bytes(file, buf.getvalue())
                target = Path(os.path.abspath(file))
            else:
                target = Path(os.path.abspath(self.image_path(ref)))
            try:
                rel = os.path.relpath(target, base_abs)
            except ValueError:  # another drive (Windows): keep the absolute path
                rel = str(target)
            written[ref] = Path(rel).as_posix()
            return written[ref]

        lines = []
        for t in self.triplets:
            negatives = tuple(place(n) for n in t.negatives) if t.has_target_image else t.negatives
            row = dataclasses.replace(t, reference=place(t.reference), target=place(t.target), negatives=negatives).to_dict()
            lines.append(json.dumps(row, ensure_ascii=False))
        atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
        return path

    # loaders
    @classmethod
    def from_jsonl(cls, path: PathLike, image_root: Optional[PathLike] = None, check_images: bool = True,
                   columns: Optional[Dict[str, str]] = None) -> "TripletSet":
        """Read JSON lines (or a JSON array) of triplet objects, validating every row."""
        return _load_jsonl(Path(path), image_root, check_images, columns)

    @classmethod
    def from_csv(cls, path: PathLike, image_root: Optional[PathLike] = None, check_images: bool = True,
                 columns: Optional[Dict[str, str]] = None) -> "TripletSet":
        """Read a CSV file whose header row names the triplet fields, validating every row."""
        return _load_csv(Path(path), image_root, check_images, columns)

    @classmethod
    def from_hf(
        cls,
        dataset_or_name: Any,
        split: Optional[str] = None,
        image_root: Optional[PathLike] = None,
        check_images: bool = True,
        columns: Optional[Dict[str, str]] = None,
    ) -> "TripletSet":
        """Read a Hugging Face data set (object, Hub id, ``save_to_disk`` folder, data file) with triplet columns.

        `split` picks a split of a DatasetDict (default ``train``, or the only one).
        """
        return _load_hf(dataset_or_name, split, image_root, check_images, columns)


# ---------------------------------------------------------------------- parsing
def _clean_optional(value: Optional[str]) -> Optional[str]:
    """Empty optional values count as absent (CSV cannot tell empty from missing)."""
    if value is None or (isinstance(value, str) and value == ""):
        return None
    return value


def _parse_negatives(value: Any, at: str, problems: List[str]) -> Optional[Tuple[str, ...]]:
    """The ``negatives`` field as a tuple (a string is one negative, absent or "" none, null items empty); None when malformed."""
    if value is None or (isinstance(value, str) and value == ""):
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)):
        problems.append(f"{at}: field 'negatives' must be a list of strings or a string, got {type(value).__name__}")
        return None
    bad = [f"{at}: field 'negatives' item {k} must be a string, got {type(v).__name__}"
           for k, v in enumerate(value, 1) if v is not None and not isinstance(v, str)]
    problems.extend(bad)
    return None if bad else tuple("" if v is None else v for v in value)  # null: an empty negative, dropped later


def _csv_negatives(cell: str, at: str, problems: List[str]) -> Any:
    """A CSV ``negatives`` cell: a JSON array, or ``|``-separated values (spaces around ``|`` ignored); empty: none."""
    text = cell.strip()
    if not text:
        return None
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            problems.append(f"{at}: field 'negatives' is not a valid JSON array ({err.msg} at column {err.colno})")
            return None
    return [part.strip() for part in text.split("|")]


def _renamed(row: Any, columns: Optional[Dict[str, str]], at: str, problems: List[str]) -> Any:
    """A raw row with its mapped names (`columns`: field -> name in the file) renamed to the fields."""
    if not columns or not isinstance(row, dict):
        return row
    out = dict(row)
    for field, name in columns.items():
        if name == field:
            continue
        if name in out:
            out[field] = out.pop(name)
        elif field in REQUIRED_FIELDS:
            problems.append(f"{at}: no field {name!r} (mapped to {field!r} by {COLUMNS_FLAG})")
    return out


def _row_to_triplet(row: Dict[str, Any], at: str, line: int, problems: List[str]) -> Optional[Triplet]:
    """Check field names and types of one raw row and build a Triplet (None when the row is unusable)."""
    if not isinstance(row, dict):
        problems.append(f"{at}: expected a JSON object, got {type(row).__name__}")
        return None
    unknown = sorted(set(row) - set(ALLOWED_FIELDS))
    if unknown:
        problems.append(f"{at}: unknown field(s) {unknown}; allowed fields: {list(ALLOWED_FIELDS)}")
    negatives = _parse_negatives(row.get("negatives"), at, problems)
    ok = negatives is not None
    values: Dict[str, Optional[str]] = {}
    for name in ALLOWED_FIELDS:
        if name == "negatives":
            continue
        value = row.get(name)
        if name == "id" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if value is not None and not isinstance(value, str):
            problems.append(f"{at}: field {name!r} must be a string, got {type(value).__name__} {value!r}")
            ok = False
            continue
        values[name] = value
    for name in REQUIRED_FIELDS:
        if name in values and values[name] is None:
            problems.append(f"{at}: required field {name!r} is missing")
            ok = False
    if not ok:
        return None
    return Triplet(
        reference=values["reference"],
        modification=values["modification"],
        target=_clean_optional(values.get("target")),
        target_caption=_clean_optional(values.get("target_caption")),
        kind=_clean_optional(values.get("kind")),
        line=line,
        id=_clean_optional(values.get("id")),
        negatives=negatives or (),
    )


def _finish(triplets: List[Triplet], problems: List[str], source: str, root: Optional[Path],
            check_images: bool, memory: Optional[Dict[str, MemoryImage]] = None,
            where: Optional[Callable[[Triplet], str]] = None) -> TripletSet:
    """Run the semantic checks and raise one error with every problem, or return the set (bad negatives dropped)."""
    out = TripletSet(triplets, root, source, memory)
    problems = problems + out.problems(check_images, where)
    if not triplets and not problems:
        problems.append("no triplets found")
    if problems:
        raise TripletFileError(source, problems)
    return out.check_negatives(check_images, where)


def _read_lines(path: Path) -> List[Tuple[int, str]]:
    """(line number, text) of every non-blank line; undecodable lines raise one error listing them."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"triplet file not found: {path}") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    out, bad = [], []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            bad.append(f"{path}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start})")
            continue
        if text.strip():
            out.append((lineno, text))
    if bad:
        raise TripletFileError(str(path), bad)
    return out


def _load_jsonl(path: Path, image_root: Optional[PathLike], check_images: bool,
                columns: Optional[Dict[str, str]] = None) -> TripletSet:
    lines = _read_lines(path)
    root = Path(image_root) if image_root is not None else path.parent
    problems: List[str] = []
    triplets: List[Triplet] = []
    if lines and lines[0][1].lstrip().startswith("["):  # a JSON array: rows are numbered by item
        try:
            items = json.loads("\n".join(text for _, text in lines))
        except json.JSONDecodeError as err:
            raise TripletFileError(str(path), [f"{path}:{err.lineno}: invalid JSON ({err.msg})"]) from None
        if not isinstance(items, list):
            raise TripletFileError(str(path), [f"{path}: expected a JSON array of objects"])
        for index, item in enumerate(items, 1):
            at = f"{path}: item {index}"
            t = _row_to_triplet(_renamed(item, columns, at, problems), at, index, problems)
            if t is not None:
                triplets.append(t)
        where = lambda t: f"{path}: item {t.line}"  # noqa: E731
        return _finish(triplets, problems, str(path), root, check_images, where=where)
    for lineno, text in lines:
        at = f"{path}:{lineno}"
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            problems.append(f"{at}: invalid JSON ({err.msg} at column {err.colno})")
            continue
        t = _row_to_triplet(_renamed(row, columns, at, problems), at, lineno, problems)
        if t is not None:
            triplets.append(t)
    return _finish(triplets, problems, str(path), root, check_images)


def _check_columns(columns: Sequence[str], at: str) -> List[str]:
    """Problems with a header / column list: unknown, duplicate or missing required names."""
    problems = []
    unknown = [c for c in columns if c not in ALLOWED_FIELDS]
    if unknown:
        problems.append(f"{at}: unknown column(s) {unknown}; allowed columns: {list(ALLOWED_FIELDS)}")
    dupes = sorted({c for c in columns if list(columns).count(c) > 1})
    if dupes:
        problems.append(f"{at}: duplicate column(s) {dupes}")
    missing = [c for c in REQUIRED_FIELDS if c not in columns]
    if missing:
        problems.append(f"{at}: missing required column(s) {missing}")
    if "target" not in columns and "target_caption" not in columns:
        problems.append(f"{at}: needs a 'target' or a 'target_caption' column")
    return problems


def _load_csv(path: Path, image_root: Optional[PathLike], check_images: bool,
              columns: Optional[Dict[str, str]] = None) -> TripletSet:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"triplet file not found: {path}") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise TripletFileError(str(path), [f"{path}:{line}: not valid UTF-8 ({err.reason})"]) from None
    root = Path(image_root) if image_root is not None else path.parent
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise TripletFileError(str(path), [f"{path}: empty file (expected a header row with {list(ALLOWED_FIELDS)})"]) from None
    except csv.Error as err:
        raise TripletFileError(str(path), [f"{path}:1: unreadable CSV header ({err})"]) from None
    if columns:
        absent = [f"{name!r} (mapped to {field!r} by {COLUMNS_FLAG})" for field, name in columns.items()
                  if name not in header]
        if absent:
            raise TripletFileError(str(path), [f"{path}:1 (header): no column {', '.join(absent)}; its columns: "
                                               f"{header}"])
        renames = {name: field for field, name in columns.items()}
        header = [renames.get(h, h) for h in header]
    header_problems = _check_columns(header, f"{path}:1 (header)")
    if header_problems:
        raise TripletFileError(str(path), header_problems)
    problems: List[str] = []
    triplets: List[Triplet] = []
    start = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            problems.append(f"{path}:{reader.line_num}: unreadable CSV row ({err})")
            break
        lineno, start = start, reader.line_num + 1  # a quoted cell may span several lines: report the first
        if not any(c.strip() for c in cells):
            continue
        at = f"{path}:{lineno}"
        if len(cells) != len(header):
            problems.append(f"{at}: {len(cells)} cell(s) but the header has {len(header)} column(s)")
            continue
        row = dict(zip(header, cells))
        if "negatives" in row:
            row["negatives"] = _csv_negatives(row["negatives"], at, problems)
        t = _row_to_triplet(row, at, lineno, problems)
        if t is not None:
            triplets.append(t)
    return _finish(triplets, problems, str(path), root, check_images)


def _hf_image_value(value: Any, what: str, memory: Dict[str, MemoryImage], problems: List[str],
                    empty: Optional[str] = None) -> Any:
    """A dataset image cell as a reference: images and bytes kept in `memory` under a ``mem:`` id, paths as strings.

    Empty bytes are a problem, or become `empty` when given (a negative: dropped later, not fatal).
    """
    if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (bytes, bytearray, Image.Image)):
        if isinstance(value, (bytes, bytearray)) and not value:
            if empty is not None:
                return empty
            problems.append(f"{what} image bytes are empty")
            return None
        ref = _memory_ref(value)
        memory.setdefault(ref, bytes(value) if isinstance(value, bytearray) else value)
        return ref
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _load_hf(dataset_or_name: Any, split: Optional[str], image_root: Optional[PathLike], check_images: bool,
             columns: Optional[Dict[str, str]] = None) -> TripletSet:
    import datasets

    ds, label = load_dataset_source(dataset_or_name, split, what="triplets")
    if columns:
        ds = map_columns(ds, columns, label, ALLOWED_FIELDS)
    header = _check_columns(ds.column_names, f"{label} (columns)")
    if header:
        raise TripletFileError(label, header)
    for name in IMAGE_FIELDS:
        # encoded bytes are smaller than decoded images and corrupt ones fail later with a name, not here
        if name in ds.column_names and isinstance(ds.features[name], datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
    if "negatives" in ds.column_names and isinstance(getattr(ds.features["negatives"], "feature", None), datasets.Image):
        ds = ds.cast_column("negatives", datasets.List(datasets.Image(decode=False)))
    memory: Dict[str, MemoryImage] = {}
    problems: List[str] = []
    triplets: List[Triplet] = []
    for index, row in enumerate(ds):
        line = index + 1
        at = f"{label} row {line}"
        row = dict(row)
        for name in IMAGE_FIELDS:
            if name in row:
                row[name] = _hf_image_value(row[name], f"{at}: {name}", memory, problems)
        if isinstance(row.get("negatives"), (list, tuple)):
            row["negatives"] = [_hf_image_value(v, f"{at}: negative", memory, problems, empty="")
                                for v in row["negatives"]]
        t = _row_to_triplet(row, at, line, problems)
        if t is not None:
            triplets.append(t)
    root = Path(image_root) if image_root is not None else None
    return _finish(triplets, problems, label, root, check_images, memory, where=lambda t: f"{label} row {t.line}")


# ---------------------------------------------------------------------- dispatch
class TripletFormat(NamedTuple):
    """A triplet source format: the file suffixes it claims and its loader (source, root, check, split, columns)."""

    suffixes: Tuple[str, ...]
    load: Callable[..., TripletSet]


TRIPLET_FORMATS: Registry[TripletFormat] = Registry("triplet format")
TRIPLET_FORMATS.add("jsonl", TripletFormat((".jsonl", ".json"), lambda src, root, check, split, columns:
                                           _load_jsonl(Path(src), root, check, columns)))
TRIPLET_FORMATS.add("csv", TripletFormat((".csv",), lambda src, root, check, split, columns:
                                         _load_csv(Path(src), root, check, columns)))
TRIPLET_FORMATS.add("hf", TripletFormat(tuple(DATA_FILE_SUFFIXES), lambda src, root, check, split, columns:
                                        _load_hf(src, split, root, check, columns)))


def _detect_format(source: Any) -> str:
    """The registered format name for a path (by suffix; folders and Hub ids are data sets) or a dataset object."""
    if not isinstance(source, (str, os.PathLike)):
        return "hf"
    path = Path(source)
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    for name in TRIPLET_FORMATS.names():
        if suffix in TRIPLET_FORMATS.get(name).suffixes:
            return name
    if not path.exists() and is_dataset_source(source):
        return "hf"  # a Hub data set id
    known = sorted(s for n in TRIPLET_FORMATS.names() for s in TRIPLET_FORMATS.get(n).suffixes)
    raise ValueError(
        f"cannot tell the triplet format of {path} from its suffix {suffix!r}; use one of {known}, "
        "a saved Hugging Face dataset folder, a Hub data set id, or pass format="
    )


def load_triplets(
    source: Any,
    image_root: Optional[PathLike] = None,
    check_images: bool = True,
    format: Optional[str] = None,
    split: Optional[str] = None,
    columns: Optional[Dict[str, str]] = None,
) -> TripletSet:
    """Load a triplet set from a .jsonl/.json/.csv file or any data set source (zscir.data.sources).

    `split` picks a split of a DatasetDict (default ``train``, or the only one); `columns` maps triplet
    fields to the names the source uses ({"reference": "src", ...}).
    """
    name = format or _detect_format(source)
    return TRIPLET_FORMATS.get(name).load(source, image_root, check_images, split, columns)
