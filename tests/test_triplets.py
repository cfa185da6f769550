"""Triplet sets: JSONL / CSV / Hugging Face loading, validation, truncation, corruption and writing."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zscir.data.triplets import (
    MEMORY_PREFIX,
    TRIPLET_FORMATS,
    Triplet,
    TripletFileError,
    TripletSet,
    count_tokens,
    load_triplets,
)

COLORS = [(200, 30, 40), (30, 200, 40), (40, 30, 200), (220, 220, 20)]


def _images(folder: Path, n: int = 4) -> list:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"images/{i}.png"
        Image.new("RGB", (8, 8), COLORS[i % len(COLORS)]).save(folder / name)
        names.append(name)
    return names


def _write_jsonl(path: Path, rows) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    _images(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def tokenizer():
    open_clip = pytest.importorskip("open_clip")
    return open_clip.get_tokenizer("ViT-B-32")


# ------------------------------------------------------------------------ JSONL
def test_jsonl_loads_rows_with_line_numbers_and_targets(folder):
    path = _write_jsonl(folder / "t.jsonl", [
        {"reference": "images/0.png", "modification": "make it green", "target": "images/1.png", "kind": "color"},
        "",  # blank lines are skipped but still counted
        {"reference": "images/2.png", "modification": "a blue one", "target_caption": "a blue square", "id": 7},
        {"reference": "images/3.png", "modification": "both", "target": "images/0.png", "target_caption": "kept"},
    ])
    ts = load_triplets(path)
    assert len(ts) == 3
    assert [t.line for t in ts] == [1, 3, 4]
    assert ts[0] == Triplet("images/0.png", "make it green", "images/1.png", None, "color", 1, None)
    assert ts[1].id == "7" and ts[1].target is None and not ts[1].has_target_image
    # both given: the image is the training target and the caption is kept
    assert ts[2].has_target_image and ts[2].target_caption == "kept"
    assert ts.image_path("images/1.png") == folder / "images/1.png"
    assert ts.image_refs() == ["images/0.png", "images/1.png", "images/2.png", "images/3.png"]
    src = ts.image_source()
    assert len(src) == 4 and src.load(1).getpixel((0, 0)) == COLORS[1]
    assert isinstance(ts[1:], TripletSet) and len(ts[1:]) == 2


def test_all_bad_rows_reported_at_once_with_line_numbers(folder):
    path = _write_jsonl(folder / "bad.jsonl", [
        {"reference": "images/0.png", "modification": "fine", "target": "images/1.png"},  # 1 ok
        '{"reference": "images/0.png", "modification": ',  # 2 bad JSON
        {"reference": "images/0.png", "modification": "x", "target": "images/1.png", "caption": "no"},  # 3 unknown field
        {"reference": "images/0.png", "modification": "   ", "target": "images/1.png"},  # 4 blank text
        {"reference": "images/0.png", "modification": "no target"},  # 5 neither target
        {"reference": "images/missing.png", "modification": "x", "target": "images/1.png"},  # 6 missing image
        {"reference": "images/0.png", "modification": 3, "target": "images/1.png"},  # 7 wrong type
        {"modification": "x", "target": "images/1.png"},  # 8 no reference
        {"reference": "images/0.png", "modification": "x", "target": "images/gone.png"},  # 9 missing target
        "[1, 2]",  # 10 not an object
    ])
    with pytest.raises(TripletFileError) as info:
        load_triplets(path)
    msg = str(info.value)
    assert len(info.value.problems) == 9
    for line in range(2, 11):
        assert f"bad.jsonl:{line}:" in msg, line
    assert "bad.jsonl:1:" not in msg
    assert "unknown field(s) ['caption']" in msg and "allowed fields" in msg and "'target_caption'" in msg
    assert "missing.png" in msg and "gone.png" in msg
    assert "neither 'target' nor 'target_caption'" in msg
    assert "whitespace only" in msg


def test_error_list_is_capped_with_a_count(folder):
    rows = [{"reference": f"images/nope{i}.png", "modification": "x", "target": "images/1.png"} for i in range(60)]
    with pytest.raises(TripletFileError) as info:
        load_triplets(_write_jsonl(folder / "many.jsonl", rows))
    assert len(info.value.problems) == 60
    assert "... and 10 more problem(s)" in str(info.value)
    assert "nope49.png" in str(info.value) and "nope50.png" not in str(info.value)


def test_image_root_and_check_images(tmp_path):
    images = tmp_path / "elsewhere"
    _images(images)
    path = _write_jsonl(tmp_path / "t.jsonl", [{"reference": "images/0.png", "modification": "m", "target": "images/1.png"}])
    with pytest.raises(TripletFileError, match="reference image not found"):
        load_triplets(path)
    ts = load_triplets(path, image_root=images)
    assert ts.image_path(ts[0].reference) == images / "images/0.png"
    assert len(load_triplets(path, check_images=False)) == 1


def test_json_array_and_duplicate_ids(folder):
    path = folder / "t.json"
    path.write_text(json.dumps([
        {"id": "a", "reference": "images/0.png", "modification": "m", "target": "images/1.png"},
        {"id": "a", "reference": "images/1.png", "modification": "m", "target": "images/2.png"},
    ]))
    with pytest.raises(TripletFileError, match="item 2: duplicate id 'a'"):
        load_triplets(path)


def test_unknown_suffix_and_empty_file(folder):
    with pytest.raises(ValueError, match="cannot tell the triplet format"):
        load_triplets(folder / "t.tsv")
    (folder / "empty.jsonl").write_text("\n\n")
    with pytest.raises(TripletFileError, match="no triplets"):
        load_triplets(folder / "empty.jsonl")
    assert set(TRIPLET_FORMATS.names()) == {"csv", "hf", "jsonl"}


def test_invalid_utf8_names_the_line(folder):
    (folder / "t.jsonl").write_bytes(b'{"reference": "images/0.png", "modification": "m", "target": "images/1.png"}\n\xff\xfe\n')
    with pytest.raises(TripletFileError, match=r"t.jsonl:2: not valid UTF-8"):
        load_triplets(folder / "t.jsonl")


# -------------------------------------------------------------------------- CSV
def test_csv_with_quoted_multiline_cell_and_empty_cells(folder):
    (folder / "t.csv").write_text(
        "reference,modification,target,target_caption,kind\n"
        'images/0.png,"make it\ngreen",images/1.png,,color\n'
        "images/2.png,a blue one,,a blue square,\n",
        encoding="utf-8",
    )
    ts = load_triplets(folder / "t.csv")
    assert [t.line for t in ts] == [2, 4]
    assert ts[0].modification == "make it\ngreen" and ts[0].target_caption is None and ts[0].kind == "color"
    assert ts[1].target is None and ts[1].target_caption == "a blue square" and ts[1].kind is None


def test_csv_wrong_columns_and_bad_rows(folder):
    (folder / "cols.csv").write_text("reference,text,target\nimages/0.png,x,images/1.png\n")
    with pytest.raises(TripletFileError) as info:
        load_triplets(folder / "cols.csv")
    msg = str(info.value)
    assert "unknown column(s) ['text']" in msg and "missing required column(s) ['modification']" in msg
    (folder / "rows.csv").write_text(
        "reference,modification,target\n"
        "images/0.png,ok,images/1.png\n"
        "images/0.png,too,many,cells\n"
        "images/0.png,,images/1.png\n"
    )
    with pytest.raises(TripletFileError) as info:
        load_triplets(folder / "rows.csv")
    msg = str(info.value)
    assert "rows.csv:3: 4 cell(s) but the header has 3" in msg
    assert "rows.csv:4: field 'modification' is empty" in msg
    assert len(info.value.problems) == 2


# ------------------------------------------------------------------ Hugging Face
def test_hf_dataset_with_paths_and_saved_folder(folder):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({
        "reference": ["images/0.png", "images/1.png"],
        "modification": ["make it green", "make it blue"],
        "target": ["images/1.png", "images/2.png"],
    })
    ts = TripletSet.from_hf(ds, image_root=folder)
    assert [t.line for t in ts] == [1, 2] and ts[1].target == "images/2.png"
    saved = folder / "saved"
    datasets.DatasetDict({"train": ds}).save_to_disk(str(saved))
    again = load_triplets(saved, image_root=folder)
    assert [t.modification for t in again] == ["make it green", "make it blue"]
    with pytest.raises(ValueError, match="has no split 'val'; its splits: train; pass --split"):
        load_triplets(saved, image_root=folder, split="val")
    with pytest.raises(TripletFileError, match="row 2: reference image not found"):
        TripletSet.from_hf(ds.map(lambda r, i: {"reference": r["reference"] if i == 0 else "x.png"}, with_indices=True),
                           image_root=folder)


def test_hf_dataset_with_pil_images_kept_in_memory(tmp_path):
    datasets = pytest.importorskip("datasets")
    red, green = Image.new("RGB", (6, 6), COLORS[0]), Image.new("RGB", (6, 6), COLORS[1])
    ds = datasets.Dataset.from_dict({
        "reference": [red, red, green],
        "modification": ["make it green", "green please", "make it red"],
        "target": [green, green, red],
    })
    ts = TripletSet.from_hf(ds)
    assert ts[0].reference.startswith(MEMORY_PREFIX)
    assert ts[0].reference == ts[1].reference == ts[2].target  # identical images share one content id
    assert ts[0].reference != ts[0].target
    assert ts.open_image(ts[0].target).getpixel((0, 0)) == COLORS[1]
    with pytest.raises(ValueError, match="held in memory"):
        ts.image_path(ts[0].reference)
    # writing saves the in-memory images as PNG files the JSONL points to
    out = ts.to_jsonl(tmp_path / "out" / "t.jsonl")
    back = load_triplets(out)
    assert back.open_image(back[2].reference).getpixel((0, 0)) == COLORS[1]
    assert back[0].reference == back[1].reference


def test_hf_unknown_column_is_named():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"reference": ["a"], "modification": ["b"], "target": ["c"], "score": [1.0]})
    with pytest.raises(TripletFileError, match=r"unknown column\(s\) \['score'\]"):
        TripletSet.from_hf(ds, check_images=False)


# ------------------------------------------------------------ token truncation
def test_count_tokens_matches_open_clip(tokenizer):
    ids = tokenizer(["a red car"])[0].tolist()
    assert count_tokens(tokenizer, ["a red car"], 70) == [ids.index(49407) + 1] == [5]
    long = " ".join(["word"] * 100)
    assert count_tokens(tokenizer, [long], 20) == [21]  # over the limit: limit + 1


def test_truncate_to_context_cuts_by_words_with_one_warning(folder, tokenizer, caplog):
    long_mod = " ".join(f"word{i}" for i in range(120))
    long_cap = " ".join(["a large blue square"] * 30)
    ts = TripletSet([
        Triplet("images/0.png", "make it green", "images/1.png", line=1),
        Triplet("images/0.png", long_mod, None, target_caption=long_cap, line=2),
        Triplet("images/0.png", "x" * 400, "images/1.png", line=3),  # one giant word: cut by characters
    ], root=folder)
    with caplog.at_level(logging.WARNING, logger="zscir.data.triplets"):
        out = ts.truncate_to_context(tokenizer, context_length=77, prompt_overhead=10, caption_overhead=4)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "truncated 3 over-long text(s) in 2 triplet(s)" in warnings[0].getMessage()
    assert out.num_truncated == 3 and ts.num_truncated == 0
    assert out[0] == ts[0]
    for text, original, limit in [(out[1].modification, long_mod, 67), (out[1].target_caption, long_cap, 73)]:
        assert count_tokens(tokenizer, [text], limit)[0] <= limit
        words = original.split()
        k = len(text.split())
        assert words[:k] == text.split()  # a word prefix of the original ...
        assert count_tokens(tokenizer, [" ".join(words[: k + 1])], limit)[0] > limit  # ... and the longest that fits
    assert set(out[2].modification) == {"x"} and 0 < len(out[2].modification) < 400
    assert count_tokens(tokenizer, [out[2].modification], 67)[0] <= 67
    with pytest.raises(ValueError, match="leaves 2 token"):
        ts.truncate_to_context(tokenizer, context_length=12, prompt_overhead=10)


# ------------------------------------------------------------------- corruption
def test_corrupt_replaces_a_fraction_deterministically(folder):
    ts = TripletSet([Triplet("images/0.png", f"text {i}", "images/1.png", line=i + 1) for i in range(20)], root=folder)
    a, b, c = ts.corrupt(0.5, seed=1), ts.corrupt(0.5, seed=1), ts.corrupt(0.5, seed=2)
    changed = [i for i in range(20) if a[i].modification != ts[i].modification]
    assert len(changed) == 10 and tuple(changed) == a.corrupted
    assert [t.modification for t in a] == [t.modification for t in b]
    assert [t.modification for t in a] != [t.modification for t in c]
    originals = {t.modification for t in ts}
    for i in changed:
        assert a[i].modification in originals  # another triplet's text
        assert (a[i].reference, a[i].target, a[i].line) == (ts[i].reference, ts[i].target, ts[i].line)
    assert [t.modification for t in ts.corrupt(0.0, 3)] == [t.modification for t in ts]
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
        ts.corrupt(1.5, 0)
    same = TripletSet([Triplet("images/0.png", "same", "images/1.png")] * 3)
    with pytest.raises(ValueError, match="all modification texts are identical"):
        same.corrupt(0.5, 0)


# ---------------------------------------------------------------------- writing
def test_to_jsonl_round_trip_from_another_folder(folder):
    path = _write_jsonl(folder / "t.jsonl", [
        {"reference": "images/0.png", "modification": "make it green", "target": "images/1.png", "kind": "color"},
        {"reference": "images/2.png", "modification": "m", "target_caption": "c", "id": "x"},
    ])
    ts = load_triplets(path)
    out = ts.to_jsonl(folder / "sub" / "copy.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["reference"] == "../images/0.png" and "line" not in rows[0]
    back = load_triplets(out)
    assert [(t.modification, t.target_caption, t.kind, t.id) for t in back] == [
        (t.modification, t.target_caption, t.kind, t.id) for t in ts
    ]
    assert [back.image_path(t.reference).resolve() for t in back] == [ts.image_path(t.reference).resolve() for t in ts]
    assert np.array_equal(np.asarray(back.open_image(back[0].target)), np.asarray(ts.open_image(ts[0].target)))
