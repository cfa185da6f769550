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
import json
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
from ..search.shards import SHARDS_DIR, ShardedRun, Workers, current_workers, part_bounds
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

    A cache that cannot be read or written is dropped with a warning: it may cost time, never the evaluation
    (unless `strict`: the shards of several processes, where the cache is how they pass rows on).
    """

    def __init__(self, folder: Path, model_key: str, strict: bool = False) -> None:
        self.folder, self.model_key, self.enabled, self.strict = folder, model_key, True, strict
        self.store: Optional[EmbeddingStore] = None
        self.pending: Dict[str, torch.Tensor] = {}  # one row per file, even if the gallery lists it twice
        self.failed: List[Dict[str, Any]] = []
        if (folder / "meta.json").is_file():
            try:
                self.store = EmbeddingStore.open(folder)
            except StoreError as err:
                self._drop(f"ignoring unreadable gallery cache {folder}: {err}")

    def _drop(self, message: str) -> None:
        if self.strict:
            raise EvaluationError(message)
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
def _embed(model: RetrievalModel, paths: Sequence[Path], batch_size: int, num_workers: int, progress: bool, desc: str,
           precision: str, device: Any) -> Iterator[Tuple[int, Optional[torch.Tensor], Optional[str]]]:
    """(position, features or None, failure message or None) for each image, in order; load failures come last."""
    load_failures: Dict[int, str] = {}
    if paths:
        with torch.inference_mode():
            for positions, images in _image_batches(paths, batch_size, num_workers, progress, desc, load_failures):
                with autocast(precision, device):
                    out = model.encode_images(images)
                feats = _as_features(out, len(images), f"{desc}: encode_images")
                bad = set(_nonfinite_rows(feats))
                for row, p in enumerate(positions.tolist()):
                    if row in bad:
                        yield p, None, f"the model returned a non-finite embedding for {paths[p]}"
                    else:
                        yield p, feats[row], None
    for p, reason in load_failures.items():
        yield p, None, reason


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
    workers: Optional[Workers] = None,
) -> Tuple[torch.Tensor, Dict[ImageId, str]]:
    """Embed gallery images ([N, D], rows of unusable images are NaN) and return the failures by id.

    With `cache_dir` the features are stored in an embedding store keyed by
    :func:`gallery_cache_key` (and the precision) and reused (or resumed) on the next call.
    `num_workers` decoding processes feed the model (0: decode in this process).
    `precision` ("no", "bf16", "fp16", "auto") is the model's autocast; the rows are float32.
    Under torchrun / accelerate launch (`workers`: default :func:`~zscir.search.shards.current_workers`) every
    process must call this: each embeds its part of the gallery (into the cache, resumable per part, or
    gathered over the process group without one) and every process gets the one-process result.
    """
    if len(ids) != len(paths):
        raise ValueError(f"encode_gallery: {len(ids)} ids but {len(paths)} paths")
    if not ids:
        raise EvaluationError(f"{desc}: the gallery is empty")
    device = model_device(model)
    precision = resolve_precision(precision, device)
    workers = workers or current_workers()
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
        folder = Path(cache_dir) / f"gallery-{key[:32]}"
        run = ShardedRun(folder / SHARDS_DIR, {"model_key": model_key}, workers, error=EvaluationError,
                         noun="gallery cache")
        if run.active:
            return _encode_gallery_sharded(model, ids, paths, run, folder, model_key, batch_size, progress, desc,
                                           num_workers, precision)
        cache = _GalleryCache(folder, model_key)
        for i, feats in cache.lookup(absolute).items():
            rows[i] = feats
    elif workers.world > 1:
        return _encode_gallery_gathered(model, ids, paths, workers, batch_size, progress, desc, num_workers, precision)
    todo = [i for i, r in enumerate(rows) if r is None]

    failures: Dict[ImageId, str] = {}
    for p, feats, message in _embed(model, [paths[i] for i in todo], batch_size, num_workers, progress, desc,
                                    precision, device):
        i = todo[p]
        if feats is None:
            failures[ids[i]] = message
            if cache is not None:
                cache.skip(absolute[i], "non-finite embedding" if message.startswith("the model") else message)
        else:
            rows[i] = feats
            if cache is not None:
                cache.put(absolute[i], feats)
    if cache is not None:
        cache.commit()
    return _stack_rows(rows, failures, ids, desc)


def _stack_rows(rows: Sequence[Optional[torch.Tensor]], failures: Dict[ImageId, str], ids: Sequence[ImageId],
                desc: str) -> Tuple[torch.Tensor, Dict[ImageId, str]]:
    """The rows as one tensor, NaN where an image failed (an error if all did)."""
    dim = next((r.shape[0] for r in rows if r is not None), None)
    if dim is None:
        example = next(iter(failures.values()), "no image could be read")
        raise EvaluationError(f"{desc}: none of the {len(ids)} gallery images could be embedded, e.g. {example}")
    nan_row = torch.full((dim,), float("nan"))
    return torch.stack([r if r is not None else nan_row for r in rows]), failures


def _encode_gallery_sharded(model: RetrievalModel, ids: Sequence[ImageId], paths: Sequence[Path], run: ShardedRun,
                            folder: Path, model_key: str, batch_size: int, progress: bool, desc: str,
                            num_workers: int, precision: str) -> Tuple[torch.Tensor, Dict[ImageId, str]]:
    """Each process embeds its parts into shard stores; the main one merges them into the cache; all read it."""
    absolute = [os.path.abspath(p) for p in paths]
    given = {}
    for a, p in zip(absolute, paths):
        given.setdefault(a, p)
    held: List[Dict[str, Any]] = []  # failures before the cache has a row (a new store learns its width from one)

    def todo() -> List[str]:
        store = _GalleryCache(folder, model_key, strict=True).store
        return [a for a in given if store is None or a not in store]

    def merge(part: Path, info: Dict[str, Any]) -> None:
        target = _GalleryCache(folder, model_key, strict=True)
        shard = EmbeddingStore.open(part) if (part / "meta.json").is_file() else None
        held.extend(info.get("skipped", []))
        if shard is not None and len(shard):
            if target.store is None:
                target.store = EmbeddingStore.create(folder, shard.arrays, meta={"model_key": model_key})
            target.store.extend(shard)
        if target.store is not None and held:
            target.store.add([], {"embeddings": np.zeros((0, *target.store.arrays["embeddings"].shape), np.float32)},
                             skipped=[s for s in held if s["id"] not in target.store])
            held.clear()

    items = run.begin(todo, merge)
    workers = run.workers
    device = model_device(model)
    for part, start, stop, where in run.my_parts():
        if run.is_done(part):
            continue
        shard = _GalleryCache(where, model_key, strict=True)
        part_items = [a for a in items[start:stop] if shard.store is None or a not in shard.store]  # a part resumes
        failed: List[Dict[str, Any]] = []
        for p, feats, message in _embed(model, [given[a] for a in part_items], batch_size, num_workers,
                                        progress and workers.is_main, f"{desc} (process {workers.rank})", precision,
                                        device):
            if feats is None:
                failed.append({"id": part_items[p], "reason": message})
            else:
                shard.put(part_items[p], feats)
        shard.commit()
        run.mark_done(part, skipped=failed)
    if items:
        run.finish(merge)
    cache = _GalleryCache(folder, model_key, strict=True)
    found = cache.lookup(absolute)
    reasons = {s["id"]: s["reason"] for s in (cache.store.skipped if cache.store is not None else [])}
    rows: List[Optional[torch.Tensor]] = [found.get(i) for i in range(len(ids))]
    failures = {ids[i]: reasons.get(a, "not embedded") for i, a in enumerate(absolute) if rows[i] is None}
    return _stack_rows(rows, failures, ids, desc)


def _encode_gallery_gathered(model: RetrievalModel, ids: Sequence[ImageId], paths: Sequence[Path], workers: Workers,
                             batch_size: int, progress: bool, desc: str, num_workers: int, precision: str
                             ) -> Tuple[torch.Tensor, Dict[ImageId, str]]:
    """Without a cache: each process embeds one contiguous part; the parts are gathered (safetensors bytes)."""
    from safetensors.torch import load as load_bytes
    from safetensors.torch import save as save_bytes

    start, stop = part_bounds(len(paths), workers.rank, workers.world)
    feats: Dict[str, torch.Tensor] = {}
    failed: Dict[str, str] = {}
    for p, row, message in _embed(model, list(paths[start:stop]), batch_size, num_workers,
                                  progress and workers.is_main, f"{desc} (process {workers.rank})", precision,
                                  model_device(model)):
        if row is None:
            failed[str(start + p)] = message
        else:
            feats[str(start + p)] = row.contiguous()
    rows: List[Optional[torch.Tensor]] = [None] * len(ids)
    failures: Dict[ImageId, str] = {}
    for blob in workers.gather_bytes(save_bytes(feats, metadata={"failed": json.dumps(failed)})):
        part = load_bytes(blob)
        for pos, row in part.items():
            rows[int(pos)] = row
        for pos, message in _failed_of(blob).items():
            failures[ids[int(pos)]] = message
    return _stack_rows(rows, failures, ids, desc)


def _failed_of(blob: bytes) -> Dict[str, str]:
    """The failures a gathered part recorded in its safetensors header."""
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + header_len])
    return json.loads(header.get("__metadata__", {}).get("failed", "{}"))


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
