"""Tests of the procedural shapes world (zscir/shapes)."""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Sequence, Set

import numpy as np
import pytest
from PIL import Image

from zscir.config import ConfigError
from zscir.cli import shapes as shapes_cli
from zscir.shapes import captions as shapes_captions, scene as shapes_scene
from zscir.shapes import (
    BACKGROUND,
    COLORS,
    EDIT_KINDS,
    LONG_TAIL_WEIGHTS,
    MAX_CAPTION_TOKENS,
    SHAPES,
    SINGLE_KINDS,
    SIZES,
    Scene,
    SceneObject,
    ShapesWorld,
    ShapesWorldConfig,
    caption,
    cell_center,
    describe,
    edit_add,
    edit_color,
    edit_move,
    edit_remove,
    edit_shape,
    edit_size,
    position_phrase,
    random_scene,
    render,
    render_array,
)

ALL_CELLS = [(r, c) for r in range(3) for c in range(3)]


def obj(shape: str, color: str, size: str, row: int, col: int) -> SceneObject:
    """Short constructor."""
    return SceneObject(shape=shape, color=color, size=size, row=row, col=col)


def full_scene() -> Scene:
    """A scene with every cell occupied."""
    return Scene(tuple(obj(SHAPES[i % len(SHAPES)], list(COLORS)[i % len(COLORS)], SIZES[i % 2], r, c) for i, (r, c) in enumerate(ALL_CELLS)))


# ----------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------


def test_scene_key_is_order_invariant_and_content_sensitive() -> None:
    a, b, c = obj("circle", "red", "small", 0, 0), obj("star", "blue", "large", 1, 2), obj("cross", "green", "small", 2, 1)
    s1, s2 = Scene((a, b, c)), Scene((c, a, b))
    assert s1.key == s2.key and s1 == s2 and s1.id == s2.id
    changed = Scene((a, b, obj("cross", "pink", "small", 2, 1)))
    moved = Scene((a, b, obj("cross", "green", "small", 2, 2)))
    assert len({s1.key, changed.key, moved.key}) == 3


def test_scene_rejects_two_objects_in_one_cell_and_bad_attributes() -> None:
    with pytest.raises(ValueError, match="cell"):
        Scene((obj("circle", "red", "small", 1, 1), obj("star", "blue", "large", 1, 1)))
    with pytest.raises(ValueError, match="color"):
        obj("circle", "magenta", "small", 0, 0)
    with pytest.raises(ValueError, match="row"):
        obj("circle", "red", "small", 3, 0)


def test_scene_dict_round_trip_and_errors_name_the_field() -> None:
    scene = random_scene(random.Random(0), 3, 3)
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    bad = scene.to_dict()
    bad["objects"][1]["shape"] = "blob"
    with pytest.raises(ValueError, match=r"objects\[1\].*shape"):
        Scene.from_dict(bad, source="scene.json")
    bad = scene.to_dict()
    del bad["objects"][0]["size"]
    with pytest.raises(ValueError, match="missing.*size"):
        Scene.from_dict(bad)


def test_random_scene_respects_object_limits() -> None:
    rng = random.Random(5)
    counts = Counter(len(random_scene(rng, 2, 4)) for _ in range(600))
    assert set(counts) == {2, 3, 4}
    with pytest.raises(ValueError, match="max_objects"):
        random_scene(rng, 3, 10)


# ----------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [48, 64, 128])
def test_cell_centre_has_the_object_colour_and_empty_cells_are_background(image_size: int) -> None:
    rng = random.Random(image_size)
    for _ in range(30):
        scene = random_scene(rng, 1, 5)
        img = np.asarray(render(scene, image_size))
        assert img.shape == (image_size, image_size, 3) and img.dtype == np.uint8
        cell = image_size / 3
        for o in scene.objects:
            y, x = cell_center(o.row, o.col, image_size)
            assert tuple(img[y, x]) == COLORS[o.color]
        for r, c in scene.free_cells():
            block = img[int(np.ceil(r * cell)) : int((r + 1) * cell), int(np.ceil(c * cell)) : int((c + 1) * cell)]
            assert (block == np.asarray(BACKGROUND, dtype=np.uint8)).all()


