"""Image folders, file lists and robust decoding.

:func:`load_image` always returns an 8-bit RGB :class:`PIL.Image.Image` or raises
:class:`ImageLoadError` naming the file; it never returns a partially decoded
image. It handles

* missing, unreadable, corrupt and truncated files (an error, never garbage);
* modes ``1``/``L``/``P``/``CMYK``/``YCbCr`` (plain conversion), ``LA``/``PA``/``RGBA``
  and palette or grey images with a transparency colour (composited on white);
* 16-bit and float images (``I;16*``, ``I``, ``F``), scaled to 8 bit (see
  :func:`to_rgb` for the rule);
* EXIF orientation (``ImageOps.exif_transpose``);
* extreme aspect ratios (a 200000x1 strip is a few hundred bytes, but a model's
  resize of its shorter side to 224 px would need gigabytes): refused from the
  header, before decoding, above ``max_aspect_ratio`` (default 100:1);
* huge images: PIL's global decompression-bomb guard is replaced by our own
  limits. Images over ``max_pixels`` are downscaled (JPEGs already while decoding,
  with ``Image.draft``, so a 200-megapixel JPEG costs a few megabytes); images
  that cannot be decoded at reduced size and are over ``max_decode_pixels`` are
  refused with an :class:`ImageLoadError` (memory would run out otherwise).

Truncated files are detected by PIL only while ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``
is False (the default); if some other code sets it, a warning is logged once.

Batches for a model come from :func:`iter_image_batches`, which decodes in a
``DataLoader`` (optionally with worker processes), skips bad images, logs each
one (path + reason) to a log file and a logger warning, and reports the count at
the end, so a corrupt file in a million-image gallery is reported and skipped
instead of crashing the job an hour in. Sources are lists of paths or a Hugging
Face ``datasets`` image column (:func:`hf_image_source`).
"""
from __future__ import annotations

import abc
import dataclasses
import hashlib
import io
import logging
import math
import os
import threading
from pathlib import Path
from typing import (
    Any,
    BinaryIO,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, BinaryIO]

#: File extensions (lower case) that :func:`list_images` picks up by default.
IMAGE_EXTENSIONS: Tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
)
#: Larger images are downscaled (aspect kept) to at most this many pixels (8192 x 4096).
DEFAULT_MAX_PIXELS = 1 << 25
#: Images that cannot be decoded at reduced size are refused above this many pixels (~800 MB as RGB).
DEFAULT_MAX_DECODE_PIXELS = 1 << 28
#: Images longer than this many times their shorter side are refused (a model resizes the shorter side).
DEFAULT_MAX_ASPECT_RATIO = 100.0
#: Transparent pixels are composited on this colour.
WHITE = (255, 255, 255)

_HIGH_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
# PIL's decompression-bomb limit is a module global that several plugins read while
# opening and decoding; we switch it off only for our own guarded calls, one at a time.
_PIL_LIMIT_LOCK = threading.Lock()
_warned_truncated_flag = False


class ImageLoadError(OSError):
    """An image file is missing, unreadable, corrupt, truncated or too large; names the file."""

    def __init__(self, path: Union[str, os.PathLike, None], reason: str) -> None:
        self.path = str(path) if path is not None else "<bytes>"
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}")

    def __reduce__(self) -> Tuple[Any, ...]:
        # keeps the two-argument constructor working across DataLoader worker processes
        return (type(self), (self.path, self.reason))


# --------------------------------------------------------------------------- decoding
class _PilLimitOff:
    """Context manager: PIL's global decompression-bomb check off (we apply our own limits)."""

    def __enter__(self) -> None:
        _PIL_LIMIT_LOCK.acquire()
        self._saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None

    def __exit__(self, *exc: Any) -> None:
        Image.MAX_IMAGE_PIXELS = self._saved
        _PIL_LIMIT_LOCK.release()


def _scaled_size(size: Tuple[int, int], max_pixels: int) -> Tuple[int, int]:
    """The largest size with the same aspect ratio and at most `max_pixels` pixels."""
    w, h = size
    if w * h <= max_pixels:
        return w, h
    factor = math.sqrt(max_pixels / float(w * h))
    nw, nh = max(1, int(w * factor)), max(1, int(h * factor))
    while nw * nh > max_pixels:  # float rounding; at most a step or two
        if nw >= nh:
            nw -= 1
        else:
            nh -= 1
    return nw, nh


