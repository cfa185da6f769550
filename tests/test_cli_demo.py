"""`zscir demo` flags: every flag reaches run_demo, and a foreign --out folder is a one-line error before any work."""
from pathlib import Path

from zscir import cli
from zscir.cli import demo as demo_cli
from zscir.demo import PRESETS


def test_flags_reach_run_demo(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo_cli, "run_demo", lambda out, cfg, **kw: calls.append((out, cfg, kw)))
    assert cli.main(["demo", "--fast", "--out", str(tmp_path / "o"), "--overwrite", "--seed", "3",
                     "--cache-dir", str(tmp_path / "c"), "--no-progress"]) == 0
    out, cfg, kw = calls[0]
    assert out == tmp_path / "o" and cfg == PRESETS["fast"].replace(seed=3)
    assert kw == {"overwrite": True, "progress": False, "cache_dir": tmp_path / "c"}
    assert cli.main(["demo"]) == 0
    out, cfg, kw = calls[1]
    assert out == Path("zscir-demo") and cfg == PRESETS["default"] and kw["overwrite"] is False


def test_a_folder_of_another_run_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(["demo", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("zscir demo: error:") and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "notes.txt").read_text() == "mine"