def test_render_array_matches_single_renders() -> None:
    scenes = ShapesWorld().scenes(12)
    batch = render_array(scenes, 64)
    assert batch.shape == (12, 64, 64, 3)
    for scene, pixels in zip(scenes, batch):
        assert np.array_equal(np.asarray(render(scene, 64)), pixels)
    assert render(scenes[0]).mode == "RGB"
    with pytest.raises(ValueError, match="image_size"):
        render_array(scenes, 10)


def _mask(shape: str, size: str, image_size: int = 64) -> np.ndarray:
    img = render_array([Scene((obj(shape, "white", size, 1, 1),))], image_size)[0]
    return (img != np.asarray(BACKGROUND, dtype=np.uint8)).any(axis=-1)


def test_shapes_are_distinguishable_at_small_size_and_sizes_differ() -> None:
    for a, b in itertools.combinations(SHAPES, 2):
        ma, mb = _mask(a, "small"), _mask(b, "small")
        iou = (ma & mb).sum() / (ma | mb).sum()
        assert iou < 0.85, f"{a} and {b} look alike at 64px (IoU {iou:.2f})"
    for s in SHAPES:
        assert _mask(s, "large").sum() > 2 * _mask(s, "small").sum()


def test_removed_and_moved_objects_render_where_the_edit_says() -> None:
    rng = random.Random(11)
    scene = Scene((obj("star", "yellow", "large", 0, 0), obj("circle", "blue", "small", 2, 2)))
    removed = edit_remove(scene, rng, index=0)
    assert removed is not None
    img = np.asarray(render(removed.target))
    assert tuple(img[cell_center(0, 0)]) == BACKGROUND
    assert tuple(img[cell_center(2, 2)]) == COLORS["blue"]
    moved = edit_move(scene, rng, index=1, cell=(1, 0))
    assert moved is not None
    img = np.asarray(render(moved.target))
    assert tuple(img[cell_center(1, 0)]) == COLORS["blue"]
    assert tuple(img[cell_center(2, 2)]) == BACKGROUND


# ----------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------


def _fingerprint(world: ShapesWorld) -> str:
    h = hashlib.sha256()
    pairs = world.captioned_scenes(40)
    h.update(world.render_array([s for s, _ in pairs]).tobytes())
    for _, text in pairs:
        h.update(text.encode())
    for e in world.make_triplets(40):
        h.update((e.source.key + e.target.key + json.dumps(e.texts, sort_keys=True)).encode())
    ev = world.make_eval_set(10, n_random=5)
    for s in ev.gallery:
        h.update(s.key.encode())
    for q in ev.queries:
        h.update(q.text.encode())
    return h.hexdigest()


def test_same_seed_same_data_different_seed_different_data() -> None:
    assert _fingerprint(ShapesWorld(seed=3)) == _fingerprint(ShapesWorld(seed=3))
    assert _fingerprint(ShapesWorld(seed=3)) != _fingerprint(ShapesWorld(seed=4))


def test_determinism_does_not_depend_on_python_hash_seed() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_shapes as t; "
        "from zscir.shapes import ShapesWorld; print(t._fingerprint(ShapesWorld(seed=3)))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _fingerprint(ShapesWorld(seed=3))


def test_named_streams_are_independent() -> None:
    world = ShapesWorld(seed=0)
    assert [world.rng("clip").random() for _ in range(3)] == [world.rng("clip").random() for _ in range(3)]
    assert world.rng("clip").random() != world.rng("stage1").random()
    assert [s.key for s in world.scenes(20, "stage1")] != [s.key for s in world.scenes(20, "clip")]
    # A stream is a sequence: asking for more extends, never reshuffles.
    assert world.scenes(30, "a")[:10] == world.scenes(10, "a")


# ----------------------------------------------------------------------------
# Edits
# ----------------------------------------------------------------------------

_ATTR_KIND = {"color": "color", "shape": "shape", "size": "size", "cell": "move"}


