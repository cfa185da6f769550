"""Benchmark loaders: layout handling and validation on tiny fixtures, then the real FashionIQ/CIRR/CIRCO files.

The real-file tests read the published val/test annotations from the shared
folder (skipped where it is absent), write one identical tiny PNG under every
image name they list, and run loaders, protocols and submission writers at full
size.  With a model whose image embeddings are all identical, every score ties,
so rankings follow the documented tie rule (gallery order) and the expected
metrics can be computed directly from the annotation files.
"""
import json
from pathlib import Path

import pytest

from fixtures_cir import (
    TiedModel,
    build_real_roots,
    make_circo,
    make_cirr,
    make_fashioniq,
    make_generic,
    shared_annotations_dir,
)
from zscir.data.benchmarks.circo import load_circo
from zscir.data.benchmarks.cirr import load_cirr
from zscir.data.benchmarks.fashioniq import CAPTION_ORDER_ALIASES, CAPTION_ORDERS, fashioniq_texts, load_fashioniq
from zscir.data.benchmarks.generic import load_generic
from zscir.data.schema import AnnotationError
from zscir.eval.evaluate import evaluate
from zscir.eval.submission import check_circo_submission, check_cirr_submission, read_rankings


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------- fixture layouts
def test_fashioniq_loader_fixture(tmp_path):
    fx = make_fashioniq(tmp_path)
    val = load_fashioniq(tmp_path, "val")
    assert val.num_queries == 9 and val.has_targets and not val.missing
    assert set(val.galleries) == {"dress", "shirt", "toptee"} and all(len(g) == 12 for g in val.galleries.values())
    q = val.queries[0]
    assert (q.query_id, q.reference, q.targets, q.gallery) == ("dress/0", "D000", ("D001",), "dress")
    # captions stripped of ".?, " at the ends, both orders
    assert q.texts == ("is dress 0 red and has dress 0 dots", "has dress 0 dots and is dress 0 red")
    single = load_fashioniq(tmp_path, "val", categories=["shirt"], caption_order="single")  # old name of c1-and-c2
    assert list(single.galleries) == ["shirt"] and single.queries[0].texts == ("is shirt 0 red and has shirt 0 dots",)
    assert single.info["caption_order"] == "c1-and-c2"
    pic2word = load_fashioniq(tmp_path, "val", categories=["shirt"], caption_order="pic2word")
    assert pic2word.queries[0].texts == (" has shirt 0 dots? and is shirt 0 red.",)  # c2 first, unstripped
    test = load_fashioniq(tmp_path, "test")
    assert test.num_queries == 6 and not test.has_targets and all(q.targets == () for q in test.queries)
    assert fx.number_of["D000"] == 0


def test_fashioniq_accepts_jpg_and_lists_missing_images(tmp_path):
    make_fashioniq(tmp_path)
    (tmp_path / "images" / "D003.png").rename(tmp_path / "images" / "D003.jpg")
    (tmp_path / "images" / "S005.png").unlink()
    split = load_fashioniq(tmp_path, "val")
    assert split.image_paths["D003"].name == "D003.jpg"
    assert list(split.missing) == ["S005"]


def test_fashioniq_reports_all_bad_rows_at_once(tmp_path):
    make_fashioniq(tmp_path)
    caps = tmp_path / "captions" / "cap.dress.val.json"

    def corrupt(rows):
        del rows[0]["target"]
        rows[1]["captions"] = ["only one"]
        rows[2]["candidate"] = "NOT-IN-SPLIT"

    _edit_json(caps, corrupt)
    (tmp_path / "image_splits" / "split.toptee.val.json").unlink()
    with pytest.raises(AnnotationError) as info:
        load_fashioniq(tmp_path, "val")
    message = str(info.value)
    assert "4 problem(s)" in message
    assert "cap.dress.val.json[0]: missing field 'target'" in message
    assert "cap.dress.val.json[1]: field 'captions'" in message
    assert "candidate 'NOT-IN-SPLIT' is not in split.dress.val.json" in message
    assert "split.toptee.val.json: file not found" in message


