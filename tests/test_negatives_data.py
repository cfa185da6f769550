"""Explicit hard negatives as triplet data: parsing, cleaning, writing, generation and encoding."""
from __future__ import annotations

import csv
import json
import logging
import os
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from zscir.data.triplet_gen import (
    Lexicon,
    TripletGenConfig,
    caption_edit_triplets,
    caption_pair_triplets,
    generate_triplets,
    similarity_pair_triplets,
)
from zscir.data.triplets import MEMORY_PREFIX, Triplet, TripletFileError, TripletSet, load_triplets
from zscir.search import mid_zone_table

from test_triplet_gen import _corpus, _corpus_files, _run_cli, _word_diff  # shared helpers of the generation tests
from test_triplets import _write_jsonl

COLORS = [(200, 30, 40), (30, 200, 40), (40, 30, 200), (220, 220, 20), (20, 220, 220)]


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    for i, color in enumerate(COLORS):
        Image.new("RGB", (8, 8), color).save(tmp_path / "images" / f"{i}.png")
    return tmp_path


def _write_csv(path: Path, header, rows) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def lexicon() -> Lexicon:
    return Lexicon.load()


# ----------------------------------------------------------------------- formats
def test_jsonl_csv_and_hf_give_the_same_negatives(folder):
    expected = [("images/2.png", "images/3.png"), ("images/4.png",), ("a green car", "a pink car"), ()]
    jsonl = _write_jsonl(folder / "t.jsonl", [
        {"reference": "images/0.png", "modification": "m0", "target": "images/1.png", "negatives": ["images/2.png", "images/3.png"]},
        {"reference": "images/0.png", "modification": "m1", "target": "images/1.png", "negatives": "images/4.png"},
        {"reference": "images/0.png", "modification": "m2", "target_caption": "a red car", "negatives": ["a green car", "a pink car"]},
        {"reference": "images/0.png", "modification": "m3", "target": "images/1.png"},
    ])
    header = ["reference", "modification", "target", "target_caption", "negatives"]
    csv_file = _write_csv(folder / "t.csv", header, [
        ["images/0.png", "m0", "images/1.png", "", '["images/2.png", "images/3.png"]'],  # a JSON array
        ["images/0.png", "m1", "images/1.png", "", "images/4.png"],
        ["images/0.png", "m2", "", "a red car", "a green car | a pink car"],  # |-separated
        ["images/0.png", "m3", "images/1.png", "", ""],  # empty: none
    ])
    datasets = pytest.importorskip("datasets")
    hf_list = datasets.Dataset.from_dict({
        "reference": ["images/0.png"] * 4, "modification": ["m0", "m1", "m2", "m3"],
        "target": ["images/1.png", "images/1.png", None, "images/1.png"], "target_caption": [None, None, "a red car", None],
        "negatives": [["images/2.png", "images/3.png"], ["images/4.png"], ["a green car", "a pink car"], []],
    })
    hf_str = datasets.Dataset.from_dict({"reference": ["images/0.png"] * 2, "modification": ["m1", "m3"],
                                         "target": ["images/1.png"] * 2, "negatives": ["images/4.png", ""]})
    for ts in (load_triplets(jsonl), load_triplets(csv_file), TripletSet.from_hf(hf_list, image_root=folder)):
        assert [t.negatives for t in ts] == expected
        assert ts.negative_problems == []
        # feature caches cover the image negatives, not the caption ones
        assert ts.image_refs() == ["images/0.png", "images/1.png", "images/2.png", "images/3.png", "images/4.png"]
    assert [t.negatives for t in TripletSet.from_hf(hf_str, image_root=folder)] == [("images/4.png",), ()]


def test_negatives_field_of_the_wrong_type_is_a_row_error(folder):
    path = _write_jsonl(folder / "t.jsonl", [
        {"reference": "images/0.png", "modification": "m", "target": "images/1.png", "negatives": {"a": 1}},
        {"reference": "images/0.png", "modification": "m", "target": "images/1.png", "negatives": ["images/2.png", 3]},
    ])
    with pytest.raises(TripletFileError) as info:
        load_triplets(path)
    assert "t.jsonl:1: field 'negatives' must be a list of strings or a string, got dict" in str(info.value)
    assert "t.jsonl:2: field 'negatives' item 2 must be a string, got int" in str(info.value)
    bad_csv = _write_csv(folder / "t.csv", ["reference", "modification", "target", "negatives"],
                         [["images/0.png", "m", "images/1.png", '["images/2.png", '], ["images/0.png", "m", "images/1.png", "[1]"]])
    with pytest.raises(TripletFileError) as info:
        load_triplets(bad_csv)
    assert "t.csv:2: field 'negatives' is not a valid JSON array" in str(info.value)
    assert "t.csv:3: field 'negatives' item 1 must be a string, got int" in str(info.value)


