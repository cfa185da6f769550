"""Data sources: one way to name images, triplets, captions and queries (files, folders, data sets, Hub ids)."""
import json

import datasets
import pytest
import torch
from PIL import Image

from fixtures_cir import PixelModel, make_generic
from hub_cache import offline_hf_home, put_in_hub_cache
from zscir import cli
from zscir.cli import eval as eval_cli
from zscir.data.sources import DataSourceError, load_dataset_source, open_images, parse_columns
from zscir.data.triplets import load_triplets

COLORS = [(220, 30, 30), (30, 200, 60), (40, 80, 240), (240, 220, 40)]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """datasets converts data files into its cache: a temporary one, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


@pytest.fixture
def folder(tmp_path):
    """Four coloured images under images/, and triplet rows over them in the data set's own column names."""
    (tmp_path / "images").mkdir()
    for i, c in enumerate(COLORS):
        Image.new("RGB", (8, 8), c).save(tmp_path / "images" / f"{i}.png")
    return tmp_path


ROWS = {"src": ["images/0.png", "images/1.png", "images/2.png"], "text": ["make it green", "make it blue", "yellow"],
        "tgt": ["images/1.png", "images/2.png", "images/3.png"], "score": [0.5, 0.7, 0.9]}
MAPPING = "reference=src,modification=text,target=tgt"


# -------------------------------------------------------------------------------------------- columns
def test_columns_parse_and_name_bad_input():
    assert parse_columns("reference=src, modification=text", ["reference", "modification"]) == \
        {"reference": "src", "modification": "text"}
    with pytest.raises(DataSourceError, match="expected FIELD=COLUMN pairs"):
        parse_columns("reference:src", ["reference"])
    with pytest.raises(DataSourceError, match="'caption' is not a field here; fields: reference, modification"):
        parse_columns("caption=x", ["reference", "modification"])
    with pytest.raises(DataSourceError, match="field 'reference' is mapped twice"):
        parse_columns("reference=a,reference=b", ["reference"])


# ------------------------------------------------------------------------------------------- triplets
def test_triplets_from_a_dataset_dict_folder_with_split_and_columns(folder):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(ROWS),
                               "validation": datasets.Dataset.from_dict({k: v[:1] for k, v in ROWS.items()})})
    dd.save_to_disk(str(folder / "ds"))
    columns = parse_columns(MAPPING, ["reference", "modification", "target"])
    ts = load_triplets(folder / "ds", image_root=folder, split="validation", columns=columns)
    assert [(t.reference, t.modification, t.target) for t in ts] == [("images/0.png", "make it green", "images/1.png")]
    assert len(load_triplets(folder / "ds", image_root=folder, columns=columns)) == 3  # default: train
    with pytest.raises(DataSourceError, match=r"has no split 'test'; its splits: train, validation; pass --split"):
        load_triplets(folder / "ds", image_root=folder, split="test", columns=columns)
    with pytest.raises(DataSourceError, match=r"has no column 'tgt2' \(mapped to 'target' by --columns\); its "
                                              r"columns: src, text, tgt, score"):
        load_triplets(folder / "ds", image_root=folder, columns=dict(columns, target="tgt2"))
    # without a mapping the data set's names must be zscir's (the extra column is named)
    with pytest.raises(ValueError, match=r"unknown column\(s\) \['src', 'text', 'tgt', 'score'\]"):
        load_triplets(folder / "ds", image_root=folder)


def test_triplets_from_parquet_jsonl_and_csv_share_one_column_mapping(folder):
    datasets.Dataset.from_dict(ROWS).to_parquet(str(folder / "t.parquet"))
    rows = [dict(zip(ROWS, values)) for values in zip(*ROWS.values())]
    (folder / "t.jsonl").write_text("".join(json.dumps({k: r[k] for k in ("src", "text", "tgt")}) + "\n" for r in rows))
    (folder / "t.csv").write_text("src,text,tgt\n" + "".join(f"{r['src']},{r['text']},{r['tgt']}\n" for r in rows))
    columns = parse_columns(MAPPING, ["reference", "modification", "target"])
    loaded = [load_triplets(folder / name, image_root=folder, columns=columns) for name in ("t.parquet", "t.jsonl",
                                                                                          "t.csv")]
    assert [[t.to_dict() for t in ts] for ts in loaded[1:]] == [[t.to_dict() for t in loaded[0]]] * 2
    with pytest.raises(ValueError, match=r"t.csv:1 \(header\): no column 'tgt2' \(mapped to 'target' by --columns\)"):
        load_triplets(folder / "t.csv", columns=dict(columns, target="tgt2"))
    with pytest.raises(ValueError, match=r"t.jsonl:1: no field 'source' \(mapped to 'reference' by --columns\)"):
        load_triplets(folder / "t.jsonl", columns=dict(columns, reference="source"))