def _draft_target(size: Tuple[int, int], max_pixels: int, min_side: Optional[int]) -> Optional[Tuple[int, int]]:
    """The size to ask a JPEG decoder for (it decodes at 1/2, 1/4 or 1/8 scale, never below the request)."""
    w, h = size
    targets = []
    if w * h > max_pixels:
        targets.append(_scaled_size(size, max_pixels))
    if min_side is not None and min(w, h) > min_side:
        f = min_side / float(min(w, h))
        targets.append((max(1, math.ceil(w * f)), max(1, math.ceil(h * f))))
    if not targets:
        return None
    return min(targets, key=lambda t: t[0] * t[1])


def check_aspect_ratio(size: Tuple[int, int], label: str, max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> None:
    """Raise ImageLoadError naming `label` if an image of `size` is over `max_aspect_ratio` times its short side long."""
    w, h = size
    ratio = max(w, h) / max(1, min(w, h))
    if ratio > max_aspect_ratio:
        raise ImageLoadError(
            label,
            f"image is {w}x{h}, aspect ratio {ratio:.0f}:1 over max_aspect_ratio={max_aspect_ratio:g}; resizing its "
            f"shorter side for a model would need {ratio:.0f} times the pixels of a square image "
            "(raise max_aspect_ratio to load it)",
        )


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """Scale a 16-bit / 32-bit integer / float single-channel image to 8-bit grey."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        # full 16-bit range, as image viewers show it
        out = arr.astype(np.float32) / 257.0
    else:
        arr = arr.astype(np.float64)
        if im.mode == "F":
            arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
            out = arr * 255.0  # float images in [0, 1]
        elif lo >= 0.0 and hi <= 255.0:
            out = arr  # already 8-bit values
        elif im.mode == "I" and lo >= 0.0 and hi <= 65535.0:
            out = arr / 257.0  # 16-bit values stored as 32-bit ints (e.g. some 16-bit PNG/TIFF)
        else:
            out = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="L")


def to_rgb(im: Image.Image, background: Tuple[int, int, int] = WHITE) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: alpha composited on `background`, 16-bit/float scaled to 8 bit.

    Scaling rule for high bit depths: ``I;16*`` divides by 257 (full 16-bit range);
    ``I`` and ``F`` keep values already in 0..255, map ``F`` in [0, 1] and ``I`` in
    0..65535 linearly, and min-max stretch anything else (NaN/inf become 0).
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_l(im).convert("RGB")
    if mode in ("P", "L", "1", "RGB", "I") and "transparency" in im.info:
        im = im.convert("RGBA")  # palette / colour-key transparency becomes an alpha channel
        mode = "RGBA"
    if mode == "P":
        return im.convert("RGB")
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as err:
        raise ImageLoadError(getattr(im, "filename", None) or None, f"unsupported image mode {mode!r} ({err})") from None


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    """Rotate/flip by the EXIF orientation tag; a broken EXIF block is ignored (the pixels are fine)."""
    try:
        orientation = im.getexif().get(0x0112)
    except Exception as err:  # malformed EXIF: PIL raises assorted errors
        logger.debug("ignoring unreadable EXIF of %s: %s", getattr(im, "filename", "<image>"), err)
        return im
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(im)
    return im


def _warn_if_truncated_images_allowed() -> None:
    global _warned_truncated_flag
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated_flag:
        _warned_truncated_flag = True
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by some other code): truncated image files "
            "will be padded silently instead of reported"
        )


def load_image(
    source: ImageInput,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS,
    min_side: Optional[int] = None,
    background: Tuple[int, int, int] = WHITE,
    name: Optional[str] = None,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> Image.Image:
    """Decode an image file (path, bytes or binary file object) into 8-bit RGB, or raise ImageLoadError naming it.

    ``min_side``: if given, JPEGs may be decoded at a reduced DCT scale as long as the
    shorter side stays >= ``min_side`` (much faster when a model needs only 224 px).
    ``name`` labels bytes / file objects in error messages. ``max_aspect_ratio``: longer
    images are refused from the header, before any pixel is decoded.
    """
    if max_pixels < 1 or max_decode_pixels < 1:
        raise ValueError(f"max_pixels and max_decode_pixels must be positive, got {max_pixels}, {max_decode_pixels}")
    if not max_aspect_ratio >= 1:
        raise ValueError(f"max_aspect_ratio must be >= 1, got {max_aspect_ratio}")
    if isinstance(source, (bytes, bytearray)):
        label = name or "<bytes>"
        fp: Any = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        label = name or str(source)
        fp = Path(source)
        if not fp.exists():
            raise ImageLoadError(label, "file not found")
        if fp.is_dir():
            raise ImageLoadError(label, "is a directory, not an image file")
        fp = str(fp)
    else:
        label = name or str(getattr(source, "name", "<file object>"))
        fp = source
    _warn_if_truncated_images_allowed()
    try:
        with _PilLimitOff():  # header only: cheap
            im = Image.open(fp)
        with im:
            if im.width < 1 or im.height < 1:
                raise ImageLoadError(label, f"image has an empty size {im.size}")
            check_aspect_ratio(im.size, label, max_aspect_ratio)
            target = _draft_target(im.size, max_pixels, min_side)
            if target is not None:
                im.draft(None, target)  # JPEG only: decode at 1/2..1/8 scale; a no-op for other formats
            pixels = im.width * im.height
            if pixels > max_decode_pixels:
                raise ImageLoadError(
                    label,
                    f"image is {im.width}x{im.height} = {pixels} pixels and its format ({im.format}) cannot be "
                    f"decoded at reduced size; over max_decode_pixels={max_decode_pixels} (raise it to load this image)",
                )
            pil_limit = Image.MAX_IMAGE_PIXELS
            if pil_limit is not None and pixels > pil_limit:
                with _PilLimitOff():
                    im.load()
            else:
                im.load()
            out = _apply_exif_orientation(im)
            out = to_rgb(out, background)
            if out.width * out.height > max_pixels:
                out = out.resize(_scaled_size(out.size, max_pixels), Image.Resampling.BICUBIC, reducing_gap=3.0)
            if out is im:
                out = im.copy()  # detach from the (closed) file object
            return out
    except ImageLoadError as err:
        if err.path == "<bytes>" and label != "<bytes>":
            raise ImageLoadError(label, err.reason) from None
        raise
    except FileNotFoundError:
        raise ImageLoadError(label, "file not found") from None
    except PermissionError:
        raise ImageLoadError(label, "permission denied") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError(label, "not a recognised image format (corrupt or not an image)") from None
    except MemoryError:
        raise ImageLoadError(label, "out of memory while decoding") from None
    except Exception as err:  # PIL plugins raise many types on corrupt/truncated data
        raise ImageLoadError(label, f"corrupt or truncated image ({type(err).__name__}: {err})") from None


# ------------------------------------------------------------------ folders and lists
def list_images(root: PathLike, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> List[Path]:
    """All image files under `root` (recursive, symlinks followed, hidden files skipped), sorted by relative path."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    if not exts:
        raise ValueError("list_images: `extensions` is empty")
    found: List[Tuple[Tuple[str, ...], Path]] = []
    seen_dirs = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:  # symlink loop
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        # hidden entries (".git", macOS "._x.jpg" resource forks) are never images
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        rel_parts = base.relative_to(root).parts
        for fn in filenames:
            if fn.startswith(".") or os.path.splitext(fn)[1].lower() not in exts:
                continue
            found.append((rel_parts + (fn,), base / fn))
    if not found:
        raise ValueError(f"no image files ({', '.join(sorted(exts))}) found under {root}")
    found.sort(key=lambda item: item[0])
    return [p for _, p in found]


def read_file_list(path: PathLike, root: Optional[PathLike] = None, must_exist: bool = False) -> List[Path]:
    """Read a list of image paths, one per line (blank lines and ``#`` comments skipped).

    Relative entries are resolved against `root`, or the list file's folder when
    `root` is None. Duplicates, undecodable lines and (with ``must_exist``) missing
    files raise ValueError naming the list file and line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file list not found: {path}")
    base = Path(root) if root is not None else path.parent
    out: List[Path] = []
    first_line: Dict[str, int] = {}
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({err})") from None
            if lineno == 1:
                line = line.lstrip("\ufeff")  # byte-order mark
            if not line or line.startswith("#"):
                continue
            if "\x00" in line:
                raise ValueError(f"{path}:{lineno}: contains a NUL character")
            entry = Path(line)
            full = entry if entry.is_absolute() else base / entry
            key = os.path.normpath(str(full))
            if key in first_line:
                raise ValueError(f"{path}:{lineno}: duplicate entry {line!r} (first on line {first_line[key]})")
            first_line[key] = lineno
            if must_exist and not full.is_file():
                raise ValueError(f"{path}:{lineno}: image file not found: {full}")
            out.append(full)
    if not out:
        raise ValueError(f"file list {path} has no entries")
    return out


# ---------------------------------------------------------------------------- sources
class ImageSource(abc.ABC):
    """An indexable collection of images: ``len``, ``load(i)`` -> RGB image, ``describe(i)`` -> name for logs."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of images."""

    @abc.abstractmethod
    def load(self, index: int) -> Image.Image:
        """Decode image `index` to RGB, raising ImageLoadError on a bad one."""

    @abc.abstractmethod
    def describe(self, index: int) -> str:
        """A path or label for image `index`, used in logs and caches."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A hex digest identifying the content list (for cache keys)."""

    def names(self) -> List[str]:
        """All labels, in order."""
        return [self.describe(i) for i in range(len(self))]


class PathSource(ImageSource):
    """Images given as file paths."""

    def __init__(self, paths: Sequence[PathLike], load_kwargs: Optional[Dict[str, Any]] = None) -> None:
        self.paths = [str(p) for p in paths]
        self.load_kwargs = dict(load_kwargs or {})

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        """Decode the file at position `index`."""
        return load_image(self.paths[index], **self.load_kwargs)

    def describe(self, index: int) -> str:
        """The path string."""
        return self.paths[index]

    def names(self) -> List[str]:
        """All path strings."""
        return list(self.paths)

    def fingerprint(self) -> str:
        """SHA-256 over the path strings (the file list, not the pixels)."""
        h = hashlib.sha256(b"paths\n")
        for p in self.paths:
            h.update(p.encode("utf-8", "surrogateescape") + b"\n")
        return h.hexdigest()


class HFImageSource(ImageSource):
    """Images in one column of a map-style Hugging Face ``datasets.Dataset``, decoded by :func:`load_image`."""

    def __init__(self, dataset: Any, image_column: str = "image", load_kwargs: Optional[Dict[str, Any]] = None,
                 root: Optional[PathLike] = None) -> None:
        import datasets

        if isinstance(dataset, (datasets.IterableDataset, datasets.IterableDatasetDict)):
            raise TypeError("hf_image_source needs a map-style datasets.Dataset (with a length), not a streaming IterableDataset")
        if isinstance(dataset, datasets.DatasetDict):
            raise TypeError(f"hf_image_source got a DatasetDict with splits {list(dataset)}; pass one split, e.g. ds['train']")
        if image_column not in dataset.column_names:
            raise KeyError(f"dataset has no column {image_column!r}; columns: {dataset.column_names}")
        self._source_fingerprint = str(getattr(dataset, "_fingerprint", ""))
        ds = dataset.select_columns([image_column])
        if isinstance(ds.features[image_column], datasets.Image):
            # undecoded {bytes, path} dicts: corrupt bytes then fail in our loader, with a name, not inside datasets
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = ds
        self.column = image_column
        self.load_kwargs = dict(load_kwargs or {})
        self.root = Path(root) if root is not None else None  # relative image paths stored in the column

    def _path(self, item: Union[str, os.PathLike]) -> Path:
        path = Path(item)
        return path if path.is_absolute() or self.root is None else self.root / path

    def __len__(self) -> int:
        return len(self.dataset)

    def _item(self, index: int) -> Any:
        return self.dataset[int(index)][self.column]

    def describe(self, index: int) -> str:
        """The stored path of the image if it has one, else ``column[index]``."""
        item = self._item(index)
        if isinstance(item, dict) and item.get("path"):
            return f"{self.column}[{index}]:{item['path']}"
        if isinstance(item, str):
            return item
        return f"{self.column}[{index}]"

    def names(self) -> List[str]:
        """All labels, read from the Arrow column in one pass (no per-row decoding)."""
        try:
            import pyarrow as pa

            column = self.dataset.data.column(self.column).combine_chunks()
            if pa.types.is_struct(column.type):
                stored = column.field("path").to_pylist()
                return [f"{self.column}[{i}]:{p}" if p else f"{self.column}[{i}]" for i, p in enumerate(stored)]
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                return [str(p) for p in column.to_pylist()]
        except Exception as err:  # unusual storage: fall back to reading row by row
            logger.debug("reading image names row by row: %s", err)
        return [self.describe(i) for i in range(len(self))]

    def load(self, index: int) -> Image.Image:
        """Decode item `index` (a PIL image, a {bytes, path} dict or a path string)."""
        item = self._item(index)
        label = f"{self.column}[{index}]"
        if isinstance(item, Image.Image):
            try:
                check_aspect_ratio(item.size, label, self.load_kwargs.get("max_aspect_ratio", DEFAULT_MAX_ASPECT_RATIO))
                return to_rgb(item)
            except ImageLoadError as err:
                raise ImageLoadError(label, err.reason) from None
        if isinstance(item, dict):
            data, path = item.get("bytes"), item.get("path")
            if data is not None:
                return load_image(data, name=f"{label}:{path}" if path else label, **self.load_kwargs)
            if path:
                return load_image(self._path(path), **self.load_kwargs)
            raise ImageLoadError(label, "item has neither bytes nor a path")
        if isinstance(item, (str, os.PathLike)):
            return load_image(self._path(item), **self.load_kwargs)
        if item is None:
            raise ImageLoadError(label, "missing image (None)")
        raise ImageLoadError(label, f"unsupported item type {type(item).__name__}")

    def fingerprint(self) -> str:
        """Digest of the dataset's own fingerprint, column and length."""
        if not self._source_fingerprint:
            raise ValueError("this dataset has no fingerprint; it cannot key a feature cache")
        text = f"hf\n{self._source_fingerprint}\n{self.column}\n{len(self)}"
        return hashlib.sha256(text.encode()).hexdigest()


class SliceSource(ImageSource):
    """Images [start, stop) of another source, re-indexed from 0 (for chunked, resumable passes)."""

    def __init__(self, base: ImageSource, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= len(base):
            raise IndexError(f"slice [{start}, {stop}) is outside a source of {len(base)} images")
        self.base, self.start, self.stop = base, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def load(self, index: int) -> Image.Image:
        """Decode image `start + index` of the base source."""
        return self.base.load(self.start + index)

    def describe(self, index: int) -> str:
        """Label of image `start + index` of the base source."""
        return self.base.describe(self.start + index)

    def fingerprint(self) -> str:
        """Digest of the base fingerprint and the slice bounds."""
        return hashlib.sha256(f"{self.base.fingerprint()}[{self.start}:{self.stop}]".encode()).hexdigest()


class SubsetSource(ImageSource):
    """Images at given positions of another source, re-indexed from 0 (e.g. the ones an index still lacks)."""

    def __init__(self, base: ImageSource, indices: Sequence[int]) -> None:
        self.base, self.indices = base, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Image.Image:
        """Decode image `indices[index]` of the base source."""
        return self.base.load(self.indices[index])

    def describe(self, index: int) -> str:
        """Label of image `indices[index]` of the base source."""
        return self.base.describe(self.indices[index])

    def fingerprint(self) -> str:
        """Digest of the base fingerprint and the positions."""
        return hashlib.sha256(f"{self.base.fingerprint()}{self.indices}".encode()).hexdigest()


def subset(images: Union["ImageSource", Sequence[PathLike]], indices: Sequence[int]) -> Union["ImageSource", List]:
    """The images at `indices`: a list for a list of paths, a :class:`SubsetSource` for a source."""
    if isinstance(images, ImageSource):
        return SubsetSource(images, indices)
    return [images[i] for i in indices]


def hf_image_source(dataset: Any, image_column: str = "image", **load_kwargs: Any) -> HFImageSource:
    """Wrap a Hugging Face image dataset column as an :class:`ImageSource` (usable wherever paths are)."""
    return HFImageSource(dataset, image_column, load_kwargs)


def as_image_source(images: Union[ImageSource, Sequence[PathLike]]) -> ImageSource:
    """Turn a list of paths into a :class:`PathSource`; pass sources through."""
    if isinstance(images, ImageSource):
        return images
    if isinstance(images, (str, os.PathLike)):
        raise TypeError(f"expected a list of image paths or an ImageSource, got a single path {images!r} (use list_images)")
    try:
        import datasets

        if isinstance(images, datasets.Dataset):
            return HFImageSource(images)
    except ImportError:  # datasets is a dependency, but keep paths working without it
        pass
    return PathSource(list(images))


# --------------------------------------------------------------- dataset and batches
class ImageSample(NamedTuple):
    """One dataset item: `pixels` is None (and `error` says why) for a bad image."""

    index: int
    pixels: Any
    name: str
    error: Optional[str]


@dataclasses.dataclass
class ImageFailure:
    """A skipped image: its position, path/label and the reason."""

    index: int
    path: str
    reason: str


@dataclasses.dataclass
class ImageBatch:
    """Good images of a batch (`pixels` stacked, or a list when untransformed; None if all were bad) + failures."""

    indices: torch.Tensor
    pixels: Any
    failures: List[ImageFailure]


class ImageListDataset(torch.utils.data.Dataset):
    """Images from paths or an ImageSource, transformed; a bad image gives a sample with ``pixels=None``."""

    def __init__(
        self,
        images: Union[ImageSource, Sequence[PathLike]],
        transform: Optional[Callable[[Image.Image], Any]] = None,
    ) -> None:
        self.source = as_image_source(images)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> ImageSample:
        name = self.source.describe(index) if isinstance(self.source, PathSource) else f"#{index}"
        try:
            image = self.source.load(index)
        except ImageLoadError as err:
            return ImageSample(index, None, err.path, err.reason)
        if self.transform is None:
            return ImageSample(index, image, name, None)
        try:
            return ImageSample(index, self.transform(image), name, None)
        except Exception as err:  # e.g. an extreme aspect ratio the transform cannot handle
            return ImageSample(index, None, name, f"transform failed ({type(err).__name__}: {err})")


def collate_skip_bad(batch: Sequence[ImageSample]) -> ImageBatch:
    """Collate good samples (tensors stacked, others kept as a list) and report the bad ones."""
    good = [s for s in batch if s.error is None]
    failures = [ImageFailure(s.index, s.name, s.error or "") for s in batch if s.error is not None]
    indices = torch.tensor([s.index for s in good], dtype=torch.long)
    if not good:
        pixels = None
    elif all(isinstance(s.pixels, torch.Tensor) for s in good):
        pixels = torch.stack([s.pixels for s in good])
    else:
        pixels = [s.pixels for s in good]
    return ImageBatch(indices, pixels, failures)


def iter_image_batches(
    paths: Union[ImageSource, Sequence[PathLike]],
    transform: Optional[Callable[[Image.Image], Any]],
    batch_size: int,
    num_workers: int = 0,
    log: Optional[PathLike] = None,
    progress: bool = True,
    on_failure: Optional[Callable[[ImageFailure], None]] = None,
    abort_after: int = 64,
    desc: str = "images",
) -> Iterator[Tuple[torch.Tensor, Any]]:
    """Yield ``(indices LongTensor, pixels)`` for the good images, in order; bad ones are logged and skipped.

    Each bad image is written to `log` (``index<TAB>path<TAB>reason``, appended),
    logged as a warning and passed to `on_failure`; the total is reported at the
    end. If the first `abort_after` images all fail, something systematic is wrong
    (wrong folder, broken transform) and a RuntimeError stops the run early; a
    shorter list whose images all fail just yields nothing (and logs it).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset = ImageListDataset(paths, transform)
    total = len(dataset)
    if total == 0:
        raise ValueError("iter_image_batches: no images given")
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skip_bad,
        persistent_workers=False,
    )
    log_fh = None
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        log_fh = open(log, "a", encoding="utf-8")
    n_bad = n_seen = 0
    last_reason = ""
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress)
    try:
        for batch in loader:
            for failure in batch.failures:
                n_bad += 1
                last_reason = f"{failure.path}: {failure.reason}"
                logger.warning("skipping image %s: %s", failure.path, failure.reason)
                if log_fh is not None:
                    log_fh.write(f"{failure.index}\t{failure.path}\t{failure.reason}\n")
                    log_fh.flush()
                if on_failure is not None:
                    on_failure(failure)
            n_seen += len(batch.indices) + len(batch.failures)
            bar.update(len(batch.indices) + len(batch.failures))
            if n_bad == n_seen and n_seen >= abort_after:
                raise RuntimeError(
                    f"all of the first {n_seen} images failed to load (last: {last_reason}); "
                    "check the paths and the transform"
                )
            if len(batch.indices):
                yield batch.indices, batch.pixels
    finally:
        bar.close()
        if log_fh is not None:
            log_fh.close()
    if n_bad == total:
        logger.warning("none of the %d images could be loaded (last: %s)", total, last_reason)
    elif n_bad:
        where = f"; listed in {log}" if log is not None else ""
        logger.warning("skipped %d of %d images that could not be loaded%s", n_bad, total, where)
    else:
        logger.info("loaded all %d images", total)
