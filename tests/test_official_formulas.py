"""Every metric `evaluate` reports on the real CIRR, CIRCO and FashionIQ val annotations, against the official formulas.

The expected numbers come from plain re-implementations written here from the
benchmarks' official evaluation code (CIRR and FashionIQ: CLIP4Cir / SEARLE
``validate.py``; CIRCO: miccunifi/CIRCO ``src/evaluation.py``), not from zscir's
code.  The images are numbered placeholders (a distinct 8x8 PNG per image id) and
the model turns them back into ids: an image's feature is a pseudo-random unit
vector of its id; a query's feature is a pseudo-random vector of (reference id,
text) pulled towards its reference and its ground truths by pseudo-random
strengths, so references and targets land all over the rankings (metrics far
from 0 and 100) and no two scores tie.  The reference builds the same vectors in float64 from the raw
annotation files; the evaluation ranks float32 copies, so the test first checks
that no score that decides a metric lies within TIE_MARGIN of a competitor.
"""
from __future__ import annotations

import functools
import hashlib
import json
from collections import defaultdict
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
import pytest
import torch

from fixtures_cir import build_real_roots, image_number, shared_annotations_dir
from zscir.eval.evaluate import evaluate

REAL = shared_annotations_dir()
DIM = 32
MAX_PULL = 1.5  # the pulls of a query towards its reference and its ground truths are uniform in [0, MAX_PULL)
TIE_MARGIN = 1e-6  # float32 scores err by < 3e-7 here; scores closer than this could be ordered either way
SALT = 0  # part of every feature's seed: a value for which no deciding score is within TIE_MARGIN of another
QUIET = dict(use_cache=False, progress=False, print_results=False)

pytestmark = pytest.mark.skipif(not REAL.is_dir(),
                                reason=f"shared annotation folder not found at {REAL} (set ZSCIR_ANNOTATIONS)")

Truths = Dict[Tuple[object, str], List[object]]


