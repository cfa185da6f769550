"""One on-disk embedding store: named arrays of rows (memory-mapped), ids, and a JSON record that commits appends.

A store folder::

    meta.json      the commit record: row count, array layout, ids size, skipped items, the owner's fields (atomic)
    ids.jsonl      one JSON id (string or integer) per row; absent when the ids are the row numbers
    <arrays>       one file per named array: rows of a fixed shape and dtype, little-endian, row-major
    .lock          advisory lock held while writing

An array file is either raw, growing with each append (``embeddings.f16`` of the
gallery index), or a ``.npy`` file preallocated for a known number of rows (the
Stage-I feature cache: ``pooled.npy``, ``patches.npy``, ``valid.npy``), whose
header length the layout records as the offset of row 0.

**Appends are transactions.** :meth:`EmbeddingStore.append` writes rows past the
committed row count, fsyncs the data files, then replaces ``meta.json``
atomically: ``meta.json`` is the only commit point, so whatever an interrupted
append left past the committed sizes is ignored by readers and overwritten by
the next append. A kill at any moment leaves the store as of its last commit,
and a writer resumes from there. Items that could not be embedded are recorded
in ``meta.json`` (``skipped``: id, reason and any details) with the same commit.

Users: :class:`zscir.search.index.EmbeddingIndex` (``zscir index``), the
evaluation gallery cache (:mod:`zscir.eval.encode`) and
:class:`zscir.data.features.FeatureCache`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Type, Union

import numpy as np

from ..checkpoint import atomic_write_json

STORE_FORMAT_VERSION = 1
META_NAME = "meta.json"
IDS_NAME = "ids.jsonl"
LOCK_NAME = ".lock"
Id = Union[str, int]
# the fields the store owns in meta.json; everything else belongs to the store's user
STORE_FIELDS = ("format_version", "count", "ids_bytes", "ids", "arrays", "skipped")


class StoreError(RuntimeError):
    """A store folder is missing, corrupt, or written to concurrently."""


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One named array of a store: its file, dtype, the shape of one row, and where row 0 starts."""

    file: str
    dtype: str  # a numpy dtype name: float16, float32, bool
    shape: Tuple[int, ...] = ()  # shape of one row
    offset: int = 0  # bytes before row 0 (the header of a .npy file)
    capacity: Optional[int] = None  # rows preallocated in a .npy file; None: a raw file that grows with each append

    @property
    def np_dtype(self) -> np.dtype:
        """The numpy dtype, little-endian."""
        return np.dtype(self.dtype).newbyteorder("<")

    @property
    def row_bytes(self) -> int:
        """Bytes per row."""
        return int(self.np_dtype.itemsize * int(np.prod(self.shape, dtype=np.int64)))

    def to_json(self) -> Dict[str, Any]:
        """The layout as written into ``meta.json``."""
        return {"file": self.file, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset,
                "capacity": self.capacity}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ArraySpec":
        """Read a layout written by :meth:`to_json`."""
        capacity = data.get("capacity")
        return cls(str(data["file"]), str(data["dtype"]), tuple(int(s) for s in data.get("shape", ())),
                   int(data.get("offset", 0)), None if capacity is None else int(capacity))


def check_id(value: Any, position: int) -> Id:
    """An id as stored: a string or an int (numpy integers converted); TypeError naming its position otherwise."""
    if isinstance(value, bool) or not isinstance(value, (str, int, np.integer)):
        raise TypeError(f"ids[{position}] = {value!r}: ids must be strings or integers")
    return int(value) if isinstance(value, np.integer) else value


