"""The examples/ scripts run offline with --tiny and produce what they promise (subprocess runs, like a user would)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env.pop("ZSCIR_ANNOTATIONS", None)
    return env


def _run(cmd, tmp_path, timeout=300):
    """Run a command in tmp_path; fail with its output if it does not exit 0."""
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc.stdout


def _load_example(name):
    """Import an example script as a module (registered first, so its dataclasses resolve)."""
    spec = importlib.util.spec_from_file_location(f"zscir_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _ranked_ids(stdout):
    """{id: score} from the 'rank score id' lines a quickstart run prints."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit():
            out[parts[2]] = float(parts[1])
    return out


# ---------------------------------------------------------------------------------------------- quickstart
def test_quickstart_tiny_finds_its_target_with_a_trained_model(tmp_path):
    world, grid = tmp_path / "world", tmp_path / "grid.png"
    stdout = _run([sys.executable, str(EXAMPLES / "quickstart.py"), "--tiny", "--workdir", str(world),
                   "--out", str(grid), "--no-progress"], tmp_path)
    # the default top 5 holds the query's known target: the tiny model was trained, not random
    rank = next(line for line in stdout.splitlines() if line.startswith("target rank: ")).split(": ", 1)[1]
    assert rank.isdigit() and 1 <= int(rank) <= 5, stdout
    assert "<- target" in stdout and (world / "model" / "config.json").is_file()
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.width > 400 and im.height > 200


def test_quickstart_ranks_the_whole_gallery_and_reuses_the_index(tmp_path, capsys):
    quickstart = _load_example("quickstart")
    world, index = tmp_path / "world", tmp_path / "index"
    query = quickstart.write_tiny_world(world)
    common = ["--images", str(world / "images"), "--reference", str(query.reference), "--text", query.text,
              "-k", "100", "--no-progress"]
    with pytest.warns(UserWarning, match="UNTRAINED"):  # no --model: said loudly
        assert quickstart.main(common + ["--index", str(index), "--out", str(tmp_path / "a.png")]) == 0
    ranked = _ranked_ids(capsys.readouterr().out)
    gallery = sorted(p.name for p in (world / "images").glob("*.png"))
    # k exceeds the gallery: every image but the reference is ranked, best first
    assert set(ranked) == set(gallery) - {query.reference.name}
    assert list(ranked.values()) == sorted(ranked.values(), reverse=True)
    assert json.loads((index / "meta.json").read_text())["count"] == len(gallery)
    with pytest.warns(UserWarning, match="UNTRAINED"):
        assert quickstart.main(common + ["--index", str(index), "--out", str(tmp_path / "again.png")]) == 0
    assert f"{len(gallery)} of {len(gallery)} images already embedded, 0 to add" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="UNTRAINED"):
        assert quickstart.main(common + ["--out", str(tmp_path / "memory.png")]) == 0
    in_memory = _ranked_ids(capsys.readouterr().out)
    assert set(in_memory) == set(ranked)
    # the index stores float16 rows: scores agree to float16 precision
    assert max(abs(in_memory[i] - ranked[i]) for i in ranked) < 2e-3


