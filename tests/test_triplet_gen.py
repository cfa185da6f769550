"""Synthetic triplet generation: lexicon swaps, caption pairs, mid-rank similarity pairs, LLM hooks, shapes, CLI."""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from zscir.cli import triplets as triplets_cli
from zscir.data import triplet_gen as gen
from zscir.data.triplet_gen import (
    CaptionCorpus,
    CaptionedImage,
    Lexicon,
    LexiconError,
    TripletGenConfig,
    caption_edit_triplets,
    caption_pair_triplets,
    editor_triplets,
    generate_triplets,
    mid_rank_partners,
    one_word_difference,
    read_captions,
    similarity_pair_triplets,
)
from zscir.data.triplets import TripletFileError, load_triplets

CAPTIONS = [
    "a red car on a street",       # 0  pairs with 1 (colour)
    "a blue car on a street",      # 1
    "A small dog in a park",       # 2  pairs with 3 (size)
    "a large dog in a park",       # 3
    "two cats on a wooden sofa",   # 4  pairs with 5 (count)
    "three cats on a wooden sofa", # 5
    "a sunset over the sea",       # 6  no lexicon word
    "a red car in the snow",       # 7  no partner
]


def _corpus_files(folder: Path, captions=CAPTIONS, duplicate_lines: bool = False) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, caption in enumerate(captions):
        Image.new("RGB", (8, 8), (10 * i, 100, 200 - 10 * i)).save(folder / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "caption": caption}))
    if duplicate_lines:
        lines += lines
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "captions.jsonl"


def _corpus(captions) -> CaptionCorpus:
    return CaptionCorpus([CaptionedImage(f"img{i}.png", c, i + 1) for i, c in enumerate(captions)], "/data", "mem")


def _words(text: str):
    return text.lower().split()


def _word_diff(a: str, b: str):
    """(removed, inserted) phrases between two captions: what is left after their common word prefix and suffix."""
    x, y = _words(a), _words(b)
    start = 0
    while start < min(len(x), len(y)) and x[start] == y[start]:
        start += 1
    end = 0
    while end < min(len(x), len(y)) - start and x[-1 - end] == y[-1 - end]:
        end += 1
    return " ".join(x[start:len(x) - end]), " ".join(y[start:len(y) - end])


@pytest.fixture(scope="module")
def lexicon() -> Lexicon:
    return Lexicon.load()


# ---------------------------------------------------------------------- lexicon
def test_default_lexicon_classes_and_word_boundaries(lexicon):
    assert {"color", "material", "count", "size", "object"} <= set(lexicon.classes)
    assert all(len(words) >= 20 for words in lexicon.classes.values())
    found = lexicon.find("A Red car, a redwood tree, red-brown paint, and Light Blue doors")
    assert [(m.text, m.word, m.cls) for m in found] == [
        ("Red", "red", "color"), ("car", "car", "object"), ("Light Blue", "light blue", "color"),
    ]


def test_bad_lexicon_lists_every_problem(tmp_path):
    path = tmp_path / "lex.json"
    path.write_text(json.dumps({
        "classes": {"color": ["red", "blue", "Red"], "fruit": ["apple", "blue"], "one": ["x"]},
        "templates": {"default": ["make it so"], "color": ["turn {old} {newest}"], "animal": ["{new}"]},
    }))
    with pytest.raises(LexiconError) as info:
        Lexicon.load(path)
    msg = str(info.value)
    assert "'red' is listed twice" in msg
    assert "'blue' is already in class 'color'" in msg
    assert "class 'one': needs at least 2 words" in msg
    assert "must mention {new} or {a_new}" in msg
    assert "unknown placeholder(s) ['newest']" in msg
    assert "templates for unknown class 'animal'" in msg
    path.write_text(json.dumps({"classes": {"color": ["red", "blue"]}, "extra": 1}))
    with pytest.raises(LexiconError, match=r"unknown key\(s\) \['extra'\]"):
        Lexicon.load(path)


def test_user_lexicon_borrows_default_templates(tmp_path):
    path = tmp_path / "lex.json"
    path.write_text(json.dumps({"classes": {"color": ["red", "blue"], "pattern": ["striped", "dotted"]}}))
    lex = Lexicon.load(path)
    assert lex.templates_for("color") == Lexicon.load().templates_for("color")
    assert lex.templates_for("pattern") == Lexicon.load().templates_for("default")
    assert lex.caption_templates


