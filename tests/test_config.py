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


# ------------------------------------------------------------------- complete files and field types
def _composer_config_file(tmp_path, edit):
    """A model folder's config.json as save_pretrained writes it, edited by `edit`."""
    import json

    from zscir.composer import ComposerConfig
    from zscir.models.phi import PhiConfig

    data = ComposerConfig(phi=PhiConfig(num_tokens=2), adapters=AdapterConfig(rank=4)).to_dict()
    edit(data)
    path = tmp_path / "model" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("where, field", [((), "query_prompt"), ((), "phi"), ((), "backbone"), ((), "placeholder"),
                                          (("phi",), "num_tokens"), (("backbone",), "model_name"),
                                          (("adapters",), "rank")])
def test_a_missing_field_of_a_model_folder_config_is_an_error_naming_file_and_field(tmp_path, where, field):
    from zscir.composer import ComposerConfig

    def drop(data):
        for key in where:
            data = data[key]
        del data[field]

    path = _composer_config_file(tmp_path, drop)
    with pytest.raises(ConfigError) as info:
        ComposerConfig.from_json(path)
    message = str(info.value)
    assert str(path) in message and f"'{field}'" in message and "missing" in message, message
    if where:
        assert f"{path}.{where[0]}" in message


def test_a_custom_prompt_is_never_lost_to_a_default(tmp_path):
    """The reported case: a folder whose config.json lost its query_prompt must not load with the default prompt."""
    from zscir.composer import Composer

    torch.manual_seed(0)
    Composer.from_clip("zscir-micro", query_prompt="a sketch of $ that {modification}").save_pretrained(tmp_path / "m")
    assert Composer.from_pretrained(tmp_path / "m").config.query_prompt == "a sketch of $ that {modification}"
    path = tmp_path / "m" / "config.json"
    import json

    data = json.loads(path.read_text())
    del data["query_prompt"]
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"m/config.json: missing field.*'query_prompt'"):
        Composer.from_pretrained(tmp_path / "m")


def test_old_model_folder_layouts_still_load_with_the_documented_defaults(tmp_path):
    """Fields added after model folders were first written may be absent: image_residual, phi's patch_grid,
    vsi_mode and vsi_tokens (the per-class OPTIONAL_FIELDS lists)."""
    from zscir.composer import ComposerConfig

    def old(data):
        del data["image_residual"]
        for key in ("patch_grid", "vsi_mode", "vsi_tokens"):
            del data["phi"][key]
        data["phi"]["max_patches"] = 1024
        data["image_prompt"] = "a photo of $"

    cfg = ComposerConfig.from_json(_composer_config_file(tmp_path, old))
    assert cfg.image_residual is False and cfg.phi.patch_grid == 4 and cfg.phi.vsi_mode == "concat"
    assert cfg.phi.vsi_tokens == 2 and cfg.phi.num_tokens == 2 and cfg.adapters == AdapterConfig(rank=4)
    assert ComposerConfig.from_json(_composer_config_file(tmp_path, lambda d: d.update(adapters=None))).adapters is None


@pytest.mark.parametrize("where, field, value, expected", [
    (("phi",), "num_tokens", "4", "int"),
    (("phi",), "use_vsi", 1, "bool"),
    (("phi",), "dropout", "0.1", "float"),
    (("phi",), "num_tokens", True, "int"),
    ((), "query_prompt", None, "str"),
    ((), "phi", [1, 2], "PhiConfig"),
    (("adapters",), "targets", ["attn", 3], "list of str"),
    (("backbone",), "model_cfg", "ViT-B-32", "object or null"),
])
def test_a_wrong_type_is_an_error_naming_field_expected_and_got(tmp_path, where, field, value, expected):
    from zscir.composer import ComposerConfig

    def set_value(data):
        for key in where:
            data = data[key]
        data[field] = value

    path = _composer_config_file(tmp_path, set_value)
    with pytest.raises(ConfigError) as info:
        ComposerConfig.from_json(path)
    message = str(info.value)
    assert str(path) in message and f"field '{field}'" in message, message
    assert f"must be {expected}" in message and f"got {type(value).__name__}" in message, message


def test_override_files_may_stay_partial_but_are_type_checked(tmp_path):
    """A training --config names only what it changes (defaults fill the rest); types are still checked."""
    cfg = Stage2Config.from_dict({"adapters": {"rank": 4}, "train": {"lr": 1, "steps": 9}, "components": ["reference"]})
    assert cfg.adapters.rank == 4 and cfg.adapters.kind == "lora" and cfg.train.steps == 9
    assert cfg.components == ("reference",) and cfg.train.lr == 1  # an integer is a valid float
    with pytest.raises(ConfigError, match=r"cfg.json.train: field 'steps' of TrainConfig must be int, got float 9.5"):
        (tmp_path / "cfg.json").write_text('{"train": {"steps": 9.5}}')
        Stage2Config.from_json(tmp_path / "cfg.json")
    with pytest.raises(ConfigError, match=r"field 'prompts' of Stage1Config must be list of str, got str"):
        Stage1Config.from_dict({"prompts": "a photo of $"})


def test_dotted_overrides_reach_nested_configs_and_name_unknown_fields():
    cfg = Stage1Config().with_overrides({"phi.num_tokens": 1, "train.steps": 7, "targets": "both"})
    assert (cfg.phi.num_tokens, cfg.train.steps, cfg.targets) == (1, 7, "both")
    assert cfg.phi.use_vsi == Stage1Config().phi.use_vsi and Stage1Config().phi.num_tokens != 1  # a copy
    with pytest.raises(ConfigError, match=r"PhiConfig has no field 'tokens' \(override 'phi.tokens'\)"):
        Stage1Config().with_overrides({"phi.tokens": 1})
