"""Helper for test_engine: first-step gradients of a tiny task, before clipping and the optimizer step.

Imported by the test for the 1-process reference, launched with torchrun for 2 processes:
``torchrun --nproc_per_node 2 tests/_ddp_grads.py OUT`` writes ``OUT/grads{rank}.safetensors`` and
``OUT/info{rank}.json`` (logged grad_norm, the error of a batch size that does not divide over the ranks).
"""
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import nn

from zscir.checkpoint import save_tensors
from zscir.losses import clip_contrastive
from zscir.train.engine import TrainConfig, Trainer, TrainTask

# grad_clip 1.0 is active at step 1 (the norm is far above 1), which is why clipped gradients cannot tell
CFG = TrainConfig(steps=1, batch_size=8, lr=1e-2, warmup_steps=0, grad_clip=1.0, log_every=1)


class _Towers(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fa, self.fb = nn.Linear(d, d), nn.Linear(d, d)
        self.log_scale = nn.Parameter(torch.tensor(2.0))  # reaches the loss without the all-gather

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {"a": F.normalize(self.fa(batch["x"]), dim=-1), "b": F.normalize(self.fb(batch["y"]), dim=-1),
                "weight": batch["weight"], "log_scale": self.log_scale}


class TinyTask(TrainTask):
    """Two linear maps aligned by a CLIP loss plus a row-weighted term (a per-sample output without gradient)."""

    def __init__(self, n: int = 32, d: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, d, generator=g)
        self.y = self.x @ torch.randn(d, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)
        self.w = torch.rand(n, generator=g)
        torch.manual_seed(0)
        self.module = _Towers(d)

    def num_examples(self) -> int:
        return len(self.x)

    def make_batch(self, indices: torch.Tensor, step: int) -> Any:
        return {"x": self.x[indices], "y": self.y[indices], "weight": self.w[indices]}

    def loss(self, outputs, batch, step):
        align = (outputs["weight"] * (outputs["a"] * outputs["b"]).sum(-1)).mean()
        return clip_contrastive(outputs["a"], outputs["b"], outputs["log_scale"].exp()) - align, {}


def first_step(cfg: TrainConfig = CFG) -> Dict[str, Any]:
    """{"grads": per-parameter gradients before clipping, "grad_norm": the logged norm} of one step."""
    task = TinyTask()
    trainer = Trainer(task, cfg, progress=False, cpu=True)
    grads: Dict[str, torch.Tensor] = {}
    clip = trainer.accelerator.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        grads.update({n: p.grad.detach().clone() for n, p in task.module.named_parameters()})
        return clip(parameters, max_norm, *args, **kwargs)

    trainer.accelerator.clip_grad_norm_ = spy
    result = trainer.train()
    return {"grads": grads, "grad_norm": result.history[0].get("grad_norm")}


def main(out: str) -> None:
    folder = Path(out)
    rank = int(os.environ.get("RANK", "0"))
    step = first_step()
    save_tensors(folder / f"grads{rank}.safetensors", step["grads"])
    info: Dict[str, Any] = {"grad_norm": step["grad_norm"], "batch_error": None}
    try:
        Trainer(TinyTask(), dataclasses.replace(CFG, batch_size=7), progress=False, cpu=True).train()
    except ValueError as err:
        info["batch_error"] = str(err)
    (folder / f"info{rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main(sys.argv[1])
