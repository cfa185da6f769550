"""End-to-end evaluation on tiny fixture folders with fake models whose metrics are known in advance."""
import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fixtures_cir import (
    PixelModel,
    ScriptedModel,
    make_circo,
    make_cirr,
    make_fashioniq,
    make_generic,
    scripted_ranking,
)
from zscir.checkpoint import save_tensors
from zscir.cli import eval as E_cli
from zscir.data.benchmarks.fashioniq import fashioniq_texts
from zscir.data.benchmarks.generic import load_generic
from zscir.data.schema import AnnotationError
from zscir.data.images import load_image
from zscir.eval import encode as E_enc
from zscir.eval import encode_queries, gallery_cache_key, load_benchmark
from zscir.eval import protocols
from zscir.eval.evaluate import evaluate, format_table
from zscir.eval.protocols import EvaluationError, MissingImagesError
from zscir.eval.submission import SubmissionError, check_circo_submission, check_cirr_submission, read_rankings
from zscir.search import EmbeddingStore

QUIET = dict(progress=False, print_results=False, use_cache=False)


# ------------------------------------------------------------------------------ CIRR
def cirr_val_script(fx):
    """Rankings per caption; see test_cirr_val_metrics_match_hand_computation for what each one scores."""
    n = [r for r in sorted(fx.number_of, key=fx.number_of.get) if r.startswith("dev")]
    by_pair = {r["pairid"]: r for r in fx.val}
    return {
        by_pair[100]["caption"]: scripted_ranking(fx, [n[0], n[2]]),  # reference first, then target
        by_pair[101]["caption"]: scripted_ranking(fx, [n[6], n[7], n[8], n[1]]),  # target 4th
        by_pair[102]["caption"]: scripted_ranking(fx, n[:7] + n[8:11] + [n[11]]),  # target 11th
        by_pair[103]["caption"]: scripted_ranking(fx, [n[10], n[9], n[6]]),  # reference, other, target
    }


def test_cirr_val_metrics_match_hand_computation(tmp_path):
    fx = make_cirr(tmp_path / "cirr")
    model = ScriptedModel(fx.num_images, cirr_val_script(fx))
    results = evaluate(model, "cirr", "val", root=tmp_path / "cirr", save_rankings=tmp_path / "r.json", **QUIET)
    m = results["metrics"]
    # full-gallery ranks after removing the reference: q100 -> 1, q101 -> 4, q102 -> 11, q103 -> 2
    assert (m["R@1"], m["R@5"], m["R@10"], m["R@50"]) == (25.0, 75.0, 75.0, 100.0)
    # group ranks (5 members, reference removed): q100 -> 1, q101 -> 1, q102 -> 5, q103 -> 2
    assert (m["Rsubset@1"], m["Rsubset@2"], m["Rsubset@3"]) == (50.0, 75.0, 75.0)
    assert m["avg"] == pytest.approx((75.0 + 50.0) / 2)
    names = [f"dev-{i}-0-img{i % 2}" for i in range(12)]
    # reference removed; unscripted images (score 0) follow in gallery order
    assert read_rankings(tmp_path / "r.json")["100"] == [names[2], names[1]] + names[3:]


def test_cirr_reference_removal_is_what_makes_the_oracle_perfect(tmp_path):
    fx = make_cirr(tmp_path)
    data = load_benchmark("cirr", tmp_path, "val")
    # a model that ranks the reference first and the target second
    script = {r["caption"]: scripted_ranking(fx, [r["reference"], r["target_hard"]]) for r in fx.val}
    assert evaluate(ScriptedModel(fx.num_images, script), data, **QUIET)["metrics"]["R@1"] == 100.0
    data.exclude_reference = False
    assert evaluate(ScriptedModel(fx.num_images, script), data, **QUIET)["metrics"]["R@1"] == 0.0


def test_cirr_oracle_scores_100(tmp_path):
    fx = make_cirr(tmp_path)
    oracle = ScriptedModel(fx.num_images, {r["caption"]: scripted_ranking(fx, [r["target_hard"]]) for r in fx.val})
    metrics = evaluate(oracle, "cirr", "val", root=tmp_path, **QUIET)["metrics"]
    assert all(v == 100.0 for v in metrics.values()), metrics


