"""Query and gallery encoding for evaluation; gallery embeddings are cached in an :class:`~zscir.search.store.EmbeddingStore`.

The gallery cache is one store folder per (model, file list, file sizes and
times) under ``$ZSCIR_CACHE_DIR`` or ``~/.cache/zscir/gallery``:
``gallery-<key>/`` with float32 rows (the exact values the evaluation ranks
with) keyed by absolute image path. Encoding appends to it as it goes, so an
interrupted encoding resumes; images that failed are recorded and retried next
time. A cache file of an older zscir (``gallery-<key>.safetensors``) is still
read.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import CheckpointError, load_tensors
from ..data.schema import CIRQuery, ImageId
from ..precision import autocast, resolve_precision
from ..search.store import ArraySpec, EmbeddingStore, StoreError
from .protocols import EvaluationError

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
CACHE_ENV = "ZSCIR_CACHE_DIR"
_COMMIT_ROWS = 4096  # gallery rows encoded between cache commits


@runtime_checkable
class RetrievalModel(Protocol):
    """What the evaluator needs from a model (e.g. :class:`zscir.composer.Composer`)."""

    cache_key: str  # identifies the weights and image pipeline; part of the gallery-feature cache key

    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """[N, D] L2-normalised embeddings of PIL images."""
        ...

    def encode_query(self, images: Sequence[Any], texts: Sequence[str]) -> torch.Tensor:
        """[N, D] L2-normalised composed-query embeddings of reference images + modification texts."""
        ...


def _as_features(out: Any, expected_rows: int, what: str) -> torch.Tensor:
    """Check a model output is a [N, D] tensor and return it as float32 CPU, L2-normalised."""
    if not isinstance(out, torch.Tensor):
        raise EvaluationError(f"{what}: the model returned {type(out).__name__}, expected a torch.Tensor")
    if out.dim() != 2 or out.shape[0] != expected_rows:
        raise EvaluationError(f"{what}: the model returned shape {tuple(out.shape)}, expected [{expected_rows}, D]")
    out = out.detach().float().cpu()
    # normalising again is harmless for normalised outputs and keeps cosine ranking for sloppy models
    return F.normalize(out, dim=-1)


def model_device(model: Any) -> Any:
    """The device a model's weights are on (the CPU for models that do not say)."""
    return getattr(model, "device", None) or "cpu"


def precision_cache_key(model_key: str, precision: str) -> str:
    """The gallery-cache model key of features encoded in `precision` (float32 keeps the plain key)."""
    return model_key if precision == "no" else f"{model_key}-{precision}"


def _nonfinite_rows(features: torch.Tensor) -> List[int]:
    return torch.nonzero(~torch.isfinite(features).all(dim=1)).flatten().tolist()


