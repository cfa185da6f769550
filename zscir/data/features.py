"""The Stage-I feature cache: a corpus encoded once by the frozen CLIP backbone, memory-mapped on disk.

For every image the cache stores the pooled embedding ``[D]`` and the projected
patch tokens ``[P, D]`` (float16), where the backbone's patch grid (e.g. 16x16
for ViT-L/14 at 224 px) is optionally average-pooled to ``g x g`` so that
million-image corpora fit on disk. The folder is an
:class:`~zscir.search.store.EmbeddingStore` with three preallocated ``.npy``
arrays and the row numbers as ids::

    meta.json       store record (rows completed, array layout, skipped images) + key, shapes   (atomic rewrite)
    paths.json      the image names, in order                            (atomic)
    pooled.npy      float16 [N, D]      numpy .npy, memory-mapped, no pickle
    patches.npy     float16 [N, P, D]
    valid.npy       bool [N]            False for images that failed to load
    failures.log    index<TAB>path<TAB>reason, one line per skipped image

**Keys.** The folder is named ``<backbone cache_key>-<digest>``; the digest hashes
the backbone ``cache_key``, the file-list fingerprint, the pooled grid, the
image size, the preprocessing pipeline and the format version. :meth:`FeatureCache.open`
recomputes the digest from ``meta.json`` and checks it against the folder name,
and against an expected backbone key when given, so a cache built by another
backbone (or other settings) is never silently reused.

**Resuming.** Items are encoded in chunks, each one store append: its rows
are written and flushed, then ``meta.json`` is atomically rewritten with the
number of completed items. An interrupted build restarts from the last
completed chunk. Caches written before the store (``completed`` in
``meta.json``) are read as they are; resuming one records it as a store.

**Disk cost per image**, ViT-L/14 at 224 px (embed_dim D = 768, 16 x 16 = 256 patches),
float16 (2 bytes/value), pooled embedding included, 1 byte valid flag:

=================  ===========  ==================  ==============
patch grid         values       bytes / image       1M images
=================  ===========  ==================  ==============
full 16x16 (256)   257 x 768    394,753 (385.5 KiB)  ~395 GB
pooled 4x4 (16)    17 x 768      26,113 (25.5 KiB)    ~26 GB
pooled 2x2 (4)     5 x 768        7,681 (7.5 KiB)     ~7.7 GB
pooled only        1 x 768        1,537 (1.5 KiB)     ~1.5 GB
=================  ===========  ==================  ==============

(:func:`disk_bytes_per_image` computes these; ``paths.json`` adds the name lengths.)
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..checkpoint import atomic_write_json
from ..models.backbone import PatchGrid, resolve_patch_grid
from ..precision import autocast, resolve_precision
from ..search.shards import PLAN_NAME, SHARDS_DIR, ShardedRun, Workers, current_workers
from ..search.store import STORE_FORMAT_VERSION, ArraySpec, EmbeddingStore, StoreAppend, StoreError
from .images import ImageFailure, ImageSource, SliceSource, as_image_source, iter_image_batches

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_NAME = "meta.json"
PATHS_NAME = "paths.json"
FAILURES_LOG = "failures.log"
ARRAY_FILES = {"pooled": "pooled.npy", "patches": "patches.npy", "valid": "valid.npy"}


class FeatureCacheError(StoreError):
    """A feature cache folder is missing, incomplete, corrupt or was built with other settings."""


def disk_bytes_per_image(embed_dim: int, patch_count: int) -> int:
    """Bytes on disk per image: float16 pooled [D] + patches [P, D], plus the 1-byte valid flag."""
    return 2 * embed_dim * (1 + patch_count) + 1


def _normalise_grid(patch_grid: PatchGrid, backbone_grid: Optional[Tuple[int, int]]) -> Optional[Tuple[int, int]]:
    """The stored patch grid (gh, gw): the backbone grid for None or 0, else the pooled size (never larger)."""
    if backbone_grid is None:
        raise FeatureCacheError("the backbone has no patch grid (not a ViT); build with with_patches=False")
    return resolve_patch_grid(patch_grid, backbone_grid)


def _describe_preprocess(preprocess: Any) -> str:
    """A stable text form of the preprocessing pipeline (memory addresses removed)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(preprocess))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:80] or "backbone"