def test_a_hub_dataset_id_loads_offline_from_the_hub_cache_or_says_how_to_get_it(folder, tmp_path, monkeypatch):
    hub = offline_hf_home(tmp_path / "hf", monkeypatch)
    datasets.Dataset.from_dict(ROWS).to_parquet(str(tmp_path / "train.parquet"))
    put_in_hub_cache(hub, "zscir-test/triplets", {"data/train-00000-of-00001.parquet": tmp_path / "train.parquet"},
                     repo_type="dataset")
    ts = load_triplets("zscir-test/triplets", image_root=folder,
                       columns=parse_columns(MAPPING, ["reference", "modification", "target"]))
    assert [t.target for t in ts] == ["images/1.png", "images/2.png", "images/3.png"]
    with pytest.raises(DataSourceError) as err:
        load_triplets("zscir-test/absent")
    text = str(err.value)
    assert "\n" not in text and "'zscir-test/absent' is not in the Hugging Face cache" in text
    assert "HF_HUB_OFFLINE" in text and "huggingface-cli download --repo-type dataset zscir-test/absent" in text


# --------------------------------------------------------------------------------------------- images
def test_images_from_a_folder_a_list_and_a_dataset_column(folder):
    from_folder = open_images(folder / "images")
    assert from_folder.ids == ["0.png", "1.png", "2.png", "3.png"] and from_folder.base == folder / "images"
    (folder / "list.txt").write_text("images/2.png\nimages/0.png\n")
    assert open_images(folder / "list.txt").ids == ["images/2.png", "images/0.png"]
    ds = datasets.Dataset.from_dict({"name": ["a", "b"], "img": [Image.new("RGB", (8, 8), c) for c in COLORS[:2]]})
    ds = ds.cast_column("img", datasets.Image())
    ds.save_to_disk(str(folder / "pics"))
    data = open_images(folder / "pics", columns={"image": "img", "id": "name"})
    assert data.ids == ["a", "b"] and data.base is None
    assert data.source.load(1).getpixel((0, 0)) == COLORS[1]
    paths = datasets.Dataset.from_dict({"image": ["images/3.png"]})
    paths.save_to_disk(str(folder / "paths"))
    assert open_images(folder / "paths", image_root=folder).source.load(0).getpixel((0, 0)) == COLORS[3]
    with pytest.raises(DataSourceError, match=r"has no 'image' column; its columns: name, img; map one with "
                                              r"--columns image=COLUMN"):
        open_images(folder / "pics")
    with pytest.raises(FileNotFoundError, match="images not found"):
        open_images(folder / "nothing")


def test_a_single_split_dataset_needs_no_split_and_a_multi_split_one_names_its_splits(folder):
    dd = datasets.DatasetDict({"a": datasets.Dataset.from_dict({"x": [1]}), "b": datasets.Dataset.from_dict({"x": [2]})})
    dd.save_to_disk(str(folder / "two"))
    with pytest.raises(DataSourceError, match=r"has splits a, b; choose one with --split"):
        load_dataset_source(folder / "two")
    assert load_dataset_source(folder / "two", "b")[0]["x"] == [2]
    datasets.DatasetDict({"only": datasets.Dataset.from_dict({"x": [3]})}).save_to_disk(str(folder / "one"))
    assert load_dataset_source(folder / "one")[0]["x"] == [3]


