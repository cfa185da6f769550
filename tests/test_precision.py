"""Mixed precision: resolving `auto`, clear errors, bf16 training steps and bf16 evaluation on the CPU."""
import argparse
import dataclasses
import importlib
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from zscir.precision import PrecisionError, autocast, resolve_precision

TRAIN_EVAL_COMMANDS = ["pretrain-clip", "train-stage1", "train-stage2", "train-bank", "eval", "index", "search"]
TRAIN_COMMANDS = TRAIN_EVAL_COMMANDS[:4]


# ------------------------------------------------------------------------------------------ resolving
def test_auto_is_float32_on_the_cpu_and_bf16_on_a_gpu_that_has_it(monkeypatch):
    assert resolve_precision("auto", "cpu") == "no"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("no", torch.device("cpu")) == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda:0") == "bf16"
    assert resolve_precision("fp16", "cuda") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda") == "no"


def test_unsupported_precision_names_the_flag_and_the_device(monkeypatch):
    with pytest.raises(PrecisionError, match=r"--mixed-precision fp16 is not supported on device cpu; it supports no, bf16"):
        resolve_precision("fp16", "cpu", "--mixed-precision")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(PrecisionError, match=r"precision bf16 is not supported on device cuda.*supports no, fp16"):
        resolve_precision("bf16", "cuda")
    with pytest.raises(PrecisionError, match=r"'fp8' is not a precision; choose one of auto, no, fp16, bf16"):
        resolve_precision("fp8", "cpu")


def test_autocast_runs_bf16_on_the_cpu_and_no_is_plain_float32():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with autocast("no", "cpu"):
        assert torch.equal(layer(x), layer(x.clone()))
        assert layer(x).dtype == torch.float32
    with autocast("bf16", "cpu"):
        assert layer(x).dtype == torch.bfloat16
    with pytest.raises(PrecisionError):
        autocast("fp16", "cpu")


# --------------------------------------------------------------------------------------------- CLI
def _parser(name):
    from zscir.cli.main import SUBCOMMANDS

    sc = SUBCOMMANDS[name]
    parser = argparse.ArgumentParser()
    getattr(importlib.import_module(sc.module), sc.add_arguments)(parser)
    return parser


@pytest.mark.parametrize("name", TRAIN_EVAL_COMMANDS)
def test_every_training_evaluation_and_index_command_has_the_flag(name):
    """Encoding commands default to auto; training leaves it to Accelerate's setting (None) unless given."""
    action = _parser(name)._option_string_actions["--mixed-precision"]
    assert action.default == (None if name in TRAIN_COMMANDS else "auto")
    assert list(action.choices) == ["auto", "no", "fp16", "bf16"]


