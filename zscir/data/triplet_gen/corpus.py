"""Image-caption corpora (``captions.jsonl``, or a data set with image-path and caption columns): the input of the
caption-based triplet modes."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from ..schema import FileChecker, PathLike
from ..sources import is_dataset_folder, is_dataset_source, load_dataset_source, map_columns
from ..triplets import TripletFileError

__all__ = ["CAPTION_FIELDS", "CaptionedImage", "CaptionCorpus", "read_captions"]

#: Fields of a caption row (``--columns image=...,caption=...`` maps data set columns onto them).
CAPTION_FIELDS = ("image", "caption")


@dataclasses.dataclass(frozen=True)
class CaptionedImage:
    """One caption line: the image (as written in the file), its caption and the line number."""

    image: str
    caption: str
    line: int


class CaptionCorpus:
    """The captions of an image-caption corpus and the folder its image paths are relative to."""

    def __init__(self, items: Sequence[CaptionedImage], root: PathLike, source: str = "<captions>") -> None:
        self.items = list(items)
        self.root = Path(root)
        self.source = source
        self._first: Dict[str, CaptionedImage] = {}
        for item in self.items:
            self._first.setdefault(item.image, item)

    def __len__(self) -> int:
        return len(self.items)

    def images(self) -> List[str]:
        """Distinct images in order of first appearance (the row order of similarity embeddings)."""
        return list(self._first)

    def first_caption(self, image: str) -> str:
        """The first caption listed for `image`."""
        return self._first[image].caption

    def first_line(self, image: str) -> int:
        """The line of the first caption listed for `image`."""
        return self._first[image].line

    def image_path(self, image: str) -> str:
        """The absolute path of an image of the corpus."""
        return os.path.abspath(Path(image) if Path(image).is_absolute() else self.root / image)


def read_captions(path: PathLike, image_root: Optional[PathLike] = None, check_images: bool = True,
                  split: Optional[str] = None, columns: Optional[Mapping[str, str]] = None) -> CaptionCorpus:
    """Read ``captions.jsonl`` (``{"image", "caption"}`` per line) or a data set (`split`, `columns`: field ->
    column) whose image column holds paths; every bad line is reported in one error."""
    if is_dataset_source(path):
        return _read_caption_dataset(path, image_root, check_images, split, columns)
    if columns:
        raise ValueError(f"--columns applies to caption data sets; {path} is a captions.jsonl file")
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"caption file not found: {path}") from None
    problems: List[str] = []
    items: List[CaptionedImage] = []
    checker = FileChecker()
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        at = f"{path}:{lineno}"
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as err:
            problems.append(f"{at}: not valid UTF-8 ({err.reason})")
            continue
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            problems.append(f"{at}: invalid JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{at}: expected a JSON object, got {type(row).__name__}")
            continue
        unknown = sorted(set(row) - {"image", "caption"})
        if unknown:
            problems.append(f"{at}: unknown field(s) {unknown}; allowed fields: ['caption', 'image']")
        image, caption = row.get("image"), row.get("caption")
        if not isinstance(image, str) or not image.strip():
            problems.append(f"{at}: field 'image' must be a non-empty string, got {image!r}")
            continue
        if not isinstance(caption, str) or not caption.strip():
            problems.append(f"{at}: field 'caption' must be a non-empty string, got {caption!r}")
            continue
        if check_images:
            file = Path(image) if Path(image).is_absolute() else root / image
            if not checker.exists(file):
                problems.append(f"{at}: image not found: {file}")
        items.append(CaptionedImage(image, caption, lineno))
    if not items and not problems:
        problems.append("no captions found")
    if problems:
        raise TripletFileError(str(path), problems)
    return CaptionCorpus(items, root, str(path))


def _read_caption_dataset(source: PathLike, image_root: Optional[PathLike], check_images: bool,
                          split: Optional[str], columns: Optional[Mapping[str, str]]) -> CaptionCorpus:
    """A caption corpus from a data set's image-path and caption columns (images relative to `image_root`)."""
    ds, label = load_dataset_source(source, split, what="caption data set")
    ds = map_columns(ds, dict(columns or {}), label, CAPTION_FIELDS, required=CAPTION_FIELDS)
    if image_root is not None:
        root = Path(image_root)
    elif Path(source).exists():
        root = Path(source) if is_dataset_folder(source) else Path(source).parent
    else:
        root = Path.cwd()
    problems: List[str] = []
    items: List[CaptionedImage] = []
    checker = FileChecker()
    for index, (image, caption) in enumerate(zip(ds["image"], ds["caption"]), 1):
        at = f"{label} row {index}"
        if not isinstance(image, str) or not image.strip():
            kind = "an image" if image is not None and not isinstance(image, str) else repr(image)
            problems.append(f"{at}: column 'image' must hold a path (relative to --image-root), got {kind}")
            continue
        if not isinstance(caption, str) or not caption.strip():
            problems.append(f"{at}: column 'caption' must be a non-empty string, got {caption!r}")
            continue
        if check_images and not checker.exists(Path(image) if Path(image).is_absolute() else root / image):
            problems.append(f"{at}: image not found: {root / image}")
        items.append(CaptionedImage(image, caption, index))
    if not items and not problems:
        problems.append("no captions found")
    if problems:
        raise TripletFileError(label, problems)
    return CaptionCorpus(items, root, label)