@pytest.mark.parametrize("bad", ["../../outside", "/etc/outside", "..\\..\\outside", "C:/outside", "sub/../../x"])
def test_fashioniq_refuses_image_names_outside_the_images_folder(tmp_path, bad):
    root = tmp_path / "fiq"
    make_fashioniq(root)
    (tmp_path / "outside.png").write_bytes((root / "images" / "D000.png").read_bytes())  # a file the name would reach
    _edit_json(root / "image_splits" / "split.dress.val.json", lambda names: names.append(bad))
    with pytest.raises(AnnotationError) as info:
        load_fashioniq(root, "val")
    message = str(info.value)
    assert "1 problem(s)" in message and "split.dress.val.json" in message
    assert "must be a path inside the folder" in message
    assert repr(bad) in message


def test_fashioniq_text_options():
    captions = ["is red.", " has dots? "]
    assert fashioniq_texts(captions) == ("is red and has dots", "has dots and is red")  # SEARLE: both, stripped
    assert fashioniq_texts(captions, "c1-and-c2") == fashioniq_texts(captions, "single") == ("is red and has dots",)
    assert fashioniq_texts(captions, "pic2word") == (" has dots?  and is red.",)  # Pic2Word: "{c2} and {c1}" as is
    assert set(CAPTION_ORDERS) == {"both", "c1-and-c2", "pic2word"} and CAPTION_ORDER_ALIASES == {"single": "c1-and-c2"}
    with pytest.raises(ValueError, match="caption_order"):
        fashioniq_texts(["a", "b"], "reverse")
    with pytest.raises(ValueError, match="exactly 2"):
        fashioniq_texts(["a"])


def test_cirr_loader_fixture_and_layouts(tmp_path):
    make_cirr(tmp_path / "official")
    val = load_cirr(tmp_path / "official", "val")
    assert val.num_queries == 4 and val.exclude_reference and val.has_targets
    q = val.queries[0]
    assert q.query_id == "100" and q.reference == "dev-0-0-img0" and len(q.subset) == 5 and q.reference not in q.subset
    assert val.image_paths["dev-0-0-img0"] == tmp_path / "official" / "img_raw" / "dev" / "dev-0-0-img0.png"
    test = load_cirr(tmp_path / "official", "test")  # "test" means test1
    assert test.split == "test1" and not test.has_targets and test.num_queries == 3

    # CLIP4Cir/SEARLE layout: annotations in <root>/cirr, images directly under <root>
    alt = tmp_path / "alt"
    make_cirr(alt / "cirr", image_root="../")
    alt_split = load_cirr(alt, "val")
    assert not alt_split.missing
    assert alt_split.image_paths["dev-0-0-img0"] == alt / "dev" / "dev-0-0-img0.png"


def test_cirr_validation_lists_every_problem(tmp_path):
    make_cirr(tmp_path)

    def corrupt(rows):
        rows[1]["pairid"] = rows[0]["pairid"]
        rows[2]["img_set"]["members"] = rows[2]["img_set"]["members"][:5]
        rows[3]["target_hard"] = "dev-99-0-img0"

    _edit_json(tmp_path / "captions" / "cap.rc2.val.json", corrupt)
    with pytest.raises(AnnotationError) as info:
        load_cirr(tmp_path, "val")
    message = str(info.value)
    assert "[1]: duplicate pairid 100 (first at index 0)" in message
    assert "[2]: img_set.members has 5 images, expected 6" in message
    assert "[3]: target_hard 'dev-99-0-img0' is not in split.rc2.val.json" in message
    with pytest.raises(ValueError, match="'val' or 'test'"):
        load_cirr(tmp_path, "train")


