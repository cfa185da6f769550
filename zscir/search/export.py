"""Export an index's ids and embeddings as Parquet (Arrow), for vector databases and ``datasets``.

The file has two columns, ``id`` (int64 when every id is an integer, else
string) and ``embedding`` (fixed-size list of float32: the stored float16 rows,
exactly, L2-normalised for the cosine metric), one row per indexed image in
index order, and the index's settings under the schema metadata key ``zscir``
(model key, metric, dim, count). ``datasets`` reads it back with
``Dataset.from_parquet(path)`` and ``add_faiss_index("embedding")`` searches it
(inner product = the index's scores).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Union

import numpy as np

from .backends import EmbeddingIndexError
from .index import EmbeddingIndex

PARQUET_META_KEY = b"zscir"


def _id_type(ids: list, pa: Any, index: EmbeddingIndex) -> Any:
    kinds = {type(i) for i in ids}
    if kinds <= {int}:
        return pa.int64()
    if kinds <= {str}:
        return pa.string()
    raise EmbeddingIndexError(f"{index.folder} mixes string and integer ids; Parquet needs one id type per column")


def export_parquet(index: EmbeddingIndex, path: Union[str, os.PathLike], rows_per_group: int = 65536) -> Path:
    """Write the ids and embeddings of `index` to a Parquet file at `path` (atomically); returns the path.

    A failed write (a full disk, a missing folder) raises :class:`EmbeddingIndexError` naming the file and
    leaves neither a partial file nor any change to the index.
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("exporting to Parquet needs pyarrow: pip install pyarrow (it comes with datasets)") from None
    path = Path(path)
    if rows_per_group < 1:
        raise ValueError(f"rows_per_group must be >= 1, got {rows_per_group}")
    if not path.parent.is_dir():
        raise EmbeddingIndexError(f"cannot export to {path}: the folder {path.parent} does not exist")
    ids, dim, n = index.ids, index.dim, len(index)
    id_type = _id_type(ids, pa, index)
    needed = n * (4 * dim + 16)  # float32 rows plus ids, before compression
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        raise EmbeddingIndexError(f"cannot export {n} embeddings to {path}: about {needed / 1e9:.2f} GB needed, "
                                  f"{free / 1e9:.2f} GB free; nothing was written and the index is unchanged")
    info = {"model_key": index.model_key, "metric": index.metric, "dim": dim, "count": n, "source_dtype": "float16"}
    schema = pa.schema([("id", id_type), ("embedding", pa.list_(pa.float32(), dim))],
                       metadata={PARQUET_META_KEY: json.dumps(info).encode()})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with pq.ParquetWriter(str(tmp), schema) as writer:
            for start in range(0, n, rows_per_group):
                stop = min(n, start + rows_per_group)
                rows = np.ascontiguousarray(index.embeddings[start:stop], dtype=np.float32)
                column = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), dim)
                writer.write_table(pa.Table.from_arrays([pa.array(ids[start:stop], type=id_type), column], schema=schema))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)
        reason = "no space left on the device" if full else str(err)
        raise EmbeddingIndexError(f"exporting {index.folder} to {path} failed: {reason}; nothing was written there "
                                  "and the index is unchanged") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_parquet_info(path: Union[str, os.PathLike]) -> dict:
    """The index settings an export recorded (model key, metric, dim, count)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(str(path)).metadata or {}
    if PARQUET_META_KEY not in meta:
        raise EmbeddingIndexError(f"{path} is not a zscir index export (no {PARQUET_META_KEY.decode()!r} metadata)")
    return json.loads(meta[PARQUET_META_KEY])


__all__ = ["PARQUET_META_KEY", "export_parquet", "read_parquet_info"]