def _pair_kinds(old: SceneObject, new: SceneObject) -> Set[str]:
    changed = {a for a in ("color", "shape", "size") if getattr(old, a) != getattr(new, a)}
    if old.cell != new.cell:
        changed.add("cell")
    return {_ATTR_KIND[a] for a in changed}


def _explanations(source: Scene, target: Scene) -> List[List[Set[str]]]:
    """Every way to explain source -> target as per-object operations (each a set of single kinds)."""
    target_keys = {o.key() for o in target.objects}
    source_keys = {o.key() for o in source.objects}
    gone = [o for o in source.objects if o.key() not in target_keys]
    new = [o for o in target.objects if o.key() not in source_keys]
    out = []
    for k in range(min(len(gone), len(new)) + 1):
        for olds in itertools.permutations(gone, k):
            for news in itertools.combinations(new, k):
                ops = [_pair_kinds(a, b) for a, b in zip(olds, news)]
                ops += [{"remove"} for o in gone if o not in olds]
                ops += [{"add"} for o in new if o not in news]
                out.append(sorted(ops, key=sorted))
    return out


def _expected_ops(kind: str) -> List[Set[str]]:
    parts = kind.split("+")
    attribute = {"color", "shape", "size", "move"}
    if len(parts) == 2 and set(parts) <= attribute:
        return [set(parts)]  # both changes hit the same object
    return sorted(({p} for p in parts), key=sorted)


def test_registry_has_single_and_pairwise_kinds() -> None:
    names = EDIT_KINDS.names()
    assert set(SINGLE_KINDS) <= set(names)
    for must in ("color+size", "shape+move", "add+remove"):
        assert must in names
    assert len(names) == 6 + 15


@pytest.mark.parametrize("kind", EDIT_KINDS.names())
def test_every_kind_changes_exactly_what_it_says(kind: str) -> None:
    rng = random.Random(kind)
    fn = EDIT_KINDS.get(kind)
    made = 0
    for _ in range(120):
        scene = random_scene(rng, 1, 5)
        edit = fn(scene, rng)
        if edit is None:
            continue
        made += 1
        assert edit.kind == kind and edit.source == scene
        assert edit.target.key != edit.source.key
        assert _expected_ops(kind) in _explanations(edit.source, edit.target), (kind, edit.source.key, edit.target.key)
        assert set(edit.texts) == {"train", "eval"} and all(edit.texts.values())
        assert edit.texts["train"] != edit.texts["eval"]
    assert made > 40


def test_impossible_edits_return_none() -> None:
    rng = random.Random(0)
    full = full_scene()
    single = Scene((obj("circle", "red", "small", 1, 1),))
    assert edit_add(full, rng) is None
    assert edit_move(full, rng) is None
    assert edit_remove(single, rng) is None
    for kind in ("color+remove", "shape+remove", "size+remove", "move+remove"):
        assert EDIT_KINDS.get(kind)(single, rng) is None
    for kind in ("color+add", "move+add", "add+remove"):
        assert EDIT_KINDS.get(kind)(full, rng) is None
    # Possible on a single object: remove it and add another.
    swap = EDIT_KINDS.get("add+remove")(single, rng)
    assert swap is not None and len(swap.target) == 1 and swap.target.key != single.key


def test_explicit_choices_are_honoured_and_validated() -> None:
    rng = random.Random(2)
    scene = Scene((obj("circle", "red", "small", 0, 0), obj("star", "blue", "large", 2, 2)))
    e = edit_color(scene, rng, index=1, color="green")
    assert e is not None and e.target.objects[1].color == "green" and "green" in e.texts["train"] and "green" in e.texts["eval"]
    e = edit_shape(scene, rng, index=0, shape="diamond")
    assert e is not None and e.target.objects[0].shape == "diamond" and "diamond" in e.texts["eval"]
    e = edit_size(scene, rng, index=0)
    assert e is not None and e.target.objects[0].size == "large"
    new = obj("cross", "orange", "small", 1, 2)
    e = edit_add(scene, rng, obj=new)
    assert e is not None and new in e.target.objects
    assert "a small orange cross" in e.texts["train"]
    assert "middle right" in e.texts["train"] and "middle right" in e.texts["eval"]
    with pytest.raises(ValueError, match="color"):
        edit_color(scene, rng, index=0, color="red")
    with pytest.raises(ValueError, match="index"):
        edit_size(scene, rng, index=5)
    with pytest.raises(ValueError, match="occupied"):
        edit_move(scene, rng, index=0, cell=(2, 2))


