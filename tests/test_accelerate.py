"""Accelerate's own settings apply (launch / config file), a flag overrides them; --report-to writes tracker logs."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from test_engine import CFG, PairTask
from zscir.cli import main
from zscir.train.engine import Trainer, experiment_tracking


@pytest.fixture
def clean_accelerate(tmp_path, monkeypatch):
    """No Accelerate setting from the machine: an empty HF_HOME, no launch variables."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return tmp_path / "hf" / "accelerate" / "default_config.yaml"


class DtypeTask(PairTask):
    """PairTask that records the dtype its forward pass computes in."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()
        forward = self.module.forward

        def recording(batch):
            out = forward(batch)
            self.dtypes.add(self.module.fa(batch["x"][:1]).dtype)
            return out

        self.module.forward = recording


def _train(cfg):
    task = DtypeTask()
    trainer = Trainer(task, dataclasses.replace(CFG, steps=3, **cfg), progress=False, cpu=True)
    trainer.train()
    return trainer.accelerator.mixed_precision, task.dtypes


def test_no_precision_in_the_config_means_accelerates_setting(clean_accelerate, monkeypatch):
    assert _train({"mixed_precision": None}) == ("no", {torch.float32})  # nothing configured: float32
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    assert _train({"mixed_precision": None}) == ("bf16", {torch.bfloat16})  # bf16 really runs on the CPU
    assert _train({"mixed_precision": "no"}) == ("no", {torch.float32})  # an explicit setting wins


def test_the_accelerate_config_file_applies_without_launch(clean_accelerate):
    clean_accelerate.parent.mkdir(parents=True)
    clean_accelerate.write_text("compute_environment: LOCAL_MACHINE\nmixed_precision: bf16\nnum_processes: 1\n")
    assert _train({"mixed_precision": None})[0] == "bf16"
    clean_accelerate.write_text("mixed_precision: fp8\n")
    from zscir.precision import PrecisionError

    with pytest.raises(PrecisionError, match=r"Accelerate's mixed precision 'fp8' .*default_config.yaml"):
        _train({"mixed_precision": None})


def _stage1(out, *extra):
    return ["train-stage1", "--shapes", "24", "--backbone", "zscir-micro", "--random-init", "--out", str(out),
            "--steps", "4", "--batch-size", "8", "--num-tokens", "1", "--concept-weight", "0", "--no-progress",
            "--device", "cpu", *extra]


def test_the_cli_records_the_precision_accelerate_decided_and_a_flag_overrides_it(clean_accelerate, tmp_path,
                                                                                    monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert main(_stage1(tmp_path / "a")) == 0
    settings = json.loads((tmp_path / "a" / "run.json").read_text())["settings"]
    assert settings["config"]["train"]["mixed_precision"] == "bf16"
    assert main(_stage1(tmp_path / "b", "--mixed-precision", "no")) == 0
    assert json.loads((tmp_path / "b" / "run.json").read_text())["settings"]["config"]["train"]["mixed_precision"] == "no"
    # a precision the device cannot run, from Accelerate's setting: one line naming where it came from
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    capsys.readouterr()
    assert main(_stage1(tmp_path / "c")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ACCELERATE_MIXED_PRECISION" in err[0] and "fp16 is not supported on device cpu" in err[0]
    assert "pass --mixed-precision" in err[0] and not (tmp_path / "c").exists()


def test_resuming_in_another_precision_is_refused(clean_accelerate, tmp_path):
    cfg = dataclasses.replace(CFG, steps=4, save_every=2)
    Trainer(PairTask(), dataclasses.replace(cfg, steps=2, mixed_precision="bf16"), output_dir=tmp_path,
            progress=False, cpu=True).train()
    from zscir.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"mixed precision 'bf16', this run would use 'no'"):
        Trainer(PairTask(), dataclasses.replace(cfg, mixed_precision="no"), output_dir=tmp_path, progress=False,
                cpu=True).train(resume=True)


# ----------------------------------------------------------------------------------------------- trackers
def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(Path(logdir).rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {logdir}"
    values = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return values


def test_tensorboard_gets_the_loss_curve_the_history_has(tmp_path):
    pytest.importorskip("tensorboard")
    with experiment_tracking("tensorboard", tmp_path / "logs", config={"note": "test"}):
        trainer = Trainer(PairTask(), dataclasses.replace(CFG, steps=6, log_every=2), progress=False, cpu=True)
        result = trainer.train()
    scalars = _scalars(tmp_path / "logs")
    assert [s for s, _ in scalars["loss"]] == [2, 4, 6]
    assert [v for _, v in scalars["loss"]] == pytest.approx([h["loss"] for h in result.history], rel=1e-6)
    assert {"lr", "grad_norm"} <= set(scalars)
    # outside the block nothing is tracked
    assert Trainer(PairTask(), dataclasses.replace(CFG, steps=1), progress=False, cpu=True).tracking is None


def test_cli_report_to_tensorboard_writes_the_curves_into_out_logs(clean_accelerate, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(_stage1(tmp_path / "run", "--report-to", "tensorboard")) == 0
    history = json.loads((tmp_path / "run" / "state" / "state.json").read_text())["history"]
    scalars = _scalars(tmp_path / "run" / "logs")
    assert [v for _, v in scalars["loss"]] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    # the run lists logs/ as its own: --overwrite replaces it instead of refusing a foreign folder
    assert "logs" in json.loads((tmp_path / "run" / "run.json").read_text())["outputs"]
    assert main(_stage1(tmp_path / "run", "--overwrite")) == 0 and not (tmp_path / "run" / "logs").exists()


def test_report_to_names_a_missing_package_or_an_unknown_tracker_before_any_work(tmp_path, monkeypatch, capsys):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    assert main(_stage1(tmp_path / "w", "--report-to", "wandb")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--report-to wandb needs the wandb package" in err[0] and "pip install wandb" in err[0]
    assert main(_stage1(tmp_path / "w", "--report-to", "mlflw")) == 1
    assert "--report-to 'mlflw': not a tracker zscir reports to; choose from none, tensorboard, wandb" in \
        capsys.readouterr().err
    assert not (tmp_path / "w").exists()
