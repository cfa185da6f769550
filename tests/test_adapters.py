"""Stage-II composing adapters: zero start, parameter counts, dropout, LoRA merging, attaching once."""
import pytest
import torch
from PIL import Image

from zscir import Composer
from zscir.models.adapters import AdapterConfig, LoRADelta, count_trainable
from zscir.models.phi import PhiConfig

PROMPTS = ["a photo of $ that add a blue circle", "a photo of $ that remove the star"]


def _adapted(kind="lora", dropout=0.0, **kw):
    torch.manual_seed(0)
    c = Composer.from_clip("zscir-tiny", phi=PhiConfig(num_tokens=2),
                           adapters=AdapterConfig(kind=kind, rank=4, dropout=dropout, **kw))
    with torch.no_grad():  # trained-looking adapters: zero-initialised ones would hide dropout and merging
        for n, p in c.backbone.model.named_parameters():
            if "lora_" in n or ".adapter_" in n:
                p.add_(torch.randn_like(p) * 0.05)
    return c


def _encode(c, tokens):
    with torch.no_grad():
        return c.backbone.encode_with_pseudo_tokens(PROMPTS, tokens, normalize=True)


@pytest.mark.parametrize("kind", ["bottleneck", "lora"])
def test_zero_initialised_adapters_equal_stage1(kind):
    torch.manual_seed(0)
    plain = Composer.from_clip("zscir-tiny", phi=PhiConfig(num_tokens=2))
    torch.manual_seed(0)
    adapted = Composer.from_clip("zscir-tiny", phi=PhiConfig(num_tokens=2), adapters=AdapterConfig(kind=kind, rank=4))
    img = Image.new("RGB", (64, 64), "white")
    assert torch.equal(plain.encode_query([img], ["add a blue circle"]), adapted.encode_query([img], ["add a blue circle"]))
    assert adapted.adapter_keys and all("adapter_" in k or "lora_" in k for k in adapted.adapter_keys)


def test_trainable_parameter_counts():
    c = Composer.from_clip("zscir-tiny", adapters=AdapterConfig(kind="bottleneck", num_layers=2, rank=32))
    n = count_trainable(c.backbone)
    # 2 layers x 2 sub-layers x (LN 2w + down w*r + r + up r*w + w), w=128, r=32
    assert n == 2 * 2 * (2 * 128 + 128 * 32 + 32 + 32 * 128 + 128)


@pytest.mark.parametrize("kind", ["bottleneck", "lora"])
def test_dropout_acts_in_training_mode_only(kind):
    c = _adapted(kind, dropout=0.5)
    twin = _adapted(kind, dropout=0.0)
    twin.load_state_dict(c.state_dict())
    tokens = torch.randn(2, 2, c.backbone.token_dim)
    c.train()
    torch.manual_seed(1)
    first = _encode(c, tokens)
    torch.manual_seed(2)
    assert (first - _encode(c, tokens)).abs().max() > 1e-4  # a fresh mask each forward pass
    c.eval()
    assert torch.equal(_encode(c, tokens), _encode(twin, tokens))  # eval: no dropout at all


def test_lora_without_dropout_draws_nothing_and_ignores_the_mode():
    c = _adapted("lora")
    tokens = torch.randn(2, 2, c.backbone.token_dim)
    evaluated = _encode(c, tokens)
    c.train()
    state = torch.get_rng_state()
    assert torch.equal(_encode(c, tokens), evaluated)
    assert torch.equal(torch.get_rng_state(), state)


