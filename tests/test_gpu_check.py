"""benchmarks/gpu_check.py: the no-CUDA exit, the CIRR folder it builds, and the whole script at smoke size."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from fixtures_cir import make_cirr
from zscir.data.benchmarks.cirr import load_cirr

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PHASES = ["import_zscir", "write_images", "load_model", "feature_cache", "stage1", "triplet_features", "stage2",
          "cirr_val_eval"]


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _run(args, tmp_path, **env):
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=full_env, capture_output=True,
                          text=True, timeout=300)


def test_without_cuda_it_says_so_in_one_line_and_exits_2(tmp_path):
    proc = _run(["--out", str(tmp_path / "r.json")], tmp_path, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--smoke" in lines[0]
    assert not (tmp_path / "r.json").exists()


def test_annotations_are_looked_up_only_where_told(tmp_path, monkeypatch):
    gc = _load_script()
    make_cirr(tmp_path / "ann" / "cirr")
    monkeypatch.setenv("ZSCIR_ANNOTATIONS", str(tmp_path / "ann"))
    assert gc.find_cirr_annotations(None)[0] == tmp_path / "ann" / "cirr"
    assert gc.find_cirr_annotations(str(tmp_path / "ann" / "cirr"))[0] == tmp_path / "ann" / "cirr"
    found, looked = gc.find_cirr_annotations(str(tmp_path / "elsewhere"))  # given: no fallback to the env folder
    assert found is None and looked == [tmp_path / "elsewhere" / "cirr", tmp_path / "elsewhere"]


def test_cirr_root_lists_an_image_under_every_name_and_subsets_queries(tmp_path):
    gc = _load_script()
    fx = make_cirr(tmp_path / "ann")
    image = tmp_path / "one.jpg"
    from PIL import Image

    Image.new("RGB", (30, 20), (1, 2, 3)).save(image)
    assert gc.prepare_cirr(tmp_path / "ann", tmp_path / "all", [image], 0) == {"queries": 4, "images": 12}
    data = load_cirr(tmp_path / "all", "val")
    assert data.num_queries == 4 and not data.missing
    counts = gc.prepare_cirr(tmp_path / "ann", tmp_path / "sub", [image], 2)
    data = load_cirr(tmp_path / "sub", "val")
    assert counts == {"queries": 2, "images": 6} and not data.missing
    assert [q.query_id for q in data.queries] == [str(r["pairid"]) for r in fx.val[:2]]


def test_smoke_runs_every_phase_and_writes_the_table_and_json(tmp_path):
    make_cirr(tmp_path / "ann" / "cirr")
    out = tmp_path / "check.json"
    proc = _run(["--smoke", "--annotations", str(tmp_path / "ann"), "--out", str(out), "--workdir",
                 str(tmp_path / "work")], tmp_path, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    assert list(record["phases"]) == PHASES and record["failed"] == [] and record["exit_code"] == 0
    for name in PHASES:
        assert record["phases"][name]["seconds"] > 0
        assert name in proc.stdout
    phases = record["phases"]
    assert phases["write_images"]["images"] == 24 and len(list((tmp_path / "work" / "images").iterdir())) == 24
    assert phases["write_images"]["processes"] == 1  # --workers 1 writes in the script's own process
    assert phases["feature_cache"]["valid"] == 24
    for stage in ("stage1", "stage2"):
        assert phases[stage]["steps"] == 2 and phases[stage]["steady_steps_per_s"] > 0
        assert all(math.isfinite(x) for x in phases[stage]["losses"])
    ev = phases["cirr_val_eval"]
    assert (ev["queries"], ev["gallery"], ev["queries_skipped"]) == (4, 12, 0) and "R@1" in ev["metrics"]


def test_missing_annotations_are_named_before_anything_runs(tmp_path):
    out = tmp_path / "check.json"
    proc = _run(["--smoke", "--annotations", str(tmp_path / "missing"), "--out", str(out)], tmp_path,
                CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CIRR annotations NOT FOUND" in lines[0] and str(tmp_path / "missing") in lines[0]
    assert not out.exists()


def test_a_failing_phase_is_recorded_and_shown_and_the_run_goes_on():
    gc = _load_script()
    report = gc.Report("cpu")
    assert report.run("stage1", lambda: {"x": 1 / 0}) is None
    assert report.run("load_model", lambda: {"model": "m", "pretrained": "random init", "params_m": 1.0}) is not None
    report.skip("cirr_val_eval", "--skip-eval")
    assert report.failed == ["stage1"] and report.phases["stage1"]["error"].startswith("ZeroDivisionError")
    table = gc.format_table(report, 1.0)
    assert "FAILED: ZeroDivisionError" in table and "skipped: --skip-eval" in table and "m random init" in table