def test_cirr_test_submission_files(tmp_path):
    fx = make_cirr(tmp_path / "cirr")
    results = evaluate(PixelModel(), "cirr", "test", root=tmp_path / "cirr", submission_dir=tmp_path / "sub", **QUIET)
    assert results["metrics"] == {} and results["split"] == "test1"
    recall_file, subset_file = map(Path, results["submission_files"])
    # 12 images minus the reference: 11 predictions (the server wants 50 on the real 2,315-image gallery)
    check_cirr_submission(recall_file, "recall", pair_ids=[200, 201, 202], length=11)
    check_cirr_submission(subset_file, "recall_subset", pair_ids=[200, 201, 202])
    recall, subset = json.loads(recall_file.read_text()), json.loads(subset_file.read_text())
    assert (recall["version"], recall["metric"], subset["metric"]) == ("rc2", "recall", "recall_subset")
    for row in fx.test:
        key = str(row["pairid"])
        assert row["reference"] not in recall[key] and row["reference"] not in subset[key]
        assert set(subset[key]) <= set(row["img_set"]["members"])
    with pytest.raises(SubmissionError, match="3 pair id"):
        check_cirr_submission(recall_file, "recall", pair_ids=[1, 2, 3], length=11)
    with pytest.raises(SubmissionError, match="11 predictions, expected 50"):
        check_cirr_submission(recall_file, "recall")


# ----------------------------------------------------------------------------- CIRCO
def circo_val_script(fx):
    """Rankings per caption; see test_circo_val_map_matches_hand_computation for what each one scores."""
    i = [1000 + 7 * k for k in range(20)]
    return {
        "has two dogs": scripted_ranking(fx, [i[1], i[9], i[2], i[3]]),  # gts at 1, 3, 4
        "is at night": scripted_ranking(fx, [i[0], i[5]]),  # single gt at 2
        "is red": scripted_ranking(fx, [i[8], i[1], i[2], i[3], i[4], i[5], i[7]]),  # gt i8 at 1, target i7 at 7
    }


CIRCO_AP10 = ((1 + 2 / 3 + 3 / 4) / 3, 1 / 2, (1 + 2 / 7) / 2)  # AP@10 of the three scripted val queries


def test_circo_val_map_matches_hand_computation(tmp_path):
    fx = make_circo(tmp_path)
    m = evaluate(ScriptedModel(fx.num_images, circo_val_script(fx)), "circo", "val", root=tmp_path, **QUIET)["metrics"]
    ap0 = CIRCO_AP10[0]
    assert m["mAP@5"] == pytest.approx(100 * (ap0 + 1 / 2 + 1 / 2) / 3)
    for k in (10, 25, 50):
        assert m[f"mAP@{k}"] == pytest.approx(100 * (ap0 + 1 / 2 + (1 + 2 / 7) / 2) / 3)
    assert m["R@5"] == pytest.approx(200 / 3)  # recall counts target_img_id only: i7 is 7th
    assert m["R@10"] == m["R@50"] == 100.0
    # official per-aspect mAP@10: only query 0 has an aspect
    assert [k for k in m if k.startswith("aspect/")] == ["aspect/cardinality/mAP@10"]
    assert m["aspect/cardinality/mAP@10"] == pytest.approx(100 * ap0)


def test_circo_per_aspect_map_order_and_table(tmp_path):
    fx = make_circo(tmp_path)
    path = tmp_path / "annotations" / "val.json"
    rows = json.loads(path.read_text())
    rows[1]["semantic_aspects"] = ["viewpoint", "cardinality"]
    rows[2]["semantic_aspects"] = ["zz_custom", "negation"]
    path.write_text(json.dumps(rows))
    results = evaluate(ScriptedModel(fx.num_images, circo_val_script(fx)), "circo", "val", root=tmp_path, **QUIET)
    aspects = {k: v for k, v in results["metrics"].items() if k.startswith("aspect/")}
    # the official script's order, then aspects it does not know, sorted; each: mean AP@10 of its queries
    assert list(aspects) == ["aspect/cardinality/mAP@10", "aspect/negation/mAP@10", "aspect/viewpoint/mAP@10",
                             "aspect/zz_custom/mAP@10"]
    ap = CIRCO_AP10
    expected = [(ap[0] + ap[1]) / 2, ap[2], ap[1], ap[2]]
    assert list(aspects.values()) == pytest.approx([100 * e for e in expected])
    table = format_table(results).splitlines()
    at = table.index("  mAP@10 per semantic aspect:")
    assert table[at + 1:at + 5] == [f"    {name.ljust(11)}  {100 * e:7.2f}"
                                    for name, e in zip(["cardinality", "negation", "viewpoint", "zz_custom"], expected)]
    assert not any(line.lstrip().startswith("aspect/") for line in table)


