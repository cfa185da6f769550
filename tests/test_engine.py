"""The shared training engine: learning, determinism, multi-process gradients, resume (weights and RNG streams)."""
import dataclasses
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zscir.checkpoint import CheckpointError, load_tensors
from zscir.losses import clip_contrastive
from zscir.train.engine import TrainConfig, Trainer, TrainTask, epoch_indices


class PairTask(TrainTask):
    """Learn two linear maps that align paired random vectors (a miniature CLIP)."""

    def __init__(self, n=256, d=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, generator=g)
        self.y = self.x @ torch.randn(d, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)
        torch.manual_seed(seed)
        self.module = _Towers(d)

    def num_examples(self):
        return len(self.x)

    def make_batch(self, indices, step):
        return {"x": self.x[indices], "y": self.y[indices]}

    def loss(self, outputs, batch, step):
        return clip_contrastive(outputs["a"], outputs["b"], 10.0), {}


class _Towers(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fa, self.fb = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, batch):
        return {"a": F.normalize(self.fa(batch["x"]), dim=-1), "b": F.normalize(self.fb(batch["y"]), dim=-1)}


CFG = TrainConfig(steps=40, batch_size=64, lr=1e-2, warmup_steps=5, log_every=1)
HERE = Path(__file__).parent


def _params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_loss_falls_and_runs_are_deterministic(tmp_path):
    a = PairTask()
    res = Trainer(a, CFG, progress=False).train()
    losses = [h["loss"] for h in res.history]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    b = PairTask()
    Trainer(b, CFG, progress=False).train()
    assert torch.equal(_params(a.module), _params(b.module))


def _ddp_grads():
    spec = importlib.util.spec_from_file_location("_ddp_grads", HERE / "_ddp_grads.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_two_processes_give_the_one_process_gradients(tmp_path):
    """torchrun with 2 CPU (gloo) processes over the same global batch: the first step's gradients before
    clipping (and the logged grad_norm) equal the 1-process ones; a batch size that does not divide fails."""
    helper = _ddp_grads()
    one = helper.first_step()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(HERE / "_ddp_grads.py"), str(tmp_path)], check=True, env=env, timeout=300)
    for rank in (0, 1):
        two = load_tensors(tmp_path / f"grads{rank}.safetensors")
        assert sorted(two) == sorted(one["grads"])
        # per parameter ||g2 - g1|| / ||g1||; a world-size factor error gives 1.0
        worst = max(float((two[k] - g).norm() / g.norm()) for k, g in one["grads"].items())
        assert worst < 1e-5, (rank, worst)
        info = json.loads((tmp_path / f"info{rank}.json").read_text())
        assert abs(info["grad_norm"] - one["grad_norm"]) < 1e-5 * one["grad_norm"], (info, one["grad_norm"])
        assert "batch_size 7" in info["batch_error"] and "2 processes" in info["batch_error"], info["batch_error"]
    norm = torch.cat([g.flatten() for g in one["grads"].values()]).norm()
    assert abs(float(norm) - one["grad_norm"]) < 1e-5 * float(norm)  # grad_norm is the pre-clip norm
    assert one["grad_norm"] > 2 * helper.CFG.grad_clip  # clipping was active, so post-clip grads could not tell


def test_grad_norm_is_logged_with_and_without_clipping():
    cfg = dataclasses.replace(CFG, steps=1)
    clipped = Trainer(PairTask(), cfg, progress=False).train().history[0]["grad_norm"]
    plain = Trainer(PairTask(), dataclasses.replace(cfg, grad_clip=0.0), progress=False).train().history[0]["grad_norm"]
    assert clipped > 0 and clipped == pytest.approx(plain, rel=1e-6)


def _interrupt_at(task, stop):
    def boom(step, module):
        if step == stop:
            raise KeyboardInterrupt
    task.on_step_end = boom
    return task


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    straight = PairTask()
    Trainer(straight, CFG, progress=False).train()
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C at step 17 leaves a resumable state
        Trainer(_interrupt_at(PairTask(), 17), CFG, output_dir=tmp_path, progress=False).train()
    assert json.loads((tmp_path / "state" / "state.json").read_text())["step"] == 17
    second = PairTask()  # fresh objects: everything must come from the checkpoint
    trainer = Trainer(second, CFG, output_dir=tmp_path, progress=False)
    result = trainer.train(resume=True)
    assert result.resumed_from == 17
    assert torch.allclose(_params(second.module), _params(straight.module), atol=1e-6)
    assert [h["step"] for h in trainer.history] == list(range(1, 41))


