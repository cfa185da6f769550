"""Gallery search: exact chunked top-k, one on-disk embedding store, the gallery index with FAISS backends, re-ranking.

``exact`` (chunked exact top-k) <- ``store`` (the embedding store: the index, the
evaluation gallery cache and the Stage-I feature cache use it) <- ``shards``
(encoding by several processes, merged in order) and ``backends``
(FAISS structures, exact re-rank) <- ``index`` (:class:`EmbeddingIndex`) <- ``export`` (Parquet);
``rerank`` diffuses top-K scores over the candidates' kNN graph; ``zones`` samples
target-relative mid-zone candidates (DQE-CIR). Nothing here
imports a model: functions that need one take it as an argument. The
function ``rerank`` stays in :mod:`zscir.search.rerank` (exported here, its
name would hide the module).
"""
from .backends import (BACKENDS, EmbeddingIndexError, FlatBackend, HNSWBackend, IVFBackend, IVFPQBackend, PQBackend,
                       SearchBackend, exact_rerank)
from .exact import exact_topk
from .export import export_parquet, read_parquet_info
from .index import (IMAGE_ROOT_FILE, INDEX_EMBEDDINGS, INDEX_IDS, INDEX_META, METRICS, RERANK_FACTOR, EmbeddingIndex,
                    model_key_of)
from .rerank import RerankConfig, knn_affinity, rerank_search
from .shards import DistributedWorkers, ShardedRun, Workers, current_workers, part_bounds
from .store import ArraySpec, EmbeddingStore, StoreAppend, StoreError
from .zones import mid_zone_table

__all__ = [
    "ArraySpec",
    "BACKENDS",
    "DistributedWorkers",
    "EmbeddingIndex",
    "EmbeddingIndexError",
    "EmbeddingStore",
    "FlatBackend",
    "HNSWBackend",
    "IMAGE_ROOT_FILE",
    "INDEX_EMBEDDINGS",
    "INDEX_IDS",
    "INDEX_META",
    "IVFBackend",
    "IVFPQBackend",
    "METRICS",
    "RERANK_FACTOR",
    "PQBackend",
    "RerankConfig",
    "SearchBackend",
    "ShardedRun",
    "StoreAppend",
    "StoreError",
    "Workers",
    "current_workers",
    "exact_rerank",
    "exact_topk",
    "export_parquet",
    "knn_affinity",
    "mid_zone_table",
    "model_key_of",
    "part_bounds",
    "read_parquet_info",
    "rerank_search",
]
