"""Stage-II plug-in components (MELT, SPN bank, DQE-CIR): their math on constructed inputs, and each inside train_stage2."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zscir.train.components as C
from zscir.composer import Composer
from zscir.config import ConfigError
from zscir.models.adapters import AdapterConfig
from zscir.models.phi import PhiConfig
from zscir.train.components import ComponentContext
from zscir.train.engine import TrainConfig
from zscir.train.features import Corpus, TripletFeatures
from zscir.train.stage2 import Stage2Config, Stage2Task, train_stage2

D = 64  # zscir-micro embedding width


def fake_context(dim=D, batch_size=32, components=(), n=4):
    """A component context without a composer: the config and triplet fields the components read."""
    cfg = Stage2Config(components=tuple(components), train=TrainConfig(batch_size=batch_size))
    triplets = SimpleNamespace(target=F.normalize(torch.randn(n, dim), dim=-1), kinds=[""] * n, modifications=[""] * n)
    return ComponentContext(cfg, triplets)


def random_triplets(n=96, kinds=None, texts=None, seed=0):
    """Random frozen features with real shapes-world texts: a memorisation task the adapters can fit."""
    from zscir.shapes import LONG_TAIL_WEIGHTS, ShapesWorld

    edits = ShapesWorld(seed=0).make_triplets(n, family="train", kind_weights=LONG_TAIL_WEIGHTS, stream="components-test")
    g = torch.Generator().manual_seed(seed)
    return TripletFeatures(
        torch.randn(n, D, generator=g), torch.randn(n, 16, D, generator=g), F.normalize(torch.randn(n, D, generator=g), dim=-1),
        texts or [e.text for e in edits], kinds or [e.kind for e in edits], [f"r{i}" for i in range(n)],
        [f"t{i}" for i in range(n)],
    )


def micro_composer():
    torch.manual_seed(0)
    return Composer.from_clip("zscir-micro", phi=PhiConfig(num_tokens=1, vsi_layers=1))


# ------------------------------------------------------------------------------------------ the contract

def test_every_built_in_registers_whatever_module_is_imported_first():
    import subprocess
    import sys

    names = ["bank", "dqe_attributes", "dqe_mid_zone", "dqe_pairwise", "explicit", "inverse_frequency", "melt_denoise",
             "melt_rarity", "mined", "query_negative", "reference", "text_augment", "text_preserve"]
    for first in ("zscir.train.components.negatives", "zscir.train.components.dqe", "zscir.train.stage2",
                  "zscir.train.bank"):
        code = f"import {first}; from zscir.train.components import STAGE2_COMPONENTS as R; print(','.join(R.names()))"
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        assert out.strip().split(",") == names, first


def test_the_base_component_declares_every_hook_with_a_neutral_default():
    comp = C.Stage2Component(fake_context(), {})
    assert comp.needs_query_negatives is False and comp.uses_text_features is False
    batch = {"step": 0}
    comp.prepare_batch(batch, torch.arange(2))
    out = {"query": torch.zeros(2, D)}
    comp.forward(torch.nn.Identity(), batch, out)
    assert batch == {"step": 0} and list(out) == ["query"]
    assert comp.modules() == {} and comp.extra_negatives(out, batch) is None and comp.sample_weights(out, batch) is None
    assert comp.loss(out, batch, 0, torch.zeros(2, 2)) == (None, {}) and comp.state() == {}


# ------------------------------------------------------------------------------------------ MELT: rarity

def test_running_moments_track_mean_and_variance():
    m = C.RunningMoments(3, momentum=0.5)
    x = torch.tensor([[0.0, 2.0, 4.0], [2.0, 2.0, 8.0]])
    m.update(x)  # the first update initialises
    assert torch.allclose(m.mean, torch.tensor([1.0, 2.0, 6.0])) and torch.allclose(m.var, torch.tensor([1.0, 0.0, 4.0]))
    m.update(torch.tensor([[3.0, 2.0, 6.0], [3.0, 2.0, 6.0]]))  # mean 3,2,6 var 0: EMA halfway
    assert torch.allclose(m.mean, torch.tensor([2.0, 2.0, 6.0])) and torch.allclose(m.var, torch.tensor([0.5, 0.0, 2.0]))
    assert int(m.count) == 4


def test_mahalanobis_energy_is_one_on_average_and_large_for_outliers():
    m = C.RunningMoments(D, momentum=1.0)
    x = torch.randn(4000, D) * torch.linspace(0.1, 3, D) + 5
    m.update(x)
    assert abs(float(C.mahalanobis_energy(x, m).mean()) - 1.0) < 1e-3
    outlier = m.mean + 4 * m.var.sqrt()  # 4 standard deviations in every dimension
    assert float(C.mahalanobis_energy(outlier.unsqueeze(0), m)) == pytest.approx(16.0, rel=1e-3)


def test_rarity_weights_are_monotone_and_mean_one():
    z = torch.tensor([-3.0, 0.0, 1.0, 4.0])
    w = C.rarity_weights(z, beta=1.0)
    assert torch.all(w[1:] > w[:-1]) and abs(float(w.mean()) - 1) < 1e-6
    assert torch.allclose(C.rarity_weights(z, beta=0.0), torch.ones(4))
    capped = C.rarity_weights(z, beta=1.0, max_weight=2.0)
    raw = 1 + F.softplus(z)
    assert float(capped[-1] / capped[0]) == pytest.approx(2.0 / float(raw[0]))


def test_melt_rarity_up_weights_rare_modifications():
    torch.manual_seed(0)
    comp = C.MeltRarity(fake_context(), {"warmup_steps": 0, "momentum": 0.2})
    common_dir, rare_dir = F.normalize(torch.randn(2, D), dim=-1)

    def batch(n_common, n_rare):
        text = torch.cat([common_dir + 0.1 * torch.randn(n_common, D), rare_dir + 0.1 * torch.randn(n_rare, D)])
        text = F.normalize(text, dim=-1)
        pooled = F.normalize(torch.randn(len(text), D), dim=-1)  # image side unrelated to either text cluster
        return {"melt_text": text, "melt_pooled": pooled, "query": text}

    for _ in range(20):  # running statistics dominated by the common modification
        comp.sample_weights(batch(58, 6), {})
    w = comp.sample_weights(batch(58, 6), {})
    assert w.shape == (64,) and abs(float(w.mean()) - 1) < 1e-5
    assert float(w[58:].mean()) > 1.3 * float(w[:58].mean()), (w[58:].mean(), w[:58].mean())
    # state round trip: a fresh component restores the statistics and weighs identically
    other = C.MeltRarity(fake_context(), {"warmup_steps": 0, "momentum": 0.2})
    other.load({k: v.clone() for k, v in comp.state().items()})
    b = batch(30, 2)
    assert torch.allclose(other.sample_weights(dict(b), {}), comp.sample_weights(dict(b), {}))


def test_melt_rarity_warm_up_gives_no_weights():
    comp = C.MeltRarity(fake_context(), {"warmup_steps": 2})
    out = {"melt_text": F.normalize(torch.randn(8, D), dim=-1), "melt_pooled": F.normalize(torch.randn(8, D), dim=-1),
           "query": torch.zeros(8, D)}
    assert comp.sample_weights(out, {}) is None and comp.sample_weights(out, {}) is None
    assert comp.sample_weights(out, {}) is not None


def test_text_guided_pooling_attends_to_the_patch_the_text_names():
    pool = C.TextGuidedPooling(D, key_dim=D)
    with torch.no_grad():
        pool.query.weight.copy_(torch.eye(D) * 4)
        pool.key.weight.copy_(torch.eye(D) * 4)
        pool.query.bias.zero_()
        pool.key.bias.zero_()
    patches = F.normalize(torch.randn(1, 9, D), dim=-1)
    pooled, attn = pool(patches[:, 4], patches)
    assert int(attn.argmax()) == 4 and float(F.cosine_similarity(pooled, patches[:, 4]).detach()) > 0.9


def test_shift_tokens_is_refused_with_a_reason():
    with pytest.raises(ConfigError, match="shift_tokens"):
        C.MeltRarity(fake_context(), {"shift_tokens": True})


# ------------------------------------------------------------------------------ MELT: inverse frequency

def test_frequency_keys_use_kinds_or_the_rarest_content_word():
    keys = C.frequency_keys(["color", "", "", ""], ["x", "make the circle red", "make the circle blue",
                                                     "make the square red"])
    assert keys[0] == "kind:color"
    # doc frequencies: circle 2, red 2, blue 1, square 1 -> rarest word (ties by alphabet)
    assert keys[1:] == ["word:circle", "word:blue", "word:square"]
    assert C.content_words("Make it a RED one, please!") == ["red"]


def test_inverse_frequency_weights_favour_rare_kinds():
    kinds = ["color"] * 16 + ["move"] * 4 + ["size"]
    ctx = fake_context(n=len(kinds))
    ctx.triplets.kinds, ctx.triplets.modifications = kinds, ["t"] * len(kinds)
    comp = C.InverseFrequency(ctx, {"alpha": 1.0})
    out = {"index": torch.arange(len(kinds)), "query": torch.zeros(len(kinds), D)}
    w = comp.sample_weights(out, {})
    assert abs(float(w.mean()) - 1) < 1e-6
    assert float(w[-1] / w[0]) == pytest.approx(16.0) and float(w[16] / w[0]) == pytest.approx(4.0)
    half = C.InverseFrequency(ctx, {"alpha": 0.5}).sample_weights(out, {})
    assert float(half[-1] / half[0]) == pytest.approx(4.0)


# ------------------------------------------------------------------------------------ MELT: denoising

def test_cosine_schedule_is_monotone_from_one():
    ab = C.cosine_alpha_bar(20)
    assert ab[0] == pytest.approx(1.0) and torch.all(ab[1:] < ab[:-1]) and float(ab[-1]) < 0.01


def test_score_vectors_take_positive_then_sorted_hardest_negatives():
    logits = torch.tensor([[5.0, 1.0, 3.0, 2.0], [0.0, 4.0, 9.0, 1.0], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 1.0]])
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1, 2] = True  # a near duplicate is never a negative
    scores, cols, valid = C.score_vectors(logits, mask, 3)
    assert cols[0].tolist() == [0, 2, 3] and scores[0].tolist() == [5.0, 3.0, 2.0]
    assert cols[1].tolist() == [1, 3, 0] and valid.all()
    _, _, valid = C.score_vectors(logits, torch.ones(4, 4, dtype=torch.bool), 3)
    assert valid[:, 0].all() and not valid[:, 1:].any()


def test_denoiser_loss_falls_and_sampling_recovers_the_distribution():
    torch.manual_seed(0)
    den = C.ScoreDenoiser(length=8, steps=20, hidden=64)
    g = torch.Generator().manual_seed(0)

    def clean(n):  # a fixed distribution: sorted negatives below a sharpened positive
        neg = torch.randn(n, 7, generator=g).sort(dim=1, descending=True).values
        return torch.cat([neg[:, :1] + 2.5, neg], dim=1)

    opt = torch.optim.Adam(den.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss = den.diffusion_loss(clean(128), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-30:]) < 0.5 * np.mean(losses[:10])
    x0 = clean(512)
    den.eval()
    noised = den.noise(x0, torch.full((512,), 10), torch.randn(512, 8, generator=g))
    out = den.sample(x0, start=10, sample_steps=4, generator=g)
    assert F.mse_loss(out, x0) < 0.5 * F.mse_loss(noised, x0)


# --------------------------------------------------------------------------------------- SPN: bank

def test_bank_component_needs_a_bank():
    with pytest.raises(ValueError, match="bank"):
        C.BankNegatives(fake_context(), {})


# ------------------------------------------------------------------------------------ DQE: mid zone

def test_mid_zone_table_respects_bounds_and_skips_duplicates():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(50, 16, generator=g), dim=-1)
    t = F.normalize(q + 0.3 * torch.randn(50, 16, generator=g), dim=-1)
    cand = torch.cat([F.normalize(torch.randn(400, 16, generator=g), dim=-1), t[:10]])  # some targets are candidates
    lo, hi = -0.6, -0.05
    table, sizes = C.mid_zone_table(q, t, cand, lo, hi, pool=8, generator=g)
    delta = q @ cand.T - (q * t).sum(-1, keepdim=True)
    dup = (t @ cand.T) >= 0.98
    zone = (delta >= lo) & (delta <= hi) & ~dup
    assert torch.equal(sizes, zone.sum(1))
    for i in range(50):
        picked = table[i][table[i] >= 0]
        assert len(picked) == min(8, int(zone[i].sum())) and len(set(picked.tolist())) == len(picked)
        assert zone[i, picked].all()
    assert all(int(table[i, 0]) != 400 + i for i in range(10))  # own target never sampled


def test_mid_zone_fallback_and_quantile_bounds():
    q = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[1.0, 0.0]])
    angles = torch.linspace(0.3, 3.0, 10)
    cand = torch.stack([angles.cos(), angles.sin()], 1)  # deltas cos(a) - 1, all below -0.04
    table, sizes = C.mid_zone_table(q, t, cand, -0.01, 0.0, pool=3)  # empty zone: hardest easy negatives
    assert int(sizes[0]) == 0 and table[0].tolist() == [0, 1, 2]
    table, sizes = C.mid_zone_table(q, t, cand, 0.5, 1.0, pool=10, bounds="quantile")
    assert int(sizes[0]) == 5 and sorted(table[0][table[0] >= 0].tolist()) == [0, 1, 2, 3, 4]


def test_mid_zone_options_are_checked():
    with pytest.raises(ConfigError, match="dqe_mid_zone.*lo"):
        C.MidZoneNegatives(fake_context(), {"lo": 0.1, "hi": -0.1})
    with pytest.raises(ConfigError, match="unknown field.*\\['width'\\]"):
        C.MidZoneNegatives(fake_context(), {"width": 3})
    with pytest.raises(ValueError, match="corpus"):
        C.MidZoneNegatives(fake_context(), {"candidates": "corpus"})


# ----------------------------------------------------------------------------------- DQE: attributes

def test_attribute_head_starts_as_identity_and_weights_sum_to_one():
    head = C.AttributeQueryHead(D, 4, rank=8)
    q = F.normalize(torch.randn(5, D), dim=-1)
    sub, w, combined = head(q, torch.randn(5, D))
    assert torch.allclose(sub, q.unsqueeze(1).expand(-1, 4, -1), atol=1e-6) and torch.allclose(combined, q, atol=1e-6)
    assert torch.allclose(w.sum(1), torch.ones(5))


def test_attribute_weights_start_from_the_attribute_prompts():
    comp = micro_composer()
    trip = random_triplets(8)
    cfg = Stage2Config(adapters=AdapterConfig(num_layers=1, rank=8), components=("dqe_attributes",))
    from zscir.train.stage2 import prepare_stage2

    task = Stage2Task(prepare_stage2(comp, cfg.adapters), trip, cfg)
    attr = task.components[0]
    attr.init_weights_from_prompts()
    prompts = [attr.opts.prompt.format(attribute=a) for a in attr.opts.attributes]
    feats = comp.backbone.encode_text(prompts, normalize=True)
    w = attr.head.weights(feats).softmax(-1)
    assert torch.equal(w.argmax(1), torch.arange(len(prompts)))


# ---------------------------------------------------------------------------- inside train_stage2

RUNS = {
    "melt_rarity": (("melt_rarity",), {"melt_rarity": {"warmup_steps": 2}}),
    "inverse_frequency": (("inverse_frequency",), {}),
    "melt_denoise": (("melt_denoise",), {"melt_denoise": {"kd_start": 0, "length": 8}}),
    "bank": (("bank",), {"bank": {"negatives": 50}}),
    "dqe_mid_zone": (("dqe_mid_zone",), {"dqe_mid_zone": {"warmup_steps": 4, "refresh_every": 6,
                                                           "bounds": "quantile", "lo": 0.5, "hi": 0.95}}),
    "dqe_pairwise": (("dqe_mid_zone", "dqe_pairwise"), {"dqe_mid_zone": {"warmup_steps": 4}}),
    "dqe_attributes": (("dqe_attributes",), {}),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_component_trains_inside_stage2_and_its_loss_falls(name):
    components, options = RUNS[name]
    trip = random_triplets(32)  # one full batch per step: the loss curve is not sampling noise
    g = torch.Generator().manual_seed(1)
    corpus = Corpus(F.normalize(torch.randn(200, D, generator=g), dim=-1), [str(i) for i in range(200)])
    cfg = Stage2Config(adapters=AdapterConfig(num_layers=1, rank=8), components=components, component_options=options,
                       train=TrainConfig(steps=24, batch_size=32, lr=3e-3, warmup_steps=2, log_every=1))
    _, result = train_stage2(micro_composer(), trip, cfg, corpus=corpus, progress=False)
    losses = [h["loss"] for h in result.history]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    last = result.history[-1]
    expected_log = {"melt_rarity": "melt_weight_max", "melt_denoise": "melt_kd", "bank": "bank",
                    "dqe_mid_zone": "dqe_zone_size", "dqe_pairwise": "dqe_pairwise",
                    "dqe_attributes": "dqe_attr_margin", "inverse_frequency": "infonce"}[name]
    assert expected_log in last


def test_component_state_is_saved_with_the_training_state(tmp_path):
    from zscir.train.engine import read_state

    components, options = RUNS["dqe_mid_zone"]
    cfg = Stage2Config(adapters=AdapterConfig(num_layers=1, rank=8), components=components + ("melt_rarity",),
                       component_options=options, train=TrainConfig(steps=8, batch_size=32, lr=3e-3, warmup_steps=2))
    train_stage2(micro_composer(), random_triplets(64), cfg, output_dir=tmp_path, progress=False)
    _, tensors = read_state(tmp_path)
    assert tensors["extra.dqe_mid_zone.table"].shape == (64, 32)
    assert int(tensors["extra.melt_rarity.updates"]) == 8
    assert any(k.startswith("param.extra.melt_rarity_pool.") for k in tensors)
    # the frozen text features are saved once, under the first component that reads them (as states written before)
    assert tensors["extra.melt_rarity.text_features"].shape == (64, D)


def test_melt_denoise_checks_its_length_against_the_batch():
    with pytest.raises(ConfigError, match="melt_denoise.*batch size"):
        C.MeltDenoise(fake_context(batch_size=8), {"length": 16})


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    """Resuming restores the running statistics and the text features cached at step 0 (not re-encoded with
    the by-then trained adapters), so 3 + 3 steps equal 6 steps."""
    options = {"melt_rarity": {"warmup_steps": 1}}

    def cfg(steps):
        return Stage2Config(adapters=AdapterConfig(num_layers=1, rank=8), components=("melt_rarity", "dqe_attributes"),
                            component_options=options,
                            train=TrainConfig(steps=steps, batch_size=16, lr=3e-3, warmup_steps=0, min_lr_ratio=1.0))

    trip = random_triplets(32)
    straight, _ = train_stage2(micro_composer(), trip, cfg(6), progress=False)
    train_stage2(micro_composer(), trip, cfg(3), output_dir=tmp_path, progress=False)
    resumed, result = train_stage2(micro_composer(), trip, cfg(6), output_dir=tmp_path, resume=True, progress=False)
    assert result.resumed_from == 3
    a, b = straight._persistent_state(), resumed._persistent_state()
    adapter_keys = [f"backbone.{k}" for k in straight.adapter_keys]
    assert adapter_keys and all(torch.allclose(a[k], b[k], atol=1e-6) for k in adapter_keys)