class NoisyPairTask(PairTask):
    """Batches perturbed with draws from the global python, numpy and torch RNGs (as augmentation would)."""

    def make_batch(self, indices, step):
        batch = super().make_batch(indices, step)
        shape = batch["x"].shape
        noise = torch.from_numpy(np.random.standard_normal(shape).astype(np.float32)) + torch.randn(shape)
        return {"x": batch["x"] + 0.3 * random.random() * noise, "y": batch["y"]}


def test_resume_continues_the_python_numpy_and_torch_rng_streams(tmp_path):
    straight = NoisyPairTask()
    Trainer(straight, CFG, progress=False).train()
    with pytest.raises(KeyboardInterrupt):
        Trainer(_interrupt_at(NoisyPairTask(), 17), CFG, output_dir=tmp_path, progress=False).train()
    random.seed(123)  # whatever ran in between must not matter
    np.random.seed(123)
    torch.manual_seed(123)
    resumed = NoisyPairTask()
    Trainer(resumed, CFG, output_dir=tmp_path, progress=False).train(resume=True)
    assert torch.allclose(_params(resumed.module), _params(straight.module), atol=1e-6)


def test_resume_refuses_another_config(tmp_path):
    Trainer(PairTask(), dataclasses.replace(CFG, steps=5), output_dir=tmp_path, progress=False).train()
    with pytest.raises(CheckpointError, match="lr"):
        Trainer(PairTask(), dataclasses.replace(CFG, lr=0.5), output_dir=tmp_path, progress=False).train(resume=True)