def test_references_disambiguate_when_colour_and_shape_are_shared() -> None:
    # Two red circles: any text about one of them must name its size or its position.
    scene = Scene((obj("circle", "red", "small", 0, 0), obj("circle", "red", "large", 2, 2), obj("star", "blue", "small", 1, 1)))
    for seed in range(25):
        rng = random.Random(seed)
        for e in (edit_color(scene, rng, index=0, color="green"), edit_remove(scene, rng, index=0), edit_move(scene, rng, index=0)):
            assert e is not None
            for family, text in e.texts.items():
                assert "small" in text or "top left" in text, (family, text)
    # A unique shape may be named by its shape alone, but the text never names the wrong object.
    star = [o.shape for o in scene.objects].index("star")
    for seed in range(25):
        e = edit_remove(scene, random.Random(seed), index=star)
        assert e is not None and all("circle" not in t for t in e.texts.values())


def test_combined_references_stay_unambiguous_after_the_other_change() -> None:
    # Turning the red cross into a star makes "the star" ambiguous for whoever reads the
    # clauses in order, so the removed blue star must be named by its colour (or position).
    scene = Scene((obj("cross", "red", "small", 0, 0), obj("star", "blue", "small", 2, 2)))
    seen = 0
    for seed in range(60):
        rng = random.Random(seed)
        e = EDIT_KINDS.get("shape+remove")(scene, rng)
        if e is None or e.target.objects[0].shape != "star" or len(e.target) != 1:
            continue
        seen += 1
        for text in e.texts.values():
            # The removed star must be named more precisely than "the star" / "no star".
            assert "the star" not in text and "no star" not in text, text
    assert seen > 0


def test_families_use_different_wording() -> None:
    edits = ShapesWorld(seed=1).make_triplets(600)
    train_only = ("make ", "change ", "move ", "remove ", "add ", "replace ", "turn ", "put ", "delete ")
    eval_only = ("same scene", "instead of", "where ", "that has", "there is", " too")
    for e in edits:
        train, ev = e.texts["train"], e.texts["eval"]
        assert not any(train.startswith(w) or f" {w}" in train for w in eval_only), train
        assert not any(ev.startswith(w) or f" {w}" in ev for w in train_only), ev
    assert len({e.texts["eval"] for e in edits}) > 500  # varied, not a few fixed strings


def test_edit_family_selects_the_text() -> None:
    world = ShapesWorld(seed=2)
    train = world.make_triplets(5)
    evals = world.make_triplets(5, family="eval")
    assert [e.text for e in train] == [e.texts["train"] for e in train]
    assert [e.text for e in evals] == [e.texts["eval"] for e in evals]
    with pytest.raises(ValueError, match="family"):
        world.make_triplets(1, family="test")


# ----------------------------------------------------------------------------
# Captions and the tokenizer
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    open_clip = pytest.importorskip("open_clip")
    return open_clip.get_tokenizer("ViT-B-32")


def _token_ids(tokenizer, texts: Sequence[str]) -> Set[int]:
    ids = tokenizer(list(texts), context_length=77)
    return set(int(i) for i in ids.unique().tolist()) - {0}


def _many_captions(n_scenes: int, min_objects: int = 1, max_objects: int = 4) -> List[str]:
    world = ShapesWorld(seed=7, min_objects=min_objects, max_objects=max_objects)
    rng = world.rng("captions-test")
    out = []
    for scene in world.scenes(n_scenes):
        out += describe(scene, rng)
        out.append(caption(scene, rng))
    return out


