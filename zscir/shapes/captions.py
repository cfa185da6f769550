"""Captions of shapes-world scenes, for pretraining a tiny CLIP: several phrasing families per scene."""
from __future__ import annotations

import random
import re
from types import MappingProxyType
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from .scene import COLORS, SHAPES, SIZES, Attrs, Scene, SceneObject, _a, _choose_ref, _join_and, _noun, _OBJECT_ATTRS, _prep

__all__ = ["MAX_CAPTION_TOKENS", "describe", "caption", "full_caption"]

# open_clip's context length for the tiny CLIP; includes the start and end tokens.
MAX_CAPTION_TOKENS = 48
# Budget for our own token estimate (words + punctuation runs); leaves room for the
# few words that BPE splits in two (e.g. "triangles").
_CAPTION_TOKEN_BUDGET = MAX_CAPTION_TOKENS - 6
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _estimate_tokens(text: str) -> int:
    """Token count estimate: one per word and per punctuation run (our vocabulary is mostly single BPE tokens)."""
    return len(re.findall(r"[a-z0-9]+|[^a-z0-9\s]+", text.lower()))


def _caption_object(obj: SceneObject, rng: random.Random, with_position: bool, full: bool = True) -> str:
    """"a small red circle at the top left", attributes sometimes omitted when not `full`."""
    if full:
        attrs: Attrs = _OBJECT_ATTRS
    else:
        attrs = rng.choice((("color", "shape"), ("size", "shape"), ("shape",), ("size", "color", "shape")))
    text = _a(" ".join(getattr(obj, a) for a in _OBJECT_ATTRS if a in attrs))
    if with_position:
        text += f" {_prep(rng)} the {obj.position}"
    return text


def _fit(build: Callable[[bool], Optional[str]]) -> Optional[str]:
    """Build a caption with positions if it fits the token budget, else without."""
    for with_position in (True, False):
        text = build(with_position)
        if text is not None and _estimate_tokens(text) <= _CAPTION_TOKEN_BUDGET:
            return text
    return None


def _shuffled(objects: Sequence[SceneObject], rng: random.Random) -> List[SceneObject]:
    """A shuffled copy."""
    out = list(objects)
    rng.shuffle(out)
    return out


def _cap_full_list(scene: Scene, rng: random.Random) -> Optional[str]:
    """Every object, fully described, in random order ("a picture with a red circle and ...")."""
    if not scene.objects:
        return rng.choice(("an empty scene", "a dark picture with no shapes"))
    prefix = rng.choice(("a picture with", "a scene with", "an image of", "there is", "a dark picture with", "", "a dark background with"))
    objs = _shuffled(scene.objects, rng)
    use_positions = rng.random() < 0.6

    def build(with_position: bool) -> str:
        items = [_caption_object(o, rng, with_position and use_positions) for o in objs]
        return f"{prefix} {_join_and(items)}".strip()

    return _fit(build) or _cap_partial(scene, rng)


def _cap_count(scene: Scene, rng: random.Random) -> Optional[str]:
    """The object count then the list ("two shapes: a blue star and a red circle")."""
    n = len(scene.objects)
    if n == 0:
        return None
    noun = rng.choice(("shape", "object")) if n == 1 else rng.choice(("shapes", "objects"))
    objs = _shuffled(scene.objects, rng)
    use_positions = rng.random() < 0.5

    def build(with_position: bool) -> str:
        items = [_caption_object(o, rng, with_position and use_positions) for o in objs]
        return f"{_NUMBER_WORDS[n]} {noun}: {_join_and(items)}"

    return _fit(build)


def _cap_partial(scene: Scene, rng: random.Random) -> Optional[str]:
    """Some objects, some attributes ("a scene with a blue circle and two other shapes")."""
    n = len(scene.objects)
    if n == 0:
        return None
    k = rng.randint(1, min(n, 3))
    objs = _shuffled(scene.objects, rng)[:k]
    items = [_caption_object(o, rng, rng.random() < 0.3, full=rng.random() < 0.5) for o in objs]
    rest = n - k
    text = f"{rng.choice(('a scene with', 'a picture with', 'an image with', 'there is'))} {_join_and(items)}"
    if rest > 0 and rng.random() < 0.6:
        others = "other shape" if rest == 1 else "other shapes"
        text += f" and {_NUMBER_WORDS[rest]} {others}"
    elif rng.random() < 0.3:
        text = f"{_join_and(items)}"
    return text


def _cap_negative(scene: Scene, rng: random.Random) -> Optional[str]:
    """What is absent ("a scene that has no triangle", "a red circle but no blue star")."""
    present_shapes = {o.shape for o in scene.objects}
    present_pairs = {(o.color, o.shape) for o in scene.objects}
    absent_shapes = [s for s in SHAPES if s not in present_shapes]
    if absent_shapes and rng.random() < 0.5:
        absent = rng.choice(absent_shapes)
    else:
        pairs = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present_pairs]
        color, shape = rng.choice(pairs)
        absent = f"{color} {shape}"
    if not scene.objects:
        return f"a scene with no {absent}"
    obj = rng.choice(scene.objects)
    named = _caption_object(obj, rng, rng.random() < 0.4)
    if len(scene.objects) == 1 and rng.random() < 0.4:
        return rng.choice((f"{named} and no other shapes", f"{named} without any other shape", f"{named}, with no other shape"))
    return rng.choice(
        (
            f"a scene that has no {absent}",
            f"a picture that has {named} but no {absent}",
            f"{named} but no {absent}",
            f"a scene with no {absent}",
            f"a picture without {_a(absent)}",
            f"a scene with {named}, without {_a(absent)}",
        )
    )