def test_epoch_indices_cover_every_example_once_per_epoch():
    n, b = 50, 16
    seen = torch.cat([epoch_indices(n, b, s, seed=3) for s in range(0, 50 * 4 // b)])[:n]
    assert sorted(seen.tolist()) == list(range(n))
    assert torch.equal(epoch_indices(n, b, 7, 3), epoch_indices(n, b, 7, 3))


# ----------------------------------------------------------------- torn checkpoints and Ctrl-C
class _Killed(BaseException):
    """SIGKILL stand-in: nothing after it runs (no except/finally of the trainer can save anything)."""


def test_a_kill_between_the_weights_and_the_json_resumes_the_previous_complete_state(tmp_path, monkeypatch):
    """The weights of step 15 reach the disk, its state.json does not: resume must be the step-10 pair, not a mix."""
    import zscir.train.engine as engine

    cfg = dataclasses.replace(CFG, save_every=5)
    straight = NoisyPairTask()
    Trainer(straight, cfg, progress=False).train()
    real = engine.atomic_write_json

    def killed_at_15(path, obj):
        if obj.get("step") == 15:
            raise _Killed
        real(path, obj)

    monkeypatch.setattr(engine, "atomic_write_json", killed_at_15)
    with pytest.raises(_Killed):
        Trainer(NoisyPairTask(), cfg, output_dir=tmp_path, progress=False).train()
    monkeypatch.setattr(engine, "atomic_write_json", real)
    resumed = NoisyPairTask()
    result = Trainer(resumed, cfg, output_dir=tmp_path, progress=False).train(resume=True)
    assert result.resumed_from == 10
    assert torch.equal(_params(resumed.module), _params(straight.module))


def test_a_weights_file_that_does_not_belong_to_its_json_is_refused(tmp_path):
    from zscir.train.engine import read_state

    Trainer(PairTask(), dataclasses.replace(CFG, steps=5), output_dir=tmp_path, progress=False).train()
    meta, tensors = read_state(tmp_path)
    step5 = (tmp_path / "state" / meta["tensors"]["file"]).read_bytes()
    Trainer(PairTask(), dataclasses.replace(CFG, steps=10), output_dir=tmp_path, progress=False).train(resume=True)
    meta = json.loads((tmp_path / "state" / "state.json").read_text())
    assert meta["step"] == 10 and sorted(p.name for p in (tmp_path / "state").iterdir()) == sorted(
        ["state.json", meta["tensors"]["file"]])  # the step-5 weights are gone once step 10 is complete
    (tmp_path / "state" / meta["tensors"]["file"]).write_bytes(step5)  # a mixed pair: step-10 JSON, step-5 weights
    with pytest.raises(CheckpointError, match=r"state.json .*step 10.* does not match .*digest"):
        Trainer(PairTask(), dataclasses.replace(CFG, steps=12), output_dir=tmp_path, progress=False).train(resume=True)


def _interrupt_in_loss(task, at_step):
    real = task.loss

    def loss(outputs, batch, step):
        if step == at_step:  # half-way through the step: its batch (and RNG draws) are made, no update yet
            raise KeyboardInterrupt
        return real(outputs, batch, step)

    task.loss = loss
    return task


def test_ctrl_c_inside_a_step_resumes_bit_for_bit(tmp_path):
    straight = NoisyPairTask()
    Trainer(straight, CFG, progress=False).train()
    with pytest.raises(KeyboardInterrupt):
        Trainer(_interrupt_in_loss(NoisyPairTask(), 10), CFG, output_dir=tmp_path, progress=False).train()
    resumed = NoisyPairTask()
    result = Trainer(resumed, CFG, output_dir=tmp_path, progress=False).train(resume=True)
    assert result.resumed_from == 10
    assert torch.equal(_params(resumed.module), _params(straight.module))


def test_a_real_sigint_finishes_the_step_saves_and_resumes_bit_for_bit(tmp_path):
    import signal

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        # e.g. started as a background job without job control: SIGINT is ignored, nothing to deliver
        pytest.skip("SIGINT is ignored or handled elsewhere in this process")

    class SigintAt10(NoisyPairTask):
        def make_batch(self, indices, step):
            batch = super().make_batch(indices, step)  # the RNG draws of step 11 are made
            if step == 10:
                os.kill(os.getpid(), signal.SIGINT)
            return batch

    straight = NoisyPairTask()
    Trainer(straight, CFG, progress=False).train()
    with pytest.raises(KeyboardInterrupt):
        Trainer(SigintAt10(), CFG, output_dir=tmp_path, progress=False).train()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    resumed = NoisyPairTask()
    result = Trainer(resumed, CFG, output_dir=tmp_path, progress=False).train(resume=True)
    assert result.resumed_from == 11  # the started step was finished before stopping
    assert torch.equal(_params(resumed.module), _params(straight.module))


def test_an_interrupt_while_the_weights_change_keeps_the_last_checkpoint(tmp_path, caplog):
    """Half-applied updates are never saved: the state stays at the last complete checkpoint."""
    cfg = dataclasses.replace(CFG, save_every=5)
    straight = PairTask()
    Trainer(straight, cfg, progress=False).train()
    trainer = Trainer(PairTask(), cfg, output_dir=tmp_path, progress=False)
    real = trainer.scheduler.step

    def step():
        if trainer.step == 12:  # the optimiser has changed the weights of step 13, the step counter has not
            raise KeyboardInterrupt
        real()

    trainer.scheduler.step = step
    with caplog.at_level("WARNING", logger="zscir.train.engine"), pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert json.loads((tmp_path / "state" / "state.json").read_text())["step"] == 10
    assert "last checkpoint" in caplog.text
    resumed = PairTask()
    assert Trainer(resumed, cfg, output_dir=tmp_path, progress=False).train(resume=True).resumed_from == 10
    assert torch.equal(_params(resumed.module), _params(straight.module))


def test_resume_without_a_state_says_it_starts_fresh_and_another_data_set_is_refused(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="zscir.train.engine"):
        Trainer(PairTask(), dataclasses.replace(CFG, steps=3), output_dir=tmp_path, progress=False).train(resume=True)
    assert "no training state" in caplog.text and "from step 0" in caplog.text
    with pytest.raises(CheckpointError, match=r"trained on 256 examples.*now has 128"):
        Trainer(PairTask(n=128), dataclasses.replace(CFG, steps=5), output_dir=tmp_path,
                progress=False).train(resume=True)


def test_a_state_written_before_the_pair_was_bound_still_resumes(tmp_path, caplog):
    straight = PairTask()
    Trainer(straight, CFG, progress=False).train()
    with pytest.raises(KeyboardInterrupt):
        Trainer(_interrupt_at(PairTask(), 20), CFG, output_dir=tmp_path, progress=False).train()
    meta = json.loads((tmp_path / "state" / "state.json").read_text())
    (tmp_path / "state" / meta.pop("tensors")["file"]).rename(tmp_path / "state" / "state.safetensors")  # old layout
    del meta["num_examples"]
    (tmp_path / "state" / "state.json").write_text(json.dumps(meta))
    resumed = PairTask()
    with caplog.at_level("WARNING", logger="zscir.train.engine"):
        assert Trainer(resumed, CFG, output_dir=tmp_path, progress=False).train(resume=True).resumed_from == 20
    assert "predates bound checkpoints" in caplog.text
    assert torch.equal(_params(resumed.module), _params(straight.module))
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["state-00000040.safetensors", "state.json"]
