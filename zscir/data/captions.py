"""Captions of Stage-I images: read them, line them up with the images, and mine concept phrases from them.

Stage I trains on images; when the corpus also has captions (web image-text pairs, COCO captions, generated
captions), its soft text alignment can take its targets from them (:mod:`zscir.train.stage1`). Captions come in
the forms the library reads images in:

* a caption file next to an image folder or file list: JSONL rows ``{"image": "a/b.jpg", "caption": "..."}``
  (or ``"captions": [...]``), or a CSV with ``image`` and ``caption`` columns; an image may have several rows.
  ``image`` is the image's id (its path relative to the folder) or a path relative to `image_root` / the
  file's folder. Other field names are mapped with ``columns`` (``image=filepath,caption=text``);
* the caption file alone: the images are the ones it names (:func:`read_caption_file_images`);
* a data set with an image column and a caption column (a string or a list of strings per row), mapped with
  ``--columns image=...,caption=...`` like every other data command.

Bad rows never stop a run: empty captions, captions of images that are not in the corpus and rows without an
image are dropped, images without a caption keep the image-only target, and all of it is counted in a
:class:`CaptionReport` that names the first few rows (file:line).
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from .sources import COLUMNS_FLAG, DataSourceError, parse_columns

__all__ = ["CAPTION_FIELDS", "CAPTION_FILE_SUFFIXES", "CaptionReport", "ImageCaptions", "captions_from_column",
           "mine_concepts", "read_caption_file", "read_caption_file_images"]

PathLike = Union[str, "os.PathLike[str]"]
CAPTION_FIELDS = ("image", "caption")
CAPTION_FILE_SUFFIXES = (".jsonl", ".csv")
#: Rows named in a report, per kind of problem.
EXAMPLES_SHOWN = 3


@dataclasses.dataclass
class CaptionReport:
    """What was dropped or missing while lining captions up with images (counts and a few examples)."""

    captions: int = 0  # kept
    images_with_captions: int = 0
    images_without_captions: int = 0
    empty: int = 0
    unknown_image: int = 0  # rows naming an image that is not in the corpus
    no_image: int = 0  # rows without an image field
    truncated: int = 0  # captions longer than the text encoder's context (set when encoded)
    examples: Dict[str, List[str]] = dataclasses.field(default_factory=dict)

    def note(self, kind: str, where: str) -> None:
        """Count one problem of `kind` at `where` (file:line or row)."""
        setattr(self, kind, getattr(self, kind) + 1)
        shown = self.examples.setdefault(kind, [])
        if len(shown) < EXAMPLES_SHOWN:
            shown.append(where)

    def problems(self) -> List[str]:
        """One line per kind of problem found (empty when all is well)."""
        words = {"empty": "empty caption(s) dropped", "unknown_image": "caption(s) of images not in the corpus dropped",
                 "no_image": "row(s) without an image dropped",
                 "truncated": "caption(s) longer than the text encoder's context, truncated",
                 "images_without_captions": "image(s) without a caption (they keep the image-only target)"}
        lines = []
        for kind, text in words.items():
            n = getattr(self, kind)
            if n:
                shown = self.examples.get(kind, [])
                lines.append(f"{n} {text}" + (f" (e.g. {', '.join(shown)})" if shown else ""))
        return lines

    def summary(self) -> str:
        """One line: what was kept, then the problems."""
        head = f"{self.captions} caption(s) for {self.images_with_captions} image(s)"
        problems = self.problems()
        return head + ("; " + "; ".join(problems) if problems else "")


@dataclasses.dataclass
class ImageCaptions:
    """The captions of each image of a corpus, in the corpus's image order, and what was dropped."""

    captions: List[List[str]]
    report: CaptionReport

    def __len__(self) -> int:
        return len(self.captions)

    def texts(self) -> List[str]:
        """Every caption, image by image."""
        return [c for caps in self.captions for c in caps]


def _clean(text: Any) -> str:
    return " ".join(str(text).split()) if text is not None else ""


def _finish(captions: List[List[str]], report: CaptionReport, name: Callable[[int], str]) -> ImageCaptions:
    for i, caps in enumerate(captions):
        if caps:
            report.images_with_captions += 1
            report.captions += len(caps)
        else:
            report.note("images_without_captions", name(i))
    return ImageCaptions(captions, report)


def _add(caps: List[str], value: Any, report: CaptionReport, where: str) -> None:
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        text = _clean(v)
        if not text:
            report.note("empty", where)
        elif text not in caps:
            caps.append(text)


