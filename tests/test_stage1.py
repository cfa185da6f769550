"""Stage I: phi-network, soft text alignment losses, the trainer (learning, 2 processes, CLI, resume)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from zscir.checkpoint import load_tensors
from zscir.composer import Composer
from zscir.models.phi import PhiConfig, PhiNetwork

HERE = Path(__file__).parent


@pytest.mark.parametrize("use_global,use_vsi,mode,tokens", [
    (True, False, "concat", 3), (False, True, "concat", 2), (True, True, "concat", 5), (True, True, "add", 3)])
def test_phi_branches(use_global, use_vsi, mode, tokens):
    cfg = PhiConfig(embed_dim=32, token_dim=48, num_tokens=3, vsi_tokens=2, use_global=use_global, use_vsi=use_vsi,
                    vsi_mode=mode, patch_grid=3)  # 3x3 = 9 patch tokens
    assert cfg.total_tokens == tokens
    phi = PhiNetwork(cfg)
    out = phi(torch.randn(5, 32), torch.randn(5, 9, 32))
    assert out.shape == (5, tokens, 48)
    if use_vsi:
        with pytest.raises(ValueError, match="patch tokens"):
            phi(torch.randn(5, 32), None)
        # the VSI tokens depend on the patches, not only on the pooled vector
        pooled = torch.randn(2, 32)
        phi.eval()
        assert (phi(pooled, torch.randn(2, 9, 32)) - phi(pooled, torch.randn(2, 9, 32))).abs().max() > 1e-4


def test_phi_needs_a_branch():
    with pytest.raises(ValueError, match="global branch, VSI, or both"):
        PhiConfig(use_global=False, use_vsi=False)
    with pytest.raises(ValueError, match="vsi_mode"):
        PhiConfig(vsi_mode="stack")


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """torchrun with 2 CPU (gloo) processes and the same global batch gives the 1-process weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one.safetensors"
    two = tmp_path / "two.safetensors"
    subprocess.run([sys.executable, str(HERE / "_ddp_stage1.py"), str(one)], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                    str(HERE / "_ddp_stage1.py"), str(two)], check=True, env=env, timeout=300)
    a, b = load_tensors(one), load_tensors(two)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, worst
    moved = max((a[k] - PhiNetwork(PhiConfig(embed_dim=64, token_dim=64, num_tokens=2, dropout=0.0, vsi_layers=1)).state_dict()[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # training did change the weights, so the match is not trivial


def test_stage1_learns_inversion(tiny_clip_dir, world, stage1_model):
    """phi trained on unlabeled images makes "a photo of $" retrieve its own held-out image, far above untrained."""
    from zscir.eval.shapes_eval import inversion_recall

    untrained = Composer.from_clip(str(tiny_clip_dir), phi=PhiConfig(num_tokens=2, vsi_layers=1))
    before = inversion_recall(untrained, untrained.backbone, world, n_images=300, stream="inv-test")
    trained = Composer.from_pretrained(stage1_model[0])
    after = inversion_recall(trained, trained.backbone, world, n_images=300, stream="inv-test")
    losses = [h["loss"] for h in stage1_model[1]]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2])
    assert after["R@1"] > before["R@1"] + 20 and after["R@1"] > 30, (before, after)


def test_cli_trains_on_a_folder_with_bad_images_and_resumes(tmp_path):
    from PIL import Image

    from zscir.cli import main

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    Image.new("CMYK", (30, 30)).save(imgs / "cmyk.jpg")
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    args = ["train-stage1", "--images", str(imgs), "--backbone", "zscir-micro", "--random-init",
            "--out", str(tmp_path / "run"), "--steps", "4", "--batch-size", "8", "--no-progress",
            "--concept-weight", "0"]
    assert main(args) == 0
    model = Composer.from_pretrained(tmp_path / "run" / "model")
    assert model.config.stage == "stage1"
    assert main(args[:args.index("--steps")] + ["--steps", "6", "--batch-size", "8", "--no-progress",
                                                "--concept-weight", "0", "--resume"]) == 0
    import json

    meta = json.loads((tmp_path / "run" / "state" / "state.json").read_text())
    assert meta["step"] == 6
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train-stage1", "--images", str(empty), "--backbone", "zscir-micro", "--random-init", "--out",
                 str(tmp_path / "x"), "--no-progress"]) == 1