@pytest.mark.parametrize("name, argv", [
    ("pretrain-clip", ["--out", "{tmp}/clip"]),
    ("train-stage1", ["--shapes", "4", "--out", "{tmp}/s1", "--device", "cpu"]),
    ("train-stage2", ["--model", "{tmp}/m", "--triplets", "{tmp}/t.jsonl", "--out", "{tmp}/s2", "--device", "cpu"]),
    ("train-bank", ["--model", "{tmp}/m", "--triplets", "{tmp}/t.jsonl", "--out", "{tmp}/b", "--device", "cpu"]),
    ("eval", ["--dataset", "generic", "--root", "{tmp}", "--model", "{tmp}/m", "--device", "cpu"]),
    ("index", ["{tmp}", "--model", "{tmp}/m", "--index", "{tmp}/index", "--device", "cpu"]),
    ("search", ["{tmp}/index", "--model", "{tmp}/m", "--image", "{tmp}/a.png", "--text", "t", "--device", "cpu"]),
])
def test_fp16_on_the_cpu_is_one_clear_error_before_any_work(name, argv, tmp_path, monkeypatch, capsys):
    from zscir.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU, also on a GPU machine
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main([name, *argv, "--mixed-precision", "fp16"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0] == f"zscir {name}: error: --mixed-precision fp16 is not supported on device cpu; it supports no, bf16 (or auto)"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was written


# ------------------------------------------------------------------------------------------ training
def test_trainer_runs_bf16_on_the_cpu_and_refuses_fp16():
    from test_engine import CFG, PairTask

    from zscir.train.engine import Trainer

    runs = {}
    for precision in ("no", "bf16"):
        trainer = Trainer(PairTask(), dataclasses.replace(CFG, steps=5, mixed_precision=precision), progress=False,
                          cpu=True)
        assert trainer.accelerator.mixed_precision == precision
        runs[precision] = [h["loss"] for h in trainer.train().history]
    assert all(math.isfinite(v) for v in runs["bf16"])
    assert runs["bf16"] != runs["no"]  # bf16 really ran (it used to fall back to float32 on the CPU)
    assert runs["bf16"] == pytest.approx(runs["no"], rel=0.05)
    with pytest.raises(PrecisionError, match=r"train: mixed_precision fp16 is not supported on device cpu"):
        Trainer(PairTask(), dataclasses.replace(CFG, mixed_precision="fp16"), progress=False, cpu=True)


def test_bf16_stage1_step_has_a_finite_loss_close_to_float32(tiny_clip_dir, world):
    from zscir.composer import Composer
    from zscir.models.phi import PhiConfig
    from zscir.train.engine import TrainConfig
    from zscir.train.features import shapes_features
    from zscir.train.stage1 import Stage1Config, train_stage1

    scenes = world.scenes(64, stream="precision-test")
    losses = {}
    for precision in ("no", "bf16"):
        torch.manual_seed(0)
        composer = Composer.from_clip(str(tiny_clip_dir), phi=PhiConfig(num_tokens=1, vsi_layers=1))
        feats = shapes_features(composer, scenes, 64, precision=precision)
        assert feats.pooled.dtype == np.float32 and feats.patches.dtype == np.float32
        cfg = Stage1Config(phi=composer.phi.config, concept_weight=0.0,
                           train=TrainConfig(steps=2, batch_size=16, warmup_steps=1, log_every=1, mixed_precision=precision))
        _, result = train_stage1(composer, feats, cfg, progress=False)
        losses[precision] = (feats, [h["loss"] for h in result.history])
    (f32, l32), (f16, l16) = losses["no"], losses["bf16"]
    assert not np.array_equal(f32.pooled, f16.pooled)  # encoded in bf16
    cos = torch.nn.functional.cosine_similarity(torch.as_tensor(f32.pooled), torch.as_tensor(f16.pooled), dim=-1)
    assert float(cos.min()) > 0.99
    assert all(math.isfinite(v) for v in l16) and l16 != l32
    assert l16 == pytest.approx(l32, rel=0.05)


def test_bf16_stage1_cli_caches_features_apart_from_float32(tmp_path):
    from zscir.cli import main

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    base = ["train-stage1", "--images", str(imgs), "--backbone", "zscir-micro", "--random-init", "--steps", "2",
            "--batch-size", "4", "--no-progress", "--concept-weight", "0", "--feature-cache", str(tmp_path / "cache")]
    assert main(base + ["--out", str(tmp_path / "bf16"), "--mixed-precision", "bf16"]) == 0
    state = json.loads((tmp_path / "bf16" / "state" / "state.json").read_text())
    assert state["config"]["mixed_precision"] == "bf16"
    assert all(math.isfinite(h["loss"]) for h in state["history"])
    assert main(base + ["--out", str(tmp_path / "fp32")]) == 0  # auto: float32 on the CPU
    assert json.loads((tmp_path / "fp32" / "state" / "state.json").read_text())["config"]["mixed_precision"] == "no"
    keys = [json.loads((f / "meta.json").read_text())["key"] for f in (tmp_path / "cache").iterdir()]
    assert sorted(k.get("precision", "no") for k in keys) == ["bf16", "no"]  # one cache per precision


def test_bf16_stage2_cli_step_has_a_finite_loss(tmp_path, tiny_clip_dir, world):
    from zscir.cli import main
    from zscir.composer import Composer
    from zscir.models.phi import PhiConfig

    Composer.from_clip(str(tiny_clip_dir), phi=PhiConfig(num_tokens=1, vsi_layers=1)).save_pretrained(tmp_path / "m")
    world.export_triplets(world.make_triplets(32, family="train", stream="precision-test"), tmp_path / "data",
                          progress=False)
    assert main(["train-stage2", "--model", str(tmp_path / "m"), "--triplets", str(tmp_path / "data" / "triplets.jsonl"),
                 "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "16", "--no-progress",
                 "--mixed-precision", "bf16"]) == 0
    state = json.loads((tmp_path / "run" / "state" / "state.json").read_text())
    assert state["config"]["mixed_precision"] == "bf16"
    assert state["history"] and all(math.isfinite(h["loss"]) for h in state["history"])
    assert Composer.from_pretrained(tmp_path / "run" / "model").config.stage == "stage2"


# ---------------------------------------------------------------------------------------- evaluation
def test_bf16_evaluation_matches_float32_recall_within_one_point(tmp_path, stage1_model, world):
    from zscir.composer import Composer
    from zscir.eval.encode import encode_gallery
    from zscir.eval.evaluate import evaluate

    folder = world.export_generic(world.make_eval_set(200, stream="eval-test"), tmp_path / "set", progress=False)
    composer = Composer.from_pretrained(stage1_model[0])
    cache = tmp_path / "cache"
    results = {p: evaluate(composer, "generic", root=folder, precision=p, cache_dir=cache, progress=False,
                           print_results=False) for p in ("no", "bf16")}
    assert results["bf16"]["precision"] == "bf16" and results["no"]["precision"] == "no"
    diffs = {k: results["bf16"]["metrics"][k] - v for k, v in results["no"]["metrics"].items() if k.startswith("R@")}
    assert diffs and all(abs(d) <= 1.0 for d in diffs.values()), diffs  # measured: at most 0.5 (one query of 200)
    assert len(list(cache.iterdir())) == 2  # bf16 gallery rows never stand in for float32 ones

    paths = sorted((folder / "images").rglob("*.png"))[:16]
    rows = {p: encode_gallery(composer, list(range(16)), paths, progress=False, precision=p)[0] for p in ("no", "bf16")}
    assert rows["bf16"].dtype == torch.float32 and not torch.equal(rows["bf16"], rows["no"])
    assert torch.allclose(rows["bf16"].norm(dim=-1), torch.ones(16), atol=1e-5)  # normalised in float32
    assert float((rows["bf16"] * rows["no"]).sum(-1).min()) > 0.99