def test_circo_loader_fixture_and_validation(tmp_path):
    make_circo(tmp_path)
    val = load_circo(tmp_path, "val")
    assert val.num_queries == 3 and len(val.galleries["all"]) == 20 and not val.missing
    assert val.queries[0].targets == (1007, 1014, 1021) and val.queries[0].texts == ("has two dogs",)
    assert [q.aspects for q in val.queries] == [("cardinality",), (), ()]
    concept = load_circo(tmp_path, "val", use_shared_concept=True)
    assert concept.queries[0].texts == ("a dog has two dogs",)
    test = load_circo(tmp_path, "test")
    assert [q.query_id for q in test.queries] == ["0", "1", "2", "3"] and not test.has_targets

    def corrupt(rows):
        rows[1]["id"] = 0
        rows[2]["target_img_id"] = 5
        rows[0]["gt_img_ids"] = [1007, 424242]
        rows[2]["semantic_aspects"] = "cardinality"

    _edit_json(tmp_path / "annotations" / "val.json", corrupt)
    with pytest.raises(AnnotationError) as info:
        load_circo(tmp_path, "val")
    message = str(info.value)
    assert "val.json[1]: duplicate id 0" in message
    assert "val.json[2]: target_img_id 5 is not among gt_img_ids" in message
    assert "val.json[0]: gt_img_ids [424242] are not in image_info_unlabeled2017.json" in message
    assert "val.json[2]: field 'semantic_aspects' must be a list of aspect names" in message


def test_circo_missing_gallery_list_is_named(tmp_path):
    make_circo(tmp_path)
    (tmp_path / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json").unlink()
    with pytest.raises(AnnotationError, match="image_info_unlabeled2017.json: file not found"):
        load_circo(tmp_path, "val")


def test_generic_loader_fixture(tmp_path):
    make_generic(tmp_path)
    split = load_generic(tmp_path)
    assert split.num_queries == 4 and split.exclude_reference
    assert split.galleries["all"] == [f"imgs/{i:02d}.png" for i in range(9)]  # refs + targets, sorted
    assert split.queries[3].query_id == "3" and split.queries[1].targets == ("imgs/03.png", "imgs/04.png")
    make_generic(tmp_path / "g2", with_gallery=True)
    assert len(load_generic(tmp_path / "g2").galleries["all"]) == 10


def test_generic_validation_names_lines(tmp_path):
    make_generic(tmp_path, with_gallery=True)
    lines = (tmp_path / "queries.jsonl").read_text().splitlines()
    lines[1] = "{not json"
    lines.append(json.dumps({"id": "q0", "reference": "imgs/00.png", "modification": "x", "targets": ["imgs/01.png"]}))
    lines.append(json.dumps({"id": "q9", "reference": "/etc/passwd", "modification": "x", "targets": ["imgs/01.png"]}))
    lines.append(json.dumps({"id": "q10", "reference": "imgs/00.png", "modification": "", "targets": ["imgs/zz.png"]}))
    lines.append(json.dumps({"id": "q11", "reference": "imgs/00.png", "targets": ["imgs/01.png"]}))
    (tmp_path / "queries.jsonl").write_text("\n".join(lines) + "\n")
    with (tmp_path / "gallery.txt").open("a") as fh:
        fh.write("imgs/00.png\n")
    with pytest.raises(AnnotationError) as info:
        load_generic(tmp_path)
    message = str(info.value)
    assert "queries.jsonl:2: invalid JSON" in message
    assert "queries.jsonl:5: duplicate id 'q0' (first used on line 1)" in message
    assert "queries.jsonl:6: field 'reference' must be a path inside the folder" in message
    assert "queries.jsonl:7: field 'modification' must be a non-empty string" in message
    assert "queries.jsonl:8: missing field 'modification'" in message
    assert "gallery.txt:11: 'imgs/00.png' is listed twice (first on line 1)" in message


def test_generic_empty_gallery_and_missing_file(tmp_path):
    make_generic(tmp_path)
    (tmp_path / "gallery.txt").write_text("# nothing here\n")
    with pytest.raises(AnnotationError, match="lists no images"):
        load_generic(tmp_path)
    with pytest.raises(AnnotationError, match="no queries.jsonl"):
        load_generic(tmp_path / "imgs")  # a folder without queries.jsonl


def test_generic_target_outside_gallery_is_an_error(tmp_path):
    make_generic(tmp_path, with_gallery=True)
    (tmp_path / "gallery.txt").write_text("imgs/00.png\nimgs/02.png\n")
    with pytest.raises(AnnotationError, match="target 'imgs/01.png' is not listed in gallery.txt"):
        load_generic(tmp_path)


# ------------------------------------------------------------------- real files
REAL = shared_annotations_dir()
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"shared annotation folder not found at {REAL} (set ZSCIR_ANNOTATIONS)")
FIQ_VAL_COUNTS = {"dress": 2017, "shirt": 2038, "toptee": 1961}  # published FashionIQ val sizes


