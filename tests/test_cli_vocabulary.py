"""One CLI vocabulary: every help shows defaults, one flag name per concept, old spellings hidden but working,
names checked before any work, and `zscir --help` quick because subcommands are imported lazily."""
import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zscir import cli

#: Earlier spellings: accepted, never shown in help.
OLD_SPELLINGS = {
    "eval": ["--workers", "--cache-dir"],
    "index": ["--root"],
    "train-stage1": ["--model", "--file-list", "--hf-dataset", "--image-column", "--cache-dir"],
    "train-stage2": ["--cache-dir"],
    "train-bank": ["--cache-dir"],
    "pretrain-clip": ["--no-resume"],
    "demo": ["--cache-dir"],
}


def _sub_parser(name):
    """The parser of one subcommand, as `zscir NAME` builds it."""
    parser = cli.build_parser([name])
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def _help(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # one help line per flag
    with pytest.raises(SystemExit) as stop:
        cli.main([name, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def _help_blocks(out):
    """{option string: its help entry} of the options section of a help text."""
    blocks = {}
    for block in re.split(r"\n(?=  -)", out.split("options:", 1)[1]):
        head = block.strip().split("  ")[0]
        for flag in re.findall(r"--?[\w-]+", head):
            blocks[flag] = " ".join(block.split())
    return blocks


@pytest.mark.parametrize("name", sorted(cli.available()))
def test_every_help_shows_its_defaults_and_hides_old_spellings(name, capsys, monkeypatch):
    out = _help(name, capsys, monkeypatch)
    blocks = _help_blocks(out)
    for action in _sub_parser(name)._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings or action.nargs == 0:
            continue
        if action.default in (None, False, "") or action.default == []:
            continue
        entry = blocks[action.option_strings[-1]]
        assert "default" in entry.lower(), f"zscir {name} --help: {action.option_strings[-1]} does not show its " \
                                           f"default {action.default!r}: {entry!r}"
    shown = set(out.split())
    for old in OLD_SPELLINGS.get(name, []):
        assert old not in shown and f"[{old}" not in out, f"zscir {name} --help shows the old spelling {old}"


def test_one_name_per_concept_across_commands():
    for name in cli.available():
        flags = _sub_parser(name)._option_string_actions
        visible = {f for f, a in flags.items() if a.help != argparse.SUPPRESS}
        assert not visible & {"--workers", "--cache-dir", "--file-list", "--hf-dataset", "--root"} or \
            (name == "eval" and visible & {"--root"} == {"--root"}), (name, visible)
        if "--out" in visible:
            assert flags["--out"].metavar == "DIR", f"zscir {name}: --out is always a folder"
        if "--model" in visible:  # always a zscir model: a folder or Hub repo id, with --revision
            assert "Hub" in flags["--model"].help and "--revision" in visible, name
        if name == "train-stage1":
            assert {"--backbone", "--pretrained", "--random-init"} <= visible and "--model" not in visible


@pytest.mark.parametrize("argv, dest, value", [
    (["eval", "--dataset", "generic", "--root", "r", "--model", "m", "--workers", "3"], "num_workers", 3),
    (["eval", "--dataset", "generic", "--root", "r", "--model", "m", "--cache-dir", "c"], "gallery_cache", Path("c")),
    (["index", "imgs", "--model", "m", "--index", "i", "--root", "base"], "image_root", "base"),
    (["train-stage1", "--file-list", "l.txt", "--out", "o"], "images", "l.txt"),
    (["train-stage1", "--hf-dataset", "user/ds", "--out", "o"], "images", "user/ds"),
    (["train-stage1", "--shapes", "4", "--model", "ViT-B-32", "--out", "o"], "backbone", "ViT-B-32"),
    (["train-stage1", "--shapes", "4", "--cache-dir", "f", "--out", "o"], "feature_cache", Path("f")),
    (["train-bank", "--model", "m", "--triplets", "t", "--out", "o", "--cache-dir", "f"], "feature_cache", Path("f")),
    (["pretrain-clip", "--out", "o", "--no-resume"], "overwrite", True),
    (["demo", "--cache-dir", "c"], "clip_cache", Path("c")),
])
def test_old_spellings_keep_their_meaning(argv, dest, value):
    args = cli.build_parser([argv[0]]).parse_args(argv)
    assert getattr(args, dest) == value
    assert cli.flags.old_spellings_used(args)


def test_names_are_checked_before_any_data_is_read(tmp_path, capsys):
    from zscir.composer import Composer

    Composer.from_clip("zscir-micro").save_pretrained(tmp_path / "m")
    missing = str(tmp_path / "no-such-triplets.jsonl")
    base = ["train-stage2", "--model", str(tmp_path / "m"), "--triplets", missing, "--out", str(tmp_path / "o")]
    assert cli.main(base + ["--components", "query_negative,nope"]) == 1
    err = capsys.readouterr().err
    assert "--components: unknown stage-2 component 'nope'; choose one of" in err and "no-such-triplets" not in err
    assert cli.main(["make-triplets", "--captions", missing, "--modes", "caption-edti", "--out", str(tmp_path / "t")]) == 1
    err = capsys.readouterr().err
    assert "unknown triplet generation mode 'caption-edti'" in err or "caption-edti" in err
    assert "no-such-triplets" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "t").exists()


def test_top_level_help_is_quick_and_loads_no_subcommand(tmp_path):
    code = ("import sys, time; t = time.perf_counter(); from zscir.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('SECONDS', time.perf_counter() - t); print('TORCH', 'torch' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60).stdout
    assert "TORCH False" in out, out
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "zscir", "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    wall = time.perf_counter() - started
    assert proc.returncode == 0 and "train-stage1" in proc.stdout
    assert wall < 1.0, f"zscir --help took {wall:.2f} s"