def _digest(key: Dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _cache_key(backbone: Any, source: ImageSource, grid: Optional[Tuple[int, int]], with_patches: bool) -> Dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "backbone": str(backbone.cache_key),
        "source": source.fingerprint(),
        "count": len(source),
        "patch_grid": list(grid) if (with_patches and grid is not None) else None,
        "with_patches": bool(with_patches),
        "image_size": int(backbone.image_size),
        "preprocess": _describe_preprocess(backbone.preprocess),
        "load_options": sorted((k, repr(v)) for k, v in getattr(source, "load_kwargs", {}).items()),
    }


def cache_folder(
    backbone: Any,
    images: Union[ImageSource, Sequence[Union[str, os.PathLike]]],
    cache_dir: Union[str, os.PathLike],
    patch_grid: PatchGrid = 4,
    with_patches: bool = True,
    precision: str = "no",
) -> Path:
    """The folder :meth:`FeatureCache.build` uses for these settings."""
    source = as_image_source(images)
    grid = _normalise_grid(patch_grid, backbone.patch_grid) if with_patches else None
    key = _cache_key(backbone, source, grid, with_patches)
    key.update(_precision_key(backbone, precision))
    return Path(cache_dir) / f"{_slug(key['backbone'])}-{_digest(key)[:16]}"


def _precision_key(backbone: Any, precision: str) -> Dict[str, str]:
    """The cache-key entry of the encoding precision (none for float32, so float32 caches keep their folders)."""
    resolved = resolve_precision(precision, _model_device_dtype(backbone)[0])
    return {} if resolved == "no" else {"precision": resolved}


