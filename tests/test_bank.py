"""SPN bank stage: deduplicated static bank, bank InfoNCE inside the Stage-II engine, and the train-bank CLI."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zscir.composer import Composer
from zscir.models.adapters import AdapterConfig
from zscir.models.phi import PhiConfig
from zscir.train.bank import BankStageConfig, build_bank, deduplicate, stage2_config, train_bank, triplet_bank_parts
from zscir.train.engine import TrainConfig
from zscir.train.features import Corpus, TripletFeatures

D = 64


def stage2_composer():
    torch.manual_seed(0)
    return Composer.from_clip("zscir-micro", phi=PhiConfig(num_tokens=1, vsi_layers=1),
                              adapters=AdapterConfig(num_layers=1, rank=8))


def random_triplets(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    texts = [f"make the {c} {s} {p}" for c, s, p in zip(["red", "blue", "green", "pink"] * n, ["circle", "square"] * n,
                                                         ["bigger", "smaller", "left", "right"] * n)][:n]
    return TripletFeatures(torch.randn(n, D, generator=g), torch.randn(n, 16, D, generator=g),
                           F.normalize(torch.randn(n, D, generator=g), dim=-1), texts, ["color"] * n,
                           [f"r{i}" for i in range(n)], [f"t{i}" for i in range(n)])


def test_deduplicate_merges_near_duplicates_greedily_in_order():
    g = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(50, 32, generator=g), dim=-1)
    near = F.normalize(base[:20] + 0.01 * torch.randn(20, 32, generator=g), dim=-1)
    feats = torch.cat([base, near, base[:5]])  # 20 near copies and 5 exact copies of earlier rows
    for block in (7, 1024):  # across blocks and within one block
        keep = deduplicate(feats, 0.98, block=block)
        assert keep.tolist() == list(range(50))
    kept = feats[keep]
    sims = kept @ kept.T
    sims.fill_diagonal_(0)
    assert float(sims.max()) < 0.98
    assert deduplicate(feats, 1.01).tolist() == list(range(len(feats)))  # nothing is a duplicate above cosine 1


def test_build_bank_normalises_keeps_ids_and_checks_inputs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(10, 8, generator=g) * 3
    bank = build_bank([(a, [f"a{i}" for i in range(10)]), (a[:4] * 2, [f"b{i}" for i in range(4)])], 0.99)
    assert bank.ids == [f"a{i}" for i in range(10)]
    assert torch.allclose(bank.features.norm(dim=-1), torch.ones(10))
    with pytest.raises(ValueError, match="empty"):
        build_bank([], 0.98)
    with pytest.raises(ValueError, match="widths"):
        build_bank([(a, ["x"] * 10), (torch.randn(2, 4), ["y", "z"])], 0.98)
    with pytest.raises(ValueError, match="ids"):
        build_bank([(a, ["x"])], 0.98)


def test_triplet_parts_leave_text_targets_out():
    trip = random_triplets(6)
    parts = triplet_bank_parts(trip, [True, False, True, True, False, True])
    assert len(parts[0][0]) == 6 and parts[1][1] == ["t0", "t2", "t3", "t5"]


def test_stage2_config_always_adds_the_bank_component():
    cfg = stage2_config(BankStageConfig(components=("reference", "bank"), negatives=64, bank_weight=0.5))
    assert cfg.components == ("reference", "bank")
    assert cfg.component_options["bank"] == {"negatives": 64, "weight": 0.5}


@pytest.mark.parametrize("negatives", [0, 40])
def test_bank_stage_trains_the_query_side_and_its_loss_falls(negatives):
    composer = stage2_composer()
    adapters = set(composer.adapter_keys)
    frozen = {k: v.clone() for k, v in composer.backbone.model.state_dict().items() if k not in adapters}
    trip = random_triplets(32)
    g = torch.Generator().manual_seed(1)
    bank = build_bank([(torch.randn(300, D, generator=g), [str(i) for i in range(300)])] + triplet_bank_parts(trip), 0.98)
    cfg = BankStageConfig(negatives=negatives, train=TrainConfig(steps=20, batch_size=32, lr=3e-3, warmup_steps=2, log_every=1))
    composer, result = train_bank(composer, trip, bank, cfg, progress=False)
    losses = [h["loss"] for h in result.history]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert "bank" in result.history[-1]
    after = composer.backbone.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())  # CLIP towers untouched: the bank never goes stale


def test_bank_stage_refuses_a_model_without_adapters():
    comp = Composer.from_clip("zscir-micro", phi=PhiConfig(num_tokens=1, vsi_layers=1))
    trip = random_triplets(8)
    with pytest.raises(ValueError, match="Stage-II"):
        train_bank(comp, trip, Corpus(trip.target, trip.target_ids), BankStageConfig(), progress=False)


def test_cli_train_bank(tmp_path):
    from zscir.cli import main
    from zscir.shapes import ShapesWorld

    world = ShapesWorld(seed=0, image_size=64)
    edits = world.make_triplets(24, family="train", stream="bank-cli")
    world.export_triplets(edits, tmp_path / "data", progress=False)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, scene in enumerate(world.scenes(6, stream="bank-corpus")):
        world.render(scene).save(corpus / f"{i}.png")
    stage2_composer().save_pretrained(tmp_path / "s2")
    args = ["train-bank", "--model", str(tmp_path / "s2"), "--triplets", str(tmp_path / "data" / "triplets.jsonl"),
            "--corpus", str(corpus), "--out", str(tmp_path / "run"), "--steps", "3", "--batch-size", "8",
            "--negatives", "0", "--dedup-threshold", "0.99999", "--no-progress"]
    assert main(args) == 0
    model = Composer.from_pretrained(tmp_path / "run" / "model")
    assert model.config.adapters is not None
    Composer.from_clip("zscir-micro", phi=PhiConfig(num_tokens=1, vsi_layers=1)).save_pretrained(tmp_path / "s1")
    args[2] = str(tmp_path / "s1")
    args[args.index("--out") + 1] = str(tmp_path / "run2")
    assert main(args) == 1  # a Stage-I model is refused with a one-line error
