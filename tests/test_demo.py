"""`zscir demo` end to end on a miniature configuration: outputs, reuse, determinism, bad --out."""
import dataclasses
import json

import pytest

from zscir import Composer
from zscir.demo import DemoConfig, run_demo

MINI = DemoConfig(clip_preset="fast", stage1_images=600, stage1_steps=8, num_triplets=128, stage2_steps=8,
                  eval_queries=60, num_tokens=2)


@pytest.fixture(scope="module")
def demo_run(tiny_clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    return out, run_demo(out, MINI, progress=False)


def test_demo_writes_everything(demo_run):
    out, results = demo_run
    for name in ("results.json", "examples.png", "training_curves.png", "model/config.json", "model/model.safetensors"):
        assert (out / name).is_file(), name
    rows = results["composed_retrieval"]
    assert set(rows) == {"image only", "text only", "image + text sum", "Pic2Word-style", "SEARLE-style",
                         "zscir Stage I", "zscir Stage II", "target caption (oracle)", "reference caption + text"}
    for r in rows.values():
        assert 0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= r["R@50"] <= 100
    assert json.loads((out / "results.json").read_text())["composed_retrieval"] == rows
    model = Composer.from_pretrained(out / "model")
    assert model.config.stage == "stage2"
    assert results["stage1"].startswith("zscir Stage I: 2 global + 2 VSI tokens, soft targets from caption fit")
    stage1_run = json.loads((out / "stage1_zscir_stage_i" / "history.json").read_text())
    assert stage1_run and "contrastive" in stage1_run[-1]


def test_demo_is_deterministic_and_reuses_finished_parts(demo_run, tmp_path):
    out, first = demo_run
    again = run_demo(tmp_path / "second", MINI, progress=False)
    assert again["composed_retrieval"] == first["composed_retrieval"]
    # same folder again: every stage is reused, the table is the same
    reused = run_demo(out, MINI, progress=False)
    assert reused["composed_retrieval"] == first["composed_retrieval"]
    assert reused["timings_seconds"]["stage1"] < first["timings_seconds"]["stage1"]


def test_demo_refuses_a_folder_from_another_run(demo_run, tmp_path):
    out, _ = demo_run
    other = dataclasses.replace(MINI, seed=1)
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_demo(out, other, progress=False)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        run_demo(stranger, MINI, progress=False)
    assert (stranger / "notes.txt").read_text() == "mine"