def _model_device_dtype(backbone: Any) -> Tuple[torch.device, torch.dtype]:
    params = getattr(backbone, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    if first is None:
        return torch.device("cpu"), torch.float32
    dtype = first.dtype if first.dtype.is_floating_point else torch.float32
    return first.device, dtype


class _FeatureStore(EmbeddingStore):
    error = FeatureCacheError
    noun = "feature cache"


class FeatureCache:
    """Read side of a Stage-I feature cache (see the module docstring); build or resume with :meth:`build`."""

    def __init__(self, store: EmbeddingStore, paths: List[str]) -> None:
        self.store = store
        self.folder = store.folder
        self.meta = store.meta
        self.pooled: np.ndarray = store.array("pooled")
        self.patches: Optional[np.ndarray] = store.array("patches") if "patches" in store.meta["arrays"] else None
        self.valid: np.ndarray = store.array("valid")
        self.paths = paths

    # ------------------------------------------------------------------- reading
    @classmethod
    def open(cls, folder: Union[str, os.PathLike], backbone_key: Optional[str] = None) -> "FeatureCache":
        """Open a complete cache; verifies the key against the folder name (and `backbone_key` if given)."""
        folder = Path(folder)
        meta = _read_meta(folder)
        key = meta["key"]
        digest = _digest(key)
        if meta.get("digest") != digest or not folder.name.endswith(digest[:16]):
            raise FeatureCacheError(
                f"{folder}: {META_NAME} does not match the folder's key (digest {digest[:16]}); "
                "the cache was moved, renamed or edited; rebuild it"
            )
        if backbone_key is not None and key["backbone"] != backbone_key:
            raise FeatureCacheError(
                f"{folder} was built with backbone {key['backbone']!r}, not {backbone_key!r}; refusing to reuse it"
            )
        if meta["count"] < key["count"]:
            raise FeatureCacheError(
                f"{folder} is incomplete ({meta['count']}/{key['count']} images encoded); "
                "run FeatureCache.build again with the same arguments to resume"
            )
        return cls(_FeatureStore.open(folder, meta), _read_paths(folder, key["count"]))

    def __len__(self) -> int:
        return int(self.pooled.shape[0])

    def __repr__(self) -> str:
        patches = None if self.patches is None else tuple(self.patches.shape)
        return (
            f"FeatureCache({str(self.folder)!r}, n={len(self)}, valid={int(self.valid.sum())}, "
            f"pooled={tuple(self.pooled.shape)}, patches={patches})"
        )

    @property
    def backbone_key(self) -> str:
        """The backbone cache_key the features were computed with."""
        return str(self.meta["key"]["backbone"])

    @property
    def patch_grid(self) -> Optional[Tuple[int, int]]:
        """The stored (pooled) patch grid, or None without patches."""
        grid = self.meta["key"]["patch_grid"]
        return None if grid is None else (int(grid[0]), int(grid[1]))

    @property
    def failures(self) -> List[Dict[str, Any]]:
        """Images that could not be loaded: dicts with index, path, reason."""
        return [{"index": s["id"], "path": s.get("path"), "reason": s["reason"]} for s in self.store.skipped]

    def valid_indices(self) -> np.ndarray:
        """Indices of the images that were encoded (int64)."""
        return np.flatnonzero(np.asarray(self.valid)).astype(np.int64)

    def torch_dataset(self) -> "CachedFeatureDataset":
        """A Dataset over the valid items yielding dict(pooled [D], patches [P, D] float32, index int)."""
        return CachedFeatureDataset(self.folder, self.valid_indices())

    # ------------------------------------------------------------------- writing
    @classmethod
    def build(
        cls,
        backbone: Any,
        paths: Union[ImageSource, Sequence[Union[str, os.PathLike]]],
        cache_dir: Union[str, os.PathLike],
        patch_grid: PatchGrid = 4,
        batch_size: int = 64,
        progress: bool = True,
        num_workers: int = 0,
        chunk_size: int = 4096,
        with_patches: bool = True,
        precision: str = "no",
        workers: Optional[Workers] = None,
    ) -> "FeatureCache":
        """Encode a corpus (paths or an ImageSource) into `cache_dir`, or resume / reuse a matching cache; returns it opened.

        ``patch_grid``: pooled grid size ``g`` (or ``(gh, gw)``), None for the full
        grid. Images that fail to load are logged, skipped and marked invalid.
        ``precision``: the backbone's autocast ("no", "bf16", "fp16", "auto"; part of the key).
        Under torchrun / accelerate launch (`workers`: default :func:`~zscir.search.shards.current_workers`)
        every process must call this: each encodes its parts of the corpus in place, resumable per part,
        and the cache equals a one-process build.
        """
        from tqdm.auto import tqdm

        if batch_size < 1 or chunk_size < 1:
            raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size}, {chunk_size}")
        source = as_image_source(paths)
        n = len(source)
        if n == 0:
            raise ValueError("cannot build a feature cache for an empty corpus (no images given)")
        grid = _normalise_grid(patch_grid, backbone.patch_grid) if with_patches else None
        key = _cache_key(backbone, source, grid, with_patches)
        key.update(_precision_key(backbone, precision))
        digest = _digest(key)
        folder = Path(cache_dir) / f"{_slug(key['backbone'])}-{digest[:16]}"
        meta_path = folder / META_NAME
        workers = workers or current_workers()
        sharded = workers.world > 1 or (folder / SHARDS_DIR / PLAN_NAME).is_file()

        if meta_path.is_file():
            meta = _read_meta(folder)
            if meta["key"] != key:
                raise FeatureCacheError(f"{folder}: stored key differs from the requested one; remove the folder to rebuild")
            if meta["count"] >= n:
                logger.info("reusing feature cache %s", folder)
                return cls.open(folder, backbone_key=key["backbone"])
            if "completed" in json.loads(meta_path.read_text()) and workers.is_main:
                atomic_write_json(meta_path, meta)  # an interrupted cache of an older zscir: record it as a store
            store = _FeatureStore.open(folder, meta)
            logger.info("resuming feature cache %s at %d/%d images", folder, len(store), n)
        elif workers.is_main:  # with several processes the main one creates the arrays, before the others look

            embed_dim = int(backbone.embed_dim)
            patch_count = grid[0] * grid[1] if grid is not None else 0
            _check_disk_space(Path(cache_dir), n * disk_bytes_per_image(embed_dim, patch_count))
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(folder / PATHS_NAME, source.names())
            (folder / FAILURES_LOG).write_text("")
            arrays = {name: ArraySpec(ARRAY_FILES[name], dtype, shape[1:], capacity=n)
                      for name, (shape, dtype) in _array_shapes(n, embed_dim, patch_count, with_patches).items()}
            store = _FeatureStore.create(folder, arrays, positional_ids=True, meta={
                "key": key,
                "digest": digest,
                "embed_dim": embed_dim,
                "patch_count": patch_count,
                "source_grid": list(backbone.patch_grid) if with_patches else None,
                "dtype": "float16",
                "chunk_size": int(chunk_size),
            })
        if sharded:
            return cls._build_sharded(backbone, source, folder, key, grid, with_patches, batch_size, num_workers,
                                      progress, workers)

        device, dtype = _model_device_dtype(backbone)
        was_training = bool(getattr(backbone, "training", False))
        if hasattr(backbone, "eval"):
            backbone.eval()
        encoder = _RangeEncoder(backbone, source, key, grid, with_patches, device, dtype, folder, batch_size, num_workers)
        start = len(store)
        step = int(store.meta["chunk_size"])
        bar = tqdm(total=n, initial=start, desc="encoding images", unit="img", disable=not progress)
        try:
            while start < n:
                stop = min(n, start + step)
                # one transaction per chunk: an interruption resumes at the chunk's start
                with store.append() as txn:
                    failures, any_valid = encoder.encode(txn, start, stop, bar, first=start == 0)
                    for f in failures:
                        txn.skip(f.index, f.reason, path=f.path)
                    if stop >= n and not any_valid and not np.asarray(store.array("valid")).any():
                        # leave the last chunk uncommitted: a fixed corpus can resume instead of reusing nothing
                        raise _nothing_loaded(n, folder, failures)
                start = stop
        finally:
            bar.close()
            if was_training and hasattr(backbone, "train"):
                backbone.train()
        if store.skipped:
            logger.warning(
                "%d of %d images could not be loaded and are marked invalid (see %s)",
                len(store.skipped), n, folder / FAILURES_LOG,
            )
        return cls.open(folder, backbone_key=key["backbone"])

    @classmethod
    def _build_sharded(cls, backbone: Any, source: ImageSource, folder: Path, key: Dict[str, Any],
                       grid: Optional[Tuple[int, int]], with_patches: bool, batch_size: int, num_workers: int,
                       progress: bool, workers: Workers) -> "FeatureCache":
        """Every process fills its parts of the preallocated arrays in place; the main process commits them in order."""
        from tqdm.auto import tqdm

        n = len(source)
        run = ShardedRun(folder / SHARDS_DIR, {"digest": _digest(key)}, workers, error=FeatureCacheError,
                         noun="feature cache", check_part=_read_progress)
        store_of = lambda: _FeatureStore.open(folder, _read_meta(folder))  # noqa: E731  (re-read: others commit)
        items = run.begin(lambda: range(len(store_of()), n), lambda part, info: _commit_part(store_of(), info))
        store = store_of()
        device, dtype = _model_device_dtype(backbone)
        was_training = bool(getattr(backbone, "training", False))
        if hasattr(backbone, "eval"):
            backbone.eval()
        encoder = _RangeEncoder(backbone, source, key, grid, with_patches, device, dtype, folder, batch_size, num_workers)
        step = int(store.meta["chunk_size"])
        mine = [(part, items[lo], items[hi - 1] + 1, where) for part, lo, hi, where in run.my_parts() if hi > lo]
        bar = tqdm(total=sum(hi - lo for _, lo, hi, _ in mine), desc=f"encoding images (process {workers.rank})",
                   unit="img", disable=not (progress and workers.is_main))
        try:
            for part, lo, hi, where in mine:
                if run.is_done(part):
                    bar.update(hi - lo)
                    continue
                state = _read_progress(where) if where.is_dir() else {"done": 0, "skipped": [], "any_valid": False}
                row = lo + int(state["done"])
                bar.update(row - lo)
                while row < hi:  # chunk by chunk, each fsynced, then its progress recorded
                    stop = min(hi, row + step)
                    with store.write_at(row) as txn:
                        failures, any_valid = encoder.encode(txn, row, stop, bar, first=row == lo)
                    state = {"done": stop - lo, "any_valid": bool(state["any_valid"] or any_valid),
                             "skipped": state["skipped"] + [{"id": f.index, "reason": f.reason, "path": f.path}
                                                            for f in failures]}
                    where.mkdir(parents=True, exist_ok=True)
                    atomic_write_json(where / PROGRESS_NAME, state)
                    row = stop
                run.mark_done(part, start=lo, stop=hi, skipped=state["skipped"], any_valid=state["any_valid"])
        finally:
            bar.close()
            if was_training and hasattr(backbone, "train"):
                backbone.train()
        if items:
            run.finish(lambda part, info: _commit_part(store_of(), info))
        return cls.open(folder, backbone_key=key["backbone"])