def test_circo_test_submission_and_shared_concept(tmp_path):
    fx = make_circo(tmp_path)
    script = {f"concept {r['id']} test caption {r['id']}": [0] for r in fx.test}
    model = ScriptedModel(fx.num_images, script)
    results = evaluate(model, "circo", "test", root=tmp_path, submission_dir=tmp_path / "sub",
                       dataset_options={"use_shared_concept": True}, **QUIET)
    assert sorted(model.texts_seen) == sorted(script)
    path = Path(results["submission_files"][0])
    check_circo_submission(path, query_ids=range(4), length=20)  # gallery of 20 < 50: every image once
    sub = json.loads(path.read_text())
    assert all(isinstance(v, int) for ranking in sub.values() for v in ranking)
    assert all(ranking[0] == 1000 for ranking in sub.values())  # scripted best, reference kept in the gallery


# ------------------------------------------------------------------------- FashionIQ
def test_fashioniq_per_category_recalls_and_both_caption_orders(tmp_path):
    fx = make_fashioniq(tmp_path)
    script = {}
    for row in fx.val:
        names = [n for n in fx.number_of if n.startswith(row["category"][0].upper())]
        if row["category"] == "dress" and row["index"] == 0:
            order = [n for n in names if n not in (row["target"],)][1:] + [row["target"]]  # 10 others first
            assert order.index(row["target"]) == 10
        else:
            order = [row["target"]]  # oracle
        for text in fashioniq_texts(row["captions"], "both"):
            script[text] = scripted_ranking(fx, order)
    model = ScriptedModel(fx.num_images, script)
    m = evaluate(model, "fashioniq", "val", root=tmp_path, **QUIET)["metrics"]
    assert m["dress/R@10"] == pytest.approx(200 / 3) and m["dress/R@50"] == 100.0
    assert m["shirt/R@10"] == m["toptee/R@10"] == m["toptee/R@50"] == 100.0
    assert m["average/R@10"] == pytest.approx((200 / 3 + 200) / 3)
    assert m["average"] == pytest.approx((m["average/R@10"] + m["average/R@50"]) / 2)
    assert "is dress 0 red and has dress 0 dots" in model.texts_seen
    assert "has dress 0 dots and is dress 0 red" in model.texts_seen
    single = ScriptedModel(fx.num_images, script)
    evaluate(single, "fashioniq", "val", root=tmp_path, dataset_options={"caption_order": "single"}, **QUIET)
    assert "has dress 0 dots and is dress 0 red" not in single.texts_seen and len(single.texts_seen) == 9
    script.update({t: scripted_ranking(fx, [r["target"]]) for r in fx.val for t in fashioniq_texts(r["captions"], "pic2word")})
    pic2word = ScriptedModel(fx.num_images, script)
    m = evaluate(pic2word, "fashioniq", "val", root=tmp_path, dataset_options={"caption_order": "pic2word"}, **QUIET)
    assert " has dress 0 dots? and is dress 0 red." in pic2word.texts_seen and len(pic2word.texts_seen) == 9
    assert m["metrics"]["average"] == 100.0 and m["options"]["caption_order"] == "pic2word"


def test_query_features_average_the_normalised_caption_orders(tmp_path):
    make_fashioniq(tmp_path)
    data = load_benchmark("fashioniq", tmp_path, "val")
    model = PixelModel()
    feats, failures = encode_queries(model, data.queries[:2], data.image_paths, batch_size=1, progress=False)
    assert not failures
    q = data.queries[1]
    image = load_image(data.image_paths[q.reference])
    parts = [F.normalize(model.encode_query([image], [t]), dim=-1) for t in q.texts]
    assert torch.allclose(feats[1], F.normalize(parts[0] + parts[1], dim=-1)[0], atol=1e-6)


