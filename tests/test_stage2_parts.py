"""Issue 12 pieces that need no trained model: splits, oracle rows, sibling and explicit negatives, text augment and preserve."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from zscir.composer import Composer
from zscir.models.phi import PhiConfig
from zscir.shapes import ShapesWorld, ShapesWorldConfig
from zscir.train.engine import TrainConfig
from zscir.train.features import mask_false_negatives, shapes_triplet_features
from zscir.train.stage2 import Stage2Config, Stage2Task, prepare_stage2


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return Composer.from_clip("zscir-micro", phi=PhiConfig(num_tokens=1, vsi_layers=1))


def test_validation_and_test_splits_are_different_queries_of_the_same_protocol(micro):
    from zscir.eval.shapes_eval import ShapesBenchmark

    world = ShapesWorld(ShapesWorldConfig(seed=0))
    val = ShapesBenchmark(micro.backbone, world, n_queries=60, split="val")
    test = ShapesBenchmark(micro.backbone, world, n_queries=60, split="test")
    legacy = ShapesBenchmark(micro.backbone, world, n_queries=60)  # the demo's queries before splits existed
    val_refs = {val.eval_set.gallery[q.reference_index].key for q in val.eval_set.queries}
    test_refs = {test.eval_set.gallery[q.reference_index].key for q in test.eval_set.queries}
    assert not val_refs & test_refs
    assert [q.text for q in legacy.eval_set.queries] == [q.text for q in test.eval_set.queries]
    assert {q.kind for q in val.eval_set.queries} and val.eval_set.family == test.eval_set.family == "eval"
    with pytest.raises(ValueError, match="split"):
        ShapesBenchmark(micro.backbone, world, n_queries=10, split="train")


def test_oracle_rows_score_caption_queries_and_the_target_caption_is_a_ceiling(micro):
    from zscir.eval.shapes_eval import ShapesBenchmark
    from zscir.shapes import full_caption

    world = ShapesWorld(ShapesWorldConfig(seed=0))
    bench = ShapesBenchmark(micro.backbone, world, n_queries=40, split="val")
    rows = bench.oracle_rows()
    assert set(rows) == {"target caption (oracle)", "reference caption + text"}
    # scoring the same texts by hand gives the same numbers (the rows are what they say)
    texts = [full_caption(q.edit.target) for q in bench.eval_set.queries]
    by_hand = bench.score(F.normalize(micro.backbone.encode_text(texts, normalize=True), dim=-1))
    assert by_hand["R@10"] == rows["target caption (oracle)"]["R@10"]


def test_sibling_negatives_are_the_reference_and_other_edits_and_leave_edits_unchanged():
    world = ShapesWorld(ShapesWorldConfig(seed=0))
    plain = world.make_triplets(30)
    with_neg = world.make_triplets(30, negatives=3)
    assert [e.text for e in plain] == [e.text for e in with_neg]
    assert [e.target.key for e in plain] == [e.target.key for e in with_neg]
    for e in with_neg:
        assert e.negatives[0].key == e.source.key
        keys = [n.key for n in e.negatives[1:]]
        assert 1 <= len(keys) <= 3 and len(set(keys)) == len(keys)
        assert e.target.key not in keys and e.source.key not in keys
    with pytest.raises(ValueError, match="negatives"):
        world.make_triplets(3, negatives=-1)


def test_export_writes_negatives_that_load_back(tmp_path):
    from zscir.data.triplets import load_triplets

    world = ShapesWorld(ShapesWorldConfig(seed=0))
    world.export_triplets(world.make_triplets(5, negatives=2), tmp_path, progress=False)
    triplets = load_triplets(tmp_path / "triplets.jsonl")
    assert all(2 <= len(t.negatives) <= 3 for t in triplets)
    assert not triplets.negative_problems


def test_mask_false_negatives_drops_near_duplicates_of_the_target_only():
    target = F.normalize(torch.randn(2, 8), dim=-1)
    negatives = F.normalize(torch.randn(2, 3, 8), dim=-1)
    negatives[0, 1] = target[0]
    valid = torch.tensor([[True, True, False], [True, True, True]])
    kept, masked = mask_false_negatives(target, negatives, valid, 0.995)
    assert masked == 1
    assert kept.tolist() == [[True, False, False], [True, True, True]]


def _task(edits, components, options=None):
    torch.manual_seed(0)  # the same random model for every call
    comp = Composer.from_clip("zscir-micro", phi=PhiConfig(num_tokens=1, vsi_layers=1))
    trip = shapes_triplet_features(comp, edits, 64, dup_threshold=1.01)  # random backbone: keep every negative
    cfg = Stage2Config(components=components, component_options=options or {}, train=TrainConfig(steps=1, batch_size=8))
    cfg = dataclasses.replace(cfg, adapters=dataclasses.replace(cfg.adapters, num_layers=2))
    prepare_stage2(comp, cfg.adapters)
    return Stage2Task(comp, trip, cfg), trip


def test_explicit_component_puts_the_triplets_negatives_in_the_denominator():
    world = ShapesWorld(ShapesWorldConfig(seed=0))
    edits = world.make_triplets(8, negatives=2)
    task, trip = _task(edits, ("explicit",))
    plain, _ = _task(edits, ())
    idx = torch.arange(8)
    batch = task.make_batch(idx, 0)
    assert torch.equal(batch["explicit"], trip.negatives[idx])
    with torch.no_grad():
        out = task.module(batch)
        with_neg, _ = task.loss(out, batch, 0)
        pbatch = plain.make_batch(idx, 0)
        without, _ = plain.loss(plain.module(pbatch), pbatch, 0)
    assert with_neg > without  # more negatives in the softmax, same positives
    # every negative masked: the loss is the plain one again
    trip.negative_valid[:] = False
    batch = task.make_batch(idx, 0)
    with torch.no_grad():
        masked, _ = task.loss(task.module(batch), batch, 0)
    assert torch.allclose(masked, without, atol=1e-6)


def test_explicit_component_without_negatives_says_how_to_get_them():
    world = ShapesWorld(ShapesWorldConfig(seed=0))
    with pytest.raises(ValueError, match="negatives"):
        _task(world.make_triplets(8), ("explicit",))


def test_text_augment_is_seeded_per_triplet_and_keeps_words_of_the_text():
    import random

    from zscir.train.components import augment_text

    text = "add a large blue square at the middle left and paint the green star red"
    a = augment_text(text, random.Random("0|5|3"), 0.3, 1.0)
    assert a == augment_text(text, random.Random("0|5|3"), 0.3, 1.0)
    assert a != text and set(a.split()) <= set(text.split()) and a.split()
    assert augment_text("red", random.Random(0), 1.0, 0.0) == "red"  # never empty
    assert augment_text(text, random.Random(0), 0.0, 0.0) == text


def test_text_augment_component_changes_only_the_batch_texts():
    from zscir.config import ConfigError

    world = ShapesWorld(ShapesWorldConfig(seed=0))
    edits = world.make_triplets(8)
    task, trip = _task(edits, ("text_augment",))
    batch = task.make_batch(torch.arange(8), 3)
    assert batch["modifications"] != trip.modifications[:8]
    assert batch["modifications"] == task.make_batch(torch.arange(8), 3)["modifications"]
    assert trip.modifications == [e.text for e in edits]
    with pytest.raises(ConfigError, match="word_dropout"):
        _task(edits, ("text_augment",), {"text_augment": {"word_dropout": 2.0}})


def test_text_preserve_is_zero_for_fresh_adapters_and_grows_when_they_move():
    world = ShapesWorld(ShapesWorldConfig(seed=0))
    task, trip = _task(world.make_triplets(8), ("text_preserve",), {"text_preserve": {"fraction": 1.0}})
    batch = task.make_batch(torch.arange(8), 0)
    _, logs = task.loss(task.module(batch), batch, 0)
    assert abs(logs["text_preserve"]) < 1e-5
    with torch.no_grad():
        for name, p in task.module.named_parameters():
            if p.requires_grad and "lora" in name.lower():
                p.add_(0.5 * torch.randn_like(p))
    batch = task.make_batch(torch.arange(8), 1)
    out = task.module(batch)
    _, logs = task.loss(out, batch, 1)
    assert logs["text_preserve"] > 1e-3
    term, _ = task.components[0].loss(out, batch, 1, None)
    term.backward()  # the term alone reaches the adapters
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in task.module.named_parameters() if "lora" in n.lower())


def test_explicit_separate_term_has_finite_gradients_with_padded_negatives():
    world = ShapesWorld(ShapesWorldConfig(seed=0))
    task, trip = _task(world.make_triplets(8, negatives=3), ("explicit",),
                       {"explicit": {"in_denominator": False, "weight": 0.25}})
    trip.negative_valid[0, 1:] = False
    batch = task.make_batch(torch.arange(8), 0)
    loss, logs = task.loss(task.module(batch), batch, 0)
    loss.backward()
    assert logs["explicit"] > 0
    assert all(torch.isfinite(p.grad).all() for p in task.module.parameters() if p.grad is not None)