@pytest.fixture(scope="module")
def real_roots(tmp_path_factory):
    """Benchmark roots: the real annotation folders linked in, one placeholder PNG per listed image."""
    if not REAL.is_dir():
        pytest.skip(f"shared annotation folder not found at {REAL}")
    return build_real_roots(tmp_path_factory.mktemp("real"), REAL).roots


@needs_real
def test_real_fashioniq_loads_every_query(real_roots):
    for split in ("val", "test"):
        data = load_fashioniq(real_roots["fashioniq"], split)
        assert not data.missing
        for category in ("dress", "shirt", "toptee"):
            rows = json.loads((REAL / "fashioniq" / "captions" / f"cap.{category}.{split}.json").read_text())
            listed = json.loads((REAL / "fashioniq" / "image_splits" / f"split.{category}.{split}.json").read_text())
            got = [q for q in data.queries if q.gallery == category]
            assert len(got) == len(rows)
            assert data.galleries[category] == listed
            if split == "val":
                assert len(got) == FIQ_VAL_COUNTS[category]
        assert data.has_targets == (split == "val")
        assert all(len(q.texts) == 2 for q in data.queries)


@needs_real
def test_real_fashioniq_val_protocol_under_full_ties(real_roots, tmp_path):
    results = evaluate(TiedModel(), "fashioniq", "val", root=real_roots["fashioniq"], use_cache=False,
                       progress=False, print_results=False, save_rankings=tmp_path / "rankings.json")
    metrics = results["metrics"]
    expected_avg = {10: [], 50: []}
    for category, count in FIQ_VAL_COUNTS.items():
        rows = json.loads((REAL / "fashioniq" / "captions" / f"cap.{category}.val.json").read_text())
        position = {n: i for i, n in enumerate(json.loads((REAL / "fashioniq" / "image_splits" / f"split.{category}.val.json").read_text()))}
        for k in (10, 50):
            # all scores tie -> the ranking is the gallery order (reference kept)
            expected = 100.0 * sum(position[r["target"]] < k for r in rows) / count
            assert metrics[f"{category}/R@{k}"] == pytest.approx(expected)
            expected_avg[k].append(expected)
    for k in (10, 50):
        assert metrics[f"average/R@{k}"] == pytest.approx(sum(expected_avg[k]) / 3)
    rankings = read_rankings(tmp_path / "rankings.json")
    assert len(rankings) == sum(FIQ_VAL_COUNTS.values())
    assert rankings["dress/0"] == json.loads((REAL / "fashioniq" / "image_splits" / "split.dress.val.json").read_text())[:50]


@needs_real
def test_real_fashioniq_test_rankings(real_roots, tmp_path):
    # one category keeps this quick; the loader test above covers all three test files
    results = evaluate(TiedModel(), "fashioniq", "test", root=real_roots["fashioniq"], use_cache=False,
                       progress=False, print_results=False, save_rankings=tmp_path / "r.json",
                       dataset_options={"categories": ["dress"]})
    assert results["metrics"] == {} and results["num_skipped"] == 0
    rankings = read_rankings(tmp_path / "r.json")
    rows = json.loads((REAL / "fashioniq" / "captions" / "cap.dress.test.json").read_text())
    assert len(rankings) == len(rows) == results["num_queries"]
    assert all(len(r) == 50 and len(set(r)) == 50 for r in rankings.values())