# ----------------------------------------------------------------------------------------- the commands
def test_eval_generic_reads_queries_from_a_dataset_with_mapped_columns(tmp_path, monkeypatch, capsys):
    fx = make_generic(tmp_path / "g")
    rows = [json.loads(line) for line in (tmp_path / "g" / "queries.jsonl").read_text().splitlines()]
    table = {"qid": [str(r["id"]) for r in rows], "ref": [r["reference"] for r in rows],
             "text": [r["modification"] for r in rows], "gt": [r["targets"] for r in rows],
             "kind": [r["kind"] for r in rows]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(table)}).save_to_disk(str(tmp_path / "ds"))
    monkeypatch.setattr(eval_cli, "load_model", lambda path, device=None: PixelModel())
    base = ["eval", "--dataset", "generic", "--model", "m", "--no-progress", "--no-cache"]
    assert cli.main(base + ["--root", str(tmp_path / "g"), "--out", str(tmp_path / "folder")]) == 0
    mapping = "id=qid,reference=ref,modification=text,targets=gt"
    assert cli.main(base + ["--root", str(tmp_path / "ds"), "--split", "test", "--columns", mapping, "--image-root",
                            str(fx.root), "--out", str(tmp_path / "dataset")]) == 0
    a, b = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("folder", "dataset"))
    assert a["metrics"] == b["metrics"] and b["num_queries"] == 4
    capsys.readouterr()
    # bad input: one line naming the problem and the fix, before the model is loaded
    monkeypatch.setattr(eval_cli, "load_model", lambda *a, **k: pytest.fail("the model loaded before the data"))
    assert cli.main(base + ["--root", str(tmp_path / "ds"), "--split", "val", "--columns", mapping]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no split 'val'; its splits: test; pass --split" in err[0]
    assert cli.main(base + ["--root", str(tmp_path / "ds"), "--split", "test", "--columns", "reference=image"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no column 'image' (mapped to 'reference' by --columns)" in err[0]
    assert cli.main(base + ["--root", str(tmp_path / "g"), "--dataset", "cirr", "--split", "dev"]) == 1
    assert "--split dev: cirr has the splits val, test" in capsys.readouterr().err


def test_make_triplets_reads_captions_from_a_dataset(tmp_path, capsys):
    captions = {"file": [], "text": []}
    for i, (color, name) in enumerate(zip(COLORS, ("red", "green", "blue", "yellow"))):
        Image.new("RGB", (8, 8), color).save(tmp_path / f"{i}.png")
        captions["file"].append(f"{i}.png")
        captions["text"].append(f"a {name} square")
    datasets.Dataset.from_dict(captions).to_parquet(str(tmp_path / "captions.parquet"))
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps({"image": f, "caption": c}) + "\n"
                                                     for f, c in zip(captions["file"], captions["text"])))
    args = ["make-triplets", "--modes", "caption-edit", "--no-progress", "--negatives", "0"]
    assert cli.main(args + ["--captions", str(tmp_path / "captions.jsonl"), "--out", str(tmp_path / "a")]) == 0
    assert cli.main(args + ["--captions", str(tmp_path / "captions.parquet"), "--columns", "image=file,caption=text",
                            "--out", str(tmp_path / "b")]) == 0
    a, b = ((tmp_path / n / "triplets.jsonl").read_text() for n in ("a", "b"))
    assert a == b and a.count("\n") >= 4
    capsys.readouterr()
    assert cli.main(args + ["--captions", str(tmp_path / "captions.parquet"), "--out", str(tmp_path / "c")]) == 1
    assert "has no 'image' column; its columns: file, text; map one with --columns image=COLUMN" in \
        capsys.readouterr().err


def test_train_stage1_and_index_read_a_dataset_image_column(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    images = [Image.new("RGB", (16, 16), COLORS[i % 4]) for i in range(12)]
    ds = datasets.Dataset.from_dict({"name": [f"p{i}" for i in range(12)], "pixels": images})
    datasets.DatasetDict({"train": ds.cast_column("pixels", datasets.Image())}).save_to_disk(str(tmp_path / "ds"))
    assert cli.main(["train-stage1", "--images", str(tmp_path / "ds"), "--columns", "image=pixels", "--backbone",
                     "zscir-micro", "--random-init", "--out", str(tmp_path / "s1"), "--steps", "2", "--batch-size",
                     "4", "--num-tokens", "1", "--concept-weight", "0", "--no-progress", "--device", "cpu"]) == 0
    run = json.loads((tmp_path / "s1" / "run.json").read_text())
    assert run["settings"]["data"]["images"] == 12
    assert "12 unlabeled images from" in (tmp_path / "s1" / "model" / "README.md").read_text()
    assert cli.main(["index", str(tmp_path / "ds"), "--columns", "image=pixels,id=name", "--model",
                     str(tmp_path / "s1" / "model"), "--index", str(tmp_path / "idx"), "--no-progress",
                     "--device", "cpu"]) == 0
    from zscir.search import EmbeddingIndex

    assert EmbeddingIndex.open(tmp_path / "idx").ids == [f"p{i}" for i in range(12)]


def test_an_unreadable_data_file_is_one_error_naming_it(tmp_path, capsys):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataSourceError, match=r"broken.parquet: could not be read as a data set"):
        load_triplets(tmp_path / "broken.parquet")
    assert cli.main(["make-triplets", "--captions", str(tmp_path / "broken.parquet"), "--out", str(tmp_path / "o"),
                     "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not be read as a data set" in err[0] and "Traceback" not in err[0]