def test_captions_fit_the_context_length(tokenizer) -> None:
    texts = _many_captions(400) + _many_captions(150, 7, 9)
    ids = tokenizer(texts, context_length=77)
    lengths = (ids != 0).sum(dim=1)
    worst = int(lengths.argmax())
    assert int(lengths.max()) <= MAX_CAPTION_TOKENS, texts[worst]


def test_eval_family_vocabulary_is_covered_by_captions(tokenizer) -> None:
    caption_tokens = _token_ids(tokenizer, _many_captions(1500))
    world = ShapesWorld(seed=8)
    eval_texts = [e.texts["eval"] for e in world.make_triplets(1500)]
    eval_texts += [q.text for q in world.make_eval_set(300, n_random=0).queries]
    missing = _token_ids(tokenizer, eval_texts) - caption_tokens
    decoder = getattr(tokenizer, "decoder", {})
    assert not missing, f"eval-family tokens never seen in captions: {[decoder.get(i, i) for i in missing]}"
    # The train family is allowed words of its own, and it does use some (held-out wording).
    train_texts = [e.texts["train"] for e in world.make_triplets(300)]
    assert _token_ids(tokenizer, train_texts) - caption_tokens


def test_describe_gives_several_true_phrasings() -> None:
    rng = random.Random(4)
    scene = Scene((obj("circle", "blue", "small", 0, 0), obj("star", "orange", "large", 1, 1)))
    texts = describe(scene, rng)
    assert len(texts) >= 4 and len(set(texts)) == len(texts)
    full = texts[0]
    assert "blue circle" in full and "orange star" in full
    assert shapes_scene._a("orange star") == "an orange star" and shapes_scene._a("red star") == "a red star"
    assert texts[1].startswith("two ")
    # Negative captions only deny things that are absent.
    for _ in range(200):
        text = shapes_captions._cap_negative(scene, rng)
        for denied in ("no blue circle", "no circle", "no orange star", "no star", "without a blue circle"):
            assert denied not in text, text


def test_concept_phrases() -> None:
    phrases = ShapesWorld().concept_phrases()
    for p in ("red circle", "large square", "circle", "red", "top left", "center"):
        assert p in phrases
    assert len(phrases) == len(set(phrases))


# ----------------------------------------------------------------------------
# Triplet sampling and evaluation sets
# ----------------------------------------------------------------------------


def test_kind_weights_skew_the_distribution() -> None:
    world = ShapesWorld(seed=9)
    n = 3000
    long_tail = Counter(e.kind for e in world.make_triplets(n, kind_weights=LONG_TAIL_WEIGHTS))
    total = sum(LONG_TAIL_WEIGHTS.values())
    for kind in ("color", "shape", "move"):
        assert abs(long_tail[kind] / n - LONG_TAIL_WEIGHTS[kind] / total) < 0.03, (kind, long_tail[kind])
    assert long_tail["color"] > 5 * long_tail["move"]
    uniform = Counter(e.kind for e in world.make_triplets(n))
    assert set(uniform) == set(EDIT_KINDS.names())
    assert max(uniform.values()) / n < 1 / 21 + 0.025 and min(uniform.values()) / n > 1 / 21 - 0.025
    only = Counter(e.kind for e in world.make_triplets(50, kind_weights={"size": 1.0}))
    assert only == {"size": 50}
    with pytest.raises(KeyError, match="recolour"):
        world.make_triplets(1, kind_weights={"recolour": 1.0})


def test_eval_set_structure() -> None:
    world = ShapesWorld(seed=5)
    ev = world.make_eval_set(60, n_random=30, siblings_per_query=3)
    keys = [s.key for s in ev.gallery]
    assert len(keys) == len(set(keys)), "gallery must be deduplicated"
    assert len(ev.gallery) <= 60 * 5 + 30
    key_set = set(keys)
    with_siblings = 0
    for i, q in enumerate(ev.queries):
        assert ev.gallery[q.reference_index].key == q.edit.source.key
        pos = ev.positives(i)
        assert pos and all(ev.gallery[j].key == q.target_key for j in pos)
        assert q.reference_index not in pos
        assert q.text == q.edit.texts["eval"]
        assert q.target_key not in q.sibling_keys and len(set(q.sibling_keys)) == len(q.sibling_keys)
        assert all(k in key_set for k in q.sibling_keys)
        with_siblings += len(q.sibling_keys) == 3
    assert with_siblings > 50
    # Default sizes: 1,000 queries give a ~5,000-image gallery (checked on a scaled-down set).
    small = world.make_eval_set(200)
    assert 800 <= len(small.gallery) <= 1100


