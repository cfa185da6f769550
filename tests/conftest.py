"""Shared fixtures: the cached 'fast' tiny CLIP (trained once per machine) and the shapes world."""
import os
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", message="No pretrained weights loaded")
ANNOTATIONS = Path(os.environ.get("ZSCIR_ANNOTATIONS", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cir-annotations"))


@pytest.fixture(scope="session")
def tiny_clip_dir():
    """Backbone folder of the 'fast' tiny CLIP from the user cache (pretrained here on first use, ~3-4 min).

    The same cached model serves the tests and the benchmarks' ``--clip-preset fast``.
    """
    from zscir.train.clip_pretrain import pretrained_tiny_clip

    folder, report = pretrained_tiny_clip("fast", progress=False)
    return folder


@pytest.fixture(scope="session")
def world():
    """The default shapes world."""
    from zscir.shapes import ShapesWorld, ShapesWorldConfig

    return ShapesWorld(ShapesWorldConfig(seed=0, image_size=64))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def stage1_model(tiny_clip_dir, world, tmp_path_factory):
    """A small Stage-I model (2 global + 2 VSI tokens, soft alignment) trained on the tiny CLIP; (folder, history)."""
    from zscir.composer import Composer
    from zscir.models.phi import PhiConfig
    from zscir.train.engine import TrainConfig
    from zscir.train.features import shapes_features
    from zscir.train.stage1 import Stage1Config, train_stage1

    torch.manual_seed(0)  # the same fixture whichever tests ran before
    composer = Composer.from_clip(str(tiny_clip_dir), phi=PhiConfig(num_tokens=2, vsi_layers=1))
    feats = shapes_features(composer, world.scenes(3000, stream="stage1-test"), 64)
    cfg = Stage1Config(phi=composer.phi.config, concept_weight=0.5,
                       train=TrainConfig(steps=120, batch_size=64, lr=1e-3, warmup_steps=10, log_every=10))
    composer, result = train_stage1(composer, feats, cfg, concepts=world.concept_phrases(), progress=False)
    folder = tmp_path_factory.mktemp("stage1") / "model"
    composer.save_pretrained(folder)
    return folder, result.history


# Fixtures that train or load the cached tiny CLIP, and modules that run whole pipelines (torchrun tests
# carry @pytest.mark.slow themselves).
SLOW_FIXTURES = {"tiny_clip_dir", "stage1_model"}
SLOW_MODULES = {"test_demo", "test_examples"}


def pytest_collection_modifyitems(config, items):
    """Mark the slow tests, so `-m "not slow"` gives a quick loop while editing (CI runs everything)."""
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