def test_written_submission_files_are_checked_at_once(tmp_path, monkeypatch):
    make_circo(tmp_path / "circo")
    make_cirr(tmp_path / "cirr")
    write_circo = protocols.write_circo_submission

    def repeats_ids(folder, rankings, name, split):
        path = write_circo(folder, rankings, name, split)
        sub = json.loads(path.read_text())
        sub["2"][1] = sub["2"][0]
        path.write_text(json.dumps(sub))
        return path

    monkeypatch.setattr(protocols, "write_circo_submission", repeats_ids)
    with pytest.raises(EvaluationError, match="would be rejected by the server") as info:
        evaluate(PixelModel(), "circo", "test", root=tmp_path / "circo", submission_dir=tmp_path / "sub", **QUIET)
    assert "query 2: repeated image ids" in str(info.value)

    write_cirr = protocols.write_cirr_submission

    def drops_a_pair(folder, rankings, subsets, name):
        return write_cirr(folder, {k: v for k, v in rankings.items() if k != "201"}, subsets, name)

    monkeypatch.setattr(protocols, "write_cirr_submission", drops_a_pair)
    with pytest.raises(EvaluationError, match="1 pair id\\(s\\) missing, e.g. \\['201'\\]"):
        evaluate(PixelModel(), "cirr", "test", root=tmp_path / "cirr", submission_dir=tmp_path / "sub", **QUIET)


def test_fashioniq_has_no_server_format(tmp_path):
    make_fashioniq(tmp_path)
    with pytest.raises(EvaluationError, match="no test-server file format"):
        evaluate(PixelModel(), "fashioniq", "test", root=tmp_path, submission_dir=tmp_path / "sub", **QUIET)


# --------------------------------------------------------------------------- generic
def generic_script(fx):
    n = [f"imgs/{i:02d}.png" for i in range(10)]
    return {
        "make it blue": scripted_ranking(fx, [n[0], n[1]]),  # reference first, target second
        "add a circle": scripted_ranking(fx, [n[4], n[5], n[3]]),  # two targets, at 1 and 3
        "make it green": scripted_ranking(fx, [n[7], n[8], n[0], n[1], n[2], n[6]]),  # target 6th
        "remove the square": scripted_ranking(fx, [n[8]]),
    }


def test_generic_metrics_and_kinds(tmp_path):
    fx = make_generic(tmp_path)
    results = evaluate(ScriptedModel(fx.num_images, generic_script(fx)), "generic", "val", root=tmp_path,
                       save_rankings=tmp_path / "r.json", **QUIET)
    m = results["metrics"]
    assert (m["R@1"], m["R@5"], m["R@10"]) == (75.0, 75.0, 100.0)
    assert m["mAP@5"] == pytest.approx(100 * (1 + (1 + 2 / 3) / 2 + 0 + 1) / 4)
    assert m["mAP@10"] == pytest.approx(100 * (1 + (1 + 2 / 3) / 2 + 1 / 6 + 1) / 4)
    assert (m["kind/color/R@1"], m["kind/color/R@10"], m["kind/shape/R@1"]) == (50.0, 100.0, 100.0)
    assert m["mean_over_kinds/R@1"] == 75.0
    # a 9-image gallery minus the reference: every ranking has 8 ids (k is clipped to the gallery)
    assert {len(r) for r in read_rankings(tmp_path / "r.json").values()} == {8}
    kept = evaluate(ScriptedModel(fx.num_images, generic_script(fx)), "generic", "val", root=tmp_path,
                    dataset_options={"exclude_reference": False}, **QUIET)
    assert kept["metrics"]["R@1"] == 50.0  # "make it blue" now ranks its reference first


def test_generic_reference_that_is_a_target_is_not_removed(tmp_path):
    make_generic(tmp_path)
    (tmp_path / "queries.jsonl").write_text(json.dumps(
        {"id": "same", "reference": "imgs/00.png", "modification": "keep it", "targets": ["imgs/00.png", "imgs/01.png"]}) + "\n")
    model = ScriptedModel(10, {"keep it": [0]})
    assert evaluate(model, "generic", "val", root=tmp_path, **QUIET)["metrics"]["R@1"] == 100.0