# ------------------------------------------------------------------ caption edits
def test_caption_edit_swaps_exactly_one_word(lexicon):
    corpus = _corpus(CAPTIONS)
    skipped = Counter()
    out = caption_edit_triplets(corpus, lexicon, random.Random(0), edits_per_caption=2, skipped=skipped)
    assert skipped["no lexicon word"] == 1
    assert len(out) == 2 * (len(CAPTIONS) - 1)
    by_line = Counter(t.line for t in out)
    assert 7 not in by_line and all(n == 2 for n in by_line.values())
    for t in out:
        source = CAPTIONS[t.line - 1]
        assert t.reference == corpus.image_path(f"img{t.line - 1}.png") and t.target is None
        old, new = _word_diff(source, t.target_caption)  # one word (or lexicon phrase) in, one out
        assert old and new and old != new, (source, t.target_caption)
        assert lexicon.class_of(old) == lexicon.class_of(new) == t.kind, (source, t.target_caption)
        assert new in t.modification.lower()
    # capitalisation of the swapped word follows the caption
    dog = [t for t in out if t.line == 3 and t.kind == "size"]
    assert all(t.target_caption[0].isupper() for t in dog)


def test_caption_edit_multiword_phrase_and_articles(tmp_path):
    path = tmp_path / "lex.json"
    path.write_text(json.dumps({
        "classes": {"object": ["apple", "teddy bear"]},
        "templates": {"object": ["{a_new} instead of {a_old}"]},
        "caption_templates": ["{target}"],
    }))
    lex = Lexicon.load(path)
    out = caption_edit_triplets(_corpus(["a Teddy Bear on a bed"]), lex, random.Random(0))
    assert [(t.modification, t.target_caption) for t in out] == [("an apple instead of a teddy bear", "a Apple on a bed")]


# ------------------------------------------------------------------ caption pairs
def test_caption_pairs_only_differ_by_one_lexicon_word(lexicon):
    corpus = _corpus(CAPTIONS)
    out = caption_pair_triplets(corpus, lexicon, random.Random(0), pairs_per_image=3)
    pairs = {(t.reference, t.target) for t in out}
    img = corpus.image_path
    expected = set()
    for a, b in [(0, 1), (2, 3), (4, 5)]:
        expected |= {(img(f"img{a}.png"), img(f"img{b}.png")), (img(f"img{b}.png"), img(f"img{a}.png"))}
    assert pairs == expected
    for t in out:
        ref_caption = CAPTIONS[t.line - 1]
        cls, old, new = one_word_difference(lexicon, ref_caption, t.target_caption)
        assert t.kind == cls and new in t.modification.lower()


def test_pair_describer_and_text_editor_fakes(lexicon):
    corpus = _corpus(CAPTIONS)
    describer = lambda ref, tgt: None if "dog" in ref else f"go from {ref} to {tgt}"  # noqa: E731
    skipped = Counter()
    out = caption_pair_triplets(corpus, lexicon, random.Random(0), describer=describer, skipped=skipped)
    assert skipped["describer declined"] == 2 and len(out) == 4
    for t in out:
        assert t.modification == f"go from {CAPTIONS[t.line - 1]} to {t.target_caption}"

    def editor(caption: str):
        if "red" not in caption:
            return None
        return "make it green", caption.replace("red", "green")

    skipped = Counter()
    edits = editor_triplets(corpus, editor, skipped=skipped)
    assert [(t.line, t.target_caption, t.kind) for t in edits] == [
        (1, "a green car on a street", "llm"), (8, "a green car in the snow", "llm")
    ]
    assert skipped["editor declined"] == 6
    with pytest.raises(TypeError, match="expected \\(modification, target_caption\\)"):
        editor_triplets(corpus, lambda c: "just a string")
    useless = Counter()
    assert editor_triplets(corpus, lambda c: ("  ", c), skipped=useless) == [] and useless["editor output unusable"] == 8


# ---------------------------------------------------------- similarity pairs
def test_mid_rank_window_on_constructed_embeddings():
    # points on an arc: from image 0, similarity strictly falls with the index, so rank r is image r + 1
    angles = torch.arange(12, dtype=torch.float32) * 0.1
    emb = torch.stack([angles.cos(), angles.sin()], dim=1) * 3.0  # scale must not matter (cosine)
    partners = mid_rank_partners(emb, 2, 5, chunk_size=5)
    assert partners[0] == [3, 4, 5]
    assert partners[11] == [8, 7, 6]
    assert all(len(p) == 3 and i not in p for i, p in enumerate(partners))
    assert mid_rank_partners(emb, 10, 20)[0] == [11]  # the window is cut at the number of other images
    with pytest.raises(ValueError, match="0 <= lo < hi"):
        mid_rank_partners(emb, 5, 5)
    emb[4, 1] = float("nan")
    with pytest.raises(ValueError, match="row 4 holds NaN"):
        mid_rank_partners(emb, 0, 2)


