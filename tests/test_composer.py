"""Composer API: encoding, save/load round trip, strict loading, the docstring example."""
import doctest
import json

import pytest
import torch
from PIL import Image

import zscir.composer
from zscir import Composer
from zscir.checkpoint import CheckpointError
from zscir.config import ConfigError
from zscir.models.adapters import AdapterConfig
from zscir.models.phi import PhiConfig


def _perturb(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)


@pytest.fixture()
def composer():
    c = Composer.from_clip("zscir-tiny", phi=PhiConfig(num_tokens=3), adapters=AdapterConfig(kind="bottleneck", rank=8))
    _perturb(c.phi)
    for n, p in c.backbone.model.named_parameters():
        if ".adapter_" in n:
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.05)
    return c


def test_docstring_example_runs():
    result = doctest.testmod(zscir.composer, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_encode_query_inputs_and_normalisation(composer, tmp_path):
    img = Image.new("RGB", (80, 50), "blue")
    path = tmp_path / "a.png"
    img.save(path)
    q = composer.encode_query([img, str(path)], ["make it red", "make it red"])
    assert q.shape == (2, 128)
    assert torch.allclose(q.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(q[0], q[1], atol=1e-5)  # a path and the same PIL image give the same query
    other = composer.encode_query([img], ["make it green"])
    assert (other - q[:1]).abs().max() > 1e-4  # the text matters
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        composer.encode_query([img, img], ["x"])


def test_save_and_load_is_bit_exact(composer, tmp_path):
    composer.save_pretrained(tmp_path / "m")
    again = Composer.from_pretrained(tmp_path / "m")
    img = Image.new("RGB", (64, 64), "yellow")
    assert torch.equal(composer.encode_query([img], ["a red star"]), again.encode_query([img], ["a red star"]))
    for (n, a), (m, b) in zip(composer.state_dict().items(), again.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    assert again.config == composer.config


def test_missing_or_mismatched_weights_are_errors(composer, tmp_path):
    composer.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not found"):
        Composer.from_pretrained(tmp_path / "m")
    composer.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["phi"]["num_tokens"] = 5  # weights were saved for 3 tokens
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match"):
        Composer.from_pretrained(tmp_path / "m")


def test_search_over_matrix(composer):
    imgs = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")]
    gallery = composer.encode_images(imgs)
    scores, idx = composer.search(imgs[0], "make it green", gallery, k=10)
    assert idx.shape == (1, 3) and sorted(idx[0].tolist()) == [0, 1, 2]
    assert torch.all(scores[0, :-1] >= scores[0, 1:])


def test_image_residual_is_inert_at_zero_and_round_trips(composer, tmp_path):
    img = Image.new("RGB", (64, 64), "pink")
    before = composer.encode_query([img], ["add a star"])
    composer.enable_image_residual()
    assert torch.equal(before, composer.encode_query([img], ["add a star"]))  # w = 0: Stage II starts at Stage I
    with torch.no_grad():
        composer.residual_weight.fill_(0.7)
    after = composer.encode_query([img], ["add a star"])
    image = composer.encode_images([img])
    assert (after @ image.T).item() > (before @ image.T).item()  # the query moved towards the reference image
    composer.save_pretrained(tmp_path / "r")
    again = Composer.from_pretrained(tmp_path / "r")
    assert again.config.image_residual and float(again.residual_weight) == pytest.approx(0.7)
    assert torch.equal(again.encode_query([img], ["add a star"]), after)


def test_old_folder_with_a_dropped_field_loads(composer, tmp_path):
    composer.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    cfg = json.loads(path.read_text())
    assert "image_prompt" not in cfg
    cfg["image_prompt"] = "a photo of $"  # written by versions before the field was removed
    path.write_text(json.dumps(cfg))
    again = Composer.from_pretrained(tmp_path / "m")
    assert again.config == composer.config and not hasattr(again.config, "image_prompt")
    cfg["image_promt"] = "typo"  # any other unknown key is still an error
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="image_promt"):
        Composer.from_pretrained(tmp_path / "m")