# ----------------------------------------------------------------------------
# Exports and config
# ----------------------------------------------------------------------------


def _read_jsonl(path: Path) -> List[Dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_export_generic(tmp_path: Path) -> None:
    world = ShapesWorld(seed=6, image_size=48)
    ev = world.make_eval_set(12, n_random=4)
    folder = world.export_generic(ev, tmp_path / "generic", progress=False)
    gallery = (folder / "gallery.txt").read_text().splitlines()
    assert len(gallery) == len(ev.gallery) == len(set(gallery))
    for rel in gallery:
        assert (folder / rel).is_file()
    queries = _read_jsonl(folder / "queries.jsonl")
    assert len(queries) == 12 and len({q["id"] for q in queries}) == 12
    for q, query in zip(queries, ev.queries):
        assert set(q) == {"id", "reference", "modification", "targets", "kind"}
        assert q["reference"] in gallery and q["targets"] and set(q["targets"]) <= set(gallery)
        assert q["modification"] == query.text and q["kind"] == query.kind
        target = np.asarray(Image.open(folder / q["targets"][0]).convert("RGB"))
        assert np.array_equal(target, np.asarray(render(query.edit.target, 48)))
    assert ShapesWorldConfig.from_json(folder / "shapes_world.json") == world.config


def test_export_captions_and_triplets(tmp_path: Path) -> None:
    world = ShapesWorld(seed=6)
    pairs = world.captioned_scenes(10)
    folder = world.export_captions(pairs, tmp_path / "caps", progress=False)
    rows = _read_jsonl(folder / "captions.jsonl")
    assert [r["caption"] for r in rows] == [c for _, c in pairs]
    first = np.asarray(Image.open(folder / rows[0]["image"]))
    assert np.array_equal(first, np.asarray(render(pairs[0][0])))

    edits = world.make_triplets(8)
    folder = world.export_triplets(edits, tmp_path / "trip", progress=False)
    rows = _read_jsonl(folder / "triplets.jsonl")
    assert len(rows) == 8
    for row, e in zip(rows, edits):
        assert set(row) == {"reference", "modification", "target", "kind"}
        assert row["modification"] == e.texts["train"] and row["kind"] == e.kind
        assert np.array_equal(np.asarray(Image.open(folder / row["reference"])), np.asarray(render(e.source)))
        assert np.array_equal(np.asarray(Image.open(folder / row["target"])), np.asarray(render(e.target)))


def test_config_round_trip_and_validation(tmp_path: Path) -> None:
    cfg = ShapesWorldConfig(seed=4, image_size=96, min_objects=2, max_objects=5)
    cfg.to_json(tmp_path / "w.json")
    assert ShapesWorldConfig.from_json(tmp_path / "w.json") == cfg
    with pytest.raises(ValueError, match="max_objects"):
        ShapesWorldConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="image_size"):
        ShapesWorldConfig(image_size=8)
    with pytest.raises(ConfigError, match="colours"):
        ShapesWorldConfig.from_dict({"colours": 3})
    assert ShapesWorld(cfg, seed=5).config.seed == 5


def test_command_line_export(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    shapes_cli.add_arguments(parser)
    args = parser.parse_args(["eval", "--out", str(tmp_path / "cli"), "--n", "5", "--n-random", "2", "--no-progress"])
    assert shapes_cli.run(args) == 0
    assert len(_read_jsonl(tmp_path / "cli" / "queries.jsonl")) == 5


def test_position_words() -> None:
    assert position_phrase(0, 0) == "top left"
    assert position_phrase(1, 1) == "center"
    assert position_phrase(2, 1) == "bottom center"
