"""Gallery search: exact chunked top-k (torch), an on-disk embedding index, FAISS backends, CLI glue.

:func:`exact_topk` is the reference search used by evaluation and by the
``exact`` backend. It never materialises the full query x gallery score matrix:
the gallery is read in chunks (a float16 memory map is upcast one chunk at a
time), queries in blocks of at most 2^25 scores, and a running top-k is merged
after each chunk. Peak extra memory is about one float32 gallery chunk
(``chunk_size x D x 4`` bytes, 128 MiB for D = 512) plus one 128 MiB score block,
whatever the gallery size.

Tie rule (shared with :mod:`zscir.eval.metrics`): among equal scores the lower
gallery index ranks first, so the same scores always give the same ranking.
(FAISS backends are approximate and make no tie promise.)

:class:`EmbeddingIndex` keeps gallery embeddings in a folder (float16 rows,
memory-mapped; ids as JSON lines; ``meta.json`` as the atomic commit record) and
searches them with a backend from :data:`BACKENDS`: ``exact`` (default),
or FAISS ``flat``, ``ivf``, ``hnsw``, ``pq``, ``ivfpq`` (inner product on
L2-normalised vectors, saved with ``faiss.write_index``; needs ``pip install zscir[faiss]``).

``index_add_arguments``/``index_run`` and ``search_add_arguments``/``search_run``
implement ``zscir index`` and ``zscir search``.
"""
from __future__ import annotations

import abc
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .checkpoint import atomic_write_json
from .registry import Registry

if TYPE_CHECKING:
    import argparse

logger = logging.getLogger(__name__)

ArrayLike = Union[torch.Tensor, np.ndarray]

# at most this many float32 scores per block (128 MB): queries are processed in blocks below it
_SCORE_BLOCK_ELEMENTS = 1 << 25


def _gallery_chunk(gallery: ArrayLike, start: int, end: int, device: torch.device) -> torch.Tensor:
    """Rows [start, end) of the gallery as a float32 tensor on `device` (float16 upcast here, per chunk)."""
    if isinstance(gallery, torch.Tensor):
        chunk = gallery[start:end]
    else:
        chunk = torch.from_numpy(np.asarray(gallery[start:end], dtype=np.float32))  # a fresh, writable float32 copy
    return chunk.to(device=device, dtype=torch.float32)