def test_quickstart_user_errors_are_one_line(tmp_path, capsys):
    quickstart = _load_example("quickstart")
    # checked before any model is loaded (no "untrained model" warning yet)
    assert quickstart.main(["--images", str(tmp_path / "missing"), "--text", "make it red", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("quickstart: error:") and "missing" in err[0]
    assert quickstart.main(["--no-progress"]) == 1
    assert "--images" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- finetune example
def test_finetune_tiny_improves_held_out_recall_and_saves_a_loadable_stage2_model(tmp_path):
    work = tmp_path / "work"
    stdout = _run([sys.executable, str(EXAMPLES / "finetune_custom_triplets.py"), "--tiny", "--workdir", str(work),
                   "--no-progress"], tmp_path)
    report = json.loads((work / "stage2" / "finetune_report.json").read_text())
    assert report["train_triplets"] + report["heldout_triplets"] == 800
    assert report["heldout_triplets"] == 80  # 10 % of the image-target triplets
    for stage in ("stage1", "stage2"):
        r = report[stage]
        assert 0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 100
    # the method works on its own held-out queries: Stage II beats the Stage-I model it started from
    before, after = report["stage1"], report["stage2"]
    assert all(after[k] >= before[k] for k in ("R@1", "R@5", "R@10")), report
    assert after["R@10"] >= before["R@10"] + 5, report
    # the printed table shows the same numbers
    for key in ("R@1", "R@5", "R@10"):
        assert f"{key:<8} {report['stage1'][key]:9.2f} {report['stage2'][key]:9.2f}" in stdout

    # the saved model reproduces the reported held-out numbers exactly
    from zscir.composer import Composer
    from zscir.data.triplets import load_triplets

    ft = _load_example("finetune_custom_triplets")
    model = Composer.from_pretrained(work / "stage2" / "model")
    assert model.config.stage == "stage2" and model.config.adapters.num_layers == 4
    triplets = ft.fit_to_context(model, load_triplets(report["triplets"]))
    _, held = ft.split_holdout(triplets, 0.1, seed=0)
    assert ft.heldout_recall(model, held) == report["stage2"]


def test_finetune_refuses_a_file_with_too_few_image_targets(tmp_path, capsys):
    from zscir.composer import Composer

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b.png")
    rows = [{"reference": "a.png", "modification": "make it blue", "target": "b.png"},
            {"reference": "b.png", "modification": "make it red", "target": "a.png"},
            {"reference": "a.png", "modification": "a blue square", "target_caption": "a blue square"}]
    (tmp_path / "few.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Composer.from_clip("zscir-micro").save_pretrained(tmp_path / "stage1")
    ft = _load_example("finetune_custom_triplets")
    code = ft.main(["--triplets", str(tmp_path / "few.jsonl"), "--model", str(tmp_path / "stage1"),
                    "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "few.jsonl" in err[0] and "2 triplet(s) with a target image out of 3" in err[0]
    assert not (tmp_path / "out" / "model").exists()


# ---------------------------------------------------------------------------------------- shell scripts
def test_shell_scripts_parse():
    for script in ("evaluate_benchmarks.sh", "train_from_scratch.sh"):
        proc = subprocess.run(["bash", "-n", str(EXAMPLES / script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_evaluate_benchmarks_rejects_an_unknown_dataset_before_running_anything(tmp_path):
    env = dict(_env(), STAGES="eval", EVALS="imagenet:val", OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(EXAMPLES / "evaluate_benchmarks.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "unknown data set 'imagenet'" in proc.stderr


def test_evaluate_benchmarks_tiny_trains_evaluates_and_writes_submissions(tmp_path):
    out = tmp_path / "run"
    # a copy outside the source tree: --tiny needs only the installed package, no tests/ folder
    script = tmp_path / "elsewhere" / "evaluate_benchmarks.sh"
    script.parent.mkdir()
    shutil.copy(EXAMPLES / "evaluate_benchmarks.sh", script)
    stdout = _run(["bash", str(script), "--tiny", str(out)], tmp_path)
    for stage in ("stage1", "stage2"):
        assert (out / stage / "model" / "config.json").is_file()
    assert "+ zscir eval --dataset fashioniq" in stdout  # the exact commands are echoed
    fiq = json.loads((out / "results" / "fashioniq_val" / "results.json").read_text())
    assert fiq["num_queries"] == 9 and 0 <= fiq["metrics"]["average/R@10"] <= fiq["metrics"]["average/R@50"] <= 100
    cirr = json.loads((out / "submission" / "zscir_cirr_recall.json").read_text())
    assert {k for k in cirr if k not in ("version", "metric")} == {"200", "201", "202"}  # the fixture's test1 pair ids
    subset = json.loads((out / "submission" / "zscir_cirr_recall_subset.json").read_text())
    assert {k for k in subset if k not in ("version", "metric")} == {"200", "201", "202"}
    circo = json.loads((out / "submission" / "zscir_circo_test.json").read_text())
    assert sorted(circo) == ["0", "1", "2", "3"] and all(len(v) == 20 for v in circo.values())


def test_train_from_scratch_tiny_runs_all_four_steps(tmp_path):
    out = tmp_path / "run"
    stdout = _run(["bash", str(EXAMPLES / "train_from_scratch.sh"), "--tiny", str(out)], tmp_path)
    assert [line[:7] for line in stdout.splitlines() if line.startswith("== ")] == ["== 1/4 ", "== 2/4 ", "== 3/4 ", "== 4/4 "]
    rows = [json.loads(line) for line in (out / "triplets" / "triplets.jsonl").read_text().splitlines()]
    assert {r["id"].rsplit("-", 1)[0] for r in rows} == {"caption-edit", "caption-pair"}
    results = json.loads((out / "results" / "results.json").read_text())
    assert results["dataset"] == "generic" and results["num_queries"] == 40
    m = results["metrics"]
    assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= m["R@50"] <= 100
    from zscir.composer import Composer

    assert Composer.from_pretrained(out / "stage2" / "model").config.stage == "stage2"