PROGRESS_NAME = "progress.json"


def _read_progress(folder: Path) -> Dict[str, Any]:
    """A part's progress (rows done from its start, skipped images, whether any image loaded)."""
    path = folder / PROGRESS_NAME
    if not path.is_file():
        return {"done": 0, "skipped": [], "any_valid": False}
    try:
        state = json.loads(path.read_text())
        return {"done": int(state["done"]), "skipped": list(state["skipped"]), "any_valid": bool(state["any_valid"])}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FeatureCacheError(f"{path}: unreadable progress record ({err})") from None


def _commit_part(store: EmbeddingStore, info: Dict[str, Any]) -> None:
    """Commit one finished part's rows (it must continue the committed rows) and its skipped images."""
    if not info:
        return  # an unfinished part of an abandoned plan: its rows are encoded again
    start, stop = int(info["start"]), int(info["stop"])
    if stop <= len(store):
        return  # committed before an interrupted merge
    if start != len(store):
        raise FeatureCacheError(f"{store.folder}: a part starts at row {start} but {len(store)} rows are committed")
    capacity = min(spec.capacity or 0 for spec in store.arrays.values())
    if stop >= capacity and not info.get("any_valid") and not np.asarray(store.array("valid")).any():
        # the earlier parts (committed) loaded nothing either; the last one stays uncommitted, as in one process
        failures = [ImageFailure(s["id"], s.get("path"), s["reason"]) for s in info.get("skipped", [])]
        raise _nothing_loaded(capacity, store.folder, failures)
    store.commit_count(stop, info.get("skipped", []))


