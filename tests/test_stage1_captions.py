"""Stage I with captions: readers and their bad input, the caption objectives, concept mining, the CLI, learning."""
import json
import logging

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from zscir.checkpoint import load_tensors
from zscir.cli import main
from zscir.data.captions import (CaptionReport, captions_from_column, mine_concepts, read_caption_file,
                                 read_caption_file_images)
from zscir.data.sources import DataSourceError, open_images
from zscir.losses import caption_targets, soft_cross_entropy, text_alignment
from zscir.train.features import CaptionFeatures, caption_features
from zscir.train.stage1 import CAPTION_DEFAULTS, STAGE1_LOSSES, STAGE1_TARGETS, Stage1Config

COLORS = [(220, 30, 30), (30, 200, 60), (40, 80, 240), (240, 220, 40)]
NAMES = ["red", "green", "blue", "yellow"]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


@pytest.fixture
def folder(tmp_path):
    """images/<i>.png in four colours (12 images) and a caption file with good and bad rows."""
    (tmp_path / "images" / "sub").mkdir(parents=True)
    for i in range(12):
        Image.new("RGB", (16, 16), COLORS[i % 4]).save(tmp_path / "images" / "sub" / f"{i}.png")
    rows = [{"image": f"sub/{i}.png", "caption": f"a {NAMES[i % 4]} square"} for i in range(10)]
    rows += [
        {"image": "sub/0.png", "captions": ["a red thing", "a red square", "  "]},  # several, one repeated, one empty
        {"image": "sub/missing.png", "caption": "nothing"},  # not in the corpus
        {"caption": "no image"},
        {"image": "sub/1.png", "caption": ""},
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path


# ------------------------------------------------------------------------------------------------ readers
def test_a_caption_file_lines_up_with_a_folder_and_counts_every_bad_row(folder):
    images = open_images(folder / "images")
    caps = read_caption_file(folder / "captions.jsonl", images.ids, base=images.base)
    by_id = dict(zip(images.ids, caps.captions))
    assert by_id["sub/0.png"] == ["a red square", "a red thing"]  # repeats dropped, order kept
    assert by_id["sub/5.png"] == ["a green square"]
    assert by_id["sub/10.png"] == [] and by_id["sub/11.png"] == []
    r = caps.report
    assert (r.captions, r.images_with_captions, r.images_without_captions) == (11, 10, 2)
    assert (r.empty, r.unknown_image, r.no_image) == (2, 1, 1)
    assert r.examples["unknown_image"] == [f"{folder / 'captions.jsonl'}:12"]
    text = "; ".join(r.problems())
    for part in ("2 empty caption(s)", "1 caption(s) of images not in the corpus", "2 image(s) without a caption",
                 "captions.jsonl:13"):
        assert part in text, part


def test_caption_paths_may_be_relative_to_the_caption_file_or_absolute(folder):
    images = open_images(folder / "images")
    lines = [json.dumps({"image": "images/sub/3.png", "caption": "relative to the file"}),
             json.dumps({"image": str(folder / "images" / "sub" / "4.png"), "caption": "absolute"})]
    (folder / "c2.jsonl").write_text("\n".join(lines))
    caps = dict(zip(images.ids, read_caption_file(folder / "c2.jsonl", images.ids, base=images.base).captions))
    assert caps["sub/3.png"] == ["relative to the file"] and caps["sub/4.png"] == ["absolute"]


def test_a_csv_with_mapped_columns_and_a_missing_column_error(folder):
    images = open_images(folder / "images")
    (folder / "c.csv").write_text("path,text\nsub/2.png,a blue square\nsub/2.png,blue\n")
    caps = read_caption_file(folder / "c.csv", images.ids, base=images.base, columns="image=path,caption=text")
    assert dict(zip(images.ids, caps.captions))["sub/2.png"] == ["a blue square", "blue"]
    with pytest.raises(DataSourceError, match=r"c\.csv: no 'caption' column \(columns: path, text\).*caption=COLUMN"):
        read_caption_file(folder / "c.csv", images.ids, base=images.base, columns="image=path")
    (folder / "none.jsonl").write_text(json.dumps({"image": "elsewhere.png", "caption": "x"}) + "\n")
    with pytest.raises(DataSourceError, match="no caption matches an image of the corpus"):
        read_caption_file(folder / "none.jsonl", images.ids, base=images.base)


def test_a_caption_file_alone_names_its_images(folder):
    ids, paths, caps = read_caption_file_images(folder / "captions.jsonl", image_root=folder / "images")
    assert ids[:2] == ["sub/0.png", "sub/1.png"] and "sub/missing.png" in ids
    assert paths[0] == folder / "images" / "sub" / "0.png"
    assert caps.captions[0] == ["a red square", "a red thing"] and caps.captions[ids.index("sub/missing.png")] == ["nothing"]
    assert (caps.report.no_image, caps.report.empty) == (1, 2)


def test_a_dataset_caption_column_holds_strings_or_lists(folder):
    imgs = [Image.new("RGB", (8, 8), COLORS[i % 4]) for i in range(4)]
    lists = datasets.Dataset.from_dict({"pixels": imgs, "text": [["a red square", "red"], ["a green square", ""],
                                                                 [], ["", "a yellow square"]]})
    lists.cast_column("pixels", datasets.Image()).save_to_disk(str(folder / "lists"))
    data = open_images(folder / "lists", columns={"image": "pixels", "caption": "text"}, extra_fields=("caption",))
    caps = captions_from_column(data.extra["caption"], data.label, data.ids)
    assert caps.captions == [["a red square", "red"], ["a green square"], [], ["a yellow square"]]
    assert caps.report.empty == 2 and caps.report.images_without_captions == 1
    ds = datasets.Dataset.from_dict({"image": imgs, "caption": ["a red square", "", None, "yellow"]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(folder / "ds"))
    data = open_images(folder / "ds", extra_fields=("caption",))  # a column named like the field needs no mapping
    caps = captions_from_column(data.extra["caption"], data.label, data.ids)
    assert caps.captions == [["a red square"], [], [], ["yellow"]] and caps.report.empty == 2
    with pytest.raises(DataSourceError, match="has no column 'words'.*columns: pixels, text"):
        open_images(folder / "lists", columns={"image": "pixels", "caption": "words"}, extra_fields=("caption",))


# --------------------------------------------------------------------------------------------- concepts
def test_mined_concepts_are_frequent_content_phrases():
    texts = ["a red dress with long sleeves", "the red dress is short", "a blue dress", "red dress, no sleeves",
             "a photo of a red dress on a chair"] * 2
    concepts = mine_concepts(texts, top_k=10, min_count=3)
    assert concepts[0] == "dress" and "red dress" in concepts
    assert "red" not in concepts  # only ever seen as part of "red dress"
    assert "sleeves" in concepts  # 4 times, in two phrases
    assert not {"a", "the", "photo", "of"} & set(" ".join(concepts).split())
    assert "blue dress" not in concepts  # 2 times < min_count
    assert mine_concepts(texts, top_k=0) == []


# ----------------------------------------------------------------------------------------------- losses
def test_image_targets_reproduce_the_soft_contrastive_loss():
    torch.manual_seed(0)
    q, v = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    logits = 20 * q @ v.T
    p = F.softmax(v @ v.T / 0.05, dim=1)
    expected = 0.5 * (-(p * F.log_softmax(logits, 1)).sum(1).mean() - (p.T * F.log_softmax(logits.T, 1)).sum(1).mean())
    out = {"pseudo": q, "image": v}
    cfg = Stage1Config()
    assert torch.allclose(STAGE1_LOSSES.get("soft")(out, cfg, 20.0), expected, atol=1e-6)


def test_caption_targets_share_mass_between_images_one_caption_fits():
    v = F.normalize(torch.tensor([[1.0, 0, 0], [0.99, 0.14, 0], [0, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    c = F.normalize(torch.tensor([[1.0, 0.07, 0], [1.0, 0.07, 0], [0, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    has = torch.tensor([True, True, True, False])
    rows, cols = caption_targets(c, v, 0.05, has)
    assert torch.allclose(rows[:3].sum(1), torch.ones(3)) and rows[3].abs().sum() == 0
    assert rows[0, 1] > 0.3 and rows[0, 0] > 0.3  # the caption of 0 fits image 1 too: not pushed away
    assert rows[2, 2] > 0.99
    assert torch.allclose(cols.sum(1), torch.ones(4))
    assert cols[:, 3].abs().sum() == 0  # a captionless row is no column target
    assert torch.allclose(cols[:, :3], F.softmax(c[:3] @ v.T / 0.05, dim=0).T, atol=1e-6)
    rows0, cols0 = caption_targets(c, v, 0.05, torch.zeros(4, dtype=torch.bool))
    assert rows0.abs().sum() == 0 and cols0.abs().sum() == 0


def test_caption_and_mixed_targets_fall_back_to_image_targets_without_captions():
    torch.manual_seed(1)
    v, c = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    has = torch.tensor([True, False, True, True, False])
    out = {"image": v, "captions": c, "has_caption": has}
    cfg = Stage1Config(caption_mix=0.25)
    img_rows, img_cols = STAGE1_TARGETS.get("image")(out, cfg)
    cap_rows, cap_cols = STAGE1_TARGETS.get("caption")(out, cfg)
    assert torch.allclose(cap_rows[1], img_rows[1]) and not torch.allclose(cap_rows[0], img_rows[0])
    both_rows, both_cols = STAGE1_TARGETS.get("both")(out, cfg)
    assert torch.allclose(both_rows, 0.75 * img_rows + 0.25 * cap_rows)
    assert torch.allclose(both_cols, 0.75 * img_cols + 0.25 * cap_cols)
    for targets in (both_rows, both_cols, cap_rows, cap_cols):
        assert torch.allclose(targets.sum(1), torch.ones(5), atol=1e-5)
    none = {"image": v, "captions": c, "has_caption": torch.zeros(5, dtype=torch.bool)}
    rows, cols = STAGE1_TARGETS.get("caption")(none, cfg)
    assert torch.allclose(rows, img_rows) and torch.allclose(cols, img_cols)


def test_text_alignment_scores_pseudo_sentences_against_the_batch_captions():
    torch.manual_seed(2)
    q, c = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    has = torch.tensor([True, True, False, True])
    k = c[has]
    expected = -(F.softmax(k @ k.T / 0.01, 1) * F.log_softmax(10 * q[has] @ k.T, 1)).sum(1).mean()
    assert torch.allclose(text_alignment(q, c, 10.0, 0.01, has), expected)
    # pulling q onto its own caption lowers the term
    assert text_alignment(c, c, 10.0, 0.01, has) < text_alignment(q, c, 10.0, 0.01, has)
    assert text_alignment(q, c, 10.0, 0.01, torch.zeros(4, dtype=torch.bool)) == 0


def test_soft_cross_entropy_is_minimal_at_its_targets():
    p = F.softmax(torch.randn(4, 4), dim=1)
    at = soft_cross_entropy(torch.log(p), p, F.softmax(torch.log(p), dim=0).T)
    off = soft_cross_entropy(torch.zeros(4, 4), p, F.softmax(torch.log(p), dim=0).T)
    assert at < off


def test_caption_features_sample_only_their_own_captions():
    feats = F.normalize(torch.randn(5, 4), dim=-1)
    cf = CaptionFeatures(feats, torch.tensor([0, 2, 2, 5]), ["a", "b", "c", "d", "e"])
    assert cf.counts().tolist() == [2, 0, 3]
    seen = {0: set(), 2: set()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        out, has = cf.sample([0, 1, 2], gen)
        assert has.tolist() == [True, False, True] and out[1].abs().sum() == 0
        for row in (0, 2):
            seen[row].add(int(torch.nonzero((feats == out[row]).all(1)).item()))
    assert seen == {0: {0, 1}, 2: {2, 3, 4}}
    a = cf.sample([2, 0, 2], torch.Generator().manual_seed(7))[0]
    assert torch.equal(a, cf.sample([2, 0, 2], torch.Generator().manual_seed(7))[0])  # resumable draws
    means = cf.means()
    assert torch.allclose(means[0], F.normalize(feats[:2].mean(0), dim=0)) and means[1].abs().sum() == 0
    with pytest.raises(ValueError, match="offsets end at 4"):
        CaptionFeatures(feats, torch.tensor([0, 4]), ["a"] * 5)


def test_caption_features_encode_each_text_once_and_count_truncated_ones():
    from zscir.models.backbone import load_backbone

    torch.manual_seed(0)
    bb = load_backbone("zscir-micro")
    long = " ".join(["word"] * 200)
    report = CaptionReport()
    cf = caption_features(bb, [["a red square", long], [], ["a red square"]], report=report)
    assert cf.offsets.tolist() == [0, 2, 2, 3] and len(cf.texts) == 3
    assert torch.equal(cf.features[0], cf.features[2])
    assert torch.allclose(cf.features.norm(dim=1), torch.ones(3))
    expected = bb.encode_text(["a red square"], normalize=True)[0]
    assert torch.allclose(cf.features[0], expected, atol=1e-5)
    assert report.truncated == 1 and "truncated" in report.problems()[0]


# -------------------------------------------------------------------------------------------------- CLI
def _train(*extra):
    return ["train-stage1", "--backbone", "zscir-micro", "--random-init", "--steps", "3", "--batch-size", "4",
            "--num-tokens", "1", "--no-progress", "--device", "cpu", "--save-every", "1", *extra]


def test_cli_trains_on_a_folder_with_a_caption_file_and_reports_bad_rows(folder, caplog):
    out = folder / "run"
    with caplog.at_level(logging.INFO, logger="zscir"):
        assert main(_train("--images", str(folder / "images"), "--captions", str(folder / "captions.jsonl"),
                           "--out", str(out))) == 0
    assert "11 caption(s) for 10 image(s)" in caplog.text
    assert "2 empty caption(s) dropped" in caplog.text and "1 caption(s) of images not in the corpus" in caplog.text
    assert "concepts: mined" in caplog.text
    run = json.loads((out / "run.json").read_text())["settings"]
    assert run["data"]["captions"]["count"] == 11
    assert {k: run["config"][k] for k in ("targets", "caption_pooling", "text_weight")} == {
        k: CAPTION_DEFAULTS[k] for k in ("targets", "caption_pooling", "text_weight")}
    assert "12 captioned images" in (out / "model" / "README.md").read_text()


def test_cli_caption_targets_resume_exactly(folder):
    base = ["--images", str(folder / "images"), "--captions", str(folder / "captions.jsonl"), "--targets",
            "caption", "--text-weight", "0.5", "--concepts", "shipped", "--concept-weight", "0"]
    assert main(_train(*base, "--caption-pooling", "mean", "--out", str(folder / "mean"))) == 0
    run = json.loads((folder / "mean" / "run.json").read_text())["settings"]
    assert run["config"]["caption_pooling"] == "mean"
    assert main(_train(*base, "--out", str(folder / "straight"), "--steps", "6")) == 0
    assert main(_train(*base, "--out", str(folder / "split"), "--steps", "3")) == 0
    assert main(_train(*base, "--out", str(folder / "split"), "--steps", "6", "--resume")) == 0
    a, b = (load_tensors(folder / name / "model" / "model.safetensors") for name in ("straight", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_reads_images_and_captions_from_the_caption_file_or_a_dataset(folder):
    assert main(_train("--captions", str(folder / "captions.jsonl"), "--image-root", str(folder / "images"),
                       "--out", str(folder / "alone"))) == 0
    run = json.loads((folder / "alone" / "run.json").read_text())["settings"]
    assert run["data"]["images"] == 11 and run["data"]["captions"]["count"] == 12  # missing.png: named, then skipped
    imgs = [Image.new("RGB", (8, 8), COLORS[i % 4]) for i in range(8)]
    ds = datasets.Dataset.from_dict({"pixels": imgs, "text": [f"a {NAMES[i % 4]} square" for i in range(8)]})
    ds.cast_column("pixels", datasets.Image()).save_to_disk(str(folder / "ds"))
    assert main(_train("--images", str(folder / "ds"), "--columns", "image=pixels,caption=text", "--out",
                       str(folder / "hf"))) == 0
    run = json.loads((folder / "hf" / "run.json").read_text())["settings"]
    assert run["data"]["captions"]["count"] == 8
    # without the mapping the text column is not a caption: an image-only run
    assert main(_train("--images", str(folder / "ds"), "--columns", "image=pixels", "--out",
                       str(folder / "plain"))) == 0
    run = json.loads((folder / "plain" / "run.json").read_text())["settings"]
    assert "captions" not in run["data"] and run["config"]["targets"] == "image"


def test_cli_bad_caption_input_is_one_clear_error(folder, capsys):
    ds = datasets.Dataset.from_dict({"pixels": [Image.new("RGB", (8, 8))] * 2, "text": ["a", "b"]})
    ds.cast_column("pixels", datasets.Image()).save_to_disk(str(folder / "ds"))
    cases = [
        (["--images", str(folder / "ds"), "--columns", "image=pixels,caption=words"], "has no column 'words'"),
        (["--images", str(folder / "images"), "--targets", "caption"], "read captions, but these images have none"),
        (["--images", str(folder / "images"), "--concepts", "mined"], "--concepts mined needs captions"),
        (["--images", str(folder / "images"), "--columns", "caption=text"], "--captions FILE"),
        (["--shapes", "8", "--captions", str(folder / "captions.jsonl")], "--shapes-captions"),
        ([], "needs images"),
    ]
    for extra, message in cases:
        assert main(_train(*extra, "--out", str(folder / "bad"))) == 1, extra
        assert message in capsys.readouterr().err, extra


def test_cli_shapes_captions(tmp_path):
    out = tmp_path / "s"
    assert main(_train("--shapes", "16", "--shapes-captions", "2", "--out", str(out))) == 0
    run = json.loads((out / "run.json").read_text())["settings"]
    assert run["data"]["shapes_captions"] == 2 and run["config"]["targets"] == CAPTION_DEFAULTS["targets"]


# --------------------------------------------------------------------------------------------- learning
def test_stage1_with_caption_targets_learns_inversion(tiny_clip_dir, world):
    """Caption soft targets (and the text term) train phi: "a photo of $" finds its own held-out image."""
    from zscir.composer import Composer
    from zscir.eval.shapes_eval import inversion_recall
    from zscir.models.phi import PhiConfig
    from zscir.train.engine import TrainConfig
    from zscir.train.features import shapes_features
    from zscir.train.stage1 import train_stage1

    torch.manual_seed(0)
    composer = Composer.from_clip(str(tiny_clip_dir), phi=PhiConfig(num_tokens=2, vsi_layers=1))
    before = inversion_recall(composer, composer.backbone, world, n_images=300, stream="inv-test")
    scenes = world.scenes(3000, stream="stage1-test")
    feats = shapes_features(composer, scenes, 64)
    caps = caption_features(composer.backbone, world.captions_of(scenes, 2))
    cfg = Stage1Config(phi=composer.phi.config, targets="caption", text_weight=0.5, concept_weight=0.0,
                       train=TrainConfig(steps=120, batch_size=64, lr=1e-3, warmup_steps=10, log_every=10))
    composer, result = train_stage1(composer, feats, cfg, captions=caps, progress=False)
    after = inversion_recall(composer, composer.backbone, world, n_images=300, stream="inv-test")
    text = [h["text"] for h in result.history]
    print("inversion R@1", before["R@1"], "->", after["R@1"], "text term", text[0], "->", text[-1])
    assert np.mean(text[-3:]) < 0.8 * np.mean(text[:2]), text
    assert after["R@1"] > before["R@1"] + 15, (before, after)


def test_cli_columns_name_the_caption_files_fields_next_to_a_folder(folder):
    (folder / "c.csv").write_text("path,text\n" + "".join(f"sub/{i}.png,a {NAMES[i % 4]} square\n" for i in range(12)))
    assert main(_train("--images", str(folder / "images"), "--captions", str(folder / "c.csv"), "--columns",
                       "image=path,caption=text", "--out", str(folder / "csv"))) == 0
    run = json.loads((folder / "csv" / "run.json").read_text())["settings"]
    assert run["data"]["captions"]["count"] == 12