class _FolderLock:
    """An exclusive advisory lock on the store folder, so two writers never interleave appends."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME

    def __enter__(self) -> "_FolderLock":
        self._fh = open(self.path, "a+")
        try:
            import fcntl

            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX)
        except ImportError:  # not POSIX: single-writer use is the caller's job
            pass
        return self

    def __exit__(self, *exc: Any) -> None:
        self._fh.close()  # closing releases the lock


class EmbeddingStore:
    """Rows of named arrays in a folder, with ids; appended in transactions that ``meta.json`` commits.

    Open one with :meth:`open`, make one with :meth:`create`; read rows with
    :meth:`array` (a read-only memory map of the committed rows), add rows with
    :meth:`add` or, for several writes in one commit, :meth:`append`.
    A user subclasses it to name its own exception and noun in messages.
    """

    error: Type[Exception] = StoreError
    noun = "store"  # what messages call the folder

    def __init__(self, folder: Path, meta: Dict[str, Any], ids: Optional[List[Id]]) -> None:
        self.folder = folder
        self.meta = meta
        self._ids = ids
        self._rows = None if ids is None else {i: r for r, i in enumerate(ids)}
        self._maps: Dict[str, np.ndarray] = {}
        self._locked = False

    # ---------------------------------------------------------------- open / create
    @classmethod
    def create(cls, folder: Union[str, os.PathLike], arrays: Mapping[str, ArraySpec],
               meta: Optional[Mapping[str, Any]] = None, positional_ids: bool = False) -> "EmbeddingStore":
        """Make an empty store (`meta`: the user's fields); arrays with a capacity are preallocated ``.npy`` files."""
        folder = Path(folder)
        if (folder / META_NAME).exists():
            raise cls.error(f"{folder} already holds a {cls.noun} ({META_NAME} exists)")
        clash = sorted(set(meta or {}) & set(STORE_FIELDS))
        if clash:
            raise ValueError(f"meta fields {clash} are the store's own")
        folder.mkdir(parents=True, exist_ok=True)
        layout = {}
        for name, spec in arrays.items():
            path = folder / spec.file
            if spec.capacity is None:
                path.write_bytes(b"")
                layout[name] = spec
            else:
                mm = np.lib.format.open_memmap(path, mode="w+", dtype=spec.np_dtype, shape=(spec.capacity, *spec.shape))
                layout[name] = dataclasses.replace(spec, offset=int(mm.offset))
                del mm
        record = {"format_version": STORE_FORMAT_VERSION, "count": 0}
        if positional_ids:
            record["ids"] = "positional"
        else:
            record["ids_bytes"] = 0
            (folder / IDS_NAME).write_bytes(b"")
        record.update(meta or {})
        record["arrays"] = {name: spec.to_json() for name, spec in layout.items()}
        record["skipped"] = []
        atomic_write_json(folder / META_NAME, record)  # written last: marks the folder as a store
        return cls(folder, record, None if positional_ids else [])

    @classmethod
    def open(cls, folder: Union[str, os.PathLike], meta: Optional[Dict[str, Any]] = None) -> "EmbeddingStore":
        """Open a store; `meta` replaces ``meta.json`` (a folder written in an older layout, translated by its user)."""
        folder = Path(folder)
        error = cls.error
        if meta is None:
            meta = cls.read_meta(folder)
        for name in ("format_version", "count", "arrays"):
            if name not in meta:
                raise error(f"{folder / META_NAME}: missing field {name!r}")
        if meta["format_version"] != STORE_FORMAT_VERSION:
            raise error(f"{folder / META_NAME}: format version {meta['format_version']}, expected {STORE_FORMAT_VERSION}")
        count = int(meta["count"])
        for name, data in meta["arrays"].items():
            spec = ArraySpec.from_json(data)
            path = folder / spec.file
            need = spec.offset + count * spec.row_bytes
            if not path.is_file() or path.stat().st_size < need:
                raise error(f"{path}: shorter than the {count} rows {META_NAME} records (corrupt {cls.noun})")
        ids = None if meta.get("ids") == "positional" else cls._read_ids(folder, meta, count)
        return cls(folder, meta, ids)

    @classmethod
    def read_meta(cls, folder: Union[str, os.PathLike]) -> Dict[str, Any]:
        """The parsed ``meta.json`` of a store folder (the store's error names a missing or invalid file)."""
        path = Path(folder) / META_NAME
        if not path.is_file():
            raise cls.error(f"no {cls.noun} at {folder} (missing {META_NAME})")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise cls.error(f"{path}: invalid JSON ({err})") from None

    @classmethod
    def _read_ids(cls, folder: Path, meta: Mapping[str, Any], count: int) -> List[Id]:
        """The committed ids (bytes past ``ids_bytes`` belong to an uncommitted append)."""
        path = folder / IDS_NAME
        if "ids_bytes" not in meta:
            raise cls.error(f"{folder / META_NAME}: missing field 'ids_bytes'")
        if not path.is_file() or path.stat().st_size < meta["ids_bytes"]:
            raise cls.error(f"{path}: shorter than {META_NAME} records (corrupt {cls.noun})")
        with open(path, "rb") as fh:
            raw = fh.read(int(meta["ids_bytes"]))
        ids: List[Id] = []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            try:
                ids.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise cls.error(f"{path}:{lineno}: invalid JSON ({err})") from None
        if len(ids) != count:
            raise cls.error(f"{path}: {len(ids)} ids for {count} embeddings (corrupt {cls.noun})")
        return ids

    # -------------------------------------------------------------------- reading
    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def arrays(self) -> Dict[str, ArraySpec]:
        """The layout of every named array."""
        return {name: ArraySpec.from_json(data) for name, data in self.meta["arrays"].items()}

    def array(self, name: str) -> np.ndarray:
        """The committed rows of array `name` as a read-only memory map [count, *row shape]."""
        mm = self._maps.get(name)
        if mm is None or mm.shape[0] != len(self):
            try:
                spec = ArraySpec.from_json(self.meta["arrays"][name])
            except KeyError:
                raise KeyError(f"no array {name!r} in {self.folder}; it has {sorted(self.meta['arrays'])}") from None
            if len(self) == 0:
                mm = np.zeros((0, *spec.shape), dtype=spec.np_dtype)
            else:
                mm = np.memmap(self.folder / spec.file, dtype=spec.np_dtype, mode="r", offset=spec.offset,
                               shape=(len(self), *spec.shape))
            self._maps[name] = mm
        return mm

    @property
    def positional_ids(self) -> bool:
        """True when the ids are the row numbers (no ids file)."""
        return self._ids is None

    @property
    def ids(self) -> List[Id]:
        """Ids in row order (a copy)."""
        return list(range(len(self))) if self._ids is None else list(self._ids)

    def __contains__(self, item_id: object) -> bool:
        if self._rows is None:
            return isinstance(item_id, int) and 0 <= item_id < len(self)
        return item_id in self._rows

    def row_of(self, item_id: Id) -> int:
        """Row number of an id (KeyError naming it if absent)."""
        if item_id not in self:
            raise KeyError(f"id {item_id!r} is not in the {self.noun} {self.folder}")
        return int(item_id) if self._rows is None else self._rows[item_id]

    def id_at(self, row: int) -> Id:
        """The id of a row."""
        return row if self._ids is None else self._ids[row]

    @property
    def skipped(self) -> List[Dict[str, Any]]:
        """Items that could not be stored: dicts with id, reason and the details their writer gave."""
        return list(self.meta.get("skipped", []))

    # -------------------------------------------------------------------- writing
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's writer lock (re-entrant within this object)."""
        if self._locked:
            yield
            return
        with _FolderLock(self.folder):
            self._locked = True
            try:
                yield
            finally:
                self._locked = False

    def _check_unchanged(self) -> None:
        """Refuse to write over rows another writer committed since this object read ``meta.json``."""
        meta_path = self.folder / META_NAME
        if meta_path.is_file() and json.loads(meta_path.read_text()).get("count") != self.meta["count"]:
            raise self.error(f"{self.folder} was changed by another writer; open it again before adding")

    def set_meta(self, **fields: Any) -> None:
        """Replace user fields of ``meta.json`` atomically (the store's own fields are refused)."""
        clash = sorted(set(fields) & set(STORE_FIELDS))
        if clash:
            raise ValueError(f"meta fields {clash} are the store's own")
        with self.lock():
            self._check_unchanged()
            self.meta = dict(self.meta, **fields)
            atomic_write_json(self.folder / META_NAME, self.meta)

    @contextlib.contextmanager
    def append(self) -> Iterator["StoreAppend"]:
        """A transaction: rows written through it are committed together when the block ends without an error."""
        with self.lock():
            self._check_unchanged()
            txn = StoreAppend(self)
            try:
                yield txn
            finally:
                txn.close()
            txn.commit()

    @contextlib.contextmanager
    def write_at(self, row: int) -> Iterator["StoreAppend"]:
        """Rows written through it fill preallocated rows `row`, `row` + 1, ... and are fsynced; nothing is committed.

        For several processes filling disjoint row ranges of one preallocated
        store (sharded encoding): each records its own progress, and the
        owner commits the rows later with :meth:`commit_count`.
        """
        growing = sorted(name for name, spec in self.arrays.items() if spec.capacity is None)
        if growing or not self.positional_ids:
            raise self.error(f"{self.folder}: write_at needs preallocated arrays and positional ids "
                             f"(growing arrays: {growing}, positional ids: {self.positional_ids})")
        txn = StoreAppend(self, start=int(row))
        try:
            yield txn
        finally:
            txn.close()

    def commit_count(self, count: int, skipped: Sequence[Mapping[str, Any]] = ()) -> None:
        """Commit rows up to `count` that :meth:`write_at` filled, and record skipped items, in one ``meta.json`` write."""
        capacity = min((spec.capacity for spec in self.arrays.values()), default=0)
        if not self.positional_ids or not len(self) <= count <= (capacity or 0):
            raise ValueError(f"cannot commit {count} rows of {self.folder} ({len(self)} committed, capacity {capacity})")
        with self.lock():
            self._check_unchanged()
            new = {s["id"] for s in skipped}
            kept = [s for s in self.meta.get("skipped", []) if s["id"] not in new]
            meta = dict(self.meta, count=int(count), skipped=kept + [dict(s) for s in skipped])
            atomic_write_json(self.folder / META_NAME, meta)
            self.meta = meta
            self._maps.clear()

    def extend(self, other: "EmbeddingStore", rows_per_write: int = 65536) -> int:
        """Append the rows and skipped items of `other` (same arrays) in one transaction; returns the rows added.

        Rows whose id this store already holds are left out, so extending again
        after an interrupted merge adds nothing twice.
        """
        mine = {name: (spec.dtype, spec.shape) for name, spec in self.arrays.items()}
        theirs = {name: (spec.dtype, spec.shape) for name, spec in other.arrays.items()}
        if mine != theirs:
            raise self.error(f"{other.folder} has arrays {theirs}, {self.folder} has {mine}: they cannot be merged")
        if self.positional_ids or other.positional_ids:
            raise self.error(f"{self.folder}: only stores with ids can be extended from another store")
        ids = other.ids
        added = 0
        with self.append() as txn:
            for start in range(0, len(ids), rows_per_write):
                stop = min(len(ids), start + rows_per_write)
                keep = [r for r in range(start, stop) if ids[r] not in self]
                if keep:
                    sel = slice(start, stop) if len(keep) == stop - start else keep
                    txn.write({name: np.asarray(other.array(name)[sel]) for name in mine}, [ids[r] for r in keep])
                    added += len(keep)
            for item in other.skipped:
                if item["id"] not in self and item["id"] not in txn._new_ids:
                    txn.skip(**item)
        return added

    def add(self, ids: Optional[Sequence[Id]], rows: Mapping[str, np.ndarray],
            skipped: Sequence[Mapping[str, Any]] = ()) -> None:
        """Append rows of every array with their ids (None for positional ids) and record skipped items, in one commit."""
        with self.append() as txn:
            txn.write(rows, ids)
            for item in skipped:
                txn.skip(**item)


class StoreAppend:
    """The open files of one append: rows go past the committed count until :meth:`commit`."""

    def __init__(self, store: EmbeddingStore, start: Optional[int] = None) -> None:
        self.store = store
        self.count = len(store) if start is None else int(start)  # the row the first write lands on
        self.rows = 0  # rows written so far in this transaction
        self.ids: List[Id] = []
        self._ids_blob: List[bytes] = []
        self._new_ids: set = set()
        self.skipped: List[Dict[str, Any]] = []
        self._specs = store.arrays
        self._files: Dict[str, BinaryIO] = {}
        for name, spec in self._specs.items():
            fh = open(store.folder / spec.file, "r+b")
            end = spec.offset + self.count * spec.row_bytes
            if spec.capacity is None:
                fh.truncate(end)  # cut off what an interrupted append left behind
            fh.seek(end)
            self._files[name] = fh
        self._ids_file = None
        if not store.positional_ids:
            self._ids_file = open(store.folder / IDS_NAME, "r+b")
            self._ids_file.truncate(int(store.meta["ids_bytes"]))
            self._ids_file.seek(int(store.meta["ids_bytes"]))

    def write(self, rows: Mapping[str, np.ndarray], ids: Optional[Sequence[Id]] = None) -> None:
        """Append rows [n, *row shape] of every array, with their ids (None for a store with positional ids)."""
        if set(rows) != set(self._specs):
            raise ValueError(f"rows must give every array of the store {sorted(self._specs)}, got {sorted(rows)}")
        sizes = {name: len(r) for name, r in rows.items()}
        n = next(iter(sizes.values()), 0)
        if len(set(sizes.values())) > 1:
            raise ValueError(f"arrays have different row counts: {sizes}")
        if self.store.positional_ids:
            if ids is not None:
                raise ValueError(f"{self.store.folder} numbers its rows; give ids=None")
        else:
            ids = self._check_ids(ids, n)
        blobs = {}
        for name, spec in self._specs.items():
            arr = np.ascontiguousarray(rows[name], dtype=spec.np_dtype)
            if tuple(arr.shape[1:]) != spec.shape:
                raise ValueError(f"{name} rows must be [n, {', '.join(map(str, spec.shape))}], got shape {tuple(arr.shape)}")
            if spec.capacity is not None and self.count + self.rows + n > spec.capacity:
                raise ValueError(f"{spec.file} holds {spec.capacity} rows; cannot append past them")
            blobs[name] = arr.tobytes()
        for name, blob in blobs.items():
            self._files[name].write(blob)
        if ids is not None:
            blob = "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in ids).encode("utf-8")
            self._ids_file.write(blob)
            self._ids_blob.append(blob)
            self.ids.extend(ids)
            self._new_ids.update(ids)
        self.rows += n

    def skip(self, id: Id, reason: str, **details: Any) -> None:
        """Record an item that could not be stored (replaces an earlier record of the same id)."""
        self.skipped.append({"id": id, "reason": str(reason), **details})

    def _check_ids(self, ids: Optional[Sequence[Id]], n: int) -> List[Id]:
        if ids is None:
            raise ValueError(f"{self.store.folder} needs an id per row")
        ids = [check_id(v, i) for i, v in enumerate(ids)]
        if len(ids) != n:
            raise ValueError(f"{len(ids)} ids for {n} embeddings")
        counts: Dict[Id, int] = {}
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
        dup_batch = [i for i, c in counts.items() if c > 1]
        if dup_batch:
            raise ValueError(f"duplicate ids within the batch: {dup_batch[:10]}{' ...' if len(dup_batch) > 10 else ''}")
        existing = [i for i in ids if i in self.store or i in self._new_ids]
        if existing:
            raise ValueError(
                f"{len(existing)} id(s) already in the {self.store.noun} {self.store.folder}: {existing[:10]}{' ...' if len(existing) > 10 else ''}"
            )
        return ids

    def close(self) -> None:
        """Flush and fsync the data files (nothing is committed yet)."""
        handles = list(self._files.values()) + ([self._ids_file] if self._ids_file is not None else [])
        for fh in handles:
            if not fh.closed:
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()

    def commit(self) -> None:
        """Rewrite ``meta.json`` with the new rows and skipped items: the commit point."""
        store = self.store
        if not self.rows and not self.skipped:
            return
        new_skips = {s["id"] for s in self.skipped}
        kept = [s for s in store.meta.get("skipped", []) if s["id"] not in self._new_ids and s["id"] not in new_skips]
        meta = dict(store.meta, count=self.count + self.rows, skipped=kept + self.skipped)
        if not store.positional_ids:
            meta["ids_bytes"] = int(store.meta["ids_bytes"]) + sum(len(b) for b in self._ids_blob)
        atomic_write_json(store.folder / META_NAME, meta)
        store.meta = meta
        if store._ids is not None:
            for i in self.ids:
                store._rows[i] = len(store._ids)
                store._ids.append(i)
        store._maps.clear()

