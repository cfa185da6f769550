"""Backbone: loading, image/text features, and the one pseudo-token encoding path."""
import json

import pytest
import torch

from zscir.checkpoint import CheckpointError
from zscir.models.backbone import (BackboneConfig, BackboneError, PromptError, create_backbone, load_backbone,
                                  register_model_config)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_backbone("zscir-tiny")


def _equivalence(bb, sentences, word):
    """Replacing the placeholder by a word's own token embedding equals encoding the sentence with the word."""
    ids = bb.tokenize([word])[0]
    body = ids[1: int(ids.argmax())]  # tokens between start and end of text
    emb = bb.token_embeddings(body.view(1, -1)).expand(len(sentences), -1, -1)
    with torch.no_grad():
        pseudo = bb.encode_with_pseudo_tokens([s.replace(word, "$") for s in sentences], emb)
        real = bb.encode_text(sentences)
    return (pseudo - real).abs().max().item()


def test_text_path_matches_open_clip(tiny):
    texts = ["a photo of a large red circle at the top left", "two shapes", "x " * 100]
    with torch.no_grad():
        ours = tiny.encode_text(texts)
        ref = tiny.model.encode_text(tiny.tokenize(texts))
    assert (ours - ref).abs().max().item() < 1e-5


def test_placeholder_equivalence_single_and_multi_token(tiny):
    sentences = ["a photo of a circle that is red", "circle", "a small blue circle in the center and a star"]
    assert _equivalence(tiny, sentences, "circle") < 1e-5
    # a word that the BPE tokenizer splits into several tokens fills several consecutive slots
    word = "zyxwvutsr"
    assert len(tiny.tokenize([word])[0].nonzero()) > 3
    assert _equivalence(tiny, [f"a photo of {word} that is red"], word) < 1e-5


def test_placeholder_equivalence_vit_b32():
    torch.manual_seed(0)
    bb = load_backbone("ViT-B-32")  # random init, offline
    assert bb.embed_dim == 512 and bb.token_dim == 512 and bb.patch_grid == (7, 7)
    assert _equivalence(bb, ["a photo of a dog on the grass", "a dog"], "dog") < 1e-5


def test_image_features_shapes(tiny):
    feats = tiny.encode_image(torch.randn(3, 3, 64, 64))
    assert feats.pooled.shape == (3, 128)
    assert feats.patches.shape == (3, 16, 128)


def test_pseudo_tokens_change_the_output_and_get_gradients(tiny):
    tokens = torch.randn(2, 3, tiny.token_dim, requires_grad=True)
    out = tiny.encode_with_pseudo_tokens(["a photo of $", "$ and $ together"], tokens)
    out.sum().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    other = tiny.encode_with_pseudo_tokens(["a photo of $", "$ and $ together"], tokens.detach() + torch.randn_like(tokens))
    assert (other - out.detach()).abs().max() > 1e-3


def test_bad_prompts(tiny):
    with pytest.raises(PromptError, match="no placeholder"):
        tiny.encode_with_pseudo_tokens(["a photo of nothing"], torch.randn(1, 1, tiny.token_dim))
    with pytest.raises(PromptError, match="context length"):
        tiny.encode_with_pseudo_tokens(["a photo of $"], torch.randn(1, 80, tiny.token_dim))
    with pytest.raises(PromptError, match="token width"):
        tiny.encode_with_pseudo_tokens(["a photo of $"], torch.randn(1, 1, 7))


def test_unknown_model_name():
    with pytest.raises(BackboneError, match="unknown model name 'ViT-L-15'"):
        load_backbone("ViT-L-15")


def test_missing_and_corrupt_checkpoints(tmp_path, tiny):
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone("zscir-tiny", pretrained=str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_backbone("zscir-tiny", pretrained=str(bad))


def test_save_and_reload_backbone_folder(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "bb")
    cfg = json.loads((tmp_path / "bb" / "config.json").read_text())
    assert cfg["model_name"] == "zscir-tiny" and cfg["model_cfg"]["embed_dim"] == 128
    again = load_backbone(str(tmp_path / "bb"))
    with torch.no_grad():
        assert torch.equal(again.encode_text(["a red circle"]), tiny.encode_text(["a red circle"]))
    assert again.cache_key == tiny.cache_key
    # a weight file for another architecture is refused, not silently ignored
    micro = load_backbone("zscir-micro")
    micro.save_pretrained(tmp_path / "micro")
    (tmp_path / "bb" / "backbone.safetensors").write_bytes((tmp_path / "micro" / "backbone.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="does not match"):
        load_backbone(str(tmp_path / "bb"))


def test_an_architecture_config_from_a_folder_is_registered_publicly():
    import open_clip

    cfg = open_clip.get_model_config("zscir-micro")
    name = "zscir-test-registered"
    assert name not in open_clip.list_models()
    bb = create_backbone(BackboneConfig(name, None, cfg))
    assert name in open_clip.list_models() and open_clip.get_model_config(name) == cfg
    assert bb.config.model_name == name and not any(p.requires_grad for p in bb.parameters())
    register_model_config("zscir-test-other", cfg)
    assert name in open_clip.list_models()  # registering another keeps the first
    with pytest.raises(BackboneError, match="cannot register"):
        register_model_config("a/b", cfg)
    with pytest.raises(BackboneError, match="text_cfg"):
        register_model_config("zscir-test-broken", {"embed_dim": 8})