def default_cache_dir() -> Path:
    """Gallery feature cache folder: ``$ZSCIR_CACHE_DIR`` or ``~/.cache/zscir/gallery``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "zscir" / "gallery"


def gallery_cache_key(model_key: str, paths: Sequence[Path]) -> str:
    """Hex digest of (model cache key, sorted file list, each file's size and modification time).

    A replaced or edited image changes its size or time and so the key; a
    touched file only costs one recomputation.
    """
    h = hashlib.sha256()
    h.update(f"zscir-gallery-v1\n{model_key}\n".encode("utf-8"))
    for p in sorted(os.path.abspath(p) for p in paths):
        try:
            st = os.stat(p)
            stamp = f"{st.st_size}\t{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{p}\t{stamp}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _image_batches(
    paths: Sequence[Path], batch_size: int, num_workers: int, progress: bool, desc: str, failures: Dict[int, str]
) -> Iterator[Tuple[torch.Tensor, List[Any]]]:
    """Decoded images in batches (bad ones recorded in `failures` by position), via zscir.data.images."""
    from ..data.images import iter_image_batches

    def record(failure: Any) -> None:
        failures[failure.index] = f"cannot load {failure.path}: {failure.reason}"

    batches = iter_image_batches(list(paths), None, batch_size, num_workers=num_workers, progress=progress,
                                 on_failure=record, desc=desc)
    try:
        yield from batches
    except RuntimeError as err:  # every one of the first images failed: a wrong folder, not a few bad files
        raise EvaluationError(f"{desc}: {err}") from None


# ------------------------------------------------------------------------ gallery cache
class _GalleryCache:
    """One gallery's features in a store keyed by absolute path (created on the first commit).

    A cache that cannot be read or written is dropped with a warning: it may cost time, never the evaluation.
    """

    def __init__(self, folder: Path, model_key: str) -> None:
        self.folder, self.model_key, self.enabled = folder, model_key, True
        self.store: Optional[EmbeddingStore] = None
        self.pending: Dict[str, torch.Tensor] = {}  # one row per file, even if the gallery lists it twice
        self.failed: List[Dict[str, Any]] = []
        if (folder / "meta.json").is_file():
            try:
                self.store = EmbeddingStore.open(folder)
            except StoreError as err:
                self._drop(f"ignoring unreadable gallery cache {folder}: {err}")

    def _drop(self, message: str) -> None:
        logger.warning("%s", message)
        self.enabled, self.store = False, None

    def lookup(self, paths: Sequence[str]) -> Dict[int, torch.Tensor]:
        """Cached features by position in `paths`."""
        have = [i for i, p in enumerate(paths) if self.store is not None and p in self.store]
        if not have:
            return {}
        rows = np.asarray(self.store.array("embeddings")[[self.store.row_of(paths[i]) for i in have]], dtype=np.float32)
        logger.info("loaded %d of %d gallery features from %s", len(have), len(paths), self.folder)
        return {i: torch.from_numpy(rows[j]) for j, i in enumerate(have)}

    def put(self, path: str, features: torch.Tensor) -> None:
        """Queue one image's features (committed every few thousand rows and at the end)."""
        if self.enabled:
            self.pending[path] = features
            if len(self.pending) >= _COMMIT_ROWS:
                self.commit()

    def skip(self, path: str, reason: str) -> None:
        """Record an image that could not be embedded (it is tried again next time)."""
        if self.enabled:
            self.failed.append({"id": path, "reason": reason})

    def commit(self) -> None:
        """Append the queued rows and failures in one store transaction."""
        if not self.enabled or not (self.pending or self.failed and self.store is not None):
            return  # failures alone wait for a store: a new one learns its dimension from a row
        try:
            if self.store is None:
                dim = int(next(iter(self.pending.values())).shape[0])
                layout = {"embeddings": ArraySpec("embeddings.f32", "float32", (dim,))}
                self.store = EmbeddingStore.create(self.folder, layout, meta={"model_key": self.model_key})
            width = self.store.arrays["embeddings"].shape
            rows = torch.stack(list(self.pending.values())).numpy() if self.pending else np.zeros((0, *width), np.float32)
            self.store.add(list(self.pending), {"embeddings": rows}, skipped=self.failed)
        except (StoreError, OSError, ValueError) as err:
            self._drop(f"not caching gallery features in {self.folder}: {err}")
        self.pending.clear()
        self.failed.clear()


def _read_legacy_cache(cache_dir: Path, key: str, paths: Sequence[Path]) -> Optional[torch.Tensor]:
    """Features from a gallery cache file of an older zscir (one safetensors file, rows in sorted-path order)."""
    cache_file = cache_dir / f"gallery-{key[:32]}.safetensors"
    if not cache_file.is_file():
        return None
    try:
        cached = load_tensors(cache_file)["features"]
    except (CheckpointError, KeyError) as err:
        logger.warning("ignoring unreadable gallery cache %s: %s", cache_file, err)
        return None
    if cached.shape[0] != len(paths) or _nonfinite_rows(cached):
        logger.warning("ignoring gallery cache %s: it holds %d rows, expected %d", cache_file, cached.shape[0], len(paths))
        return None
    absolute = [os.path.abspath(p) for p in paths]
    order = sorted(range(len(paths)), key=absolute.__getitem__)
    features = torch.empty_like(cached)
    features[torch.tensor(order)] = cached
    logger.info("loaded %d gallery features from %s", len(paths), cache_file)
    return features


# ---------------------------------------------------------------------------- encoding
def encode_gallery(
    model: RetrievalModel,
    ids: Sequence[ImageId],
    paths: Sequence[Path],
    batch_size: int = 64,
    cache_dir: Optional[PathLike] = None,
    progress: bool = True,
    desc: str = "gallery",
    num_workers: int = 0,
    precision: str = "no",
) -> Tuple[torch.Tensor, Dict[ImageId, str]]:
    """Embed gallery images ([N, D], rows of unusable images are NaN) and return the failures by id.

    With `cache_dir` the features are stored in an embedding store keyed by
    :func:`gallery_cache_key` (and the precision) and reused (or resumed) on the next call.
    `num_workers` decoding processes feed the model (0: decode in this process).
    `precision` ("no", "bf16", "fp16", "auto") is the model's autocast; the rows are float32.
    """
    if len(ids) != len(paths):
        raise ValueError(f"encode_gallery: {len(ids)} ids but {len(paths)} paths")
    if not ids:
        raise EvaluationError(f"{desc}: the gallery is empty")
    device = model_device(model)
    precision = resolve_precision(precision, device)
    model_key = getattr(model, "cache_key", None)
    absolute = [os.path.abspath(p) for p in paths]
    cache: Optional[_GalleryCache] = None
    rows: List[Optional[torch.Tensor]] = [None] * len(ids)
    if cache_dir is not None and model_key:
        model_key = precision_cache_key(str(model_key), precision)  # bf16 rows never stand in for float32 ones
        key = gallery_cache_key(model_key, paths)
        legacy = _read_legacy_cache(Path(cache_dir), key, paths)
        if legacy is not None:
            return legacy, {}
        cache = _GalleryCache(Path(cache_dir) / f"gallery-{key[:32]}", model_key)
        for i, feats in cache.lookup(absolute).items():
            rows[i] = feats
    todo = [i for i, r in enumerate(rows) if r is None]

    load_failures: Dict[int, str] = {}
    failures: Dict[ImageId, str] = {}
    if todo:
        with torch.inference_mode():
            for positions, images in _image_batches([paths[i] for i in todo], batch_size, num_workers, progress, desc,
                                                    load_failures):
                with autocast(precision, device):
                    out = model.encode_images(images)
                feats = _as_features(out, len(images), f"{desc}: encode_images")
                bad = set(_nonfinite_rows(feats))
                for row, p in enumerate(positions.tolist()):
                    i = todo[p]
                    if row in bad:
                        failures[ids[i]] = f"the model returned a non-finite embedding for {paths[i]}"
                        if cache is not None:
                            cache.skip(absolute[i], "non-finite embedding")
                    else:
                        rows[i] = feats[row]
                        if cache is not None:
                            cache.put(absolute[i], feats[row])
    for p, reason in load_failures.items():
        failures[ids[todo[p]]] = reason
        if cache is not None:
            cache.skip(absolute[todo[p]], reason)
    if cache is not None:
        cache.commit()
    dim = next((r.shape[0] for r in rows if r is not None), None)
    if dim is None:
        raise EvaluationError(f"{desc}: none of the {len(ids)} gallery images could be embedded, e.g. {next(iter(failures.values()))}")
    nan_row = torch.full((dim,), float("nan"))
    return torch.stack([r if r is not None else nan_row for r in rows]), failures


def encode_queries(
    model: RetrievalModel,
    queries: Sequence[CIRQuery],
    image_paths: Mapping[ImageId, Path],
    batch_size: int = 64,
    progress: bool = True,
    num_workers: int = 0,
    precision: str = "no",
) -> Tuple[torch.Tensor, Dict[str, str]]:
    """Embed composed queries ([Q, D]; a query with several texts averages their normalised features).

    Returns the features and the failures by query id (unreadable reference or
    non-finite output); failed rows are NaN. `precision` is the model's autocast; the rows are float32.
    """
    if not queries:
        return torch.empty(0, 0), {}
    load_failures: Dict[int, str] = {}
    failures: Dict[str, str] = {}
    rows: List[Optional[torch.Tensor]] = [None] * len(queries)
    paths = [image_paths[q.reference] for q in queries]
    device = model_device(model)
    precision = resolve_precision(precision, device)
    with torch.inference_mode():
        for positions, images in _image_batches(paths, batch_size, num_workers, progress, "queries", load_failures):
            positions = positions.tolist()
            summed: Optional[torch.Tensor] = None
            for t in range(max(len(queries[i].texts) for i in positions)):
                members = [j for j, i in enumerate(positions) if len(queries[i].texts) > t]
                with autocast(precision, device):
                    out = model.encode_query([images[j] for j in members], [queries[positions[j]].texts[t] for j in members])
                feats = _as_features(out, len(members), "queries: encode_query")
                if summed is None:
                    summed = torch.zeros(len(positions), feats.shape[1])
                summed[members] += feats
            # SEARLE protocol: normalise((normalise(f1) + normalise(f2)) / 2); the /2 cancels out
            combined = F.normalize(summed, dim=-1)
            bad = set(_nonfinite_rows(combined))
            for row, i in enumerate(positions):
                if row in bad:
                    failures[queries[i].query_id] = "the model returned a non-finite query embedding"
                else:
                    rows[i] = combined[row]
    for i, reason in load_failures.items():
        failures[queries[i].query_id] = f"reference unreadable: {reason}"
    dim = next((r.shape[0] for r in rows if r is not None), 0)
    nan_row = torch.full((dim,), float("nan"))
    return torch.stack([r if r is not None else nan_row for r in rows]), failures


__all__ = ["CACHE_ENV", "RetrievalModel", "default_cache_dir", "encode_gallery", "encode_queries", "gallery_cache_key",
           "model_device", "precision_cache_key"]