def test_similarity_pairs_respect_the_window(lexicon):
    captions = [f"photo number {i}" for i in range(40)]
    corpus = _corpus(captions)
    emb = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    out = similarity_pair_triplets(corpus, emb, lexicon, random.Random(0), window=(3, 8), pairs_per_image=2)
    assert len(out) == 80
    sims = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(emb, dim=1).T
    sims.fill_diagonal_(-2)
    order = sims.argsort(dim=1, descending=True)
    index = {corpus.image_path(f"img{i}.png"): i for i in range(40)}
    for t in out:
        i, j = index[t.reference], index[t.target]
        assert j in order[i, 3:8].tolist()
        assert t.kind == "similar" and t.target_caption == captions[j]
        assert f"photo number {j}" in t.modification  # caption templates name the target
    with pytest.raises(ValueError, match="lists 40 distinct images"):
        similarity_pair_triplets(corpus, emb[:10], lexicon, random.Random(0))


def test_similarity_pairs_use_word_templates_for_one_word_differences(lexicon):
    corpus = _corpus(["a red car on a street", "a blue car on a street"])
    out = similarity_pair_triplets(corpus, torch.eye(2), lexicon, random.Random(0), window=(0, 1))
    assert [t.kind for t in out] == ["color", "color"]
    assert "blue" in out[0].modification and "red" in out[1].modification


# ----------------------------------------------------------------- corpus input
def test_read_captions_reports_every_bad_line(tmp_path):
    _corpus_files(tmp_path, CAPTIONS[:2])
    with (tmp_path / "captions.jsonl").open("a") as fh:
        fh.write('{"image": "images/9.png", "caption": "gone"}\n{"image": "images/0.png"}\nnot json\n'
                 '{"image": "images/0.png", "caption": "x", "tags": []}\n')
    with pytest.raises(TripletFileError) as info:
        read_captions(tmp_path / "captions.jsonl")
    msg = str(info.value)
    assert "captions.jsonl:3: image not found" in msg
    assert "captions.jsonl:4: field 'caption'" in msg
    assert "captions.jsonl:5: invalid JSON" in msg
    assert "captions.jsonl:6: unknown field(s) ['tags']" in msg
    assert len(info.value.problems) == 4


# ------------------------------------------------------------------- pipeline
def test_generate_dedups_caps_and_is_deterministic(tmp_path):
    captions = _corpus_files(tmp_path / "corpus", duplicate_lines=True)
    # two colours and one template: every caption with "red" or "blue" has exactly one possible edit,
    # so each duplicated caption line yields an identical (reference, modification, target) row
    lex = tmp_path / "lex.json"
    lex.write_text(json.dumps({"classes": {"color": ["red", "blue"]}, "templates": {"color": ["make it {new}"]}}))
    cfg = TripletGenConfig(captions=str(captions), modes=("caption-edit",), seed=3, lexicon=str(lex))
    result = generate_triplets(cfg, tmp_path / "out", progress=False)
    assert [(Path(t.reference).name, t.modification, t.target_caption) for t in result.triplets] == [
        ("0.png", "make it blue", "a blue car on a street"),
        ("1.png", "make it red", "a red car on a street"),
        ("7.png", "make it blue", "a blue car in the snow"),
    ]
    assert result.duplicates == 3 and result.skipped["caption-edit"]["no lexicon word"] == 10
    # the default lexicon: many possible edits per caption, same seed -> same rows
    cfg = TripletGenConfig(captions=str(captions), modes=("caption-edit", "caption-pair"), seed=3)
    result = generate_triplets(cfg, tmp_path / "out", progress=False)
    keys = [(t.reference, t.modification, t.target, t.target_caption) for t in result.triplets]
    assert len(keys) == len(set(keys))
    again = generate_triplets(cfg, tmp_path / "out", progress=False)
    assert [t.to_dict() for t in again.triplets] == [t.to_dict() for t in result.triplets]
    other = generate_triplets(dataclasses.replace(cfg, seed=4), tmp_path / "out", progress=False)
    assert [t.to_dict() for t in other.triplets] != [t.to_dict() for t in result.triplets]
    capped = generate_triplets(dataclasses.replace(cfg, max_triplets=4), tmp_path / "out", progress=False)
    assert len(capped.triplets) == 4 and capped.dropped_by_max == len(result.triplets) - 4
    strip = lambda t: dataclasses.replace(t, id=None)  # noqa: E731  (ids are numbered after the cap)
    full = [strip(t) for t in result.triplets]
    kept = [full.index(strip(t)) for t in capped.triplets]
    assert kept == sorted(kept)  # a subset, in the original order
    with pytest.raises(KeyError, match="unknown triplet generation mode 'nope'"):
        generate_triplets(TripletGenConfig(captions=str(captions), modes=("nope",)), tmp_path / "out")
    with pytest.raises(ValueError, match="needs image embeddings"):
        generate_triplets(TripletGenConfig(captions=str(captions), modes=("similarity-pair",)), tmp_path / "out")
    with pytest.raises(ValueError, match="nothing to generate"):
        generate_triplets(TripletGenConfig(), tmp_path / "out")