# ------------------------------------------------------------- missing / bad inputs
def test_missing_image_is_listed_and_allow_missing_counts_skips(tmp_path):
    fx = make_cirr(tmp_path)
    (tmp_path / "img_raw" / "dev" / "dev-4-0-img0.png").unlink()  # a group-0 member
    with pytest.raises(MissingImagesError) as info:
        evaluate(ScriptedModel(fx.num_images, cirr_val_script(fx)), "cirr", "val", root=tmp_path, **QUIET)
    assert "dev-4-0-img0" in str(info.value) and "--allow-missing" in str(info.value)
    results = evaluate(ScriptedModel(fx.num_images, cirr_val_script(fx)), "cirr", "val", root=tmp_path,
                       allow_missing=True, **QUIET)
    assert results["num_skipped"] == 2 and results["num_queries"] == 2
    assert results["skipped"] == {"subset member missing or unreadable": 2}
    assert sorted(results["skipped_query_ids"]) == ["100", "101"]
    assert results["warnings"] and results["metrics"]["R@5"] == 50.0  # q102 (11th) misses, q103 (2nd) hits


def test_corrupt_image_is_an_error_or_a_counted_skip(tmp_path):
    fx = make_cirr(tmp_path)
    (tmp_path / "img_raw" / "dev" / "dev-11-0-img1.png").write_bytes(b"not a png")  # target of pair 102
    with pytest.raises(MissingImagesError, match="dev-11-0-img1"):
        evaluate(ScriptedModel(fx.num_images, cirr_val_script(fx)), "cirr", "val", root=tmp_path, **QUIET)
    results = evaluate(ScriptedModel(fx.num_images, cirr_val_script(fx)), "cirr", "val", root=tmp_path,
                       allow_missing=True, **QUIET)
    # q102 loses its target, q103 a member of its group
    assert results["skipped"] == {"target image missing or unreadable": 1, "subset member missing or unreadable": 1}


def test_nan_gallery_embedding_is_named(tmp_path):
    fx = make_generic(tmp_path)
    model = ScriptedModel(fx.num_images, generic_script(fx))
    model.nan_images = {fx.number_of["imgs/06.png"]}
    with pytest.raises(MissingImagesError, match="non-finite embedding for .*06.png"):
        evaluate(model, "generic", "val", root=tmp_path, **QUIET)
    results = evaluate(model, "generic", "val", root=tmp_path, allow_missing=True, **QUIET)
    assert results["num_skipped"] == 1 and results["skipped_query_ids"] == ["q2"]


def test_nan_query_embedding_is_an_error(tmp_path):
    fx = make_generic(tmp_path)

    class NanQuery(ScriptedModel):
        def encode_query(self, images, texts):
            out = super().encode_query(images, texts)
            out[[t == "add a circle" for t in texts]] = float("nan")
            return out

    with pytest.raises(MissingImagesError, match="q1: the model returned a non-finite query embedding"):
        evaluate(NanQuery(fx.num_images, generic_script(fx)), "generic", "val", root=tmp_path, **QUIET)
    results = evaluate(NanQuery(fx.num_images, generic_script(fx)), "generic", "val", root=tmp_path,
                       allow_missing=True, **QUIET)
    assert results["skipped"] == {"non-finite query embedding": 1}


def test_bad_model_output_and_duplicate_query_ids(tmp_path):
    make_generic(tmp_path)

    class WrongShape(PixelModel):
        def encode_images(self, images):
            return torch.zeros(len(images) + 1, 4)

    with pytest.raises(EvaluationError, match=r"shape \(\d+, 4\)"):
        evaluate(WrongShape(), "generic", "val", root=tmp_path, **QUIET)
    data = load_generic(tmp_path)
    data.queries.append(data.queries[0])
    with pytest.raises(AnnotationError, match="duplicate query id 'q0'"):
        evaluate(PixelModel(), data, **QUIET)
    data = load_generic(tmp_path)
    data.galleries["all"] = []
    with pytest.raises(AnnotationError, match="gallery 'all' is empty"):
        evaluate(PixelModel(), data, **QUIET)
    with pytest.raises(TypeError, match="does not take option"):
        evaluate(PixelModel(), "generic", "val", root=tmp_path, dataset_options={"categories": ["dress"]}, **QUIET)