def _nothing_loaded(n: int, folder: Path, failures: Sequence[ImageFailure]) -> FeatureCacheError:
    last = failures[-1] if failures else None
    return FeatureCacheError(
        f"none of the {n} images could be loaded (see {folder / FAILURES_LOG}); "
        f"e.g. {last.path if last else '?'}: {last.reason if last else ''}"
    )


class _RangeEncoder:
    """Encodes images [start, stop) of a corpus into a store transaction, in corpus order (one process's work)."""

    def __init__(self, backbone: Any, source: ImageSource, key: Dict[str, Any], grid: Optional[Tuple[int, int]],
                 with_patches: bool, device: torch.device, dtype: torch.dtype, folder: Path, batch_size: int,
                 num_workers: int) -> None:
        self.backbone, self.source, self.key, self.grid, self.with_patches = backbone, source, key, grid, with_patches
        self.device, self.dtype, self.folder = device, dtype, folder
        self.batch_size, self.num_workers = batch_size, num_workers

    def encode(self, txn: StoreAppend, start: int, stop: int, bar: Any, first: bool) -> Tuple[List[ImageFailure], bool]:
        """Write rows start..stop-1 (zero rows, invalid, for images that fail); returns the failures and whether any loaded."""
        failures: List[ImageFailure] = []

        def record(failure: ImageFailure) -> None:
            failures.append(ImageFailure(failure.index + start, failure.path, failure.reason))
            bar.update(1)

        meta = txn.store.meta
        chunk = _ChunkWriter(txn, start, int(meta["embed_dim"]), int(meta["patch_count"]), self.with_patches)
        for idx, pixels in iter_image_batches(
            SliceSource(self.source, start, stop),
            self.backbone.preprocess,
            self.batch_size,
            num_workers=self.num_workers,
            progress=False,
            on_failure=record,
            abort_after=64 if first else stop - start + 1,
        ):
            rows = idx.numpy() + start
            with autocast(self.key.get("precision", "no"), self.device):
                pooled, patches = _encode(self.backbone, pixels, self.device, self.dtype, self.grid, self.with_patches)
            _check_finite(pooled, patches, rows, self.source)
            chunk.write(rows, pooled, patches)
            bar.update(len(rows))
        chunk.fill_to(stop)  # failed images at the end of the chunk
        if failures:
            with open(self.folder / FAILURES_LOG, "a", encoding="utf-8") as fh:
                fh.writelines(f"{f.index}\t{f.path}\t{f.reason}\n" for f in failures)
        return failures, chunk.any_valid


