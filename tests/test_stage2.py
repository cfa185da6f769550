"""Stage II: adapters, hard negatives, learning to compose, robustness to noisy text, CLI on triplet files."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zscir.composer import Composer
from zscir.train.engine import TrainConfig
from zscir.train.features import Corpus, shapes_features, shapes_triplet_features
from zscir.train.stage2 import Stage2Config, train_stage2


@pytest.fixture(scope="module")
def small_bench(tiny_clip_dir, world):
    from zscir.eval.shapes_eval import ShapesBenchmark
    from zscir.models.backbone import load_backbone

    return ShapesBenchmark(load_backbone(str(tiny_clip_dir)), world, n_queries=300, stream="eval-test")


def _train(stage1_model, world, edits, components=Stage2Config().components, steps=150, corpus=None):
    comp = Composer.from_pretrained(stage1_model[0])
    trip = shapes_triplet_features(comp, edits, 64)
    cfg = Stage2Config(components=components,
                       train=TrainConfig(steps=steps, batch_size=64, lr=3e-3, warmup_steps=10, log_every=10))
    comp, result = train_stage2(comp, trip, cfg, corpus=corpus, progress=False)
    return comp, result


def test_stage2_learns_to_compose_on_held_out_phrasing(stage1_model, world, small_bench):
    from zscir.eval.shapes_eval import composer_encoder, image_plus_text

    before = small_bench.evaluate(composer_encoder(Composer.from_pretrained(stage1_model[0])))
    # 3,000 triplets: with 800 the gain over the sum was 3 points on one CPU, too thin to survive another
    # CPU's rounding (issue 16); here it is about 12 over the sum and 18 over Stage I (default and AVX2 kernels)
    edits = world.make_triplets(3000, family="train", stream="triplets-test")
    comp, result = _train(stage1_model, world, edits, steps=250)
    after = small_bench.evaluate(composer_encoder(comp))
    summed = small_bench.evaluate(image_plus_text(comp.backbone))
    losses = [h["loss"] for h in result.history]
    assert after["R@10"] > before["R@10"] + 10, (before["R@10"], after["R@10"])
    assert after["R@10"] > summed["R@10"] + 5, (summed["R@10"], after["R@10"])
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:2])
    assert after["per_kind_R@10"]["remove"] > before["per_kind_R@10"]["remove"]


def test_mined_negatives_component_runs_and_learns(stage1_model, world, small_bench):

    comp0 = Composer.from_pretrained(stage1_model[0])
    feats = shapes_features(comp0, world.scenes(1000, stream="corpus-test"), 64)
    corpus = Corpus(F.normalize(torch.as_tensor(feats.pooled), dim=-1), [str(i) for i in range(1000)])
    edits = world.make_triplets(400, family="train", stream="triplets-test")
    comp, result = _train(stage1_model, world, edits, components=("reference", "mined"), steps=60, corpus=corpus)
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_cli_trains_from_a_triplet_file(tmp_path, stage1_model, world):
    from zscir.cli import main

    edits = world.make_triplets(60, family="train", stream="cli-test")
    world.export_triplets(edits, tmp_path / "data", progress=False)
    out = tmp_path / "run"
    args = ["train-stage2", "--model", str(stage1_model[0]), "--triplets", str(tmp_path / "data" / "triplets.jsonl"),
            "--out", str(out), "--steps", "5", "--batch-size", "16", "--no-progress"]
    assert main(args) == 0
    model = Composer.from_pretrained(out / "model")
    assert model.config.stage == "stage2" and model.config.adapters is not None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"reference": "nope.png", "modification": "", "target": "x.png"}\n{broken\n')
    assert main(["train-stage2", "--model", str(stage1_model[0]), "--triplets", str(bad), "--out", str(tmp_path / "r2"),
                 "--no-progress"]) == 1
