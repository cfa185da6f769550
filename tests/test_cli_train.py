"""Training commands and their output folders: no silent random backbone, no silent replacement or mismatched resume."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from zscir.checkpoint import load_tensors
from zscir.cli import main
from zscir.composer import Composer
from zscir.models.phi import PhiConfig


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _stage1(images, out, *extra):
    return ["train-stage1", "--images", str(images), "--out", str(out), "--steps", "2", "--batch-size", "8",
            "--no-progress", "--concept-weight", "0", *extra]


# ---------------------------------------------------------------------------- train-stage1 --backbone
def test_train_stage1_without_backbone_is_one_error_listing_the_choices(images, tmp_path, capsys):
    assert main(_stage1(images, tmp_path / "run")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--backbone is required" in err[0]
    for choice in ("--pretrained", "ViT-L-14", "openai", "folder", "tiny-clip", "--random-init", "hf-hub:"):
        assert choice in err[0], choice
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_an_open_clip_name_without_weights_is_refused(images, tmp_path, capsys):
    assert main(_stage1(images, tmp_path / "run", "--backbone", "zscir-micro")) == 1
    err = capsys.readouterr().err
    assert "without weights" in err and "--pretrained" in err and "--random-init" in err
    assert main(_stage1(images, tmp_path / "run", "--backbone", "tiny-clip:nope")) == 1
    assert "unknown tiny-CLIP preset 'nope'" in capsys.readouterr().err
    # a misspelt architecture is named before any image is read
    assert main(_stage1(tmp_path / "no-images", tmp_path / "run", "--backbone", "ViT-L-41", "--random-init")) == 1
    err = capsys.readouterr().err
    assert "--backbone ViT-L-41: not an open_clip architecture (did you mean" in err and "ViT-L-14" in err


def test_the_old_model_spelling_still_names_the_backbone(images, tmp_path, capsys):
    assert main(_stage1(images, tmp_path / "run", "--model", "zscir-micro", "--random-init")) == 0
    err = capsys.readouterr().err
    assert "--model is now spelled --backbone" in err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["model"]["name"] == "zscir-micro"


def test_random_init_is_seeded_warned_and_reuses_one_feature_cache(images, tmp_path, caplog):
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="zscir"):
        for name in ("a", "b"):
            assert main(_stage1(images, tmp_path / name, "--backbone", "zscir-micro", "--random-init",
                                "--feature-cache", str(cache))) == 0
    assert "random weights" in caplog.text
    a, b = (load_tensors(tmp_path / name / "model" / "model.safetensors") for name in ("a", "b"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)  # same seed, same model
    assert len(list(cache.iterdir())) == 1  # the second run found the first one's features: no orphan cache


def test_tiny_clip_names_the_cached_trained_tiny_clip(images, tmp_path, monkeypatch):
    import zscir.train.clip_pretrain as clip_pretrain
    from zscir.models.backbone import load_backbone

    torch.manual_seed(0)
    folder = load_backbone("zscir-micro").save_pretrained(tmp_path / "tiny")  # stands in for the cached model
    calls = []
    monkeypatch.setattr(clip_pretrain, "pretrained_tiny_clip",
                        lambda preset, **kw: calls.append((preset, kw)) or (folder, {}))
    assert main(_stage1(images, tmp_path / "run", "--backbone", "tiny-clip:fast")) == 0
    assert calls and calls[0][0] == "fast"
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert settings["model"]["tiny_clip"] == "fast"
    model = Composer.from_pretrained(tmp_path / "run" / "model")
    assert model.backbone.cache_key == load_backbone(str(folder)).cache_key


# ------------------------------------------------------------------------------- run folders
@pytest.fixture()
def stage2_inputs(tmp_path, world):
    torch.manual_seed(0)
    Composer.from_clip("zscir-micro", phi=PhiConfig(num_tokens=1, vsi_layers=1)).save_pretrained(tmp_path / "s1")
    world.export_triplets(world.make_triplets(24, family="train", stream="run-folder-test"), tmp_path / "data",
                          progress=False)
    return tmp_path / "s1", tmp_path / "data" / "triplets.jsonl"


def _stage2(model, triplets, out, *extra):
    return ["train-stage2", "--model", str(model), "--triplets", str(triplets), "--out", str(out), "--steps", "2",
            "--batch-size", "8", "--adapter-layers", "1", "--no-progress", *extra]


def test_a_finished_run_is_never_replaced_silently(stage2_inputs, tmp_path, capsys):
    model, triplets = stage2_inputs
    out = tmp_path / "run"
    assert main(_stage2(model, triplets, out)) == 0
    before = (out / "model" / "model.safetensors").read_bytes()
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert main(_stage2(model, triplets, out, "--lr", "0.5")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finished run of zscir train-stage2" in err[0] and "--resume" in err[0] \
        and "--overwrite" in err[0]
    assert (out / "model" / "model.safetensors").read_bytes() == before
    assert main(_stage2(model, triplets, out, "--lr", "0.5", "--overwrite")) == 0  # replaced on request
    assert (out / "model" / "model.safetensors").read_bytes() != before
    assert json.loads((out / "run.json").read_text())["settings"]["config"]["train"]["lr"] == 0.5


def test_overwrite_removes_only_what_zscir_wrote(stage2_inputs, tmp_path, capsys):
    model, triplets = stage2_inputs
    out = tmp_path / "run"
    assert main(_stage2(model, triplets, out)) == 0
    (out / "my_notes.md").write_text("keep me")
    assert main(_stage2(model, triplets, out, "--overwrite")) == 1
    err = capsys.readouterr().err
    assert "my_notes.md" in err and "did not write" in err
    assert (out / "my_notes.md").read_text() == "keep me" and (out / "model").is_dir()
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "data.csv").write_text("1,2")
    assert main(_stage2(model, triplets, stranger)) == 1  # not a run folder: refused with or without flags
    assert main(_stage2(model, triplets, stranger, "--overwrite")) == 1
    assert sorted(p.name for p in stranger.iterdir()) == ["data.csv"]


def test_resume_checks_the_recorded_settings_and_names_what_differs(stage2_inputs, tmp_path, world, capsys):
    model, triplets = stage2_inputs
    out = tmp_path / "run"
    assert main(_stage2(model, triplets, out, "--save-every", "1")) == 0
    world.export_triplets(world.make_triplets(24, family="train", stream="other"), tmp_path / "other", progress=False)
    torch.manual_seed(1)
    Composer.from_clip("zscir-micro", phi=PhiConfig(num_tokens=1, vsi_layers=1)).save_pretrained(tmp_path / "s1b")
    cases = [
        (_stage2(model, tmp_path / "other" / "triplets.jsonl", out, "--resume"), ["triplets.sha256"]),
        (_stage2(model, triplets, out, "--resume", "--components", "reference"), ["config.components"]),
        (_stage2(tmp_path / "s1b", triplets, out, "--resume"), ["model.folder"]),
        (_stage2(model, triplets, out, "--resume", "--lr", "0.1"), ["config.train.lr"]),
    ]
    for argv, fields in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "cannot resume" in err and all(f in err for f in fields), err
        assert "config.train.steps" not in err
    assert main(_stage2(model, triplets, out, "--resume", "--steps", "4")) == 0  # more steps: the same run
    assert json.loads((out / "state" / "state.json").read_text())["step"] == 4


def test_resume_with_nothing_to_resume_says_so(stage2_inputs, tmp_path, caplog):
    model, triplets = stage2_inputs
    with caplog.at_level(logging.WARNING, logger="zscir"):
        assert main(_stage2(model, triplets, tmp_path / "new", "--resume")) == 0
    assert "nothing to resume" in caplog.text and "starting a new run" in caplog.text


def test_resume_and_overwrite_exclude_each_other(stage2_inputs, tmp_path, capsys):
    model, triplets = stage2_inputs
    with pytest.raises(SystemExit):
        main(_stage2(model, triplets, tmp_path / "x", "--resume", "--overwrite"))
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.slow
def test_pretrain_clip_out_is_a_run_folder_resumed_only_when_asked(tmp_path, capsys):
    out = tmp_path / "clip"
    base = ["pretrain-clip", "--preset", "quick", "--out", str(out), "--no-progress", "--mixed-precision", "no"]
    assert main(base + ["--steps", "2"]) == 0
    capsys.readouterr()
    assert main(base + ["--steps", "3"]) == 1  # it used to continue silently
    assert "holds a finished run of zscir pretrain-clip; pass --resume" in capsys.readouterr().err
    assert main(base + ["--steps", "3", "--resume"]) == 0  # more steps: the run continues
    assert json.loads((out / "training" / "state" / "state.json").read_text())["step"] == 3
    assert main(base + ["--steps", "2", "--no-resume"]) == 0  # the old spelling of --overwrite
    assert json.loads((out / "training" / "state" / "state.json").read_text())["step"] == 2
    assert "--no-resume is now spelled --overwrite" in capsys.readouterr().err