# ---------------------------------------------------------------------- gallery cache
def test_gallery_features_are_cached_by_model_and_files(tmp_path):
    make_generic(tmp_path / "data")
    cache = tmp_path / "cache"
    opts = dict(progress=False, print_results=False, cache_dir=cache)
    first = PixelModel()
    r1 = evaluate(first, "generic", "val", root=tmp_path / "data", **opts)
    assert first.image_calls > 0 and len(list(cache.glob("gallery-*/meta.json"))) == 1
    again = PixelModel()
    r2 = evaluate(again, "generic", "val", root=tmp_path / "data", **opts)
    assert again.image_calls == 0 and r2["metrics"] == r1["metrics"]
    other = PixelModel(seed=1)  # another cache_key: its own features
    evaluate(other, "generic", "val", root=tmp_path / "data", **opts)
    assert other.image_calls > 0
    path = tmp_path / "data" / "imgs" / "05.png"
    old_size = path.stat().st_size
    Image.effect_noise((64, 64), 50).convert("RGB").save(path)  # a replaced file (of another size)
    assert path.stat().st_size != old_size
    changed = PixelModel()
    evaluate(changed, "generic", "val", root=tmp_path / "data", **opts)
    assert changed.image_calls > 0 and len(list(cache.glob("gallery-*/meta.json"))) == 3


def test_gallery_cache_keeps_exact_features_and_resumes(tmp_path):
    make_generic(tmp_path / "data")
    opts = dict(progress=False, print_results=False, cache_dir=tmp_path / "cache")
    data = load_generic(tmp_path / "data")
    ids = data.galleries["all"]
    paths = [data.image_paths[i] for i in ids]
    fresh = E_enc.encode_gallery(PixelModel(), ids, paths, cache_dir=None, progress=False)[0]
    cached = E_enc.encode_gallery(PixelModel(), ids, paths, cache_dir=tmp_path / "cache", progress=False)[0]
    again = PixelModel()
    reread = E_enc.encode_gallery(again, ids, paths, cache_dir=tmp_path / "cache", progress=False)[0]
    assert again.image_calls == 0 and torch.equal(reread, fresh) and torch.equal(cached, fresh)  # float32, bit-exact
    # a cache that holds only some of the images (an interrupted run) encodes just the others
    store = EmbeddingStore.open(next((tmp_path / "cache").glob("gallery-*")))
    partial = tmp_path / "partial" / store.folder.name
    part = EmbeddingStore.create(partial, store.arrays, meta={"model_key": store.meta["model_key"]})
    part.add(store.ids[:4], {"embeddings": np.asarray(store.array("embeddings")[:4])})
    resumed = PixelModel()
    features = E_enc.encode_gallery(resumed, ids, paths, cache_dir=tmp_path / "partial", batch_size=100, progress=False)[0]
    assert resumed.image_calls == 1 and torch.equal(features, fresh)
    assert len(EmbeddingStore.open(partial)) == len(ids)
    assert evaluate(PixelModel(), "generic", "val", root=tmp_path / "data", **opts)["num_queries"] == 4


def test_gallery_cache_file_of_an_older_zscir_is_read(tmp_path):
    """Before the embedding store the cache was one safetensors file of float32 rows in sorted-path order."""
    make_generic(tmp_path / "data")
    data = load_generic(tmp_path / "data")
    ids = data.galleries["all"]
    paths = [data.image_paths[i] for i in ids]
    fresh = E_enc.encode_gallery(PixelModel(), ids, paths, cache_dir=None, progress=False)[0]
    order = sorted(range(len(paths)), key=lambda i: os.path.abspath(paths[i]))
    key = gallery_cache_key(PixelModel().cache_key, paths)
    save_tensors(tmp_path / "old" / f"gallery-{key[:32]}.safetensors", {"features": fresh[torch.tensor(order)]},
                 metadata={"model": PixelModel().cache_key, "count": str(len(ids))})
    model = PixelModel()
    loaded = E_enc.encode_gallery(model, ids, paths, cache_dir=tmp_path / "old", progress=False)[0]
    assert model.image_calls == 0 and torch.equal(loaded, fresh)