class _ChunkWriter:
    """Appends a chunk's rows in corpus order: zero rows, marked invalid, stand in for images that failed."""

    def __init__(self, txn: StoreAppend, start: int, embed_dim: int, patch_count: int, with_patches: bool) -> None:
        self.txn, self.next_row, self.any_valid = txn, start, False
        self.dim, self.patch_count, self.with_patches = embed_dim, patch_count, with_patches

    def _zeros(self, n: int) -> Dict[str, np.ndarray]:
        block = {"pooled": np.zeros((n, self.dim), dtype=np.float16), "valid": np.zeros(n, dtype=bool)}
        if self.with_patches:
            block["patches"] = np.zeros((n, self.patch_count, self.dim), dtype=np.float16)
        return block

    def write(self, rows: np.ndarray, pooled: np.ndarray, patches: Optional[np.ndarray]) -> None:
        """Append rows up to the last of `rows` (ascending corpus positions) with these features."""
        if rows[0] < self.next_row:
            raise FeatureCacheError(f"images arrived out of order (#{int(rows[0])} after #{self.next_row - 1})")
        block = self._zeros(int(rows[-1]) + 1 - self.next_row)
        at = rows - self.next_row
        block["pooled"][at] = pooled
        block["valid"][at] = True
        if self.with_patches:
            block["patches"][at] = patches
        self.txn.write(block)
        self.any_valid = True
        self.next_row = int(rows[-1]) + 1

    def fill_to(self, stop: int) -> None:
        """Append zero rows, marked invalid, up to row `stop`."""
        if stop > self.next_row:
            self.txn.write(self._zeros(stop - self.next_row))
            self.next_row = stop


