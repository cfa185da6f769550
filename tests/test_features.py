"""The Stage-I feature cache: shapes, values, keys, resuming, corrupt images, datasets."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from zscir.data.features import (
    FeatureCache,
    FeatureCacheError,
    cache_folder,
    disk_bytes_per_image,
)
from zscir.data.images import load_image


@pytest.fixture(scope="module")
def backbone():
    from zscir.models.backbone import load_backbone

    torch.manual_seed(0)
    return load_backbone("zscir-micro")  # 32 px, patch 8 -> 4x4 grid, embed_dim 64


class Wrapped:
    """Delegates to a real backbone; counts encode calls, can fail after some calls or fake another key."""

    def __init__(self, bb, fail_after: Optional[int] = None, key: Optional[str] = None, scale: float = 1.0):
        self.bb, self.fail_after, self.calls, self.scale = bb, fail_after, 0, scale
        self.preprocess, self.image_size, self.embed_dim = bb.preprocess, bb.image_size, bb.embed_dim
        self.patch_grid = bb.patch_grid
        self.cache_key = key or bb.cache_key

    def parameters(self):
        return self.bb.parameters()

    def encode_image(self, pixels, with_patches=True, patch_grid=None):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        feats = self.bb.encode_image(pixels, with_patches=with_patches, patch_grid=patch_grid)
        feats.pooled = feats.pooled * self.scale
        return feats


def _corpus(folder: Path, n: int = 10, bad=(3, 7)) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"img{i:02d}.png"
        if i in bad:
            p.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
        else:
            Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _direct(bb, path):
    with torch.no_grad():
        return bb.encode_image(bb.preprocess(load_image(path))[None])


def test_build_shapes_values_and_failures(tmp_path, backbone):
    paths = _corpus(tmp_path / "imgs")
    cache = FeatureCache.build(backbone, paths, tmp_path / "cache", patch_grid=2, batch_size=3, chunk_size=4, progress=False)
    assert len(cache) == 10 and cache.pooled.dtype == np.float16
    assert cache.pooled.shape == (10, 64) and cache.patches.shape == (10, 4, 64)
    assert cache.valid.tolist() == [i not in (3, 7) for i in range(10)]
    assert cache.valid_indices().tolist() == [0, 1, 2, 4, 5, 6, 8, 9]
    assert [f["index"] for f in cache.failures] == [3, 7] and "img07.png" in cache.failures[1]["path"]
    assert (cache.folder / "failures.log").read_text().count("\n") == 2
    assert cache.paths == [str(p) for p in paths]
    assert not cache.pooled[3].any()  # failed rows stay zero

    feats = _direct(backbone, paths[5])
    np.testing.assert_allclose(cache.pooled[5].astype(np.float32), feats.pooled[0].numpy(), rtol=2e-3, atol=2e-3)
    grid = feats.patches[0].reshape(4, 4, 64).permute(2, 0, 1)
    pooled2 = F.adaptive_avg_pool2d(grid, (2, 2)).permute(1, 2, 0).reshape(4, 64)
    np.testing.assert_allclose(cache.patches[5].astype(np.float32), pooled2.numpy(), rtol=2e-3, atol=2e-3)


def test_full_grid_and_disk_cost_matches_files(tmp_path, backbone):
    paths = _corpus(tmp_path / "imgs", n=6, bad=())
    cache = FeatureCache.build(backbone, paths, tmp_path / "cache", patch_grid=None, progress=False)
    assert cache.patches.shape == (6, 16, 64)
    np.testing.assert_allclose(
        cache.patches[2].astype(np.float32), _direct(backbone, paths[2]).patches[0].numpy(), rtol=2e-3, atol=2e-3
    )
    data_bytes = sum(np.load(cache.folder / f, mmap_mode="r").nbytes for f in ("pooled.npy", "patches.npy", "valid.npy"))
    assert data_bytes == 6 * disk_bytes_per_image(64, 16)


def test_second_build_reuses_without_encoding(tmp_path, backbone):
    paths = _corpus(tmp_path / "imgs", n=5, bad=())
    first = FeatureCache.build(backbone, paths, tmp_path / "cache", patch_grid=2, progress=False)
    counting = Wrapped(backbone)
    again = FeatureCache.build(counting, paths, tmp_path / "cache", patch_grid=2, progress=False)
    assert counting.calls == 0 and again.folder == first.folder
    # another grid or another file list is another cache
    assert cache_folder(backbone, paths, tmp_path / "cache", patch_grid=1) != first.folder
    assert cache_folder(backbone, paths[:4], tmp_path / "cache", patch_grid=2) != first.folder


def test_other_backbone_is_never_reused(tmp_path, backbone):
    paths = _corpus(tmp_path / "imgs", n=4, bad=())
    first = FeatureCache.build(backbone, paths, tmp_path / "cache", patch_grid=2, progress=False)
    other = Wrapped(backbone, key="other-model-0123", scale=2.0)
    second = FeatureCache.build(other, paths, tmp_path / "cache", patch_grid=2, progress=False)
    assert other.calls > 0 and second.folder != first.folder and second.folder.name.startswith("other-model-0123-")
    np.testing.assert_allclose(second.pooled[:].astype(np.float32), 2 * first.pooled[:].astype(np.float32), rtol=2e-3)
    with pytest.raises(FeatureCacheError, match="other-model-0123"):
        FeatureCache.open(first.folder, backbone_key="other-model-0123")
    # a meta edited to claim another backbone no longer matches the folder's key
    meta_path = first.folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["key"]["backbone"] = "other-model-0123"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(FeatureCacheError, match="does not match the folder's key"):
        FeatureCache.open(first.folder)


def test_interrupted_build_resumes_from_last_chunk(tmp_path, backbone):
    paths = _corpus(tmp_path / "imgs", n=10, bad=(6,))
    flaky = Wrapped(backbone, fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        # chunks of 4 in batches of 2: chunk 0 = calls 1-2, chunk 1 dies at call 4
        FeatureCache.build(flaky, paths, tmp_path / "cache", patch_grid=2, batch_size=2, chunk_size=4, progress=False)
    folder = cache_folder(backbone, paths, tmp_path / "cache", patch_grid=2)
    assert json.loads((folder / "meta.json").read_text())["count"] == 4
    with pytest.raises(FeatureCacheError, match="incomplete .4/10"):
        FeatureCache.open(folder)

    counting = Wrapped(backbone)
    resumed = FeatureCache.build(counting, paths, tmp_path / "cache", patch_grid=2, batch_size=2, chunk_size=4, progress=False)
    # items 4..9 minus the bad #6: chunk [4,8) -> 2 batches (one is partly bad), chunk [8,10) -> 1
    assert counting.calls == 3
    fresh = FeatureCache.build(backbone, paths, tmp_path / "fresh", patch_grid=2, batch_size=5, progress=False)
    assert resumed.valid.tolist() == fresh.valid.tolist()
    assert [f["index"] for f in resumed.failures] == [6]
    np.testing.assert_allclose(resumed.pooled[:].astype(np.float32), fresh.pooled[:].astype(np.float32), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(resumed.patches[:].astype(np.float32), fresh.patches[:].astype(np.float32), rtol=2e-3, atol=2e-3)


def test_torch_dataset_over_valid_items_with_workers(tmp_path, backbone):
    paths = _corpus(tmp_path / "imgs", n=7, bad=(0, 4))
    cache = FeatureCache.build(backbone, paths, tmp_path / "cache", patch_grid=2, progress=False)
    ds = cache.torch_dataset()
    assert len(ds) == 5
    item = ds[0]
    assert item["index"] == 1 and item["pooled"].dtype == torch.float32 and item["patches"].shape == (4, 64)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert torch.cat([b["index"] for b in batches]).tolist() == [1, 2, 3, 5, 6]
    all_pooled = torch.cat([b["pooled"] for b in batches])
    assert torch.equal(all_pooled, torch.from_numpy(cache.pooled[[1, 2, 3, 5, 6]].astype(np.float32)))


def test_bad_inputs(tmp_path, backbone):
    with pytest.raises(ValueError, match="empty corpus"):
        FeatureCache.build(backbone, [], tmp_path / "cache", progress=False)
    paths = _corpus(tmp_path / "imgs", n=3, bad=())
    with pytest.raises(ValueError, match="larger than the backbone"):
        FeatureCache.build(backbone, paths, tmp_path / "cache", patch_grid=8, progress=False)
    with pytest.raises(FeatureCacheError, match="not found"):
        FeatureCache.open(tmp_path / "nowhere")
    all_bad = _corpus(tmp_path / "bad", n=3, bad=(0, 1, 2))
    with pytest.raises(FeatureCacheError, match="none of the 3 images could be loaded"):
        FeatureCache.build(backbone, all_bad, tmp_path / "cache", progress=False)


def test_float16_overflow_is_an_error(tmp_path, backbone):
    paths = _corpus(tmp_path / "imgs", n=3, bad=())
    huge = Wrapped(backbone, key="huge-key", scale=1e9)
    with pytest.raises(FeatureCacheError, match="non-finite features"):
        FeatureCache.build(huge, paths, tmp_path / "cache", progress=False)


def test_hf_dataset_source(tmp_path, backbone):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(3)
    imgs = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(4)]
    ds = datasets.Dataset.from_dict({"image": imgs}).cast_column("image", datasets.Image())
    cache = FeatureCache.build(backbone, ds, tmp_path / "cache", patch_grid=2, progress=False)
    assert cache.valid.all() and cache.paths == [f"image[{i}]" for i in range(4)]
    with torch.no_grad():
        ref = backbone.encode_image(backbone.preprocess(imgs[2].convert("RGB"))[None]).pooled[0]
    np.testing.assert_allclose(cache.pooled[2].astype(np.float32), ref.numpy(), rtol=2e-3, atol=2e-3)


def test_pooled_only_cache(tmp_path, backbone):
    paths = _corpus(tmp_path / "imgs", n=3, bad=(1,))
    cache = FeatureCache.build(backbone, paths, tmp_path / "cache", with_patches=False, progress=False)
    assert cache.patches is None and cache.patch_grid is None and cache.pooled.shape == (3, 64)
    assert not (cache.folder / "patches.npy").exists()
    item = cache.torch_dataset()[1]
    assert item["index"] == 2 and "patches" not in item
    assert cache.folder != cache_folder(backbone, paths, tmp_path / "cache", patch_grid=4)


def _rewrite_as_before_the_store(folder: Path, meta: dict, completed: Optional[int] = None) -> None:
    """Write the meta.json FeatureCache wrote before it used the EmbeddingStore (the .npy files are the same)."""
    old = {k: meta[k] for k in ("key", "digest", "embed_dim", "patch_count", "source_grid", "dtype", "chunk_size")}
    old["completed"] = meta["count"] if completed is None else completed
    old["complete"] = old["completed"] == meta["key"]["count"]
    old["failures"] = [{"index": s["id"], "path": s["path"], "reason": s["reason"]} for s in meta["skipped"]
                       if s["id"] < old["completed"]]
    (folder / "meta.json").write_text(json.dumps(old))


def test_cache_written_before_the_store_loads_and_resumes(tmp_path, backbone):
    paths = _corpus(tmp_path / "imgs", n=10, bad=(3, 7))
    built = FeatureCache.build(backbone, paths, tmp_path / "cache", patch_grid=2, batch_size=3, chunk_size=4, progress=False)
    pooled, patches, valid = built.pooled[:].copy(), built.patches[:].copy(), built.valid[:].copy()
    meta = json.loads((built.folder / "meta.json").read_text())
    _rewrite_as_before_the_store(built.folder, meta)
    old = FeatureCache.open(built.folder, backbone_key=backbone.cache_key)
    assert np.array_equal(old.pooled, pooled) and np.array_equal(old.patches, patches) and np.array_equal(old.valid, valid)
    assert [f["index"] for f in old.failures] == [3, 7] and "img07.png" in old.failures[1]["path"]
    counting = Wrapped(backbone)
    assert FeatureCache.build(counting, paths, tmp_path / "cache", patch_grid=2, progress=False).folder == built.folder
    assert counting.calls == 0  # reused, not re-encoded
    assert [int(item["index"]) for item in old.torch_dataset()] == [0, 1, 2, 4, 5, 6, 8, 9]

    _rewrite_as_before_the_store(built.folder, meta, completed=4)  # an older zscir was interrupted after one chunk
    with pytest.raises(FeatureCacheError, match="incomplete .4/10"):
        FeatureCache.open(built.folder)
    resumed = FeatureCache.build(counting, paths, tmp_path / "cache", patch_grid=2, batch_size=3, chunk_size=4,
                                 progress=False)
    assert counting.calls > 0 and json.loads((built.folder / "meta.json").read_text())["count"] == 10
    assert [f["index"] for f in resumed.failures] == [3, 7] and resumed.valid.tolist() == valid.tolist()
    np.testing.assert_allclose(resumed.pooled[:].astype(np.float32), pooled.astype(np.float32), rtol=2e-3, atol=2e-3)
