"""Patch pooling: phi reads the same tokens from the Stage-I feature cache as from Composer.encode_query."""
import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from zscir import Composer
from zscir.data.features import FeatureCache
from zscir.models.backbone import BackboneError, load_backbone, register_model_config
from zscir.models.phi import PhiConfig
from zscir.train.features import FeatureSource, shapes_features

GRID8 = "zscir-test-grid8"  # 128 px, patch 16: an 8x8 patch grid, unlike the tiny CLIPs' 4x4
register_model_config(GRID8, {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 128, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
})


@pytest.fixture(scope="module")
def composer():
    torch.manual_seed(0)
    c = Composer.from_clip(GRID8, phi=PhiConfig(num_tokens=2, vsi_layers=1, dropout=0.0))
    with torch.no_grad():  # a random phi whose VSI tokens depend clearly on the patches
        for p in c.phi.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return c


def _images(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (96 + 8 * i, 140, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_cache_and_encode_query_give_phi_the_same_tokens(composer, tmp_path):
    assert composer.backbone.patch_grid == (8, 8)  # phi's default patch_grid: 4
    paths = _images(tmp_path / "imgs")
    # what `zscir train-stage1` builds (its --patch-grid default 4), read as Stage I reads it
    cache = FeatureCache.build(composer.backbone, paths, tmp_path / "cache", patch_grid=4, progress=False)
    pooled, patches = FeatureSource.from_cache(cache).get(np.arange(len(paths)))
    assert patches.shape[1] == 16
    with torch.no_grad():
        from_cache = composer.phi(pooled, patches)
    seen = []
    hook = composer.phi.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        composer.encode_query([Image.open(p) for p in paths], ["make it red"] * len(paths))
    finally:
        hook.remove()
    from_query = seen[0]
    scale = from_query.abs().max().item()
    diff = (from_cache - from_query).abs().max().item()
    assert diff < 2e-3 * scale, f"phi differs by {diff:.4g} (max |token| {scale:.4g})"  # float16 rounding only
    # the full 8x8 grid would give phi other tokens: the comparison above can tell them apart
    full = composer.backbone.encode_image(composer._pixels([Image.open(p) for p in paths]))
    assert full.patches.shape[1] == 64
    with pytest.raises(ValueError, match="reads 16 patch tokens .* but got 64"):
        composer.phi(full.pooled, full.patches)


def test_every_path_pools_to_phis_grid(composer, world):
    scenes = world.scenes(3, stream="grid-test")
    feats = shapes_features(composer, scenes, 64)
    assert feats.patches.shape == (3, 16, 64)
    full = composer.backbone.encode_image(composer.backbone.pixels_from_uint8(
        np.stack([np.asarray(Image.new("RGB", (64, 64), c)) for c in ("red", "green", "blue")])))
    manual = full.patches.reshape(3, 4, 2, 4, 2, 64).mean(dim=(2, 4)).reshape(3, 16, 64)
    assert torch.allclose(composer.phi_patches(full.patches), manual, atol=1e-6)
    full_grid = Composer.from_clip(GRID8, phi=PhiConfig(patch_grid=0))
    assert full_grid.phi.patch_count == 64
    assert full_grid.image_features([Image.new("RGB", (64, 64))])[1].shape == (1, 64, 64)


def test_matching_grid_is_bit_identical():
    from zscir.models.backbone import pool_patches

    torch.manual_seed(0)
    tiny = load_backbone("zscir-tiny")  # 4x4 grid: pooling to 4x4 must not touch the tokens
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full, pooled = tiny.encode_image(x), tiny.encode_image(x, patch_grid=4)
    assert torch.equal(full.patches, pooled.patches)
    tokens = torch.randn(2, 16, 8)
    assert pool_patches(tokens, (4, 4), (4, 4)) is tokens


def test_old_phi_config_gets_the_grid_it_was_trained_with():
    old = PhiConfig().to_dict()
    del old["patch_grid"]
    old["max_patches"] = 1024  # written before patch_grid replaced it
    assert PhiConfig.from_dict(old).patch_grid == 4
    with pytest.raises(ValueError, match="patch_grid must be an int >= 0"):
        PhiConfig(patch_grid=-1)


def test_grid_larger_than_the_backbone_is_one_clear_error_at_load(tmp_path):
    torch.manual_seed(0)
    Composer.from_clip("zscir-micro").save_pretrained(tmp_path / "m")  # 4x4 backbone
    path = tmp_path / "m" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["phi"]["patch_grid"] = 8  # as if phi had been trained on an 8x8 cache
    path.write_text(json.dumps(cfg))
    with pytest.raises(BackboneError, match=r"model folder .*m: phi reads patch tokens pooled to 8x8 .*"
                                            r"has a 4x4 patch grid"):
        Composer.from_pretrained(tmp_path / "m")
    with pytest.raises(BackboneError, match="pooled to 8x8"):
        Composer.from_clip("zscir-micro", phi=PhiConfig(patch_grid=8))


def test_training_refuses_features_of_another_grid(composer):
    from zscir.train.stage1 import Stage1Config, Stage1Task

    features = FeatureSource(np.zeros((4, 64), np.float16), np.zeros((4, 64, 64), np.float16))  # full 8x8 grid
    with pytest.raises(ValueError, match=r"Stage-I image features hold 64 patch tokens per image, but phi reads 16"):
        Stage1Task(composer, features, Stage1Config(phi=composer.phi.config))


def test_cli_patch_grid_sets_phi():
    from zscir.cli.train import stage1_add_arguments, stage1_config_from_args

    parser = argparse.ArgumentParser()
    stage1_add_arguments(parser)
    assert stage1_config_from_args(parser.parse_args(["--shapes", "4", "--out", "x"])).phi.patch_grid == 4
    assert stage1_config_from_args(parser.parse_args(["--shapes", "4", "--out", "x", "--patch-grid", "2"])
                                   ).phi.patch_grid == 2
