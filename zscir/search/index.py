"""The gallery index: one model's image embeddings in an :class:`~zscir.search.store.EmbeddingStore`, searched exactly or with FAISS.

Layout (what ``zscir index`` writes): ``embeddings.f16`` (raw little-endian
float16, row-major ``[count, dim]``), ``ids.jsonl`` (one JSON id per line),
``meta.json`` (the store's commit record plus dim, model key, metric and the
saved FAISS backends), ``<backend>.faiss`` and ``image_root.txt``.

Metric ``cosine`` (default) stores L2-normalised rows and normalises queries;
``ip`` uses raw inner products. Search is :func:`~zscir.search.exact.exact_topk`
(``backend="exact"``, default) or a backend of
:data:`~zscir.search.backends.BACKENDS`, optionally followed by an exact
re-rank of its candidates against the stored rows.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .backends import BACKENDS, EmbeddingIndexError, SearchBackend, exact_rerank
from .exact import ArrayLike, exact_topk
from .store import IDS_NAME, META_NAME, ArraySpec, EmbeddingStore, Id, check_id

if TYPE_CHECKING:
    from ..composer import Composer

logger = logging.getLogger(__name__)

INDEX_META = META_NAME
INDEX_IDS = IDS_NAME
INDEX_EMBEDDINGS = "embeddings.f16"
IMAGE_ROOT_FILE = "image_root.txt"  # the folder the ids are relative to (lets `zscir search --out` find the images)
METRICS = ("cosine", "ip")
RERANK_FACTOR = 10  # compressed backends fetch 10 k candidates and re-rank them exactly (bench_scale.py: --rerank-factor)
_REQUIRED = ("format_version", "dim", "count", "model_key", "metric", "ids_bytes", "backends")


class _IndexStore(EmbeddingStore):
    error = EmbeddingIndexError
    noun = "index"


def model_key_of(composer: "Composer", model_dir: Union[str, os.PathLike]) -> str:
    """The key that ties an index to the model: ``composer.cache_key``, else the model folder's path."""
    key = getattr(composer, "cache_key", None)
    if key:
        return str(key)
    logger.warning("the model has no cache_key; keying the index by its folder path %s", model_dir)
    return f"dir:{Path(model_dir).resolve()}"


