"""The Hub: model folders by repo id (offline, from a local HF cache), hf-hub: backbones, model cards, push_to_hub."""
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from hub_cache import offline_hf_home, put_in_hub_cache
from zscir import cli
from zscir.composer import Composer
from zscir.hub import HubError, read_card_info

MODEL_FILES = ("config.json", "model.safetensors", "README.md")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty HF cache under tmp (HF_HOME) in offline mode; returns the hub cache folder."""
    return offline_hf_home(tmp_path / "hf", monkeypatch)


def _micro(seed=0):
    torch.manual_seed(seed)
    return Composer.from_clip("zscir-micro")


def _publish(hub, tmp_path, repo, composer, revision="main", **card):
    folder = tmp_path / f"saved-{repo.replace('/', '-')}-{revision}"
    composer.save_pretrained(folder, **card)
    put_in_hub_cache(hub, repo, {n: folder / n for n in MODEL_FILES}, revision=revision)
    return folder


def _query(composer):
    ref = Image.new("RGB", (32, 32), (200, 30, 30))
    return composer.encode_query([ref], ["make it blue"])


# -------------------------------------------------------------------------------------- from_pretrained
def test_a_repo_id_in_the_offline_cache_loads_like_its_folder_and_revisions_pick_the_weights(hub, tmp_path):
    main, v2 = _micro(0), _micro(1)
    _publish(hub, tmp_path, "zscir-test/micro", main)
    _publish(hub, tmp_path, "zscir-test/micro", v2, revision="v2")
    loaded = Composer.from_pretrained("zscir-test/micro")
    assert torch.equal(_query(loaded), _query(main))
    at_v2 = Composer.from_pretrained("zscir-test/micro", revision="v2")
    assert torch.equal(_query(at_v2), _query(v2)) and not torch.equal(_query(at_v2), _query(main))


def test_a_repo_missing_from_the_cache_while_offline_is_one_line_naming_the_fix(hub):
    with pytest.raises(HubError) as err:
        Composer.from_pretrained("zscir-test/absent")
    text = str(err.value)
    assert "\n" not in text and "zscir-test/absent" in text
    assert "HF_HUB_OFFLINE" in text and "huggingface-cli download zscir-test/absent" in text


def test_a_local_folder_wins_over_a_repo_of_the_same_name_and_takes_no_revision(hub, tmp_path, monkeypatch):
    _publish(hub, tmp_path, "org/model", _micro(1))
    local = _micro(0)
    local.save_pretrained(tmp_path / "org" / "model")
    monkeypatch.chdir(tmp_path)
    assert torch.equal(_query(Composer.from_pretrained("org/model")), _query(local))
    with pytest.raises(HubError, match="revision only applies to Hub repo ids"):
        Composer.from_pretrained("org/model", revision="v2")
    with pytest.raises(FileNotFoundError, match=r"model ./nothing/here: not a model folder \(no such folder"):
        Composer.from_pretrained("./nothing/here")


# ----------------------------------------------------------------------------------------- model card
def _front_matter(folder):
    text = (Path(folder) / "README.md").read_text()
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, "the model card has no YAML front matter"
    return yaml.safe_load(match.group(1)), text


def test_save_pretrained_writes_a_model_card_with_hub_metadata_and_results(tmp_path):
    results = [{"dataset": "cirr", "split": "val", "metrics": {"R@1": 24.5, "R@5": 51.25}, "num_queries": 4181}]
    folder = tmp_path / "my-model"
    _micro().save_pretrained(folder, training_data={"stage1": "10,000 images of imagenet/train"}, results=results,
                             datasets=["user/triplets"])
    meta, text = _front_matter(folder)
    assert meta["library_name"] == "zscir" and "composed-image-retrieval" in meta["tags"]
    assert meta["datasets"] == ["user/triplets"]
    index = meta["model-index"][0]
    assert index["name"] == "my-model"
    metrics = {m["name"]: m["value"] for r in index["results"] for m in r["metrics"]}
    assert metrics == {"R@1": 24.5, "R@5": 51.25}
    assert index["results"][0]["dataset"]["split"] == "val"
    assert "* stage1: 10,000 images of imagenet/train" in text and "cirr val: R@1 24.50, R@5 51.25" in text
    # the card does not change what loads: the same weights and config
    assert Composer.from_pretrained(folder).config == _micro().config


def test_the_card_is_carried_forward_when_a_model_is_loaded_trained_further_and_saved(tmp_path):
    first = tmp_path / "stage1"
    _micro().save_pretrained(first, training_data={"stage1": "shapes world, 256 images"},
                             results=[{"dataset": "generic", "split": "val", "metrics": {"R@10": 10.0}}])
    model = Composer.from_pretrained(first)
    model.save_pretrained(tmp_path / "stage2", training_data={"stage2": "triplets.jsonl (64 rows)"},
                          results=[{"dataset": "generic", "split": "val", "metrics": {"R@10": 30.0}}])
    info = read_card_info(tmp_path / "stage2")
    assert info["training_data"] == {"stage1": "shapes world, 256 images", "stage2": "triplets.jsonl (64 rows)"}
    assert info["results"] == [{"dataset": "generic", "split": "val", "metrics": {"R@10": 30.0}}]  # newer wins


def test_bad_results_are_refused_with_the_expected_shape(tmp_path):
    with pytest.raises(ValueError, match=r"results\[0\]: expected a dict with 'dataset', 'split' and 'metrics'"):
        _micro().save_pretrained(tmp_path / "m", results=[{"R@1": 3.0}])


# ------------------------------------------------------------------------------------- hf-hub: backbones
def _publish_open_clip(hub, tmp_path, repo, weights=True):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = open_clip.create_model("zscir-micro")
    files = {"open_clip_config.json": json.dumps({"model_cfg": open_clip.get_model_config("zscir-micro"),
                                                  "preprocess_cfg": {}})}
    if weights:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
        files["open_clip_model.safetensors"] = tmp_path / "w.safetensors"
    put_in_hub_cache(hub, repo, files)
    return model


def test_hf_hub_backbones_go_to_open_clip_unchanged_and_are_referenced_not_copied(hub, tmp_path):
    reference = _publish_open_clip(hub, tmp_path, "zscir-test/micro-clip")
    composer = Composer.from_clip("hf-hub:zscir-test/micro-clip")
    assert composer.config.backbone.model_name == "hf-hub:zscir-test/micro-clip" and not composer.config.embed_backbone
    for (k, a), (_, b) in zip(reference.state_dict().items(), composer.backbone.model.state_dict().items()):
        assert torch.equal(a, b), k
    composer.save_pretrained(tmp_path / "m")
    from safetensors.torch import load_file

    assert not any(k.startswith("backbone.") for k in load_file(tmp_path / "m" / "model.safetensors"))
    meta, _ = _front_matter(tmp_path / "m")
    assert meta["base_model"] == "zscir-test/micro-clip"
    assert torch.equal(_query(Composer.from_pretrained(tmp_path / "m")), _query(composer))


def test_an_hf_hub_backbone_without_cached_weights_is_refused_not_randomly_initialised(hub, tmp_path):
    _publish_open_clip(hub, tmp_path, "zscir-test/config-only", weights=False)
    with pytest.raises(HubError, match="open_clip_model.safetensors|HF_HUB_OFFLINE"):
        Composer.from_clip("hf-hub:zscir-test/config-only")
    with pytest.raises(HubError, match="backbone 'zscir-test/nothing': the Hub repo is not in the Hugging Face cache"):
        Composer.from_clip("hf-hub:zscir-test/nothing")


# ---------------------------------------------------------------------------------------------- push
class _FakeApi:
    """Records what push_to_hub would send (no network)."""

    calls = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private))

    def create_branch(self, repo_id, branch, exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None, create_pr=False):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        card = read_card_info(folder_path)
        self.calls.append(("upload_folder", repo_id, revision, files, card["training_data"]))
        return f"https://huggingface.co/{repo_id}/commit/abc"


def test_push_to_hub_checks_its_arguments_before_any_network_and_uploads_the_folder(monkeypatch):
    import huggingface_hub

    _FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    composer = _micro()
    with pytest.raises(HubError, match="'not a repo!' is not a Hugging Face repo id"):
        composer.push_to_hub("not a repo!")
    assert _FakeApi.calls == []
    url = composer.push_to_hub("me/my-model", revision="dev", private=True, training_data={"stage1": "x"})
    assert url == "https://huggingface.co/me/my-model/commit/abc"
    assert _FakeApi.calls == [("create_repo", "me/my-model", True), ("create_branch", "me/my-model", "dev"),
                              ("upload_folder", "me/my-model", "dev", sorted(MODEL_FILES), {"stage1": "x"})]


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_evaluates_a_hub_model_and_says_in_one_line_when_it_is_not_cached(hub, tmp_path, capsys):
    from zscir.data.benchmarks.fixtures import make_generic

    make_generic(tmp_path / "data")
    _publish(hub, tmp_path, "zscir-test/micro", _micro(0), revision="v2")
    argv = ["eval", "--dataset", "generic", "--root", str(tmp_path / "data"), "--no-progress", "--no-cache",
            "--device", "cpu"]
    assert cli.main(argv + ["--model", "zscir-test/micro", "--revision", "v2", "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "results.json").read_text())["num_queries"] == 4
    capsys.readouterr()
    assert cli.main(argv + ["--model", "zscir-test/absent"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zscir eval: error: model 'zscir-test/absent'") and "HF_HUB_OFFLINE" in err[0]