# ------------------------------------------------------------------------------- CLI
def _parse(argv):
    parser = argparse.ArgumentParser(prog="zscir eval")
    E_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_run_writes_results_rankings_and_submission(tmp_path, monkeypatch, capsys):
    fx = make_cirr(tmp_path / "cirr")
    loaded = []

    def fake_loader(path, device=None):
        loaded.append(path)
        return ScriptedModel(fx.num_images, cirr_val_script(fx))

    monkeypatch.setattr(E_cli, "load_model", fake_loader)
    args = _parse(["--dataset", "cirr", "--root", str(tmp_path / "cirr"), "--split", "val", "--model", "MODEL_DIR",
                   "--out", str(tmp_path / "res.json"), "--save-rankings", str(tmp_path / "rank.json"),
                   "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--batch-size", "3"])
    assert E_cli.run(args) == 0 and loaded == ["MODEL_DIR"]
    saved = json.loads((tmp_path / "res.json").read_text())
    assert saved["metrics"]["R@5"] == 75.0 and saved["num_queries"] == 4
    assert "Rsubset@1" in capsys.readouterr().out
    assert set(read_rankings(tmp_path / "rank.json")) == {"100", "101", "102", "103"}

    monkeypatch.setattr(E_cli, "load_model", lambda path, device=None: PixelModel())
    args = _parse(["--dataset", "cirr", "--root", str(tmp_path / "cirr"), "--split", "test", "--model", "m",
                   "--submission", str(tmp_path / "sub"), "--no-cache", "--no-progress"])
    assert E_cli.run(args) == 0
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["zscir_cirr_recall.json", "zscir_cirr_recall_subset.json"]


def test_cli_fiq_caption_order_spellings(tmp_path, monkeypatch, capsys):
    make_fashioniq(tmp_path / "fiq")
    monkeypatch.setattr(E_cli, "load_model", lambda path, device=None: PixelModel())
    for flag, order in (("both", "both"), ("c1-and-c2", "c1-and-c2"), ("single", "c1-and-c2"), ("pic2word", "pic2word")):
        args = _parse(["--dataset", "fashioniq", "--root", str(tmp_path / "fiq"), "--model", "m", "--no-progress",
                       "--no-cache", "--fiq-caption-order", flag, "--out", str(tmp_path / f"{flag}.json")])
        assert E_cli.run(args) == 0
        assert json.loads((tmp_path / f"{flag}.json").read_text())["options"]["caption_order"] == order
    with pytest.raises(SystemExit):
        _parse(["--dataset", "fashioniq", "--root", "r", "--model", "m", "--fiq-caption-order", "reverse"])
    assert "invalid choice: 'reverse'" in capsys.readouterr().err


def test_cli_reports_data_errors_with_exit_code(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(E_cli, "load_model", lambda path, device=None: PixelModel())
    args = _parse(["--dataset", "circo", "--root", str(tmp_path / "absent"), "--model", "m", "--no-progress"])
    assert E_cli.run(args) == 1
    assert "folder not found" in capsys.readouterr().err
    make_circo(tmp_path / "circo")
    (tmp_path / "circo" / "COCO2017_unlabeled" / "unlabeled2017" / f"{1000:012d}.png").unlink()
    args = _parse(["--dataset", "circo", "--root", str(tmp_path / "circo"), "--model", "m", "--no-progress", "--no-cache"])
    assert E_cli.run(args) == 1
    assert "000000001000.png" in capsys.readouterr().err
    args = _parse(["--dataset", "circo", "--root", str(tmp_path / "circo"), "--model", "m", "--no-progress",
                   "--no-cache", "--allow-missing", "--out", str(tmp_path / "o.json")])
    assert E_cli.run(args) == 0
    assert json.loads((tmp_path / "o.json").read_text())["num_skipped"] == 1  # query 0 has that reference


def test_decoding_in_worker_processes_gives_the_same_results(tmp_path):
    fx = make_generic(tmp_path)
    inline = evaluate(ScriptedModel(fx.num_images, generic_script(fx)), "generic", "val", root=tmp_path, **QUIET)
    workers = evaluate(ScriptedModel(fx.num_images, generic_script(fx)), "generic", "val", root=tmp_path,
                       num_workers=1, batch_size=3, **QUIET)
    assert workers["metrics"] == inline["metrics"]
