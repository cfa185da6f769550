"""Where images, triplets and queries come from: one way to name a data source, on every command.

A data source is one string:

* an image folder (searched recursively) or a text file listing image paths, one per line (``.txt``);
* a zscir file: triplets ``.jsonl`` / ``.json`` / ``.csv`` (:mod:`zscir.data.triplets`), captions ``.jsonl``;
* a data file the ``datasets`` library reads (``.parquet``, ``.arrow``);
* a ``save_to_disk`` folder (a ``Dataset`` or a ``DatasetDict``), or a folder of data files such as a Hub data
  set downloaded with ``huggingface-cli download --repo-type dataset`` (``data/train-*.parquet``);
* a Hugging Face Hub data set id (``user/name``), loaded by ``datasets`` through the HF cache; with
  ``HF_HUB_OFFLINE=1`` the cached copy is used (``datasets``' own cache, else the hub cache's snapshot).

Two modifiers apply to data sets: `split` picks one split of a ``DatasetDict`` (default: ``train`` when there is
one, else the only split), and `columns` maps zscir's field names to the data set's columns
(``reference=src,modification=text``; see :func:`parse_columns`). With a mapping, the data set's other columns
are ignored; without one, its columns must be zscir's field names. Every problem is one error naming the source,
the split or the column, and what to pass instead.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .images import IMAGE_EXTENSIONS, HFImageSource, ImageSource, PathSource, list_images, read_file_list

__all__ = ["COLUMNS_FLAG", "DATA_FILE_SUFFIXES", "DataSourceError", "ImageData", "choose_split",
           "is_dataset_folder", "is_dataset_source", "load_dataset_source", "map_columns", "open_images",
           "parse_columns"]

PathLike = Union[str, "os.PathLike[str]"]
COLUMNS_FLAG = "--columns"
#: Files read as a data set (not as zscir's own formats) by their suffix.
DATA_FILE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_DEFAULT_SPLIT = "train"


class DataSourceError(ValueError):
    """A data source, split or column that cannot be used; the message names it and the fix."""


# --------------------------------------------------------------------------------------------- columns
def parse_columns(spec: Union[None, str, Mapping[str, str]], allowed: Sequence[str],
                  flag: str = COLUMNS_FLAG) -> Dict[str, str]:
    """``"field=column,..."`` (or a dict) as {field: column}; unknown fields and bad syntax are one error."""
    if not spec:
        return {}
    items = list(spec.items()) if isinstance(spec, Mapping) else []
    if isinstance(spec, str):
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            field, sep, column = (s.strip() for s in part.partition("="))
            if not sep or not field or not column:
                raise DataSourceError(f"{flag} {spec!r}: expected FIELD=COLUMN pairs separated by commas, "
                                      f"e.g. {allowed[0]}=my_column")
            items.append((field, column))
    out: Dict[str, str] = {}
    for field, column in items:
        if field not in allowed:
            raise DataSourceError(f"{flag}: {field!r} is not a field here; fields: {', '.join(allowed)}")
        if field in out:
            raise DataSourceError(f"{flag}: field {field!r} is mapped twice")
        out[field] = column
    return out


def map_columns(ds: Any, columns: Mapping[str, str], label: str, fields: Sequence[str],
                required: Sequence[str] = (), flag: str = COLUMNS_FLAG) -> Any:
    """The data set with its columns renamed to zscir's fields (`columns`: field -> column).

    With a mapping, only mapped columns and columns already named like a field are kept. A mapped column the
    data set lacks, or a required field without a column, is one error listing the columns it has.
    """
    have = list(ds.column_names)
    shown = ", ".join(have)
    for field, column in columns.items():
        if column not in have:
            raise DataSourceError(f"{label} has no column {column!r} (mapped to {field!r} by {flag}); its "
                                  f"columns: {shown}")
        if column != field and field in have and field not in columns.values():
            raise DataSourceError(f"{label}: {flag} maps {column!r} to {field!r}, but it has a column {field!r} "
                                  f"too; map {field!r} to another field or drop it")
    renames = {column: field for field, column in columns.items() if column != field}
    if columns:
        keep = [c for c in have if c in renames or c in columns.values() or (c in fields and c not in renames)]
        ds = ds.select_columns(keep)
    if renames:
        ds = ds.rename_columns(renames)
    missing = [f for f in required if f not in ds.column_names]
    if missing:
        field = missing[0]
        raise DataSourceError(f"{label} has no {field!r} column; its columns: {shown}; map one with "
                              f"{flag} {field}=COLUMN")
    return ds


# ---------------------------------------------------------------------------------------------- sources
def is_dataset_folder(path: PathLike) -> bool:
    """A ``save_to_disk`` folder, or a folder holding data files (``*.parquet`` / ``*.arrow``, two levels deep)."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    if any((folder / marker).is_file() for marker in _SAVED_MARKERS):
        return True
    for pattern in ("*", "*/*"):
        if any(p.suffix in DATA_FILE_SUFFIXES for p in folder.glob(pattern) if p.is_file()):
            return True
    return False


