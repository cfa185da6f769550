"""`zscir shapes` and `zscir make-triplets` keep every flag after their parsers moved to zscir/cli."""
import pytest

from zscir import cli

FLAGS = {
    "shapes": ["--out", "--n", "--seed", "--image-size", "--min-objects", "--max-objects", "--family", "--n-random",
               "--siblings", "--long-tail", "--no-progress", "eval,triplets,captions"],
    "make-triplets": ["--out", "--captions", "--image-root", "--modes", "--lexicon", "--seed", "--max",
                      "--edits-per-caption", "--pairs-per-image", "--window", "--embeddings", "--text-editor",
                      "--pair-describer", "--shapes", "--long-tail", "--shapes-image-size", "--no-check-images",
                      "--no-progress"],
}


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_help_lists_every_flag(name, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([name, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: zscir {name}")
    missing = [flag for flag in FLAGS[name] if flag not in out]
    assert not missing, f"`zscir {name} --help` lacks {missing}"


def test_make_triplets_lists_every_generation_mode(capsys, monkeypatch):
    from zscir.data.triplet_gen import GENERATION_MODES

    monkeypatch.setenv("COLUMNS", "400")  # argparse may wrap a help line at a mode name's hyphen

    with pytest.raises(SystemExit):
        cli.main(["make-triplets", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(mode in out for mode in GENERATION_MODES.names())


def test_shapes_exports_through_the_command(tmp_path, capsys):
    assert cli.main(["shapes", "triplets", "--out", str(tmp_path), "--n", "3", "--image-size", "32", "--no-progress"]) == 0
    assert "wrote 3 triplets" in capsys.readouterr().out
    assert len((tmp_path / "triplets.jsonl").read_text().splitlines()) == 3