@needs_real
def test_real_cirr_groups_and_val_protocol(real_roots):
    data = load_cirr(real_roots["cirr"], "val")
    assert data.num_queries == 4181 and len(data.galleries["all"]) == 2297 and not data.missing
    for q in data.queries:
        assert len(q.subset) == 5 and q.reference not in q.subset and q.targets[0] in q.subset
    results = evaluate(TiedModel(), data, use_cache=False, progress=False, print_results=False)
    metrics = results["metrics"]
    position = {n: i for i, n in enumerate(data.galleries["all"])}
    rows = json.loads((REAL / "cirr" / "captions" / "cap.rc2.val.json").read_text())
    for k in (1, 5, 10, 50):
        # gallery order with the reference removed: the target moves up one place if the reference was before it
        hits = sum(position[r["target_hard"]] - (position[r["reference"]] < position[r["target_hard"]]) < k for r in rows)
        assert metrics[f"R@{k}"] == pytest.approx(100.0 * hits / len(rows))
    for k in (1, 2, 3):
        hits = 0
        for r in rows:
            group = sorted((m for m in r["img_set"]["members"] if m != r["reference"]), key=position.__getitem__)
            hits += group.index(r["target_hard"]) < k
        assert metrics[f"Rsubset@{k}"] == pytest.approx(100.0 * hits / len(rows))


@needs_real
def test_real_cirr_test_submission(real_roots, tmp_path):
    data = load_cirr(real_roots["cirr"], "test")
    assert data.num_queries == 4148 and len(data.galleries["all"]) == 2315
    assert all(len(q.subset) == 5 for q in data.queries)
    results = evaluate(TiedModel(), data, use_cache=False, progress=False, print_results=False, submission_dir=tmp_path)
    recall_file, subset_file = map(Path, results["submission_files"])
    pair_ids = [r["pairid"] for r in json.loads((REAL / "cirr" / "captions" / "cap.rc2.test1.json").read_text())]
    assert len(pair_ids) == 4148
    check_cirr_submission(recall_file, "recall", pair_ids=pair_ids)  # also checks the 5 MB server limit
    check_cirr_submission(subset_file, "recall_subset", pair_ids=pair_ids)
    recall = json.loads(recall_file.read_text())
    subset = json.loads(subset_file.read_text())
    by_id = {str(q.query_id): q for q in data.queries}
    for pair_id in ("12063", str(pair_ids[-1])):
        assert by_id[pair_id].reference not in recall[pair_id]
        assert set(subset[pair_id]) <= set(by_id[pair_id].subset)


@needs_real
def test_real_circo_val_protocol_and_test_submission(real_roots, tmp_path):
    val = load_circo(real_roots["circo"], "val")
    assert val.num_queries == 220 and not val.missing
    rows = json.loads((REAL / "circo" / "annotations" / "val.json").read_text())
    assert [q.aspects for q in val.queries] == [tuple(r["semantic_aspects"]) for r in rows]
    results = evaluate(TiedModel(), val, use_cache=False, progress=False, print_results=False)
    gallery = val.galleries["all"]
    top50 = gallery[:50]  # full ties: every query ranks the gallery in list order, reference kept
    for k in (5, 10, 25, 50):
        aps = []
        for r in rows:
            hits, total = 0, 0.0
            for pos, image_id in enumerate(top50[:k], start=1):
                if image_id in r["gt_img_ids"]:
                    hits += 1
                    total += hits / pos
            aps.append(total / min(len(r["gt_img_ids"]), k))
        assert results["metrics"][f"mAP@{k}"] == pytest.approx(100.0 * sum(aps) / len(aps))
        assert results["metrics"][f"R@{k}"] == pytest.approx(100.0 * sum(r["target_img_id"] in top50[:k] for r in rows) / len(rows))

    test = load_circo(real_roots["circo"], "test")
    assert test.num_queries == 800
    results = evaluate(TiedModel(), test, use_cache=False, progress=False, print_results=False, submission_dir=tmp_path)
    path = Path(results["submission_files"][0])
    check_circo_submission(path, query_ids=range(800))  # 800 ids, 50 unique int predictions each
    ours = json.loads(path.read_text())
    example = json.loads((REAL / "circo" / "submission_examples" / "submission_test.json").read_text())
    assert set(ours) == set(example)
    assert {type(v[0]) for v in ours.values()} == {type(v[0]) for v in example.values()} == {int}
    assert {len(v) for v in ours.values()} == {len(v) for v in example.values()} == {50}