def test_shapes_mode_exports_training_family(tmp_path):
    shapes = pytest.importorskip("zscir.shapes")
    cfg = TripletGenConfig(shapes=12, seed=1, shapes_image_size=32, long_tail=True)
    result = gen.make_triplets(cfg, tmp_path / "out", progress=False)
    ts = load_triplets(tmp_path / "out" / "triplets.jsonl")
    assert len(ts) == 12 == sum(result.counts["shapes"].values())
    assert {t.kind for t in ts} <= set(shapes.ALL_KINDS)
    assert all(t.id.startswith("shapes-") for t in ts)
    edits = shapes.ShapesWorld(seed=1, image_size=32).make_triplets(12, family="train", kind_weights=shapes.LONG_TAIL_WEIGHTS)
    assert [t.modification for t in ts] == [e.texts["train"] for e in edits]
    assert ts.open_image(ts[0].reference).size == (32, 32)


# ------------------------------------------------------------------------- CLI
def _run_cli(argv) -> int:
    parser = argparse.ArgumentParser()
    triplets_cli.add_arguments(parser)
    return triplets_cli.run(parser.parse_args(argv))


def test_cli_end_to_end_with_all_caption_modes(tmp_path, capsys, monkeypatch):
    captions = _corpus_files(tmp_path / "corpus")
    from safetensors.torch import save_file

    save_file({"embeddings": torch.randn(len(CAPTIONS), 8, generator=torch.Generator().manual_seed(0))},
              str(tmp_path / "emb.safetensors"))
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "fake_llm.py").write_text(
        "def edit(caption):\n"
        "    return ('make it wooden', caption + ' made of wood') if 'car' in caption else None\n"
    )
    monkeypatch.syspath_prepend(str(plugin))
    argv = ["--out", str(tmp_path / "out"), "--captions", str(captions), "--embeddings", str(tmp_path / "emb.safetensors"),
            "--window", "1", "4", "--text-editor", "fake_llm:edit", "--seed", "5", "--no-progress"]
    assert _run_cli(argv) == 0
    printed = capsys.readouterr().out
    for mode in ("caption-edit", "caption-pair", "similarity-pair", "llm-edit"):
        assert mode in printed
    out_file = tmp_path / "out" / "triplets.jsonl"
    ts = load_triplets(out_file)  # relative paths resolve from the output folder without an image root
    report = json.loads((tmp_path / "out" / "make_triplets.json").read_text())
    assert report["total"] == len(ts)
    assert report["counts"]["llm-edit"] == {"llm": 3}
    assert sum(report["counts"]["similarity-pair"].values()) == len(CAPTIONS)
    modes = Counter(t.id.rsplit("-", 1)[0] for t in ts)
    assert {m: n for m, n in modes.items()} == {m: sum(c.values()) for m, c in report["counts"].items()}
    first = out_file.read_bytes()
    assert _run_cli(argv) == 0 and out_file.read_bytes() == first  # same seed, same file
    assert _run_cli(argv[:-3] + ["--seed", "6", "--no-progress"]) == 0 and out_file.read_bytes() != first
    with pytest.raises(ValueError, match="module:function"):
        _run_cli(["--out", str(tmp_path / "o2"), "--captions", str(captions), "--text-editor", "fake_llm"])