def _sorted_by_score_then_index(values: torch.Tensor, indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by score (descending), equal scores by index (ascending)."""
    order = indices.argsort(dim=1, stable=True)
    values, indices = values.gather(1, order), indices.gather(1, order)
    order = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, order), indices.gather(1, order)


def _block_topk(scores: torch.Tensor, k: int, offset: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k of a score block with exact tie handling at the k-th value (lowest indices win)."""
    width = scores.shape[1]
    # one extra candidate tells whether the k-th score is tied with an item left out
    values, cols = scores.topk(min(k + 1, width), dim=1, largest=True, sorted=True)
    if values.shape[1] > k:
        boundary_tied = values[:, k] == values[:, k - 1]
        values, cols = values[:, :k].contiguous(), cols[:, :k].contiguous()
        # torch.topk picks arbitrary members among equal k-th scores: redo those rows by index order
        for row in torch.nonzero(boundary_tied).flatten().tolist():
            kth = values[row, k - 1]
            above = values[row] > kth
            tied = torch.nonzero(scores[row] == kth).flatten()[: k - int(above.sum())]
            cols[row] = torch.cat([cols[row][above], tied])
            values[row] = torch.cat([values[row][above], scores[row, tied]])
    return _sorted_by_score_then_index(values, cols + offset)


def _exclusion_pairs(exclude: Sequence[Sequence[int]], n_queries: int, n_gallery: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flatten per-query exclusions into (query, gallery) index pairs sorted by gallery index."""
    if len(exclude) != n_queries:
        raise ValueError(f"exclude has {len(exclude)} entries but there are {n_queries} queries (one list per query)")
    qs, gs = [], []
    for qi, items in enumerate(exclude):
        for g in items if items is not None else ():
            g = int(g)
            if not 0 <= g < n_gallery:
                raise IndexError(f"exclude[{qi}] contains gallery index {g}, outside 0..{n_gallery - 1}")
            qs.append(qi)
            gs.append(g)
    q = torch.tensor(qs, dtype=torch.long)
    g = torch.tensor(gs, dtype=torch.long)
    order = g.argsort(stable=True)
    return q[order], g[order]


def exact_topk(
    queries: ArrayLike,
    gallery: ArrayLike,
    k: int,
    chunk_size: int = 65536,
    exclude: Optional[Sequence[Sequence[int]]] = None,
    progress: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k of queries [Q, D] over a gallery [N, D] (tensor, array or memmap), chunked.

    Returns ``(scores [Q, k'] float32, indices [Q, k'] int64)`` with ``k' = min(k, N)``,
    best first; equal scores are ordered by gallery index, lower first.
    ``exclude[i]`` lists gallery indices never returned for query i; when a query
    has fewer than k' candidates left, its row is padded with score ``-inf`` and
    index ``-1``. Non-finite values in queries or gallery raise ValueError naming
    the row. Results are on the queries' device.
    """
    from tqdm.auto import tqdm

    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    q = queries if isinstance(queries, torch.Tensor) else torch.from_numpy(np.asarray(queries))
    if q.ndim != 2:
        raise ValueError(f"queries must be 2-D [Q, D], got shape {tuple(q.shape)}")
    if gallery.ndim != 2:
        raise ValueError(f"gallery must be 2-D [N, D], got shape {tuple(gallery.shape)}")
    n, dim = int(gallery.shape[0]), int(gallery.shape[1])
    if q.shape[1] != dim:
        raise ValueError(f"queries have dimension {q.shape[1]} but the gallery has {dim}")
    if n == 0:
        raise ValueError("the gallery is empty")
    device = q.device
    q = q.detach().to(torch.float32)
    bad = torch.nonzero(~torch.isfinite(q).all(dim=1)).flatten()
    if len(bad):
        raise ValueError(f"queries contain NaN/inf in {len(bad)} row(s), e.g. query {int(bad[0])}")
    n_queries = q.shape[0]
    k = min(k, n)
    if n_queries == 0:
        return torch.empty(0, k, device=device), torch.empty(0, k, dtype=torch.long, device=device)
    ex_q = ex_g = None
    if exclude is not None:
        ex_q, ex_g = _exclusion_pairs(exclude, n_queries, n)
    q_block = max(1, min(n_queries, _SCORE_BLOCK_ELEMENTS // min(chunk_size, n)))

    best_v = torch.full((n_queries, 0), float("-inf"), device=device)
    best_i = torch.full((n_queries, 0), -1, dtype=torch.long, device=device)
    bar = tqdm(total=n, desc="search", unit="item", disable=not progress)
    for start in range(0, n, chunk_size):
        end = min(n, start + chunk_size)
        g = _gallery_chunk(gallery, start, end, device)
        finite = torch.isfinite(g.sum(dim=1))  # a NaN/inf anywhere in a row makes its sum non-finite
        if not bool(finite.all()):
            row = start + int(torch.nonzero(~finite)[0])
            raise ValueError(f"gallery contains NaN/inf, e.g. in row {row}")
        if ex_g is not None:
            lo, hi = torch.searchsorted(ex_g, torch.tensor([start, end])).tolist()
            chunk_ex_q, chunk_ex_g = ex_q[lo:hi].to(device), (ex_g[lo:hi] - start).to(device)
        kk = min(k, end - start)
        new_v = torch.empty(n_queries, kk, device=device)
        new_i = torch.empty(n_queries, kk, dtype=torch.long, device=device)
        for qs in range(0, n_queries, q_block):
            qe = min(n_queries, qs + q_block)
            scores = q[qs:qe] @ g.T
            if ex_g is not None and len(chunk_ex_g):
                in_block = (chunk_ex_q >= qs) & (chunk_ex_q < qe)
                scores[chunk_ex_q[in_block] - qs, chunk_ex_g[in_block]] = float("-inf")
            new_v[qs:qe], new_i[qs:qe] = _block_topk(scores, kk, start)
            del scores
        # both lists are sorted (score desc, index asc) and every new index is larger, so a stable
        # sort of the concatenation keeps the tie rule
        cat_v = torch.cat([best_v, new_v], dim=1)
        cat_i = torch.cat([best_i, new_i], dim=1)
        order = cat_v.argsort(dim=1, descending=True, stable=True)[:, :k]
        best_v, best_i = cat_v.gather(1, order), cat_i.gather(1, order)
        bar.update(end - start)
    bar.close()
    best_i = best_i.masked_fill(torch.isneginf(best_v), -1)  # excluded items that filled short rows
    return best_v, best_i


# =============================================================================== index
INDEX_FORMAT_VERSION = 1
INDEX_META = "meta.json"
INDEX_IDS = "ids.jsonl"
INDEX_EMBEDDINGS = "embeddings.f16"
INDEX_LOCK = ".lock"
METRICS = ("cosine", "ip")
Id = Union[str, int]


class EmbeddingIndexError(RuntimeError):
    """An index folder is missing, corrupt, or used with the wrong model or dimension."""


def _import_faiss(backend: str) -> Any:
    try:
        import faiss
    except ImportError:
        raise ImportError(f"the {backend!r} index backend needs FAISS: pip install zscir[faiss]") from None
    return faiss


def _check_id(value: Any, position: int) -> Id:
    if isinstance(value, bool) or not isinstance(value, (str, int, np.integer)):
        raise TypeError(f"ids[{position}] = {value!r}: ids must be strings or integers")
    return int(value) if isinstance(value, np.integer) else value


class _FolderLock:
    """An exclusive advisory lock on the index folder, so two writers never interleave appends."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / INDEX_LOCK

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


# ----------------------------------------------------------------------------- backends
class SearchBackend(abc.ABC):
    """A way to search an :class:`EmbeddingIndex`; FAISS ones persist a file in the index folder."""

    approximate = True

    def __init__(self, dim: int, **params: Any) -> None:
        self.dim = dim
        self.params = dict(params)

    @abc.abstractmethod
    def build(self, embeddings: np.ndarray) -> None:
        """Create the structure from all stored embeddings [N, D] (float16 memmap)."""

    @abc.abstractmethod
    def add(self, vectors: np.ndarray) -> None:
        """Append float32 vectors [n, D] (rows continue the stored order)."""

    @abc.abstractmethod
    def search(self, queries: np.ndarray, k: int, **search_params: Any) -> Tuple[np.ndarray, np.ndarray]:
        """Top-k rows for float32 queries: (scores [Q, k], rows [Q, k], -1 where fewer)."""

    @property
    @abc.abstractmethod
    def ntotal(self) -> int:
        """Number of vectors the structure holds."""

    def save(self, path: Path) -> None:
        """Write the structure to `path` atomically."""

    @classmethod
    @abc.abstractmethod
    def load(cls, path: Path, dim: int, params: Dict[str, Any]) -> "SearchBackend":
        """Read a structure written by :meth:`save`."""


BACKENDS: Registry = Registry("index backend")


class _FaissBackend(SearchBackend):
    """Common FAISS plumbing: an ``index_factory`` string, inner-product metric, chunked adds."""

    search_defaults: Dict[str, Any] = {}

    @abc.abstractmethod
    def factory_string(self, n: int) -> str:
        """The faiss.index_factory description for a corpus of `n` vectors."""

    def train_size(self, n: int) -> int:
        """How many vectors to train on (0 = no training needed)."""
        return 0

    def build(self, embeddings: np.ndarray) -> None:
        faiss = _import_faiss(self.name)
        n = int(embeddings.shape[0])
        self.faiss_index = faiss.index_factory(self.dim, self.factory_string(n), faiss.METRIC_INNER_PRODUCT)
        n_train = min(n, self.train_size(n))
        if hasattr(self.faiss_index, "do_polysemous_training"):
            # code reordering for Hamming filtering: minutes of annealing, unused by our searches
            self.faiss_index.do_polysemous_training = False
        if not self.faiss_index.is_trained:
            rng = np.random.default_rng(int(self.params.get("seed", 0)))
            rows = np.sort(rng.choice(n, size=n_train, replace=False))
            self.faiss_index.train(np.ascontiguousarray(embeddings[rows], dtype=np.float32))
        for start in range(0, n, 65536):
            self.add(np.asarray(embeddings[start:start + 65536], dtype=np.float32))

    def add(self, vectors: np.ndarray) -> None:
        if len(vectors):
            self.faiss_index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    @property
    def ntotal(self) -> int:
        return int(self.faiss_index.ntotal)

    def search(self, queries: np.ndarray, k: int, **search_params: Any) -> Tuple[np.ndarray, np.ndarray]:
        faiss = _import_faiss(self.name)
        settings = {**self.search_defaults, **{k_: v for k_, v in self.params.items() if k_ in self.search_defaults}}
        settings.update(search_params)
        space = faiss.ParameterSpace()
        for key, value in settings.items():
            if key not in self.search_defaults:
                raise ValueError(f"{self.name!r} backend has no search parameter {key!r}; known: {sorted(self.search_defaults)}")
            space.set_index_parameter(self.faiss_index, key, value)
        scores, rows = self.faiss_index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, rows

    def save(self, path: Path) -> None:
        faiss = _import_faiss(self.name)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            faiss.write_index(self.faiss_index, str(tmp))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    @classmethod
    def load(cls, path: Path, dim: int, params: Dict[str, Any]) -> "SearchBackend":
        faiss = _import_faiss(cls.name)
        backend = cls(dim, **params)
        try:
            backend.faiss_index = faiss.read_index(str(path))
        except RuntimeError as err:
            raise EmbeddingIndexError(f"cannot read FAISS index {path}: {err}") from None
        if backend.faiss_index.d != dim:
            raise EmbeddingIndexError(f"{path}: FAISS index has dimension {backend.faiss_index.d}, the index {dim}")
        return backend


def _default_nlist(n: int) -> int:
    # ~4 sqrt(N) lists, but at least 39 training points per centroid (FAISS warns below that)
    return int(max(1, min(4 * math.sqrt(n), n // 39)))


@BACKENDS.register("flat")
class FlatBackend(_FaissBackend):
    """FAISS IndexFlatIP: exact brute force in FAISS (float32 copy of the gallery)."""

    name = "flat"
    approximate = False

    def factory_string(self, n: int) -> str:
        return "Flat"


@BACKENDS.register("ivf")
class IVFBackend(_FaissBackend):
    """FAISS IVF-Flat: k-means lists, `nprobe` of them scanned per query (params: nlist, nprobe)."""

    name = "ivf"
    search_defaults = {"nprobe": 32}

    def factory_string(self, n: int) -> str:
        self.params.setdefault("nlist", _default_nlist(n))
        return f"IVF{int(self.params['nlist'])},Flat"

    def train_size(self, n: int) -> int:
        return 40 * int(self.params["nlist"])  # FAISS wants >= 39 points per list


@BACKENDS.register("hnsw")
class HNSWBackend(_FaissBackend):
    """FAISS HNSW-Flat graph (params: M, ef_construction; search: efSearch)."""

    name = "hnsw"
    search_defaults = {"efSearch": 128}

    def factory_string(self, n: int) -> str:
        return f"HNSW{int(self.params.get('M', 32))},Flat"

    def build(self, embeddings: np.ndarray) -> None:
        faiss = _import_faiss(self.name)
        self.faiss_index = faiss.index_factory(self.dim, self.factory_string(len(embeddings)), faiss.METRIC_INNER_PRODUCT)
        self.faiss_index.hnsw.efConstruction = int(self.params.get("ef_construction", 80))
        for start in range(0, len(embeddings), 65536):
            self.add(np.asarray(embeddings[start:start + 65536], dtype=np.float32))


def _default_pq_m(dim: int) -> int:
    # sub-quantizers of ~8 dimensions, and m must divide dim
    for m in range(max(1, dim // 8), 0, -1):
        if dim % m == 0:
            return m
    return 1


@BACKENDS.register("pq")
class PQBackend(_FaissBackend):
    """FAISS product quantization, brute force over compressed codes (params: m, nbits)."""

    name = "pq"

    def factory_string(self, n: int) -> str:
        self.params.setdefault("m", _default_pq_m(self.dim))
        return f"PQ{int(self.params['m'])}x{int(self.params.get('nbits', 8))}"

    def train_size(self, n: int) -> int:
        return 256 * (1 << int(self.params.get("nbits", 8)))


@BACKENDS.register("ivfpq")
class IVFPQBackend(_FaissBackend):
    """FAISS IVF with product-quantized lists (params: nlist, m, nbits; search: nprobe)."""

    name = "ivfpq"
    search_defaults = {"nprobe": 32}

    def factory_string(self, n: int) -> str:
        self.params.setdefault("nlist", _default_nlist(n))
        self.params.setdefault("m", _default_pq_m(self.dim))
        return f"IVF{int(self.params['nlist'])},PQ{int(self.params['m'])}x{int(self.params.get('nbits', 8))}"

    def train_size(self, n: int) -> int:
        return max(40 * int(self.params["nlist"]), 256 * (1 << int(self.params.get("nbits", 8))))


BACKENDS.add("exact", None)  # chunked torch search over the stored float16 embeddings (exact_topk)


# -------------------------------------------------------------------------- the index
class EmbeddingIndex:
    """Gallery embeddings in a folder: float16 rows (memory-mapped), ids (JSON lines), meta; exact or FAISS search.

    Layout: ``embeddings.f16`` (raw little-endian float16, row-major ``[count, dim]``),
    ``ids.jsonl`` (one JSON id per line), ``meta.json`` (dim, count, model key,
    metric, committed byte sizes, FAISS backends) and ``<backend>.faiss``.
    ``add`` appends to the data files and then rewrites ``meta.json`` atomically;
    ``meta.json`` is the commit record, so bytes past its sizes (an interrupted
    add) are ignored and cut off by the next ``add``.

    Metric ``cosine`` (default) stores L2-normalised rows and normalises queries;
    ``ip`` uses raw inner products.
    """

    def __init__(self, folder: Path, meta: Dict[str, Any], ids: List[Id]) -> None:
        self.folder = folder
        self.meta = meta
        self._ids = ids
        self._rows = {i: r for r, i in enumerate(ids)}
        self._backends: Dict[str, SearchBackend] = {}
        self._map: Optional[np.ndarray] = None

    # -------------------------------------------------------------- open / create
    @classmethod
    def create(cls, folder: Union[str, os.PathLike], dim: int, model_key: str, metric: str = "cosine") -> "EmbeddingIndex":
        """Make a new empty index folder (an existing index there is an error)."""
        folder = Path(folder)
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if (folder / INDEX_META).exists():
            raise EmbeddingIndexError(f"{folder} already holds an index; use EmbeddingIndex.open")
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": INDEX_FORMAT_VERSION,
            "dim": int(dim),
            "count": 0,
            "model_key": str(model_key),
            "metric": metric,
            "dtype": "float16",
            "ids_bytes": 0,
            "backends": {},
        }
        (folder / INDEX_EMBEDDINGS).write_bytes(b"")
        (folder / INDEX_IDS).write_bytes(b"")
        atomic_write_json(folder / INDEX_META, meta)
        return cls(folder, meta, [])

    @classmethod
    def open(cls, folder: Union[str, os.PathLike], model_key: Optional[str] = None) -> "EmbeddingIndex":
        """Open an index; with `model_key`, refuse one built by another model."""
        folder = Path(folder)
        meta_path = folder / INDEX_META
        if not meta_path.is_file():
            raise EmbeddingIndexError(f"no index at {folder} (missing {INDEX_META})")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise EmbeddingIndexError(f"{meta_path}: invalid JSON ({err})") from None
        for field in ("format_version", "dim", "count", "model_key", "metric", "ids_bytes", "backends"):
            if field not in meta:
                raise EmbeddingIndexError(f"{meta_path}: missing field {field!r}")
        if meta["format_version"] != INDEX_FORMAT_VERSION:
            raise EmbeddingIndexError(f"{meta_path}: format version {meta['format_version']}, expected {INDEX_FORMAT_VERSION}")
        if model_key is not None and meta["model_key"] != model_key:
            raise EmbeddingIndexError(
                f"{folder} was built with model {meta['model_key']!r}, not {model_key!r}; "
                "embeddings of different models are not comparable: rebuild the index"
            )
        count, dim = int(meta["count"]), int(meta["dim"])
        emb_path, ids_path = folder / INDEX_EMBEDDINGS, folder / INDEX_IDS
        need = count * dim * 2
        if not emb_path.is_file() or emb_path.stat().st_size < need:
            raise EmbeddingIndexError(f"{emb_path}: shorter than the {count} rows {INDEX_META} records (corrupt index)")
        if not ids_path.is_file() or ids_path.stat().st_size < meta["ids_bytes"]:
            raise EmbeddingIndexError(f"{ids_path}: shorter than {INDEX_META} records (corrupt index)")
        with open(ids_path, "rb") as fh:
            raw = fh.read(int(meta["ids_bytes"]))
        ids: List[Id] = []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            try:
                ids.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise EmbeddingIndexError(f"{ids_path}:{lineno}: invalid JSON ({err})") from None
        if len(ids) != count:
            raise EmbeddingIndexError(f"{ids_path}: {len(ids)} ids for {count} embeddings (corrupt index)")
        return cls(folder, meta, ids)

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return int(self.meta["count"])

    def __repr__(self) -> str:
        return (
            f"EmbeddingIndex({str(self.folder)!r}, count={len(self)}, dim={self.dim}, metric={self.metric!r}, "
            f"model_key={self.model_key!r}, backends={sorted(self.meta['backends'])})"
        )

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.meta["dim"])

    @property
    def metric(self) -> str:
        """``cosine`` or ``ip``."""
        return str(self.meta["metric"])

    @property
    def model_key(self) -> str:
        """Key of the model whose embeddings are stored."""
        return str(self.meta["model_key"])

    @property
    def ids(self) -> List[Id]:
        """Ids in row order (a copy)."""
        return list(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._rows

    def row_of(self, item_id: Id) -> int:
        """Row number of an id (KeyError naming it if absent)."""
        try:
            return self._rows[item_id]
        except KeyError:
            raise KeyError(f"id {item_id!r} is not in the index {self.folder}") from None

    @property
    def embeddings(self) -> np.ndarray:
        """The stored rows as a read-only float16 memory map [count, dim]."""
        if self._map is None or self._map.shape[0] != len(self):
            if len(self) == 0:
                self._map = np.zeros((0, self.dim), dtype=np.float16)
            else:
                self._map = np.memmap(self.folder / INDEX_EMBEDDINGS, dtype="<f2", mode="r", shape=(len(self), self.dim))
        return self._map

    # ------------------------------------------------------------------------- add
    def _prepare(self, ids: Sequence[Id], embeddings: ArrayLike) -> Tuple[List[Id], np.ndarray]:
        ids = [_check_id(v, i) for i, v in enumerate(ids)]
        emb = embeddings.detach().cpu().float().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"embeddings must be [n, {self.dim}], got shape {tuple(emb.shape)}")
        if len(ids) != emb.shape[0]:
            raise ValueError(f"{len(ids)} ids for {emb.shape[0]} embeddings")
        counts: Dict[Id, int] = {}
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
        dup_batch = [i for i, c in counts.items() if c > 1]
        if dup_batch:
            raise ValueError(f"duplicate ids within the batch: {dup_batch[:10]}{' ...' if len(dup_batch) > 10 else ''}")
        existing = [i for i in ids if i in self._rows]
        if existing:
            raise ValueError(
                f"{len(existing)} id(s) already in the index {self.folder}: {existing[:10]}{' ...' if len(existing) > 10 else ''}"
            )
        bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
        if len(bad):
            raise ValueError(f"embeddings contain NaN/inf for id(s) {[ids[b] for b in bad[:10]]}")
        if self.metric == "cosine":
            norms = np.linalg.norm(emb, axis=1, keepdims=True)
            zero = np.flatnonzero(norms[:, 0] == 0)
            if len(zero):
                raise ValueError(f"zero embeddings cannot be normalised (cosine metric), id(s) {[ids[z] for z in zero[:10]]}")
            emb = emb / norms
        half = emb.astype("<f2")
        over = np.flatnonzero(~np.isfinite(half).all(axis=1))
        if len(over):
            raise ValueError(f"embeddings overflow float16 for id(s) {[ids[o] for o in over[:10]]}")
        return ids, half

    def add(self, ids: Sequence[Id], embeddings: ArrayLike) -> None:
        """Append embeddings [n, dim] with their ids; duplicate ids or NaN rows raise ValueError naming them."""
        ids, half = self._prepare(ids, embeddings)
        if not ids:
            return
        with _FolderLock(self.folder):
            fresh = json.loads((self.folder / INDEX_META).read_text())
            if fresh["count"] != self.meta["count"]:
                raise EmbeddingIndexError(f"{self.folder} was changed by another writer; open it again before adding")
            count, ids_bytes = int(self.meta["count"]), int(self.meta["ids_bytes"])
            id_blob = "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in ids).encode("utf-8")
            # cut off whatever an interrupted add left past the committed sizes, then append
            for name, size, blob in ((INDEX_EMBEDDINGS, count * self.dim * 2, half.tobytes()), (INDEX_IDS, ids_bytes, id_blob)):
                with open(self.folder / name, "r+b") as fh:
                    fh.truncate(size)
                    fh.seek(size)
                    fh.write(blob)
                    fh.flush()
                    os.fsync(fh.fileno())
            meta = dict(self.meta, count=count + len(ids), ids_bytes=ids_bytes + len(id_blob))
            atomic_write_json(self.folder / INDEX_META, meta)  # commit point
            self.meta = meta
            for i in ids:
                self._rows[i] = len(self._ids)
                self._ids.append(i)
            self._map = None
        # saved FAISS structures are not rewritten on every add: searching catches them up in memory,
        # and sync_backends() (or build_backend) saves them

    # ---------------------------------------------------------------------- backends
    def build_backend(self, name: str, **params: Any) -> SearchBackend:
        """Build a FAISS structure (``flat``, ``ivf``, ``hnsw``, ``pq``, ``ivfpq``) over all rows and save it here."""
        cls = BACKENDS.get(name)
        if cls is None:
            raise ValueError("the 'exact' backend needs no building; it searches the stored embeddings directly")
        if len(self) == 0:
            raise EmbeddingIndexError(f"{self.folder} is empty; add embeddings before building a {name!r} backend")
        backend = cls(self.dim, **params)
        backend.build(self.embeddings)
        with _FolderLock(self.folder):
            self._save_backend(name, backend)
        return backend

    def sync_backends(self) -> List[str]:
        """Add rows appended since each saved FAISS structure was built, and save them; returns their names."""
        names = sorted(self.meta["backends"])
        with _FolderLock(self.folder):
            for name in names:
                if self.meta["backends"][name]["count"] != len(self):
                    self._save_backend(name, self._backend(name))
        return names

    def _save_backend(self, name: str, backend: SearchBackend) -> None:
        backend.save(self.folder / f"{name}.faiss")
        backends = dict(self.meta["backends"])
        backends[name] = {"params": backend.params, "count": backend.ntotal, "file": f"{name}.faiss"}
        self.meta = dict(self.meta, backends=backends)
        atomic_write_json(self.folder / INDEX_META, self.meta)
        self._backends[name] = backend

    def _backend(self, name: str) -> SearchBackend:
        """A loaded backend, caught up with rows added after it was saved."""
        if name in self._backends:
            backend = self._backends[name]
        else:
            info = self.meta["backends"].get(name)
            if info is None:
                BACKENDS.get(name)  # unknown names raise KeyError listing the choices
                raise EmbeddingIndexError(
                    f"no {name!r} backend in {self.folder}; build it first (EmbeddingIndex.build_backend or "
                    f"`zscir index --backend {name}`); built: {sorted(self.meta['backends']) or 'none'}"
                )
            backend = BACKENDS.get(name).load(self.folder / info["file"], self.dim, info["params"])
            self._backends[name] = backend
        if backend.ntotal > len(self):
            raise EmbeddingIndexError(f"the {name!r} backend holds {backend.ntotal} vectors but the index {len(self)}; rebuild it")
        if backend.ntotal < len(self):
            logger.info(
                "adding %d rows appended since the %r backend was saved (in memory; sync_backends() saves them)",
                len(self) - backend.ntotal, name,
            )
            emb = self.embeddings
            for start in range(backend.ntotal, len(self), 65536):
                backend.add(np.asarray(emb[start:min(len(self), start + 65536)], dtype=np.float32))
        return backend

    # ------------------------------------------------------------------------ search
    def _queries(self, queries: ArrayLike) -> torch.Tensor:
        q = queries if isinstance(queries, torch.Tensor) else torch.from_numpy(np.asarray(queries, dtype=np.float32))
        q = q.detach().float().cpu()
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got shape {tuple(q.shape)}")
        bad = torch.nonzero(~torch.isfinite(q).all(dim=1)).flatten()
        if len(bad):
            raise ValueError(f"queries contain NaN/inf, e.g. query {int(bad[0])}")
        if self.metric == "cosine":
            norms = q.norm(dim=1, keepdim=True)
            if bool((norms == 0).any()):
                raise ValueError(f"query {int(torch.nonzero(norms[:, 0] == 0)[0])} is all zeros (cosine metric)")
            q = q / norms
        return q

    def search_arrays(
        self,
        queries: ArrayLike,
        k: int,
        exclude_ids: Optional[Sequence[Sequence[Id]]] = None,
        backend: str = "exact",
        **search_params: Any,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-k rows per query: (scores [Q, k'] float32, rows [Q, k'] int64), k' = min(k, count); -1 pads short rows."""
        if len(self) == 0:
            raise EmbeddingIndexError(f"the index {self.folder} is empty")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        q = self._queries(queries)
        exclude_rows = None
        if exclude_ids is not None:
            if len(exclude_ids) != q.shape[0]:
                raise ValueError(f"exclude_ids has {len(exclude_ids)} entries for {q.shape[0]} queries")
            exclude_rows = [[self.row_of(i) for i in (items or ())] for items in exclude_ids]
        if backend == "exact":
            if search_params:
                raise ValueError(f"the exact backend takes no search parameters, got {sorted(search_params)}")
            return exact_topk(q, self.embeddings, k, exclude=exclude_rows)
        engine = self._backend(backend)
        k = min(k, len(self))
        extra = max((len(set(r)) for r in exclude_rows), default=0) if exclude_rows else 0
        scores, rows = engine.search(q.numpy(), min(len(self), k + extra), **search_params)
        out_s = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
        out_r = np.full((q.shape[0], k), -1, dtype=np.int64)
        for qi in range(q.shape[0]):
            banned = set(exclude_rows[qi]) if exclude_rows else ()
            keep = [(s, r) for s, r in zip(scores[qi], rows[qi]) if r >= 0 and r not in banned][:k]
            if keep:
                out_s[qi, : len(keep)] = [s for s, _ in keep]
                out_r[qi, : len(keep)] = [r for _, r in keep]
        return torch.from_numpy(out_s), torch.from_numpy(out_r)

    def search(
        self,
        queries: ArrayLike,
        k: int,
        exclude_ids: Optional[Sequence[Sequence[Id]]] = None,
        backend: str = "exact",
        **search_params: Any,
    ) -> List[List[Tuple[Id, float]]]:
        """Top-k ``(id, score)`` lists per query, best first (ties by insertion order for ``exact``)."""
        scores, rows = self.search_arrays(queries, k, exclude_ids=exclude_ids, backend=backend, **search_params)
        return [
            [(self._ids[r], float(s)) for s, r in zip(srow.tolist(), rrow.tolist()) if r >= 0]
            for srow, rrow in zip(scores, rows)
        ]


# ============================================================================ CLI glue
def _parse_params(items: Optional[Sequence[str]], flag: str) -> Dict[str, Any]:
    """``KEY=VALUE`` strings to a dict (ints and floats converted)."""
    out: Dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        for convert in (int, float):
            try:
                out[key] = convert(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


def model_key_of(composer: Any, model_dir: Union[str, os.PathLike]) -> str:
    """The key that ties an index to the model: ``composer.cache_key``, else the model folder's path."""
    key = getattr(composer, "cache_key", None)
    if key:
        return str(key)
    logger.warning("the model has no cache_key; keying the index by its folder path %s", model_dir)
    return f"dir:{Path(model_dir).resolve()}"


def _image_list(images: str, root: Optional[str]) -> Tuple[List[Path], List[str]]:
    """Paths and ids (relative posix paths) from a folder or a file list."""
    from .data.images import list_images, read_file_list

    src = Path(images)
    if src.is_dir():
        base = src
        paths = list_images(src)
    elif src.is_file():
        base = Path(root) if root else src.parent
        paths = read_file_list(src, root=root)
    else:
        raise FileNotFoundError(f"images not found: {images} (give an image folder or a text file listing images)")
    ids = []
    for p in paths:
        try:
            ids.append(p.relative_to(base).as_posix())
        except ValueError:  # absolute entries outside the base keep their full path
            ids.append(p.as_posix())
    return paths, ids


def index_add_arguments(parser: "argparse.ArgumentParser") -> None:
    """Arguments of ``zscir index``: embed a gallery with a trained model into an index folder."""
    parser.add_argument("images", help="image folder (searched recursively) or a text file with one image path per line")
    parser.add_argument("--model", required=True, help="trained model folder (Composer.save_pretrained)")
    parser.add_argument("--index", required=True, help="index folder to create or extend (images already in it are skipped)")
    parser.add_argument("--root", default=None, help="folder that relative paths in a file list are relative to (default: the list's folder)")
    parser.add_argument("--backend", default="exact", choices=BACKENDS.names(), help="also build this FAISS structure (default: exact only)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--backend-param", action="append", metavar="KEY=VALUE", help="FAISS build parameter, e.g. nlist=1024 (repeatable)")
    parser.add_argument("--metric", default="cosine", choices=METRICS, help="similarity for a new index")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="image decoding worker processes")
    parser.add_argument("--commit-every", type=int, default=4096, help="embeddings buffered between index commits")
    parser.add_argument("--bad-log", default=None, help="where to list images that fail to load (default: INDEX/bad_images.log)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def index_run(args: "argparse.Namespace") -> int:
    """Run ``zscir index``: embed new images of the gallery and append them to the index."""
    from .composer import Composer
    from .data.images import iter_image_batches

    backend_params = _parse_params(args.backend_param, "--backend-param")
    if args.batch_size < 1 or args.commit_every < 1:
        raise ValueError("--batch-size and --commit-every must be >= 1")
    paths, ids = _image_list(args.images, args.root)
    from .models.backbone import default_device

    composer = Composer.from_pretrained(args.model, device=getattr(args, "device", None) or default_device())
    key = model_key_of(composer, args.model)
    folder = Path(args.index)
    index = EmbeddingIndex.open(folder, model_key=key) if (folder / INDEX_META).is_file() else None
    todo = [i for i, item_id in enumerate(ids) if index is None or item_id not in index]
    print(f"{len(paths)} images, {len(paths) - len(todo)} already indexed, {len(todo)} to embed")
    bad_log = Path(args.bad_log) if args.bad_log else folder / "bad_images.log"
    n_bad = 0
    buffer_ids: List[Id] = []
    buffer_emb: List[torch.Tensor] = []

    def commit() -> None:
        nonlocal index
        if not buffer_ids:
            return
        emb = torch.cat(buffer_emb)
        if index is None:
            index = EmbeddingIndex.create(folder, int(emb.shape[1]), key, metric=args.metric)
        index.add(list(buffer_ids), emb)
        buffer_ids.clear()
        buffer_emb.clear()

    def count_bad(_failure: Any) -> None:
        nonlocal n_bad
        n_bad += 1

    if todo:
        for positions, images in iter_image_batches(
            [paths[i] for i in todo], None, args.batch_size, num_workers=args.num_workers,
            log=bad_log, progress=not args.no_progress, on_failure=count_bad, desc="indexing",
        ):
            with torch.no_grad():
                emb = composer.encode_images(images)
            buffer_emb.append(torch.as_tensor(emb).detach().float().cpu())
            buffer_ids.extend(ids[todo[p]] for p in positions.tolist())
            if len(buffer_ids) >= args.commit_every:
                commit()
        commit()
    if index is None:
        raise EmbeddingIndexError(f"nothing was indexed into {folder}: no image could be loaded")
    src = Path(args.images)
    base = src if src.is_dir() else Path(args.root) if args.root else src.parent
    from .checkpoint import atomic_write_text

    atomic_write_text(folder / IMAGE_ROOT_FILE, str(base.resolve()) + "\n")  # lets `zscir search --out` find the images
    if args.backend != "exact":
        print(f"building the {args.backend!r} backend over {len(index)} embeddings")
        index.build_backend(args.backend, **backend_params)
    elif index.meta["backends"]:
        index.sync_backends()
    print(f"index {folder}: {len(index)} embeddings (dim {index.dim}); {n_bad} image(s) skipped"
          + (f", listed in {bad_log}" if n_bad else ""))
    return 0


IMAGE_ROOT_FILE = "image_root.txt"


def search_add_arguments(parser: "argparse.ArgumentParser") -> None:
    """Arguments of ``zscir search``: a composed query (image + text) against an index."""
    parser.add_argument("index", help="index folder written by `zscir index`")
    parser.add_argument("--model", required=True, help="the model folder the index was built with")
    parser.add_argument("--image", required=True, help="reference image")
    parser.add_argument("--text", required=True, help="modification text")
    parser.add_argument("-k", "--top-k", type=int, default=10, help="number of results")
    parser.add_argument("--backend", default="exact", choices=BACKENDS.names())
    parser.add_argument("--search-param", action="append", metavar="KEY=VALUE", help="e.g. nprobe=64 or efSearch=256")
    parser.add_argument("--exclude", action="append", default=[], metavar="ID", help="gallery id never to return (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", default=None, help="write a PNG grid (reference, text, top-k with scores)")
    parser.add_argument("--image-root", default=None,
                        help="folder the gallery ids are relative to, for --out (default: the folder given to `zscir index`)")


def search_run(args: "argparse.Namespace") -> int:
    """Run ``zscir search`` and print the ranked gallery ids."""
    from .composer import Composer
    from .data.images import load_image

    params = _parse_params(args.search_param, "--search-param")
    index = EmbeddingIndex.open(args.index)
    from .models.backbone import default_device

    composer = Composer.from_pretrained(args.model, device=getattr(args, "device", None) or default_device())
    key = model_key_of(composer, args.model)
    if key != index.model_key:
        raise EmbeddingIndexError(f"{args.index} was built with model {index.model_key!r}, but --model is {key!r}")
    image = load_image(args.image)
    with torch.no_grad():
        query = torch.as_tensor(composer.encode_query([image], [args.text])).detach().float().cpu()
    exclude = [list(args.exclude)] if args.exclude else None
    hits = index.search(query, args.top_k, exclude_ids=exclude, backend=args.backend, **params)[0]
    if args.json:
        print(json.dumps([{"rank": r, "id": i, "score": round(s, 6)} for r, (i, s) in enumerate(hits, start=1)], indent=2))
    else:
        print(f"{'rank':>4}  {'score':>8}  id")
        for rank, (item_id, score) in enumerate(hits, start=1):
            print(f"{rank:>4}  {score:8.4f}  {item_id}")
    if args.out:
        _write_search_grid(args, index, image, hits)
    return 0


def _write_search_grid(args: "argparse.Namespace", index: "EmbeddingIndex", image: Any, hits: Sequence[Tuple[Id, float]]) -> None:
    """PNG of the query and its ranked results; unreadable result images are shown blank."""
    from PIL import Image

    from .data.images import ImageLoadError
    from .viz import GridRow, save_retrieval_grid

    root_file = Path(args.index) / IMAGE_ROOT_FILE
    root = Path(args.image_root or (root_file.read_text().strip() if root_file.is_file() else "."))
    results = []
    for item_id, score in hits:
        try:
            shown = load_image(root / str(item_id))
        except ImageLoadError:
            shown = Image.new("RGB", (64, 64), "gray")
        results.append((shown, f"{score:.3f}", False))
    save_retrieval_grid(args.out, [GridRow(image, args.text, results)])
    print(f"wrote {args.out}")