def _cap_where(scene: Scene, rng: random.Random) -> Optional[str]:
    """Where things are ("a scene where the red circle is at the top left")."""
    if not scene.objects:
        return None
    objects = scene.objects
    picks = rng.sample(range(len(objects)), min(len(objects), rng.choice((1, 1, 2))))
    clauses = []
    for i in picks:
        attrs = _choose_ref(objects, i, rng)
        if attrs is None or "position" in attrs:
            continue
        clauses.append(f"the {_noun(objects[i], attrs, rng)} is {_prep(rng)} the {objects[i].position}")
    if not clauses:
        obj = objects[picks[0]]
        return f"there is {_caption_object(obj, rng, True)}"
    body = " and ".join(clauses)
    return rng.choice((f"a scene where {body}", body, f"a picture where {body}"))


def _cap_same(scene: Scene, rng: random.Random) -> Optional[str]:
    """Shared attributes ("two shapes of the same color: a red circle and a red star", "a red circle and a blue one")."""
    objects = scene.objects
    options = []
    for attr, noun in (("color", "color"), ("size", "size"), ("shape", "shape")):
        groups: Dict[str, List[SceneObject]] = {}
        for o in objects:
            groups.setdefault(getattr(o, attr), []).append(o)
        for value in sorted(groups):
            members = groups[value]
            if len(members) >= 2:
                options.append((attr, noun, members))
    if not options:
        return None
    attr, noun, members = rng.choice(options)
    members = _shuffled(members, rng)
    count = _NUMBER_WORDS[len(members)]
    items = _join_and([_caption_object(o, rng, False) for o in members])
    if attr == "shape" and len(members) == 2 and rng.random() < 0.5:
        first, second = members
        return f"{_a(first.color + ' ' + first.shape)} and {_a(second.color)} one"
    if len(members) > 3:
        # Long lists would not fit the context; say how many instead.
        return f"a scene with {count} shapes of the same {noun}"
    return rng.choice(
        (
            f"{count} shapes of the same {noun}: {items}",
            f"{items}, the same {noun}",
            f"a scene with {count} shapes of the same {noun}",
        )
    )


def _cap_also(scene: Scene, rng: random.Random) -> Optional[str]:
    """Two objects linked by "also" / "too" ("a red circle, and a blue star too")."""
    if len(scene.objects) < 2:
        return None
    first, second = rng.sample(list(scene.objects), 2)
    pos = rng.random() < 0.5
    a, b = _caption_object(first, rng, pos), _caption_object(second, rng, pos)
    return rng.choice(
        (
            f"{a} and also {b}",
            f"{a}, and {b} too",
            f"there is {a}, and there is also {b}",
            f"a scene with {a} and {b} too",
        )
    )


def _cap_instead(scene: Scene, rng: random.Random) -> Optional[str]:
    """One object contrasted with an alternative it is not ("a red circle instead of a blue one")."""
    if not scene.objects:
        return None
    obj = rng.choice(scene.objects)
    if rng.random() < 0.6:
        other = rng.choice([c for c in COLORS if c != obj.color])
        text = f"{_a(obj.color + ' ' + obj.shape)} instead of {_a(other)} one"
    else:
        other = rng.choice([s for s in SIZES if s != obj.size])
        text = f"{_a(obj.size + ' ' + obj.shape)} instead of {_a(other)} one"
    if rng.random() < 0.5:
        text = f"a scene with {text} {_prep(rng)} the {obj.position}"
    return text


_CAPTION_FAMILIES: Mapping[str, Callable[[Scene, random.Random], Optional[str]]] = MappingProxyType(
    {
        "full": _cap_full_list,
        "count": _cap_count,
        "partial": _cap_partial,
        "negative": _cap_negative,
        "where": _cap_where,
        "same": _cap_same,
        "also": _cap_also,
        "instead": _cap_instead,
    }
)
# How often `caption` picks each family: complete descriptions dominate so the tiny
# CLIP learns full scene content; the relational ones teach it the eval-family words.
_CAPTION_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {"full": 0.4, "count": 0.15, "partial": 0.1, "negative": 0.09, "where": 0.09, "same": 0.06, "also": 0.06, "instead": 0.05}
)


def describe(scene: Scene, rng: random.Random, n_extra: int = 4) -> List[str]:
    """Several distinct captions: a full list, a counted list and `n_extra` relational/partial ones."""
    texts = [_CAPTION_FAMILIES["full"](scene, rng), _CAPTION_FAMILIES["count"](scene, rng)]
    others = [name for name in _CAPTION_FAMILIES if name not in ("full", "count")]
    rng.shuffle(others)
    for name in others[:n_extra]:
        texts.append(_CAPTION_FAMILIES[name](scene, rng))
    out: List[str] = []
    for t in texts:
        if t and t not in out and _estimate_tokens(t) <= _CAPTION_TOKEN_BUDGET:
            out.append(t)
    return out


def caption(scene: Scene, rng: random.Random) -> str:
    """One caption of the scene, from a family drawn by :data:`_CAPTION_WEIGHTS`."""
    names = list(_CAPTION_WEIGHTS)
    name = rng.choices(names, weights=[_CAPTION_WEIGHTS[n] for n in names])[0]
    text = _CAPTION_FAMILIES[name](scene, rng)
    if text and _estimate_tokens(text) <= _CAPTION_TOKEN_BUDGET:
        return text
    return _cap_full_list(scene, rng) or "an empty scene"


def full_caption(scene: Scene, rng: Optional[random.Random] = None) -> str:
    """A complete description: every object with size, colour, shape and position (scene order, or shuffled by `rng`)."""
    if not scene.objects:
        return "an empty scene"
    objects = _shuffled(scene.objects, rng) if rng is not None else list(scene.objects)
    return "a picture with " + _join_and([f"{_a(f'{o.size} {o.color} {o.shape}')} at the {o.position}" for o in objects])