# ------------------------------------------------------------------------ helpers
def _encode(
    backbone: Any,
    pixels: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    grid: Optional[Tuple[int, int]],
    with_patches: bool,
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Run the backbone on a batch; returns float16 pooled [B, D] and patches pooled to `grid` [B, P, D]."""
    with torch.no_grad():
        if with_patches:
            feats = backbone.encode_image(pixels.to(device=device, dtype=dtype), patch_grid=grid)
        else:
            feats = backbone.encode_image(pixels.to(device=device, dtype=dtype), with_patches=False)
    pooled = feats.pooled.float().cpu().to(torch.float16).numpy()
    if not with_patches:
        return pooled, None
    if feats.patches is None:
        raise FeatureCacheError("the backbone returned no patch tokens; build with with_patches=False")
    return pooled, feats.patches.float().cpu().to(torch.float16).numpy()


def _check_finite(pooled: np.ndarray, patches: Optional[np.ndarray], rows: np.ndarray, source: ImageSource) -> None:
    bad = ~np.isfinite(pooled).all(axis=1)
    if patches is not None:
        bad |= ~np.isfinite(patches).all(axis=(1, 2))
    if bad.any():
        first = int(rows[np.flatnonzero(bad)[0]])
        raise FeatureCacheError(
            f"non-finite features (NaN, or overflow in float16) for {int(bad.sum())} image(s), "
            f"e.g. #{first} {source.describe(first)}"
        )


def _check_disk_space(cache_dir: Path, needed: int) -> None:
    probe = cache_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise FeatureCacheError(
            f"the feature cache needs {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free under {probe}; "
            "use a coarser patch_grid (e.g. 2) or another cache_dir"
        )


def _read_meta(folder: Path) -> Dict[str, Any]:
    """The cache's store record; a cache written before the store (progress in "completed") is translated."""
    if not folder.is_dir():
        raise FeatureCacheError(f"feature cache folder not found: {folder}")
    if not (folder / META_NAME).is_file():
        raise FeatureCacheError(f"{folder} is not a feature cache (no {META_NAME})")
    meta = _FeatureStore.read_meta(folder)
    legacy = "completed" in meta
    for field in ("key", "digest", "embed_dim", "patch_count", "chunk_size") + (("completed",) if legacy else ("count",)):
        if field not in meta:
            raise FeatureCacheError(f"{folder / META_NAME}: missing field {field!r}")
    version = meta["key"].get("format_version")
    if version != FORMAT_VERSION:
        raise FeatureCacheError(f"{folder / META_NAME}: format version {version}, this zscir reads version {FORMAT_VERSION}; rebuild")
    return _from_legacy(folder, meta) if legacy else meta


def _from_legacy(folder: Path, meta: Dict[str, Any]) -> Dict[str, Any]:
    """The store record of a cache folder written before FeatureCache kept its features in an EmbeddingStore."""
    n, d, p = int(meta["key"]["count"]), int(meta["embed_dim"]), int(meta["patch_count"])
    arrays = {}
    for name, (shape, dtype) in _array_shapes(n, d, p, meta["key"]["with_patches"]).items():
        path = folder / ARRAY_FILES[name]
        if not path.is_file():
            raise FeatureCacheError(f"{folder}: {ARRAY_FILES[name]} is missing")
        try:
            arr = np.lib.format.open_memmap(path, mode="r")
        except (ValueError, OSError) as err:
            raise FeatureCacheError(f"{path}: unreadable array file ({err})") from None
        if tuple(arr.shape) != shape or arr.dtype != np.dtype(dtype):
            raise FeatureCacheError(f"{path}: has {arr.dtype}{list(arr.shape)}, expected {dtype}{list(shape)}")
        arrays[name] = ArraySpec(ARRAY_FILES[name], dtype, shape[1:], int(arr.offset), capacity=n).to_json()
    record = {k: v for k, v in meta.items() if k not in ("completed", "complete", "failures")}
    record.update(format_version=STORE_FORMAT_VERSION, count=int(meta["completed"]), ids="positional", arrays=arrays,
                  skipped=[{"id": f["index"], "reason": f["reason"], "path": f["path"]} for f in meta.get("failures", [])])
    return record


def _read_paths(folder: Path, count: int) -> List[str]:
    path = folder / PATHS_NAME
    try:
        paths = json.loads(path.read_text())
    except FileNotFoundError:
        raise FeatureCacheError(f"{folder}: {PATHS_NAME} is missing") from None
    except json.JSONDecodeError as err:
        raise FeatureCacheError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(paths, list) or len(paths) != count:
        raise FeatureCacheError(f"{path}: expected a list of {count} names")
    return paths


def _array_shapes(n: int, dim: int, patch_count: int, with_patches: bool) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """Shape and dtype of each array of a cache of `n` images."""
    shapes = {"pooled": ((n, dim), "float16"), "valid": ((n,), "bool")}
    if with_patches:
        shapes["patches"] = ((n, patch_count, dim), "float16")
    return shapes


class CachedFeatureDataset(torch.utils.data.Dataset):
    """Valid items of a feature cache as float32 tensors; memory maps are opened lazily in each worker."""

    def __init__(self, folder: Union[str, os.PathLike], indices: np.ndarray) -> None:
        self.folder = Path(folder)
        self.indices = np.asarray(indices, dtype=np.int64)
        self._arrays: Optional[Dict[str, np.ndarray]] = None

    def __getstate__(self) -> Dict[str, Any]:
        # never ship the mapped arrays to worker processes; each worker maps the files itself
        state = dict(self.__dict__)
        state["_arrays"] = None
        return state

    def _maps(self) -> Dict[str, np.ndarray]:
        if self._arrays is None:
            store = _FeatureStore.open(self.folder, _read_meta(self.folder))
            self._arrays = {name: store.array(name) for name in store.meta["arrays"] if name != "valid"}
        return self._arrays

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        index = int(self.indices[i])
        maps = self._maps()
        item: Dict[str, Any] = {"pooled": torch.from_numpy(np.asarray(maps["pooled"][index], dtype=np.float32)), "index": index}
        if "patches" in maps:
            item["patches"] = torch.from_numpy(np.asarray(maps["patches"][index], dtype=np.float32))
        return item