def _looks_like_hub_id(text: str) -> bool:
    """``owner/name`` (a bare word is more likely a mistyped folder) that is not a file name."""
    from ..hub import is_repo_id

    suffix = Path(text).suffix.lower()
    return is_repo_id(text) and "/" in text and suffix not in set(IMAGE_EXTENSIONS) | {".txt", ".jsonl", ".csv"}


def is_dataset_source(source: Any) -> bool:
    """Whether `source` is read through ``datasets`` (a Dataset, a data set folder or file, or a Hub id)."""
    if not isinstance(source, (str, os.PathLike)):
        return True
    path = Path(source)
    if path.is_dir():
        return is_dataset_folder(path)
    if path.exists():
        return path.suffix.lower() in DATA_FILE_SUFFIXES
    return _looks_like_hub_id(os.fspath(source))


def choose_split(obj: Any, split: Optional[str], label: str, flag: str = "--split") -> Tuple[Any, str]:
    """One split of a ``DatasetDict`` (or the ``Dataset`` itself) and its label; unknown splits name the choices."""
    import datasets

    if isinstance(obj, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise DataSourceError(f"{label}: a streaming data set; zscir needs a map-style one (load it without "
                              "streaming=True)")
    if isinstance(obj, datasets.DatasetDict):
        names = list(obj)
        if split is None:
            if _DEFAULT_SPLIT in obj or len(names) == 1:
                split = _DEFAULT_SPLIT if _DEFAULT_SPLIT in obj else names[0]
            else:
                raise DataSourceError(f"{label} has splits {', '.join(names)}; choose one with {flag}")
        if split not in obj:
            raise DataSourceError(f"{label} has no split {split!r}; its splits: {', '.join(names)}; pass {flag} "
                                  "with one of them")
        return obj[split], f"{label}[{split}]"
    if not isinstance(obj, datasets.Dataset):
        raise DataSourceError(f"{label}: expected a datasets.Dataset or DatasetDict, got {type(obj).__name__}")
    return obj, label if split is None else f"{label}[{split}]"


def _load_hub(repo_id: str, split: Optional[str], revision: Optional[str]) -> Any:
    """A Hub data set through ``datasets`` (cache, offline, token), or the hub cache's snapshot when offline."""
    import datasets
    from huggingface_hub import errors, snapshot_download

    try:
        return datasets.load_dataset(repo_id, revision=revision)
    except (ConnectionError, errors.OfflineModeIsEnabled) as err:
        first: Exception = err
    except datasets.exceptions.DatasetNotFoundError:
        raise DataSourceError(f"{repo_id!r}: no such file or folder, and no Hub data set of that name (or it is "
                              "private or gated: log in with huggingface-cli login or set HF_TOKEN)") from None
    try:  # offline or unreachable: a snapshot in the hub cache (huggingface-cli download --repo-type dataset)
        folder = snapshot_download(repo_id, repo_type="dataset", revision=revision)
    except (errors.LocalEntryNotFoundError, errors.HfHubHTTPError, OSError):
        from huggingface_hub import constants

        why = "HF_HUB_OFFLINE=1 forbids downloading it" if constants.HF_HUB_OFFLINE else \
            f"the Hub could not be reached ({first})"
        fix = "or unset HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else "or check the connection"
        raise DataSourceError(f"data set {repo_id!r} is not in the Hugging Face cache and {why}; download it once "
                              f"online (huggingface-cli download --repo-type dataset {repo_id}), {fix}") from None
    return _read(f"{repo_id} (cached at {folder})", datasets.load_dataset, folder)


def _read(label: str, load: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a ``datasets`` loader; what it raises for an unreadable source becomes one DataSourceError naming it."""
    try:
        return load(*args, **kwargs)
    except (DataSourceError, FileNotFoundError):
        raise
    except Exception as err:  # datasets raises many types (DatasetGenerationError, ArrowInvalid, ...) for bad files
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataSourceError(f"{label}: could not be read as a data set ({type(err).__name__}: {first})") from None


def load_dataset_source(source: Any, split: Optional[str] = None, revision: Optional[str] = None,
                        what: str = "data set") -> Tuple[Any, str]:
    """One map-style split of a data set named by any source form (see the module doc) and its label."""
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.DatasetDict, datasets.IterableDataset,
                           datasets.IterableDatasetDict)):
        return choose_split(source, split, f"{what} <in memory>")
    text = os.fspath(source)
    path = Path(text)
    if path.is_dir():
        if any((path / marker).is_file() for marker in _SAVED_MARKERS):
            obj = _read(f"{text} (a save_to_disk folder)", datasets.load_from_disk, text)
        elif is_dataset_folder(path):
            obj = _read(text, datasets.load_dataset, text)
        else:
            raise DataSourceError(f"{text}: a folder without a data set (no save_to_disk files, no .parquet or "
                                  ".arrow files)")
    elif path.is_file():
        builder = DATA_FILE_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise DataSourceError(f"{text}: not a data set file (expected {', '.join(DATA_FILE_SUFFIXES)})")
        obj = _read(text, datasets.load_dataset, builder, data_files=text)
    elif _looks_like_hub_id(text):
        obj = _load_hub(text, split, revision)
    else:
        raise FileNotFoundError(f"{what} not found: {text} (no such file or folder, and not a Hub data set id)")
    return choose_split(obj, split, text)


# ----------------------------------------------------------------------------------------------- images
@dataclasses.dataclass
class ImageData:
    """Images of a source: loader, one id per image, the folder ids are relative to (None for data sets)."""

    source: ImageSource
    ids: List[str]
    base: Optional[Path]
    label: str
    extra: Dict[str, List[Any]] = dataclasses.field(default_factory=dict)  # other fields read from a data set

    def settings(self) -> Dict[str, Any]:
        """What identifies these images in a run's settings: their number and a fingerprint."""
        return {"images": len(self.ids), "sha256": self.source.fingerprint()}


IMAGE_FIELDS = ("image", "id")


def open_images(source: Any, split: Optional[str] = None, columns: Optional[Mapping[str, str]] = None,
                image_root: Optional[PathLike] = None, extra_fields: Sequence[str] = ()) -> ImageData:
    """The images of a folder, a file list or a data set's image column (`columns`: image=COLUMN, id=COLUMN).

    Ids are paths relative to the folder (file lists: to `image_root`, default the list's folder); for data sets,
    the `id` column when there is one, else the stored file name or ``image[i]``. Relative paths stored in a data
    set are read from `image_root`. The values of `extra_fields` a data set has (e.g. ``caption``) are returned
    in ``ImageData.extra``.
    """
    columns = dict(columns or {})
    if isinstance(source, (str, os.PathLike)) and not is_dataset_source(source):
        path = Path(source)
        if path.is_dir():
            paths = list_images(path)
            base = path
        elif path.is_file():
            base = Path(image_root) if image_root else path.parent
            paths = read_file_list(path, root=image_root)
        else:
            raise FileNotFoundError(f"images not found: {source} (give an image folder, a text file listing images, "
                                    "a data set folder or file, or a Hub data set id)")
        if columns:
            raise DataSourceError(f"{COLUMNS_FLAG} applies to data sets; {source} is a "
                                  f"{'folder' if path.is_dir() else 'file list'} of images")
        ids = []
        for p in paths:
            try:
                ids.append(p.relative_to(base).as_posix())
            except ValueError:  # absolute entries outside the base keep their full path
                ids.append(p.as_posix())
        return ImageData(PathSource(paths), ids, base, os.fspath(source))
    ds, label = load_dataset_source(source, split)
    ds = map_columns(ds, columns, label, IMAGE_FIELDS + tuple(extra_fields), required=("image",))
    extra = {f: list(ds[f]) for f in extra_fields if f in ds.column_names}
    images = HFImageSource(ds, "image", root=image_root)
    if "id" in ds.column_names:
        ids = [str(i) for i in ds["id"]]
        if len(set(ids)) != len(ids):
            raise DataSourceError(f"{label}: the id column holds repeated values; map a unique one with "
                                  f"{COLUMNS_FLAG} id=COLUMN")
    else:
        ids = images.names()
    return ImageData(images, ids, None, label, extra)
