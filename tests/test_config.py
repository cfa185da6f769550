"""Configs and checkpoint folders: JSON round trips, strict keys, atomic and checked model folders."""
import dataclasses

import pytest
import torch

from zscir.checkpoint import CheckpointError, load_folder, save_folder
from zscir.config import Config, ConfigError
from zscir.models.adapters import AdapterConfig
from zscir.train.bank import BankStageConfig
from zscir.train.clip_pretrain import PRESETS, ClipPretrainConfig
from zscir.train.engine import TrainConfig
from zscir.train.stage1 import Stage1Config
from zscir.train.stage2 import Stage2Config


@dataclasses.dataclass
class _Inner(Config):
    width: int = 3


@dataclasses.dataclass
class _Outer(Config):
    name: str = "x"
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    tags: tuple = ("a", "b")


def test_config_round_trip_and_unknown_keys(tmp_path):
    cfg = _Outer(name="y", inner=_Inner(7), tags=("c",))
    cfg.to_json(tmp_path / "c.json")
    assert _Outer.from_json(tmp_path / "c.json") == cfg
    with pytest.raises(ConfigError, match="widht"):
        _Outer.from_dict({"inner": {"widht": 3}})
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ConfigError, match="invalid JSON"):
        _Outer.from_json(tmp_path / "bad.json")


def test_checkpoint_folder_round_trip_and_errors(tmp_path):
    save_folder(tmp_path / "m", {"a": 1}, {"w": torch.arange(4.0)})
    cfg, tensors = load_folder(tmp_path / "m")
    assert cfg == {"a": 1} and torch.equal(tensors["w"], torch.arange(4.0))
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.endswith(".tmp")]
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_folder(tmp_path / "m")
    with pytest.raises(CheckpointError, match="not found"):
        load_folder(tmp_path / "missing")


@pytest.mark.parametrize("cfg", [
    Stage1Config(loss="hard", prompts=("a photo of $", "an image of $"), train=TrainConfig(steps=7, seed=3)),
    Stage2Config(adapters=AdapterConfig(kind="lora", num_layers=1, rank=4), components=("reference", "melt_rarity"),
                 component_options={"melt_rarity": {"beta": 0.5, "warmup_steps": 3}}),
    BankStageConfig(negatives=64, components=("reference",), component_options={"bank": {"weight": 0.5}}),
    PRESETS["fast"],
], ids=lambda c: type(c).__name__)
def test_training_configs_round_trip_through_json(tmp_path, cfg):
    cfg.to_json(tmp_path / "cfg.json")
    back = type(cfg).from_json(tmp_path / "cfg.json")
    assert back == cfg and back.to_dict() == cfg.to_dict()
    assert isinstance(back.train, TrainConfig)


def test_stage2_config_names_an_unknown_nested_key():
    with pytest.raises(ConfigError, match="Stage2Config.train.*unknown field.*'stpes'"):
        Stage2Config.from_dict({"train": {"stpes": 3}}, source="Stage2Config")
    assert isinstance(ClipPretrainConfig.from_dict({"train": {"steps": 3}}).train, TrainConfig)
