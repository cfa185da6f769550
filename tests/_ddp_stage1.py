"""Helper for test_stage1: run Stage I on fixed random features; launched with torchrun (or plain python)."""
import sys

import torch

from zscir.checkpoint import save_tensors
from zscir.composer import Composer
from zscir.models.phi import PhiConfig
from zscir.train.engine import TrainConfig
from zscir.train.features import FeatureSource
from zscir.train.stage1 import Stage1Config, train_stage1


def main(out: str) -> None:
    torch.manual_seed(0)
    composer = Composer.from_clip("zscir-micro", phi=PhiConfig(num_tokens=2, dropout=0.0, vsi_layers=1))
    g = torch.Generator().manual_seed(1)
    feats = FeatureSource(torch.randn(64, 64, generator=g).numpy(), torch.randn(64, 16, 64, generator=g).numpy())
    cfg = Stage1Config(phi=composer.phi.config, concept_weight=0.5,
                       train=TrainConfig(steps=6, batch_size=16, lr=1e-3, warmup_steps=2, log_every=1))
    composer, result = train_stage1(composer, feats, cfg, concepts=["red", "circle", "blue square"], progress=False)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        save_tensors(out, composer.phi.state_dict())


if __name__ == "__main__":
    main(sys.argv[1])