def _rows(path: Path, columns: Mapping[str, str]) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(file:line, row with zscir's field names) of a JSONL or CSV caption file."""
    image_key, caption_key = columns.get("image", "image"), columns.get("caption", "caption")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            for key, flag in ((image_key, "image"), (caption_key, "caption")):
                if key not in fields:
                    raise DataSourceError(f"{path}: no {key!r} column (columns: {', '.join(fields)}); map the "
                                          f"{flag} column with {COLUMNS_FLAG} {flag}=COLUMN")
            for n, row in enumerate(reader, start=2):
                yield f"{path}:{n}", {"image": row.get(image_key), "caption": row.get(caption_key)}
        return
    plural = "captions" if caption_key == "caption" else None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataSourceError(f"{path}:{n}: not a JSON object ({err.msg})") from None
            if not isinstance(obj, dict):
                raise DataSourceError(f"{path}:{n}: expected a JSON object with {image_key!r} and {caption_key!r}")
            caption = obj.get(caption_key)
            if caption is None and plural:
                caption = obj.get(plural)
            yield f"{path}:{n}", {"image": obj.get(image_key), "caption": caption}


def _check_caption_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    if path.suffix.lower() not in CAPTION_FILE_SUFFIXES:
        raise DataSourceError(f"{path}: a caption file is .jsonl or .csv")
    return path


def read_caption_file_images(path: PathLike, image_root: Optional[PathLike] = None,
                             columns: Union[None, str, Mapping[str, str]] = None
                             ) -> Tuple[List[str], List[Path], ImageCaptions]:
    """A caption file read on its own, in one pass: the distinct images it names (as written, in first-seen
    order), their paths (resolved against `image_root`, default the file's folder) and their captions."""
    path = _check_caption_file(path)
    columns = parse_columns(columns, CAPTION_FIELDS)
    root = Path(image_root) if image_root else path.parent
    index: Dict[str, int] = {}
    captions: List[List[str]] = []
    report = CaptionReport()
    for where, row in _rows(path, columns):
        image = _clean(row["image"])
        if not image:
            report.note("no_image", where)
            continue
        if image not in index:
            index[image] = len(captions)
            captions.append([])
        _add(captions[index[image]], row["caption"], report, where)
    if not index:
        raise DataSourceError(f"{path}: names no image (every row lacks the image field)")
    ids = list(index)
    paths = [Path(i) if os.path.isabs(i) else root / i for i in ids]
    return ids, paths, _finish(captions, report, lambda n: f"image {ids[n]}")


def read_caption_file(path: PathLike, ids: Sequence[str], base: Optional[PathLike] = None,
                      image_root: Optional[PathLike] = None,
                      columns: Union[None, str, Mapping[str, str]] = None) -> ImageCaptions:
    """Captions of each image `ids[i]` from a JSONL/CSV caption file; see the module doc for the matching rules.

    `base` is the folder the ids are relative to (an image folder; None for absolute ids).
    """
    path = _check_caption_file(path)
    columns = parse_columns(columns, CAPTION_FIELDS)
    by_id = {i: n for n, i in enumerate(ids)}
    by_path: Dict[str, int] = {}
    if base is not None:
        by_path = {os.path.normpath(os.path.abspath(Path(base) / i)): n for n, i in enumerate(ids)}
    roots = [Path(r) for r in (image_root, path.parent) if r]
    captions: List[List[str]] = [[] for _ in ids]
    report = CaptionReport()
    for where, row in _rows(path, columns):
        image = _clean(row["image"])
        if not image:
            report.note("no_image", where)
            continue
        n = by_id.get(image)
        if n is None:
            candidates = [image] if os.path.isabs(image) else [str(r / image) for r in roots]
            n = next((by_path[k] for k in (os.path.normpath(os.path.abspath(c)) for c in candidates) if k in by_path),
                     None)
        if n is None:
            report.note("unknown_image", where)
            continue
        _add(captions[n], row["caption"], report, where)
    if not any(captions):
        raise DataSourceError(f"{path}: no caption matches an image of the corpus ({report.summary()}); the "
                              f"image field must be the image's path relative to the image folder or to "
                              f"--image-root / the caption file's folder")
    return _finish(captions, report, lambda n: f"image {ids[n]}")


def captions_from_column(values: Sequence[Any], label: str, ids: Optional[Sequence[str]] = None) -> ImageCaptions:
    """Captions of each row of a data set's caption column (a string or a list of strings per row)."""
    report = CaptionReport()
    captions: List[List[str]] = [[] for _ in values]
    for n, value in enumerate(values):
        _add(captions[n], value, report, f"{label} row {n}")
    return _finish(captions, report, lambda n: f"{label} row {n}" if ids is None else f"image {ids[n]}")


# ----------------------------------------------------------------------------------------------- concepts
#: Function words that never start or end a concept phrase.
STOP_WORDS = frozenset("""
a an the this that these those some any each every no not and or but nor so of in on at to for with without by from
into onto over under above below near next beside behind between up down out off about as is are was were be been
being has have had do does did it its it's they them their there here he she his her we our you your i my me
one two three four five six seven eight nine ten several many few more most other another same also than then
just only very too while which who whom whose what where when how all both either neither instead photo picture image
shows showing shown view close left right top bottom middle center centre corner side
""".split())
_WORD = re.compile(r"[a-z][a-z'-]*")


def mine_concepts(texts: Sequence[str], top_k: int = 200, min_count: int = 3, max_words: int = 3) -> List[str]:
    """The `top_k` most frequent concept phrases of a caption corpus: runs of up to `max_words` content words
    (attribute-noun pairs such as "red dress", and single nouns) seen at least `min_count` times.

    A phrase is a run of consecutive words with no stop word inside; longer phrases are kept only when they are
    frequent in their own right, and a phrase that only ever occurs inside one longer kept phrase adds nothing,
    so it is dropped.
    """
    if top_k <= 0:
        return []
    counts: collections.Counter = collections.Counter()
    for text in texts:
        words = _WORD.findall(text.lower())
        run: List[str] = []
        for w in words + [""]:
            if w and w not in STOP_WORDS and len(w) > 1:
                run.append(w)
                continue
            for n in range(1, max_words + 1):
                for s in range(len(run) - n + 1):
                    counts[" ".join(run[s: s + n])] += 1
            run = []
    frequent = {p: c for p, c in counts.items() if c >= min_count}
    # a phrase as frequent as a longer phrase that contains it only ever appears inside that phrase
    covered = set()
    for p, c in frequent.items():
        words = p.split()
        for n in range(1, len(words)):
            for s in range(len(words) - n + 1):
                sub = " ".join(words[s: s + n])
                if frequent.get(sub) == c:
                    covered.add(sub)
    ranked = sorted((p for p in frequent if p not in covered), key=lambda p: (-frequent[p], p))
    return ranked[:top_k]
