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


def _stop_before_training(monkeypatch):
    """The demo's first real work raises, so a test never runs a demo (and an old build fails it fast)."""
    import zscir.train.clip_pretrain as clip_pretrain

    def stop(*args, **kwargs):
        raise RuntimeError("the test stops the demo here")

    monkeypatch.setattr(clip_pretrain, "pretrained_tiny_clip", stop)


def test_overwrite_never_deletes_files_the_demo_did_not_write(tmp_path, monkeypatch, capsys):
    """`--out . --overwrite` in a working directory: refused with the files named, nothing deleted."""
    _stop_before_training(monkeypatch)
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    (work / "src" / "main.py").write_text("print(1)")
    monkeypatch.chdir(work)
    assert cli.main(["demo", "--out", ".", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "notes.txt" in err and "src" in err and "did not write" in err
    assert (work / "notes.txt").read_text() == "mine" and (work / "src" / "main.py").is_file()


def test_overwrite_replaces_only_what_another_demo_run_wrote(tmp_path, monkeypatch):
    from zscir.demo import DEMO_OUTPUTS, RUN_FILE, OutputFolder

    out = tmp_path / "run"
    first = OutputFolder(out, PRESETS["fast"].to_dict(), overwrite=False)
    for name in ("model", "stage2", "stage1_zscir_stage_i"):
        (first.path / name).mkdir()
        (first.path / name / "config.json").write_text("{}")
    (out / "results.json").write_text("{}")
    (out / ".results.json.x1y2.tmp").write_text("half")  # an atomic write cut short by a kill
    assert set(DEMO_OUTPUTS) >= {"model", "stage2", "stage1_zscir_stage_i", "results.json"}
    other = PRESETS["fast"].replace(seed=1).to_dict()
    try:
        OutputFolder(out, other, overwrite=False)
        raise AssertionError("another run's folder was accepted without --overwrite")
    except FileExistsError as err:
        assert "--overwrite" in str(err)
    OutputFolder(out, other, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [RUN_FILE]  # the earlier run's entries, and only those, went
    (out / "model").mkdir()
    (out / "thesis.tex").write_text("years of work")  # a file the demo did not write
    try:
        OutputFolder(out, PRESETS["fast"].to_dict(), overwrite=True)
        raise AssertionError("a folder with foreign files was replaced")
    except FileExistsError as err:
        assert "thesis.tex" in str(err) and "model" not in str(err).split("(")[1].split(")")[0]
    assert (out / "thesis.tex").read_text() == "years of work" and (out / "model").is_dir()


def test_a_run_file_from_before_the_outputs_were_recorded_still_counts_as_the_same_run(tmp_path):
    import json

    from zscir.demo import RUN_FILE, OutputFolder

    settings = PRESETS["fast"].to_dict()
    (tmp_path / RUN_FILE).write_text(json.dumps(settings))  # the old form: the settings alone
    (tmp_path / "model").mkdir()
    OutputFolder(tmp_path, settings, overwrite=False)  # same run: continues, nothing removed
    assert (tmp_path / "model").is_dir()


def test_a_folder_trained_with_other_training_defaults_is_another_run(tmp_path, monkeypatch, capsys):
    """The run file records every training config: new library defaults never reuse a model trained with old ones."""
    import dataclasses

    from zscir import demo
    from zscir.runs import RunFolder

    cfg = PRESETS["fast"]
    settings = demo.demo_settings(cfg)
    assert settings["stage2"]["train"]["steps"] == cfg.stage2_steps
    assert set(settings["stage1"]) == set(demo.STAGE1_NAMES)
    assert settings["stage1"]["zscir Stage I"]["phi"]["num_tokens"] == cfg.num_tokens
    new_default = demo.stage2_config

    def old_default(c):
        s2 = new_default(c)
        return dataclasses.replace(s2, adapters=dataclasses.replace(s2.adapters, rank=s2.adapters.rank // 2))

    with monkeypatch.context() as m:  # the run as an older zscir, with another Stage-II default, recorded it
        m.setattr(demo, "stage2_config", old_default)
        recorded = demo.demo_settings(cfg)
    assert recorded != settings
    RunFolder(tmp_path / "run", "demo", recorded, demo.DEMO_OUTPUTS, run_file=demo.RUN_FILE).open(
        resume=None, overwrite=False)
    (tmp_path / "run" / "model").mkdir()  # a finished Stage II made with the older default
    _stop_before_training(monkeypatch)
    monkeypatch.setattr(demo, "PRESETS", {**demo.PRESETS, "fast": cfg})
    assert cli.main(["demo", "--fast", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
