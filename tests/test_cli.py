"""The `zscir` command: help lists every subcommand, `index` + `search` end to end, one-line user errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from zscir import cli
from zscir.search import EmbeddingIndex

REPO = Path(__file__).resolve().parents[1]


def _flat(text):
    """Collapse whitespace, so help text wrapped by argparse compares equal to the one-line description."""
    return " ".join(text.split())


def _zscir(args, cwd, timeout=120):
    """Run the installed `zscir` entry point (or `python -m zscir` when no script is installed)."""
    script = Path(sys.executable).with_name("zscir")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "zscir"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_registered_subcommand_module_exists():
    missing = sorted(set(cli.SUBCOMMANDS) - set(cli.available()))
    assert not missing, f"registered in zscir.cli.SUBCOMMANDS but their modules are missing: " \
                        f"{[(name, cli.SUBCOMMANDS[name].module) for name in missing]}"


def test_top_level_help_lists_every_subcommand_with_its_description(tmp_path):
    proc = _zscir(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = _flat(proc.stdout)
    for name, sc in cli.SUBCOMMANDS.items():
        assert f"{name} {_flat(sc.help)}" in text, f"`zscir --help` does not list {name!r} with {sc.help!r}"


def test_python_dash_m_runs_the_same_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "zscir", "demo", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = _flat(proc.stdout)
    assert out.startswith("usage: zscir demo") and _flat(cli.SUBCOMMANDS["demo"].help) in out


@pytest.mark.parametrize("name", sorted(cli.available()))
def test_each_subcommand_help_shows_its_description(name, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([name, "--help"])
    assert stop.value.code == 0
    out = _flat(capsys.readouterr().out)
    assert out.startswith(f"usage: zscir {name}")
    assert _flat(cli.SUBCOMMANDS[name].help) in out


def test_no_subcommand_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- index + search
COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 80, 240), "yellow": (240, 220, 40),
          "white": (240, 240, 240), "purple": (150, 60, 220)}


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A small image folder (one nested, one broken file) and a saved random-init micro Composer."""
    from zscir.composer import Composer

    root = tmp_path_factory.mktemp("cli")
    images = root / "images"
    (images / "more").mkdir(parents=True)
    for i, (name, rgb) in enumerate(COLORS.items()):
        folder = images / "more" if i % 2 else images
        im = Image.new("RGB", (40, 40), (18, 18, 24))
        im.paste(rgb, (8 + 3 * i, 8, 30, 30 - i))
        im.save(folder / f"{name}.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    torch.manual_seed(0)
    composer = Composer.from_clip("zscir-micro")
    composer.save_pretrained(root / "model")
    return root, composer


def test_index_then_search_end_to_end(gallery, capsys):
    root, composer = gallery
    images, model, index = root / "images", root / "model", root / "index"
    assert cli.main(["index", str(images), "--model", str(model), "--index", str(index), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "7 images, 0 already indexed, 7 to embed" in out and "1 image(s) skipped" in out
    assert "broken.png" in (index / "bad_images.log").read_text()
    built = EmbeddingIndex.open(index)
    expected_ids = {f"{'more/' if i % 2 else ''}{name}.png" for i, name in enumerate(COLORS)}
    assert set(built.ids) == expected_ids

    # a second run embeds nothing new
    assert cli.main(["index", str(images), "--model", str(model), "--index", str(index), "--no-progress"]) == 0
    assert "7 images, 6 already indexed, 1 to embed" in capsys.readouterr().out  # only the broken file is retried

    reference, text = images / "red.png", "make it blue"
    assert cli.main(["search", str(index), "--model", str(model), "--image", str(reference), "--text", text,
                     "-k", "4", "--exclude", "red.png", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4]
    assert "red.png" not in {h["id"] for h in hits}
    # the same ranking computed directly with the model
    query = composer.encode_query([Image.open(reference).convert("RGB")], [text])[0]
    ids = sorted(expected_ids - {"red.png"})
    feats = composer.encode_images([Image.open(images / i).convert("RGB") for i in ids])
    direct = {i: float(s) for i, s in zip(ids, feats @ query)}
    for hit in hits:
        assert abs(hit["score"] - direct[hit["id"]]) < 2e-3  # float16 index rows
    best_direct = sorted(direct.values(), reverse=True)[:4]
    assert [h["score"] for h in hits] == pytest.approx(best_direct, abs=2e-3)


def test_search_with_another_model_is_a_one_line_error(gallery, tmp_path, capsys):
    from zscir.composer import Composer

    root, _ = gallery
    index = tmp_path / "index"
    assert cli.main(["index", str(root / "images"), "--model", str(root / "model"), "--index", str(index),
                     "--no-progress"]) == 0
    torch.manual_seed(1)
    Composer.from_clip("zscir-micro").save_pretrained(tmp_path / "other")
    capsys.readouterr()
    code = cli.main(["search", str(index), "--model", str(tmp_path / "other"), "--image",
                     str(root / "images" / "red.png"), "--text", "make it blue"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith("zscir search: error:") and "was built with model" in err[0]


def test_user_error_in_a_real_process_prints_one_line_and_no_traceback(tmp_path):
    proc = _zscir(["search", str(tmp_path / "no-such-index"), "--model", str(tmp_path / "no-model"),
                   "--image", "x.png", "--text", "make it red"], tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("zscir search: error:") and "no-such-index" in last
