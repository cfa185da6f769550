"""Ways to search an embedding index: FAISS structures behind a small registry, and exact re-ranking of their candidates.

:data:`BACKENDS` maps a name to a :class:`SearchBackend` class: ``flat``
(brute force in FAISS), ``ivf``, ``hnsw``, ``pq``, ``ivfpq``; ``exact`` is
registered as None and means :func:`zscir.search.exact.exact_topk` over the
stored rows. FAISS structures use inner product on the stored (L2-normalised
for the cosine metric) vectors, are saved with ``faiss.write_index`` next to
the index, and need ``pip install zscir[faiss]``.
"""
from __future__ import annotations

import abc
import math
import os
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import torch

from ..registry import Registry
from .store import StoreError


class EmbeddingIndexError(StoreError):
    """An index folder is missing, corrupt, or used with the wrong model or dimension."""


def _import_faiss(backend: str) -> Any:
    try:
        import faiss
    except ImportError:
        raise ImportError(f"the {backend!r} index backend needs FAISS: pip install zscir[faiss]") from None
    return faiss


# ----------------------------------------------------------------------------- backends
class SearchBackend(abc.ABC):
    """A way to search an :class:`EmbeddingIndex`; FAISS ones persist a file in the index folder."""

    approximate = True
    lossy = False  # scores from compressed codes: searches re-rank candidates exactly by default

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

    def bytes_per_vector(self) -> float:
        """Memory per stored vector when loaded (codes and ids, without the fixed part: centroids, codebooks)."""
        return float("nan")

    @classmethod
    @abc.abstractmethod
    def load(cls, path: Path, dim: int, params: Dict[str, Any]) -> "SearchBackend":
        """Read a structure written by :meth:`save`."""


BACKENDS: Registry = Registry("index backend")


class _FaissBackend(SearchBackend):
    """Common FAISS plumbing: an ``index_factory`` string, inner-product metric, chunked adds."""

    search_defaults: Dict[str, Any] = {}
    mappable = False  # inverted lists that can stay on disk, memory-mapped (build param mmap=1)
    mapped = False  # this structure's lists are memory-mapped from its file

    def __init__(self, dim: int, **params: Any) -> None:
        super().__init__(dim, **params)
        if self.params.get("mmap") and not self.mappable:
            raise ValueError(f"the {self.name!r} backend cannot be memory-mapped; mmap applies to ivf and ivfpq")

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
            if self.mapped:  # memory-mapped lists are read-only: read the whole structure into memory first
                self.faiss_index = _import_faiss(self.name).read_index(str(self.path))
                self.mapped = False
            self.faiss_index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def bytes_per_vector(self) -> float:
        """Codes plus the 8-byte id of an inverted-list entry (IVF), or the code size (flat, PQ, HNSW storage + links)."""
        faiss = _import_faiss(self.name)
        try:
            ivf = faiss.extract_index_ivf(self.faiss_index)
        except RuntimeError:
            ivf = None
        if ivf is not None:
            return float(ivf.code_size + np.dtype(np.int64).itemsize)
        index = faiss.downcast_index(self.faiss_index)
        size = float(getattr(index, "code_size", 0))
        hnsw = getattr(index, "hnsw", None)
        if hnsw is not None:
            size = float(faiss.downcast_index(index.storage).code_size)
            size += 4 * hnsw.neighbors.size() / max(1, index.ntotal)
        return size

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
        backend.path = path
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if params.get("mmap") else 0
        try:
            backend.faiss_index = faiss.read_index(str(path), flags)
            backend.mapped = bool(flags)
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
    mappable = True

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
    lossy = True

    def factory_string(self, n: int) -> str:
        self.params.setdefault("m", _default_pq_m(self.dim))
        return f"PQ{int(self.params['m'])}x{int(self.params.get('nbits', 8))}"

    def train_size(self, n: int) -> int:
        return 256 * (1 << int(self.params.get("nbits", 8)))


@BACKENDS.register("ivfpq")
class IVFPQBackend(_FaissBackend):
    """FAISS IVF with product-quantized lists (params: nlist, m, nbits, opq, fastscan, mmap; search: nprobe).

    A vector costs ``m * nbits / 8`` bytes of code plus an 8-byte id. ``opq=1``
    learns a rotation to ``m * (dim // m)`` dimensions first (any ``m``, e.g.
    56 for 64 bytes per vector at dim 512); ``fastscan=1`` uses 4-bit codes
    scanned with SIMD (quick to train and search; kept in memory); ``mmap=1``
    leaves the lists on disk, memory-mapped. Searches re-rank the candidates
    exactly from the stored rows.
    """

    name = "ivfpq"
    search_defaults = {"nprobe": 32}
    mappable = True
    lossy = True

    def factory_string(self, n: int) -> str:
        self.params.setdefault("nlist", _default_nlist(n))
        opq = bool(self.params.get("opq", False))
        self.params.setdefault("m", min(64, self.dim) if opq else _default_pq_m(self.dim))
        m, nbits = int(self.params["m"]), int(self.params.get("nbits", 8))
        if not 1 <= m <= self.dim:
            raise ValueError(f"m must be in [1, {self.dim}], got {m}")
        if self.params.get("fastscan"):
            if self.params.get("mmap"):
                raise ValueError("fast-scan lists cannot be memory-mapped; use fastscan=1 or mmap=1")
            if "nbits" in self.params and nbits != 4:
                raise ValueError(f"fast-scan codes have 4 bits, got nbits={nbits}")
            self.params["nbits"], codes = 4, f"PQ{m}x4fs"
        else:
            codes = f"PQ{m}x{nbits}"
        ivf = f"IVF{int(self.params['nlist'])},{codes}"
        if opq:
            return f"OPQ{m}_{m * (self.dim // m)},{ivf}"
        if self.dim % m:
            raise ValueError(f"m={m} must divide the dimension {self.dim} (or set opq=1)")
        return ivf

    def train_size(self, n: int) -> int:
        return max(40 * int(self.params["nlist"]), 256 * (1 << int(self.params.get("nbits", 8))))


BACKENDS.add("exact", None)  # chunked torch search over the stored float16 embeddings (exact_topk)


def exact_rerank(queries: torch.Tensor, embeddings: np.ndarray, rows: np.ndarray, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Re-score candidate rows [Q, C] (-1: none) exactly against the stored rows; the best k per query.

    Returns ``(scores [Q, k], rows [Q, k])`` ordered by exact score, equal
    scores by row (the :func:`~zscir.search.exact.exact_topk` tie rule), padded
    with ``-inf`` / ``-1`` where a query has fewer than k candidates. Each query
    reads only its own candidates' rows (sorted, once each), so memory stays at
    one query's candidates whatever the batch.
    """
    from .exact import _sorted_by_score_then_index

    rows = np.asarray(rows, dtype=np.int64)
    cand = torch.from_numpy(rows)
    valid = cand >= 0
    scores = torch.full(cand.shape, float("-inf"))
    q = queries.float()
    for i in range(rows.shape[0]):
        ok = rows[i] >= 0
        needed, where = np.unique(rows[i][ok], return_inverse=True)
        # torch upcasts float16 several times faster than numpy
        vectors = torch.from_numpy(np.ascontiguousarray(embeddings[needed])).float()
        scores[i, torch.from_numpy(ok)] = (vectors @ q[i])[torch.from_numpy(where.reshape(-1))]
    scores, cand = _sorted_by_score_then_index(scores, cand.masked_fill(~valid, torch.iinfo(torch.int64).max))
    scores, cand = scores[:, :k], cand[:, :k]
    return scores, cand.masked_fill(torch.isneginf(scores), -1)