class EmbeddingIndex:
    """Gallery embeddings in a folder (float16 rows, memory-mapped; ids; meta), searched exactly or with FAISS.

    ``add`` appends in one store transaction: bytes an interrupted add left past
    the committed sizes are ignored, and cut off by the next ``add``.
    """

    def __init__(self, store: EmbeddingStore) -> None:
        self.store = store
        self._backends: Dict[str, SearchBackend] = {}

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
        meta = {"dim": int(dim), "model_key": str(model_key), "metric": metric, "dtype": "float16", "backends": {}}
        arrays = {"embeddings": ArraySpec(INDEX_EMBEDDINGS, "float16", (int(dim),))}
        return cls(_IndexStore.create(folder, arrays, meta))

    @classmethod
    def open(cls, folder: Union[str, os.PathLike], model_key: Optional[str] = None) -> "EmbeddingIndex":
        """Open an index; with `model_key`, refuse one built by another model."""
        folder = Path(folder)
        meta = _IndexStore.read_meta(folder)
        for name in _REQUIRED:
            if name not in meta:
                raise EmbeddingIndexError(f"{folder / INDEX_META}: missing field {name!r}")
        if model_key is not None and meta["model_key"] != model_key:
            raise EmbeddingIndexError(
                f"{folder} was built with model {meta['model_key']!r}, not {model_key!r}; "
                "embeddings of different models are not comparable: rebuild the index"
            )
        # indexes written before the store recorded its layout: float16 rows in embeddings.f16
        meta.setdefault("arrays", {"embeddings": ArraySpec(INDEX_EMBEDDINGS, "float16", (int(meta["dim"]),)).to_json()})
        return cls(_IndexStore.open(folder, meta))

    # ------------------------------------------------------------------ properties
    @property
    def folder(self) -> Path:
        """The index folder."""
        return self.store.folder

    @property
    def meta(self) -> Dict[str, Any]:
        """The committed ``meta.json`` record."""
        return self.store.meta

    def __len__(self) -> int:
        return len(self.store)

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
        return self.store.ids

    @property
    def skipped(self) -> List[Dict[str, Any]]:
        """Items that could not be embedded when they were offered (id, reason); a later successful add removes them."""
        return self.store.skipped

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.store

    def row_of(self, item_id: Id) -> int:
        """Row number of an id (KeyError naming it if absent)."""
        return self.store.row_of(item_id)

    @property
    def embeddings(self) -> np.ndarray:
        """The stored rows as a read-only float16 memory map [count, dim]."""
        return self.store.array("embeddings")

    # ------------------------------------------------------------------------- add
    def _prepare(self, ids: Sequence[Id], embeddings: ArrayLike) -> Tuple[List[Id], np.ndarray]:
        ids = [check_id(v, i) for i, v in enumerate(ids)]
        emb = embeddings.detach().cpu().float().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"embeddings must be [n, {self.dim}], got shape {tuple(emb.shape)}")
        if len(ids) != emb.shape[0]:
            raise ValueError(f"{len(ids)} ids for {emb.shape[0]} embeddings")
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

    def add(self, ids: Sequence[Id], embeddings: ArrayLike, skipped: Sequence[Dict[str, Any]] = ()) -> None:
        """Append embeddings [n, dim] with their ids (and record items that failed: dicts with id, reason).

        Duplicate ids or NaN rows raise ValueError naming them.
        """
        ids, half = self._prepare(ids, embeddings)
        # validated before the transaction, so a bad batch leaves nothing behind
        if not ids and not skipped:
            return
        self.store.add(ids, {"embeddings": half}, skipped=skipped)
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
        self._save_backend(name, backend)
        return backend

    def sync_backends(self) -> List[str]:
        """Add rows appended since each saved FAISS structure was built, and save them; returns their names."""
        names = sorted(self.meta["backends"])
        with self.store.lock():
            for name in names:
                if self.meta["backends"][name]["count"] != len(self):
                    self._save_backend(name, self._backend(name))
        return names

    def _save_backend(self, name: str, backend: SearchBackend) -> None:
        with self.store.lock():
            path = self.folder / f"{name}.faiss"
            backend.save(path)
            backends = dict(self.meta["backends"])
            backends[name] = {"params": backend.params, "count": backend.ntotal, "file": path.name,
                              "file_bytes": path.stat().st_size, "bytes_per_vector": backend.bytes_per_vector()}
            self.store.set_meta(backends=backends)
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
        rerank: Optional[int] = None,
        **search_params: Any,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-k rows per query: (scores [Q, k'] float32, rows [Q, k'] int64), k' = min(k, count); -1 pads short rows.

        With a FAISS `backend`, ``rerank=C`` (C >= k) fetches C candidates and
        orders them by their exact score against the stored rows; None: ``RERANK_FACTOR * k``
        for the compressed backends (``pq``, ``ivfpq``), none for the others; 0: never.
        """
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
            if search_params or rerank:
                raise ValueError(f"the exact backend takes no search parameters, got {sorted(search_params) + (['rerank'] if rerank else [])}")
            return exact_topk(q, self.embeddings, k, exclude=exclude_rows)
        engine = self._backend(backend)
        if rerank is None:
            rerank = RERANK_FACTOR * k if engine.lossy else 0
        k = min(k, len(self))
        wanted = min(len(self), max(k, rerank))
        extra = max((len(set(r)) for r in exclude_rows), default=0) if exclude_rows else 0
        scores, rows = engine.search(q.numpy(), min(len(self), wanted + extra), **search_params)
        out_s = np.full((q.shape[0], wanted), -np.inf, dtype=np.float32)
        out_r = np.full((q.shape[0], wanted), -1, dtype=np.int64)
        for qi in range(q.shape[0]):
            banned = set(exclude_rows[qi]) if exclude_rows else ()
            keep = [(s, r) for s, r in zip(scores[qi], rows[qi]) if r >= 0 and r not in banned][:wanted]
            if keep:
                out_s[qi, : len(keep)] = [s for s, _ in keep]
                out_r[qi, : len(keep)] = [r for _, r in keep]
        if rerank:
            return exact_rerank(q, self.embeddings, out_r, k)
        return torch.from_numpy(out_s), torch.from_numpy(out_r)

    def search(
        self,
        queries: ArrayLike,
        k: int,
        exclude_ids: Optional[Sequence[Sequence[Id]]] = None,
        backend: str = "exact",
        rerank: Optional[int] = None,
        **search_params: Any,
    ) -> List[List[Tuple[Id, float]]]:
        """Top-k ``(id, score)`` lists per query, best first (ties by insertion order for ``exact``)."""
        scores, rows = self.search_arrays(queries, k, exclude_ids=exclude_ids, backend=backend, rerank=rerank,
                                          **search_params)
        return [
            [(self.store.id_at(r), float(s)) for s, r in zip(srow.tolist(), rrow.tolist()) if r >= 0]
            for srow, rrow in zip(scores, rows)
        ]