def test_adapters_take_the_mode_of_the_model():
    c = Composer.from_clip("zscir-tiny")  # eval mode
    c.add_adapters(AdapterConfig(kind="lora", rank=4, dropout=0.5))
    deltas = [m for m in c.modules() if isinstance(m, LoRADelta)]
    assert deltas and not any(m.training for m in deltas)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_merged_lora_encodes_like_unmerged(dropout, tmp_path):
    c = _adapted("lora", dropout=dropout)
    tokens = torch.randn(2, 2, c.backbone.token_dim)
    img = Image.new("RGB", (64, 64), "orange")
    before, query = _encode(c, tokens), c.encode_query([img], ["make it green"])
    c.save_pretrained(tmp_path / "m")
    c.train()  # merging folds the eval-mode weights even from training mode
    assert c.merge_adapters() == 4 * 4  # 4 blocks x (attn in/out + mlp fc/proj)
    c.eval()
    assert torch.allclose(_encode(c, tokens), before, atol=1e-5)
    assert torch.allclose(c.encode_query([img], ["make it green"]), query, atol=1e-5)
    assert c.merged and not c.adapter_keys
    assert not any("lora_" in n for n, _ in c.named_parameters())
    assert c.merge_adapters() == 0  # nothing left to fold
    with pytest.raises(ValueError, match="merged"):
        c.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    # the documented route: save unmerged, load, merge
    again = Composer.from_pretrained(tmp_path / "m")
    again.merge_adapters()
    assert torch.allclose(_encode(again, tokens), before, atol=1e-5)


def test_bottleneck_cannot_be_merged_and_full_has_nothing_to_merge(tmp_path):
    with pytest.raises(ValueError, match="non-linear"):
        _adapted("bottleneck").merge_adapters()
    full = Composer.from_clip("zscir-tiny", adapters=AdapterConfig(kind="full", num_layers=1))
    assert full.merge_adapters() == 0 and not full.merged
    full.save_pretrained(tmp_path / "full")  # still an ordinary model folder


def test_add_adapters_once():
    c = Composer.from_clip("zscir-tiny", phi=PhiConfig(num_tokens=2))
    assert c.config.adapters is None and not c.adapter_keys
    cfg = AdapterConfig(kind="lora", num_layers=2, rank=4)
    keys = c.add_adapters(cfg)
    assert keys == c.adapter_keys and len(keys) == 2 * 4 * 2 and c.config.adapters == cfg
    state = {k: v.clone() for k, v in c.state_dict().items()}
    with pytest.raises(ValueError, match="already has adapters"):
        c.add_adapters(cfg)
    assert c.state_dict().keys() == state.keys()  # the refused call changed nothing
    with pytest.raises(ValueError, match="already has adapters"):
        _adapted("bottleneck").add_adapters(AdapterConfig())


def test_add_adapters_checks_the_layer_count_and_the_config():
    c = Composer.from_clip("zscir-tiny")
    with pytest.raises(ValueError, match="num_layers=99"):
        c.add_adapters(AdapterConfig(num_layers=99))
    with pytest.raises(ValueError, match="dropout"):
        AdapterConfig(dropout=1.5)


CAPTIONS = ["a red circle and a blue star", "a photo of a green square"]


def _train_like(c):
    """Move every trainable text parameter as training would (full blocks included)."""
    with torch.no_grad():
        for p in c.backbone.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("kind", ["lora", "bottleneck", "full"])
def test_frozen_text_is_unchanged_by_stage2(kind, tmp_path):
    torch.manual_seed(0)
    c = Composer.from_clip("zscir-tiny", phi=PhiConfig(num_tokens=2))
    before = c.encode_texts(CAPTIONS)
    c.add_adapters(AdapterConfig(kind=kind, num_layers=2, rank=4))
    _train_like(c)
    assert torch.allclose(c.encode_texts(CAPTIONS), before, atol=1e-6)  # frozen CLIP text by default
    adapted = c.encode_texts(CAPTIONS, adapted=True)
    assert (adapted - before).abs().max() > 1e-3  # the adapters really change the text encoder
    assert torch.equal(c.encode_texts(CAPTIONS, adapted=True), adapted)  # and are back on after frozen_text()
    c.save_pretrained(tmp_path / "m")
    loaded = Composer.from_pretrained(tmp_path / "m")
    if kind == "full":  # the folder embeds only the fine-tuned blocks of the tiny CLIP
        with pytest.raises(ValueError, match="kind 'full'"):
            loaded.encode_texts(CAPTIONS)
    else:
        assert torch.allclose(loaded.encode_texts(CAPTIONS), before, atol=1e-6)
    assert torch.allclose(loaded.encode_texts(CAPTIONS, adapted=True), adapted, atol=1e-6)


def test_frozen_text_after_merge_is_refused():
    c = _adapted("lora")
    c.merge_adapters()
    with pytest.raises(ValueError, match="merged"):
        c.encode_texts(CAPTIONS)