# ------------------------------------------------------------------------- features
def _rng(key: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little"))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@functools.lru_cache(maxsize=None)
def image_vector(image_id: object) -> np.ndarray:
    """The float64 unit feature of an image id."""
    return _unit(_rng(f"image\t{SALT}\t{image_id}").standard_normal(DIM))


def query_vector(reference: object, text: str, truths: Sequence[object]) -> np.ndarray:
    """The float64 feature of a (reference, text) query: random, pulled towards its reference and its ground truths.

    The pull towards the reference often ranks it first, as with real models,
    so whether a protocol removes it from the ranking shows in the metrics.
    """
    rng = _rng(f"query\t{SALT}\t{reference}\t{text}")
    noise = _unit(rng.standard_normal(DIM))
    pull = _unit(sum(image_vector(t) for t in truths))
    return noise + MAX_PULL * rng.random() * image_vector(reference) + MAX_PULL * rng.random() * pull


class NamedRandomModel:
    """Decodes each numbered placeholder back to its image id; features as image_vector / query_vector."""

    cache_key = "named-random"

    def __init__(self, name_of: Mapping[int, object], truths: Truths) -> None:
        self.name_of = name_of
        self.truths = truths

    def encode_images(self, images):
        """[N, DIM] float32 image features."""
        return torch.from_numpy(np.stack([image_vector(self.name_of[image_number(im)]) for im in images])).float()

    def encode_query(self, images, texts):
        """[N, DIM] float32 query features; an unexpected (reference, text) is an error (wrong query text)."""
        rows = []
        for im, text in zip(images, texts):
            key = (self.name_of[image_number(im)], text)
            assert key in self.truths, f"evaluate asked for a query the official text rule does not produce: {key}"
            rows.append(query_vector(*key, self.truths[key]))
        return torch.from_numpy(np.stack(rows)).float()


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """Real roots (val splits) with a distinct numbered PNG per image id."""
    return build_real_roots(tmp_path_factory.mktemp("numbered"), REAL, numbered=True,
                            splits={"fashioniq": ("val",), "cirr": ("val",)})


# ------------------------------------------------------------------------- helpers
def _load(*parts: str):
    return json.loads(REAL.joinpath(*parts).read_text())


def _rank(row: np.ndarray, column: int) -> int:
    """0-based position of `column` in `row` sorted best first (no ties: the number of strictly higher scores)."""
    return int(np.sum(row > row[column]))


def _assert_clear(row: np.ndarray, column: int, what: str) -> None:
    """No other score lies within TIE_MARGIN of row[column], so float32 and float64 order it the same way."""
    gaps = np.abs(row - row[column])
    gaps[column] = np.inf
    assert gaps.min() > TIE_MARGIN, f"{what}: a near tie ({gaps.min():.1e}) could flip a metric; choose another SALT"


def _check_recall_boundaries(row: np.ndarray, column: int, ks: Sequence[int], what: str) -> None:
    """Recall@K only changes when a swap moves the target across position K: check those neighbours."""
    if any(_rank(row, column) in (k - 1, k) for k in ks):
        _assert_clear(row, column, what)


def _compare(metrics: Mapping[str, float], expected: Mapping[str, float]) -> None:
    assert sorted(metrics) == sorted(expected), "evaluate reports other metrics than the official code"
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key


# ------------------------------------------------------------------------------ CIRR
def test_cirr_val_matches_the_official_formulas(numbered):
    rows = _load("cirr", "captions", "cap.rc2.val.json")
    gallery = list(_load("cirr", "image_splits", "split.rc2.val.json"))
    column = {name: j for j, name in enumerate(gallery)}
    G = np.stack([image_vector(n) for n in gallery])
    # the query text is the caption as given; the only ground truth is target_hard
    truths: Truths = defaultdict(list)
    for r in rows:
        truths[(r["reference"], r["caption"])].append(r["target_hard"])

    ks, subset_ks = (1, 5, 10, 50), (1, 2, 3)
    hits = {k: 0 for k in ks}
    subset_hits = {k: 0 for k in subset_ks}
    for r in rows:
        row = G @ _unit(query_vector(r["reference"], r["caption"], truths[(r["reference"], r["caption"])]))
        # the whole split gallery is ranked and the reference image deleted from the ranking (CLIP4Cir / SEARLE:
        # "Delete the reference image from the results"); Recall@K asks whether target_hard is in the top K
        row[column[r["reference"]]] = -np.inf
        target = column[r["target_hard"]]
        _check_recall_boundaries(row, target, ks, f"CIRR pair {r['pairid']}")
        position = _rank(row, target)
        for k in ks:
            hits[k] += position < k
        # Recall_subset ranks only the pair's img_set members, the reference (already deleted) excluded: 5 images
        members = [column[m] for m in r["img_set"]["members"] if m != r["reference"]]
        assert len(members) == 5 and target in members
        for m in members:
            if m != target:
                assert abs(row[m] - row[target]) > TIE_MARGIN, f"CIRR pair {r['pairid']}: near tie in its group"
        subset_position = sum(row[m] > row[target] for m in members)
        for k in subset_ks:
            subset_hits[k] += subset_position < k
    n = len(rows)
    expected = {f"R@{k}": 100.0 * hits[k] / n for k in ks}
    expected.update({f"Rsubset@{k}": 100.0 * subset_hits[k] / n for k in subset_ks})
    expected["avg"] = (expected["R@5"] + expected["Rsubset@1"]) / 2  # the CIRR leaderboard's summary number
    assert 0 < expected["R@1"] < expected["R@50"] < 100 and 20 < expected["Rsubset@1"] < 100  # informative, not random

    results = evaluate(NamedRandomModel(numbered.name_of, truths), "cirr", "val", root=numbered.roots["cirr"], **QUIET)
    assert results["num_queries"] == n and results["num_skipped"] == 0
    _compare(results["metrics"], expected)


# ----------------------------------------------------------------------------- CIRCO
def test_circo_val_matches_the_official_formulas(numbered):
    rows = _load("circo", "annotations", "val.json")
    info = json.loads((numbered.roots["circo"] / "COCO2017_unlabeled" / "annotations" /
                       "image_info_unlabeled2017.json").read_text())
    gallery = [im["id"] for im in info["images"]]
    column = {image_id: j for j, image_id in enumerate(gallery)}
    G = np.stack([image_vector(i) for i in gallery])
    # the query text is the relative caption alone (no shared concept); all gt_img_ids are ground truths
    truths: Truths = defaultdict(list)
    for r in rows:
        truths[(r["reference_img_id"], r["relative_caption"])].extend(r["gt_img_ids"])

    ks = (5, 10, 25, 50)
    aps: Dict[int, List[float]] = {k: [] for k in ks}
    recalls: Dict[int, List[float]] = {k: [] for k in ks}
    aspect_aps: Dict[str, List[float]] = defaultdict(list)
    for r in rows:
        gts = r["gt_img_ids"]
        assert len(set(gts)) == len(gts) and gts[0] == r["target_img_id"]  # official: the target is the first gt
        row = G @ _unit(query_vector(r["reference_img_id"], r["relative_caption"],
                                     truths[(r["reference_img_id"], r["relative_caption"])]))
        # the reference is NOT removed: the official predictions are the top 50 of the whole gallery
        for g in gts:
            if _rank(row, column[g]) <= 50:
                _assert_clear(row, column[g], f"CIRCO query {r['id']}")
        predictions = [gallery[j] for j in np.argsort(-row)[:50]]
        # official: precision at each position holding a gt, summed over the top k, divided by min(#gt, k)
        labels = np.isin(predictions, gts)
        precisions = np.cumsum(labels) * labels / np.arange(1, 51)
        for k in ks:
            aps[k].append(float(np.sum(precisions[:k]) / min(len(gts), k)))
            # official Recall@k counts target_img_id only
            recalls[k].append(float(r["target_img_id"] in predictions[:k]))
        # official semantic mAP@10: each aspect of the query collects the query's AP@10
        for aspect in r["semantic_aspects"]:
            aspect_aps[aspect].append(float(np.sum(precisions[:10]) / min(len(gts), 10)))
    expected = {f"mAP@{k}": 100.0 * float(np.mean(aps[k])) for k in ks}
    expected.update({f"R@{k}": 100.0 * float(np.mean(recalls[k])) for k in ks})
    expected.update({f"aspect/{a}/mAP@10": 100.0 * float(np.mean(v)) for a, v in aspect_aps.items()})
    assert len(aspect_aps) == 9 and 0 < expected["mAP@5"] < 100 and 0 < expected["R@5"] < expected["R@50"] < 100

    results = evaluate(NamedRandomModel(numbered.name_of, truths), "circo", "val", root=numbered.roots["circo"], **QUIET)
    assert results["num_queries"] == len(rows) and results["num_skipped"] == 0
    _compare(results["metrics"], expected)


# ------------------------------------------------------------------------- FashionIQ
def _searle_texts(captions: Sequence[str]) -> Tuple[str, str]:
    """SEARLE's two query texts: "c1 and c2" and "c2 and c1", each caption stripped of '.?, ' at its ends."""
    c1, c2 = (c.strip(".?, ") for c in captions)
    return f"{c1} and {c2}", f"{c2} and {c1}"


def test_fashioniq_val_matches_the_official_formulas(numbered):
    categories = ("dress", "shirt", "toptee")
    rows = {c: _load("fashioniq", "captions", f"cap.{c}.val.json") for c in categories}
    truths: Truths = defaultdict(list)
    for c in categories:
        for r in rows[c]:
            for text in _searle_texts(r["captions"]):
                truths[(r["candidate"], text)].append(r["target"])

    ks = (10, 50)
    expected: Dict[str, float] = {}
    for c in categories:
        # each category is ranked against its own val split gallery (split.<category>.val.json); the reference
        # stays in it: CLIP4Cir / SEARLE sort the distances to every index image and remove nothing
        gallery = _load("fashioniq", "image_splits", f"split.{c}.val.json")
        column = {name: j for j, name in enumerate(gallery)}
        G = np.stack([image_vector(n) for n in gallery])
        hits = {k: 0 for k in ks}
        for index, r in enumerate(rows[c]):
            # SEARLE: normalise((normalise(f(c1 and c2)) + normalise(f(c2 and c1))) / 2)
            parts = [_unit(query_vector(r["candidate"], t, truths[(r["candidate"], t)]))
                     for t in _searle_texts(r["captions"])]
            row = G @ _unit((parts[0] + parts[1]) / 2)
            target = column[r["target"]]
            _check_recall_boundaries(row, target, ks, f"FashionIQ {c}/{index}")
            position = _rank(row, target)
            for k in ks:
                hits[k] += position < k
        for k in ks:
            expected[f"{c}/R@{k}"] = 100.0 * hits[k] / len(rows[c])
    for k in ks:
        expected[f"average/R@{k}"] = sum(expected[f"{c}/R@{k}"] for c in categories) / len(categories)
    expected["average"] = (expected["average/R@10"] + expected["average/R@50"]) / 2  # CLIP4Cir / SEARLE's summary
    assert all(0 < expected[f"{c}/R@10"] < expected[f"{c}/R@50"] < 100 for c in categories)

    results = evaluate(NamedRandomModel(numbered.name_of, truths), "fashioniq", "val",
                       root=numbered.roots["fashioniq"], **QUIET)
    assert results["num_queries"] == sum(len(v) for v in rows.values()) and results["num_skipped"] == 0
    _compare(results["metrics"], expected)