def test_hf_image_list_negatives_are_kept_in_memory(tmp_path):
    datasets = pytest.importorskip("datasets")
    red, green, blue, gold = (Image.new("RGB", (6, 6), c) for c in COLORS[:4])
    ds = datasets.Dataset.from_dict(
        {"reference": [red], "modification": ["make it green"], "target": [green], "negatives": [[blue, gold]]},
        features=datasets.Features({"reference": datasets.Image(), "modification": datasets.Value("string"),
                                    "target": datasets.Image(), "negatives": datasets.List(datasets.Image())}),
    )
    ts = TripletSet.from_hf(ds)
    negs = ts[0].negatives
    assert len(negs) == 2 and all(n.startswith(MEMORY_PREFIX) for n in negs)
    assert ts.open_image(negs[1]).getpixel((0, 0)) == COLORS[3]
    back = load_triplets(ts.to_jsonl(tmp_path / "out" / "t.jsonl"))  # in-memory negatives saved as PNG files
    assert [back.open_image(n).getpixel((0, 0)) for n in back[0].negatives] == [COLORS[2], COLORS[3]]


# ------------------------------------------------------------------------ writing
def test_to_jsonl_round_trips_negatives(folder):
    path = _write_jsonl(folder / "t.jsonl", [
        {"reference": "images/0.png", "modification": "m0", "target": "images/1.png",
         "negatives": ["images/2.png", str(folder / "images" / "3.png")]},
        {"reference": "images/0.png", "modification": "m1", "target_caption": "a red car", "negatives": ["a blue car"]},
        {"reference": "images/0.png", "modification": "m2", "target": "images/1.png"},
    ])
    ts = load_triplets(path)
    out = ts.to_jsonl(folder / "sub" / "copy.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["negatives"] == ["../images/2.png", "../images/3.png"]  # placed like reference/target
    assert rows[1]["negatives"] == ["a blue car"] and "negatives" not in rows[2]
    back = load_triplets(out)
    assert [[back.image_path(n).resolve() for n in back[0].negatives]] == [[ts.image_path(n).resolve() for n in ts[0].negatives]]
    assert back[1].negatives == ("a blue car",) and back[2].negatives == ()


# ----------------------------------------------------------------------- cleaning
def test_bad_negatives_are_dropped_counted_and_listed(folder, caplog):
    path = _write_jsonl(folder / "t.jsonl", [
        {"reference": "images/0.png", "modification": "m0", "target": "images/1.png",
         "negatives": ["images/2.png", "images/9.png", "./images/1.png", "", "images/2.png", "images/3.png"]},
        {"reference": "images/0.png", "modification": "m1", "target_caption": "A red  car",
         "negatives": ["a red car", "a blue car", "A Blue car ", "   "]},
        {"reference": "images/0.png", "modification": "m2", "target": "images/1.png", "negatives": ["images/3.png"]},
    ])
    with caplog.at_level(logging.WARNING, logger="zscir.data.triplets"):
        ts = load_triplets(path)
    assert ts[0].negatives == ("images/2.png", "images/3.png")
    assert ts[1].negatives == ("a blue car",)
    assert ts[2].negatives == ("images/3.png",)
    listed = ts.negative_problems
    assert len(listed) == 7
    at1, at2 = f"{path}:1: ", f"{path}:2: "
    assert listed[0].startswith(at1) and "negative 2" in listed[0] and "image not found" in listed[0]
    assert listed[1].startswith(at1) and "negative 3" in listed[1] and "is the target" in listed[1]
    assert listed[2].startswith(at1) and "negative 4 is empty" in listed[2]
    assert listed[3].startswith(at1) and "negative 5" in listed[3] and "repeats negative 1" in listed[3]
    assert listed[4].startswith(at2) and "negative 1" in listed[4] and "is the target" in listed[4]
    assert listed[5].startswith(at2) and "negative 3" in listed[5] and "repeats negative 2" in listed[5]
    assert listed[6].startswith(at2) and "negative 4 is empty" in listed[6]
    warnings = [r for r in caplog.records if "negative" in r.getMessage()]
    assert len(warnings) == 1 and "dropped 7 unusable negative(s) in 2 triplet(s)" in warnings[0].getMessage()
    assert at1 in warnings[0].getMessage()
    # derived sets keep the listing; the strict checks of reference/target are unchanged
    assert ts[1:].negative_problems == listed
    _write_jsonl(path, [{"reference": "images/0.png", "modification": "m", "target": "images/9.png", "negatives": ["images/2.png"]}])
    with pytest.raises(TripletFileError, match="target image not found"):
        load_triplets(path)


def test_in_memory_set_checks_negatives_on_request(folder):
    ts = TripletSet([Triplet("images/0.png", "m", "images/1.png", negatives=["images/2.png", "mem:nothing"])], folder)
    assert ts[0].negatives == ("images/2.png", "mem:nothing")  # lists become tuples
    checked = ts.check_negatives()
    assert checked[0].negatives == ("images/2.png",)
    assert checked.negative_problems == ["<memory>:0: negative 2 'mem:nothing' names an in-memory image that this set does not hold"]


def test_negative_paths_follow_the_rules_of_reference_and_target(folder):
    # triplet files may name images outside their folder (absolute paths, ../ as to_jsonl writes them):
    # a negative is resolved and checked exactly like the target, no more and no less
    sub = folder / "sub"
    sub.mkdir()
    path = _write_jsonl(sub / "t.jsonl", [
        {"reference": "../images/0.png", "modification": "m", "target": "../images/1.png",
         "negatives": ["../images/2.png", "../../nowhere/3.png", str(folder / "images" / "4.png")]},
    ])
    ts = load_triplets(path)
    assert ts[0].negatives == ("../images/2.png", str(folder / "images" / "4.png"))
    assert ts.image_path(ts[0].negatives[0]) == sub / "../images/2.png"
    assert "negative 2 image not found" in ts.negative_problems[0]
    _write_jsonl(path, [{"reference": "../images/0.png", "modification": "m", "target": "../../nowhere/3.png"}])
    with pytest.raises(TripletFileError, match="target image not found"):
        load_triplets(path)


def test_truncation_covers_caption_negatives():
    class WordTokenizer:  # one token per word plus start and end
        eot_token_id = 2

        def __call__(self, texts, context_length):
            rows = []
            for text in texts:
                ids = [1] + [5] * len(text.split()) + [2]
                ids = ids[:context_length - 1] + [2] if len(ids) > context_length else ids
                rows.append(ids + [0] * (context_length - len(ids)))
            return torch.tensor(rows)

    long = "a red car " + "very " * 20
    ts = TripletSet([Triplet("r.png", "m", target_caption="a blue car", negatives=(long, "a green car"))])
    out = ts.truncate_to_context(WordTokenizer(), 8)
    assert out[0].negatives[0] == "a red car very very very" and out[0].negatives[1] == "a green car"
    assert out.num_truncated == 1


# --------------------------------------------------------------------- generation
def test_caption_edit_negatives_differ_from_the_target_in_the_edited_slot_only(lexicon):
    captions = ["a red car on a street", "A small dog in a park", "two cats on a wooden sofa"]
    plain = caption_edit_triplets(_corpus(captions), lexicon, random.Random(0), edits_per_caption=2)
    out = caption_edit_triplets(_corpus(captions), lexicon, random.Random(0), edits_per_caption=2,
                                negatives=3, negative_rng=random.Random(1))
    # the negatives come from their own stream: the triplets are the same with or without them
    assert [(t.modification, t.target_caption) for t in out] == [(t.modification, t.target_caption) for t in plain]
    assert all(t.negatives == () for t in plain)
    for t in out:
        old, new = _word_diff(captions[t.line - 1], t.target_caption)  # what the modification changes
        assert len(t.negatives) == 3 and len(set(t.negatives)) == 3
        for neg in t.negatives:
            replaced, other = _word_diff(t.target_caption, neg)
            # exactly the edited slot differs: the target's word is replaced by another word of its class
            assert replaced == new, (t.target_caption, neg)
            assert other not in (new, old)
            assert lexicon.class_of(other) == lexicon.class_of(new) == t.kind


def test_caption_pair_negatives_are_images_with_a_third_word_in_the_slot(lexicon):
    captions = ["a red car on a street", "a blue car on a street", "a green car on a street", "a pink car on a street",
                "a red car in the snow"]
    corpus = _corpus(captions)
    out = caption_pair_triplets(corpus, lexicon, random.Random(0), pairs_per_image=1, negatives=2,
                                negative_rng=random.Random(1))
    index = {corpus.image_path(f"img{i}.png"): i for i in range(len(captions))}
    assert out
    for t in out:
        i, j = index[t.reference], index[t.target]
        assert len(t.negatives) == 2
        for neg in t.negatives:
            k = index[neg]
            assert k not in (i, j, 4)
            assert captions[k].split()[1] not in (captions[i].split()[1], captions[j].split()[1])


def _arc(n: int) -> torch.Tensor:
    angles = torch.arange(n, dtype=torch.float32) * 0.02
    return torch.stack([angles.cos(), angles.sin(), torch.zeros(n)], 1)


def test_mid_zone_table_can_exclude_and_skip_the_fallback():
    emb = F.normalize(_arc(30), dim=-1)
    q, t = emb[[0]], emb[[10]]  # s(q, t) = cos(0.2)
    table, sizes = mid_zone_table(q, t, emb, -0.05, 0.05, pool=30, dup_threshold=0.995,
                                  exclude=torch.tensor([[0, 12]]), fallback=False)
    chosen = sorted(i for i in table[0].tolist() if i >= 0)
    delta = (emb @ q[0]) - (q[0] @ t[0])
    expected = [j for j in range(30) if -0.05 <= delta[j] <= 0.05 and float(t[0] @ emb[j]) < 0.995 and j not in (0, 12)]
    assert chosen == expected and int(sizes[0]) == len(expected) and 10 not in chosen
    empty, size = mid_zone_table(q, t, emb, 0.5, 0.6, pool=4, fallback=False)
    assert (empty == -1).all() and int(size[0]) == 0
    fallback, _ = mid_zone_table(q, t, emb, 0.5, 0.6, pool=4)  # DQE's default: the hardest easy negatives
    assert (fallback >= 0).all()


def test_similarity_pair_negatives_lie_in_the_band_and_skip_reference_target_and_duplicates(lexicon):
    n = 60
    emb = _arc(n) * 2.0  # scale must not matter
    emb[31] = emb[30] + torch.tensor([0.0, 0.0, 1e-3])  # a near duplicate of image 30
    corpus = _corpus([f"photo number {i}" for i in range(n)])
    out = similarity_pair_triplets(corpus, emb, lexicon, random.Random(0), window=(3, 12), pairs_per_image=1,
                                   negatives=4, negative_rng=random.Random(1), negative_band=(-0.05, 0.05))
    plain = similarity_pair_triplets(corpus, emb, lexicon, random.Random(0), window=(3, 12), pairs_per_image=1)
    assert [(t.reference, t.target) for t in out] == [(t.reference, t.target) for t in plain]
    feats = F.normalize(emb, dim=-1)
    index = {corpus.image_path(f"img{i}.png"): i for i in range(n)}
    made = 0
    for t in out:
        i, j = index[t.reference], index[t.target]
        assert len(t.negatives) <= 4 and len(set(t.negatives)) == len(t.negatives)
        for neg in t.negatives:
            k = index[neg]
            delta = float(feats[i] @ feats[k] - feats[i] @ feats[j])
            assert -0.05 <= delta <= 0.05
            assert k not in (i, j) and float(feats[j] @ feats[k]) < 0.995
        made += len(t.negatives)
    assert made > 2 * n  # the band is wide enough on this arc for most triplets
    with_30 = [t for t in out if index[t.target] == 30]
    assert with_30 and all(index[neg] != 31 for t in with_30 for neg in t.negatives)


def test_make_triplets_negatives_flag_and_summary(tmp_path, capsys):
    captions = _corpus_files(tmp_path / "corpus", ["a red car on a street", "a blue car on a street",
                                                   "a green car on a street", "two cats on a sofa"])
    argv = ["--out", str(tmp_path / "out"), "--captions", str(captions), "--no-progress", "--seed", "2"]
    assert _run_cli(argv + ["--negatives", "2"]) == 0
    printed = capsys.readouterr().out
    ts = load_triplets(tmp_path / "out" / "triplets.jsonl")
    made = sum(len(t.negatives) for t in ts)
    assert made > 0 and f"{made} negative(s)" in printed
    report = json.loads((tmp_path / "out" / "make_triplets.json").read_text())
    assert report["config"]["negatives"] == 2 and sum(report["negatives"].values()) == made
    for t in ts:
        assert len(t.negatives) <= 2
        if t.id.startswith("caption-edit"):
            assert all(not n.endswith(".png") for n in t.negatives)  # captions, like the targets
        else:
            assert all(os.path.isfile(ts.image_path(n)) for n in t.negatives)
    assert _run_cli(argv + ["--negatives", "0"]) == 0
    assert "0 negative(s)" in capsys.readouterr().out
    assert all(t.negatives == () for t in load_triplets(tmp_path / "out" / "triplets.jsonl"))
    with pytest.raises(ValueError, match="negatives must be >= 0"):
        generate_triplets(TripletGenConfig(captions=str(captions), negatives=-1), tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="negative_lo"):
        generate_triplets(TripletGenConfig(captions=str(captions), negative_lo=0.1, negative_hi=-0.1), tmp_path / "o",
                          progress=False)


def test_make_triplets_shapes_rows_list_existing_negative_images(tmp_path, capsys):
    pytest.importorskip("zscir.shapes")
    assert _run_cli(["--out", str(tmp_path / "out"), "--shapes", "6", "--negatives", "2", "--shapes-image-size", "32",
                     "--no-progress"]) == 0
    out_file = tmp_path / "out" / "triplets.jsonl"
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        assert 2 <= len(row["negatives"]) <= 3  # the reference, then up to 2 sibling edits
        assert row["negatives"][0] == row["reference"]
        assert all((tmp_path / "out" / n).is_file() for n in row["negatives"])
        assert row["target"] not in row["negatives"]
    assert f"{sum(len(r['negatives']) for r in rows)} negative(s)" in capsys.readouterr().out


# ----------------------------------------------------------------------- encoding
@pytest.fixture(scope="module")
def tiny_composer():
    from zscir.composer import Composer

    torch.manual_seed(0)
    return Composer.from_clip("zscir-tiny").eval()


def test_encode_triplets_gives_negatives_with_masks(folder, tiny_composer, caplog):
    from zscir.train.features import encode_triplets

    Image.open(folder / "images" / "1.png").save(folder / "images" / "1copy.png")  # a near duplicate of the target
    (folder / "images" / "broken.png").write_bytes(b"not an image")
    path = _write_jsonl(folder / "t.jsonl", [
        {"reference": "images/0.png", "modification": "m0", "target": "images/1.png",
         "negatives": ["images/2.png", "images/1copy.png", "images/broken.png"]},
        {"reference": "images/0.png", "modification": "m1", "target": "images/3.png", "negatives": ["images/4.png"]},
        {"reference": "images/0.png", "modification": "m2", "target_caption": "a red car", "negatives": ["a blue car", "a green car"]},
        {"reference": "images/0.png", "modification": "m3", "target": "images/2.png"},
    ])
    ts = load_triplets(path)
    with caplog.at_level(logging.WARNING, logger="zscir.train.features"):
        feats = encode_triplets(tiny_composer, ts, batch_size=2, progress=False)
    d = tiny_composer.backbone.embed_dim
    assert feats.negatives.shape == (4, 3, d) and feats.negative_valid.shape == (4, 3)
    assert feats.negative_valid.tolist() == [[True, False, False], [True, False, False], [True, True, False], [False] * 3]
    norms = feats.negatives.norm(dim=-1)
    assert torch.allclose(norms[feats.negative_valid], torch.ones(4), atol=1e-4)
    images = tiny_composer.encode_images([ts.open_image("images/2.png"), ts.open_image("images/4.png")]).float()
    assert torch.allclose(feats.negatives[0, 0], images[0], atol=1e-4)
    assert torch.allclose(feats.negatives[1, 0], images[1], atol=1e-4)
    texts = tiny_composer.encode_texts(["a blue car", "a green car"]).float()  # frozen text, like text targets
    assert torch.allclose(feats.negatives[2, :2], texts, atol=1e-4)
    # the copy of the target is kept as data but masked as a false negative
    assert float(feats.negatives[0, 1] @ feats.target[0]) > 0.995
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "broken.png" in messages and "1 negative image(s) could not be decoded" in messages
    assert "masked 1 near-duplicate negative(s)" in messages
    loose = encode_triplets(tiny_composer, ts, batch_size=2, progress=False, dup_threshold=1.01)
    assert loose.negative_valid[0].tolist() == [True, True, False]
    half = encode_triplets(tiny_composer, ts, batch_size=2, progress=False, precision="bf16")
    assert half.negatives.dtype == torch.float32 and half.negative_valid.tolist() == feats.negative_valid.tolist()
    assert torch.allclose(half.negatives.norm(dim=-1)[half.negative_valid], torch.ones(4), atol=1e-5)
    plain = encode_triplets(tiny_composer, ts[3:], progress=False)
    assert plain.negatives is None and plain.negative_valid is None
