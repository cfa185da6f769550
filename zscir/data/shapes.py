"""The built-in procedural "shapes world": images, captions and modification triplets.

An offline stand-in for real composed-image-retrieval data, in the spirit of the
CSS data set (Vo et al., 2019).  A scene is 1-4 coloured shapes on a dark
background, one per cell of a 3x3 grid.  The world provides

* fast, deterministic rendering (precomputed anti-aliased masks per shape, size,
  cell and image size; no per-pixel Python loops),
* captions for pretraining a tiny CLIP (:func:`describe`, :func:`caption`),
* modification operations (:data:`EDIT_KINDS`) that return an :class:`Edit` with
  texts in two disjoint phrasing families: ``"train"`` (imperative: "make the red
  circle green") and ``"eval"`` (held-out descriptive wording: "the same scene but
  the circle is green").  Every word of the eval family also occurs in captions,
  so a CLIP trained only on captions knows it,
* :class:`ShapesWorld`, which draws seeded caption sets, training triplets and
  evaluation sets, and exports them to the folder formats the rest of zscir reads.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from ..config import Config
from ..registry import Registry

__all__ = [
    "SHAPES",
    "COLORS",
    "SIZES",
    "ROWS",
    "COLS",
    "BACKGROUND",
    "FAMILIES",
    "SINGLE_KINDS",
    "COMBINED_KINDS",
    "ALL_KINDS",
    "EDIT_KINDS",
    "LONG_TAIL_WEIGHTS",
    "MAX_CAPTION_TOKENS",
    "SceneObject",
    "Scene",
    "Edit",
    "EvalQuery",
    "EvalSet",
    "ShapesWorldConfig",
    "ShapesWorld",
    "position_phrase",
    "random_object",
    "random_scene",
    "cell_center",
    "render",
    "render_array",
    "describe",
    "caption",
    "full_caption",
    "edit_color",
    "edit_shape",
    "edit_size",
    "edit_move",
    "edit_add",
    "edit_remove",
    "add_arguments",
    "run",
]

# ----------------------------------------------------------------------------
# Vocabulary of the world
# ----------------------------------------------------------------------------

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
COLORS: Mapping[str, Tuple[int, int, int]] = MappingProxyType(
    {
        "red": (230, 35, 35),
        "green": (40, 190, 70),
        "blue": (50, 100, 250),
        "yellow": (245, 225, 40),
        "purple": (150, 65, 220),
        "orange": (250, 140, 20),
        "white": (240, 240, 240),
        "pink": (255, 135, 205),
    }
)
SIZES: Tuple[str, ...] = ("small", "large")
ROWS: Tuple[str, ...] = ("top", "middle", "bottom")
COLS: Tuple[str, ...] = ("left", "center", "right")
BACKGROUND: Tuple[int, int, int] = (18, 18, 24)
GRID = 3
FAMILIES: Tuple[str, ...] = ("train", "eval")
SINGLE_KINDS: Tuple[str, ...] = ("color", "shape", "size", "move", "add", "remove")
# Object radius as a fraction of the cell side; < 0.5 so shapes in neighbouring cells never touch.
SIZE_RADIUS: Mapping[str, float] = MappingProxyType({"small": 0.27, "large": 0.45})
# open_clip's context length for the tiny CLIP; includes the start and end tokens.
MAX_CAPTION_TOKENS = 48
# Budget for our own token estimate (words + punctuation runs); leaves room for the
# few words that BPE splits in two (e.g. "triangles").
_CAPTION_TOKEN_BUDGET = MAX_CAPTION_TOKENS - 6
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_OBJECT_ATTRS = ("size", "color", "shape")
_CELLS: Tuple[Tuple[int, int], ...] = tuple((r, c) for r in range(GRID) for c in range(GRID))


def position_phrase(row: int, col: int) -> str:
    """Words for a grid cell: "top left", "middle right", "center", ..."""
    if (row, col) == (1, 1):
        return "center"
    return f"{ROWS[row]} {COLS[col]}"


def _article(word: str) -> str:
    """The indefinite article for a following word ("an orange", "a red")."""
    return "an" if word[:1] in "aeiou" else "a"


def _a(phrase: str) -> str:
    """`phrase` with its indefinite article."""
    return f"{_article(phrase)} {phrase}"


def _join_and(parts: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _estimate_tokens(text: str) -> int:
    """Token count estimate: one per word and per punctuation run (our vocabulary is mostly single BPE tokens)."""
    return len(re.findall(r"[a-z0-9]+|[^a-z0-9\s]+", text.lower()))


# ----------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One shape: its kind, colour, size and grid cell (row 0-2 top to bottom, col 0-2 left to right)."""

    shape: str
    color: str
    size: str
    row: int
    col: int

    def __post_init__(self) -> None:
        for name, allowed in (("shape", SHAPES), ("color", tuple(COLORS)), ("size", SIZES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"SceneObject.{name}={value!r} is not one of {list(allowed)}")
        for name in ("row", "col"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < GRID:
                raise ValueError(f"SceneObject.{name}={value!r} must be an int in 0..{GRID - 1}")

    @property
    def cell(self) -> Tuple[int, int]:
        """(row, col)."""
        return (self.row, self.col)

    @property
    def position(self) -> str:
        """Position words of the object's cell ("top left")."""
        return position_phrase(self.row, self.col)

    def key(self) -> str:
        """Canonical string of this object's content."""
        return f"r{self.row}c{self.col}={self.size}/{self.color}/{self.shape}"

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "object") -> "SceneObject":
        """Build from a dict; missing or unknown fields raise ValueError naming them and `source`."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected an object with fields shape/color/size/row/col, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        missing = [n for n in names if n not in data]
        if unknown or missing:
            raise ValueError(f"{source}: unknown field(s) {unknown}, missing field(s) {missing}; expected {names}")
        try:
            return cls(**{n: data[n] for n in names})
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None


@dataclass(frozen=True)
class Scene:
    """A set of objects, at most one per grid cell; stored in canonical (row, col) order."""

    objects: Tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        objects = tuple(self.objects)
        for i, obj in enumerate(objects):
            if not isinstance(obj, SceneObject):
                raise TypeError(f"Scene.objects[{i}] is {type(obj).__name__}, expected SceneObject")
        cells = [o.cell for o in objects]
        if len(set(cells)) != len(cells):
            dup = sorted({c for c in cells if cells.count(c) > 1})
            raise ValueError(f"Scene has more than one object in cell(s) {dup}; one object per cell")
        # Canonical order makes equality and the key independent of construction order.
        object.__setattr__(self, "objects", tuple(sorted(objects, key=lambda o: o.cell)))

    @property
    def key(self) -> str:
        """Canonical, order-independent string of the scene content."""
        return ";".join(o.key() for o in self.objects) or "empty"

    @property
    def id(self) -> str:
        """Short stable hash of :attr:`key`, used as an image file name."""
        return hashlib.sha1(self.key.encode("utf-8")).hexdigest()[:16]

    def occupied(self) -> List[Tuple[int, int]]:
        """Cells holding an object."""
        return [o.cell for o in self.objects]

    def free_cells(self) -> List[Tuple[int, int]]:
        """Empty cells in row-major order."""
        taken = set(self.occupied())
        return [c for c in _CELLS if c not in taken]

    def __len__(self) -> int:
        return len(self.objects)

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict form: {"objects": [...]}."""
        return {"objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "scene") -> "Scene":
        """Build from :meth:`to_dict` output; bad input raises ValueError naming `source` and the field."""
        if not isinstance(data, Mapping) or set(data) != {"objects"}:
            got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"{source}: expected an object with exactly the field 'objects', got {got}")
        items = data["objects"]
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{source}.objects: expected a list, got {type(items).__name__}")
        objs = tuple(SceneObject.from_dict(o, source=f"{source}.objects[{i}]") for i, o in enumerate(items))
        try:
            return cls(objs)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None


def random_object(rng: random.Random, row: int, col: int) -> SceneObject:
    """A uniformly random object in the given cell."""
    return SceneObject(rng.choice(SHAPES), rng.choice(tuple(COLORS)), rng.choice(SIZES), row, col)


def random_scene(rng: random.Random, min_objects: int = 1, max_objects: int = 4) -> Scene:
    """A random scene with a uniform number of objects in [min_objects, max_objects] in distinct cells."""
    if not 0 <= min_objects <= max_objects <= GRID * GRID:
        raise ValueError(
            f"random_scene: need 0 <= min_objects <= max_objects <= {GRID * GRID}, got {min_objects}, {max_objects}"
        )
    n = rng.randint(min_objects, max_objects)
    cells = rng.sample(_CELLS, n)
    return Scene(tuple(random_object(rng, r, c) for r, c in cells))


# ----------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------

_SUPERSAMPLE = 4
_STAR_POINTS = tuple(
    ((1.0 if k % 2 == 0 else 0.45) * np.cos(-np.pi / 2 + k * np.pi / 5), (1.0 if k % 2 == 0 else 0.45) * np.sin(-np.pi / 2 + k * np.pi / 5))
    for k in range(10)
)
_TRIANGLE_POINTS = ((0.0, -0.95), (1.0, 0.85), (-1.0, 0.85))


def _inside_polygon(u: np.ndarray, v: np.ndarray, points: Sequence[Tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over sample coordinates."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(points)
    for i in range(n):
        x1, y1 = points[i]
        x2, y2 = points[(i + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > v) != (y2 > v)
        x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at)
    return inside


# Unit-radius shape predicates: u to the right, v downwards, centre at 0.
_SHAPE_TESTS: Mapping[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = MappingProxyType(
    {
        "circle": lambda u, v: u * u + v * v <= 1.0,
        "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
        "triangle": lambda u, v: _inside_polygon(u, v, _TRIANGLE_POINTS),
        "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.0,
        "cross": lambda u, v: ((np.abs(u) <= 0.34) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.34) & (np.abs(u) <= 1.0)),
        "star": lambda u, v: _inside_polygon(u, v, _STAR_POINTS),
    }
)
assert set(_SHAPE_TESTS) == set(SHAPES)

# (image_size, shape, size, row, col) -> (y0, x0, alpha[h, w]); filled lazily, tiny.
_ALPHA_CACHE: Dict[Tuple[int, str, str, int, int], Tuple[int, int, np.ndarray]] = {}
# (image_size, shape, size, row, col, color) -> (y0, x0, rgb patch uint8[h, w, 3])
_PATCH_CACHE: Dict[Tuple[int, str, str, int, int, str], Tuple[int, int, np.ndarray]] = {}


def _alpha_patch(image_size: int, shape: str, size: str, row: int, col: int) -> Tuple[int, int, np.ndarray]:
    """Anti-aliased coverage of one shape in one cell, cropped to its non-zero box."""
    key = (image_size, shape, size, row, col)
    hit = _ALPHA_CACHE.get(key)
    if hit is not None:
        return hit
    cell = image_size / GRID
    cy, cx = (row + 0.5) * cell, (col + 0.5) * cell
    radius = SIZE_RADIUS[size] * cell
    y0, x0 = max(0, int(np.floor(cy - radius - 1))), max(0, int(np.floor(cx - radius - 1)))
    y1, x1 = min(image_size, int(np.ceil(cy + radius + 1))), min(image_size, int(np.ceil(cx + radius + 1)))
    k = _SUPERSAMPLE
    ys = y0 + (np.arange((y1 - y0) * k) + 0.5) / k
    xs = x0 + (np.arange((x1 - x0) * k) + 0.5) / k
    v, u = np.meshgrid((ys - cy) / radius, (xs - cx) / radius, indexing="ij")
    inside = _SHAPE_TESTS[shape](u, v).astype(np.float32)
    alpha = inside.reshape(y1 - y0, k, x1 - x0, k).mean(axis=(1, 3))
    rows_any, cols_any = np.nonzero(alpha.any(axis=1))[0], np.nonzero(alpha.any(axis=0))[0]
    alpha = alpha[rows_any[0] : rows_any[-1] + 1, cols_any[0] : cols_any[-1] + 1]
    result = (y0 + int(rows_any[0]), x0 + int(cols_any[0]), alpha)
    _ALPHA_CACHE[key] = result
    return result


def _color_patch(image_size: int, obj: SceneObject) -> Tuple[int, int, np.ndarray]:
    """The object's pixels blended over the background, cached per size/cell/colour."""
    key = (image_size, obj.shape, obj.size, obj.row, obj.col, obj.color)
    hit = _PATCH_CACHE.get(key)
    if hit is not None:
        return hit
    y0, x0, alpha = _alpha_patch(image_size, obj.shape, obj.size, obj.row, obj.col)
    bg = np.asarray(BACKGROUND, dtype=np.float32)
    fg = np.asarray(COLORS[obj.color], dtype=np.float32)
    rgb = bg + (fg - bg) * alpha[..., None]
    result = (y0, x0, np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    _PATCH_CACHE[key] = result
    return result


def _check_image_size(image_size: int) -> int:
    """Validate an image side length."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 3 * 8:
        raise ValueError(f"image_size must be an int >= 24, got {image_size!r}")
    return image_size


def render_array(scenes: Sequence[Scene], image_size: int = 64) -> np.ndarray:
    """Render scenes into a uint8 array [B, H, W, 3]."""
    _check_image_size(image_size)
    out = np.empty((len(scenes), image_size, image_size, 3), dtype=np.uint8)
    out[...] = BACKGROUND
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            y0, x0, patch = _color_patch(image_size, obj)
            h, w = patch.shape[:2]
            # Patches are cropped to the shape, and shapes never leave their cell,
            # so a plain copy composites correctly.
            out[b, y0 : y0 + h, x0 : x0 + w] = patch
    return out


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    """Render one scene as an RGB PIL image."""
    return Image.fromarray(render_array([scene], image_size)[0], mode="RGB")


def cell_center(row: int, col: int, image_size: int = 64) -> Tuple[int, int]:
    """Pixel (y, x) containing the centre of a grid cell."""
    cell = image_size / GRID
    return int((row + 0.5) * cell), int((col + 0.5) * cell)


# ----------------------------------------------------------------------------
# Referring to objects
# ----------------------------------------------------------------------------

Attrs = Tuple[str, ...]
# Preferred ways to name an object, most natural first; position is the fallback.
_REF_PREFERENCES: Tuple[Attrs, ...] = (
    ("color", "shape"),
    ("shape",),
    ("size", "color", "shape"),
    ("size", "shape"),
)
_REF_WITH_POSITION: Tuple[Attrs, ...] = (("color", "shape", "position"), ("shape", "position"))


def _matches(obj: SceneObject, like: SceneObject, attrs: Attrs) -> bool:
    """Whether `obj` fits a description of `like` that uses `attrs`."""
    for a in attrs:
        if a == "position":
            if obj.cell != like.cell:
                return False
        elif getattr(obj, a) != getattr(like, a):
            return False
    return True


def _choose_ref(objects: Sequence[SceneObject], index: int, rng: random.Random, avoid: Sequence[SceneObject] = ()) -> Optional[Attrs]:
    """Attributes that single out objects[index]: unique in the scene and matching none of `avoid`.

    `avoid` holds objects created by the other half of a combined edit, so the
    description stays unambiguous whichever clause a reader applies first.
    """
    target = objects[index]

    def unique(attrs: Attrs) -> bool:
        if sum(_matches(o, target, attrs) for o in objects) != 1:
            return False
        return not any(_matches(o, target, attrs) for o in avoid)

    valid = [a for a in _REF_PREFERENCES if unique(a)]
    if not valid:
        valid = [a for a in _REF_WITH_POSITION if unique(a)]
    if not valid:
        return None
    return valid[0] if rng.random() < 0.7 else rng.choice(valid)


def _noun(obj: SceneObject, attrs: Attrs, rng: random.Random) -> str:
    """Words naming `obj` by `attrs` (no article), e.g. "small red circle at the top left"."""
    words = [getattr(obj, a) for a in _OBJECT_ATTRS if a in attrs]
    text = " ".join(words)
    if "position" in attrs:
        text += f" {_prep(rng)} the {obj.position}"
    return text


def _prep(rng: random.Random) -> str:
    """A locative preposition."""
    return rng.choice(("at", "in"))


# ----------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# Edits: planning, applying, and phrasing
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    """A modification: `source` scene, `target` scene, its `kind`, and one text per phrasing family."""

    source: Scene
    target: Scene
    kind: str
    texts: Dict[str, str]
    family: str = "train"

    @property
    def text(self) -> str:
        """The text of this edit's `family`."""
        return self.texts[self.family]

    def with_family(self, family: str) -> "Edit":
        """The same edit with another primary family."""
        _check_family(family)
        return dataclasses.replace(self, family=family)

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict form."""
        return {
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "kind": self.kind,
            "texts": dict(self.texts),
            "family": self.family,
        }


@dataclass(frozen=True)
class _Change:
    """Modify existing object `index` into `new` (attributes and/or cell)."""

    index: int
    new: SceneObject


@dataclass(frozen=True)
class _Add:
    """Add a new object."""

    new: SceneObject


@dataclass(frozen=True)
class _Remove:
    """Remove existing object `index`."""

    index: int


_Op = Union[_Change, _Add, _Remove]


def _check_family(family: str) -> str:
    """Validate a phrasing family name."""
    if family not in FAMILIES:
        raise ValueError(f"unknown phrasing family {family!r}; choose one of {list(FAMILIES)}")
    return family


def _changed_attrs(old: SceneObject, new: SceneObject) -> List[str]:
    """Which of shape/color/size/position differ."""
    out = [a for a in ("shape", "color", "size") if getattr(old, a) != getattr(new, a)]
    if old.cell != new.cell:
        out.append("position")
    return out


def _apply(scene: Scene, ops: Sequence[_Op]) -> Optional[Scene]:
    """The scene after all ops, or None if it would be empty or put two objects in one cell."""
    objects = list(scene.objects)
    removed = {op.index for op in ops if isinstance(op, _Remove)}
    for op in ops:
        if isinstance(op, _Change):
            objects[op.index] = op.new
    kept = [o for i, o in enumerate(objects) if i not in removed]
    kept += [op.new for op in ops if isinstance(op, _Add)]
    if not kept:
        return None
    try:
        return Scene(tuple(kept))
    except ValueError:
        return None


def _created(ops: Sequence[_Op], skip: int) -> List[SceneObject]:
    """Objects produced by every op except ops[skip] (changed or added objects)."""
    return [op.new for j, op in enumerate(ops) if j != skip and isinstance(op, (_Change, _Add))]


# --- train family: imperative ---------------------------------------------

_TRAIN_COLOR = ("make {o} {c}", "change {o} to {c}", "paint {o} {c}", "turn {o} {c}", "recolor {o} {c}", "color {o} {c}")
_TRAIN_SHAPE = ("replace {o} with {n}", "turn {o} into {n}", "change {o} into {n}", "swap {o} for {n}", "make {o} {n}")
_TRAIN_SIZE = {
    "large": ("make {o} large", "make {o} bigger", "enlarge {o}", "scale {o} up", "resize {o} to large"),
    "small": ("make {o} small", "make {o} smaller", "shrink {o}", "scale {o} down", "resize {o} to small"),
}
_TRAIN_MOVE = ("move {o} to the {p}", "put {o} in the {p}", "shift {o} to the {p}", "place {o} at the {p}", "drag {o} to the {p}", "move {o} over to the {p}")
_TRAIN_ADD = ("add {n} at the {p}", "add {n} in the {p}", "put {n} in the {p}", "insert {n} at the {p}", "place {n} at the {p}", "draw {n} in the {p}")
# Position-first wording only reads well as a whole sentence, so single adds only.
_TRAIN_ADD_ALONE = _TRAIN_ADD + ("at the {p}, add {n}", "in the {p}, draw {n}")
_TRAIN_REMOVE = ("remove {o}", "delete {o}", "take away {o}", "get rid of {o}", "erase {o}", "take out {o}")


_TRAIN_MOVE_FROM = ("move {o} from the {q} to the {p}", "shift {o} from the {q} to the {p}", "drag {o} from the {q} over to the {p}")


def _train_change(old: SceneObject, new: SceneObject, attrs: Attrs, rng: random.Random) -> str:
    """Imperative clauses for one changed object named by `attrs`; later clauses call it "it"."""
    todo = _changed_attrs(old, new)
    parts: List[Callable[[str], str]] = []
    if "shape" in todo:
        folded = [a for a in ("size", "color") if a in todo and rng.random() < 0.7]
        noun = _a(" ".join([getattr(new, a) for a in ("size", "color") if a in folded] + [new.shape]))
        tpl = rng.choice(_TRAIN_SHAPE)
        parts.append(lambda o, tpl=tpl, noun=noun: tpl.format(o=o, n=noun))
        todo = [a for a in todo if a != "shape" and a not in folded]
    for attr in todo:
        if attr == "color":
            tpl = rng.choice(_TRAIN_COLOR)
            parts.append(lambda o, tpl=tpl: tpl.format(o=o, c=new.color))
        elif attr == "size":
            tpl = rng.choice(_TRAIN_SIZE[new.size])
            parts.append(lambda o, tpl=tpl: tpl.format(o=o))
    rng.shuffle(parts)
    if "position" in todo:
        if "position" in attrs:
            # Named by the cell it leaves, so this clause goes first:
            # "move the red circle from the top left to the center and make it green".
            tpl = rng.choice(_TRAIN_MOVE_FROM)
            plain = tuple(a for a in attrs if a != "position")
            first = tpl.format(o=f"the {_noun(old, plain, rng)}", q=old.position, p=new.position)
            return _join_and([first] + [part("it") for part in parts])
        tpl = rng.choice(_TRAIN_MOVE)
        parts.insert(rng.randint(0, len(parts)), lambda o, tpl=tpl: tpl.format(o=o, p=new.position))
    subject = f"the {_noun(old, attrs, rng)}"
    return _join_and([part(subject if i == 0 else "it") for i, part in enumerate(parts)])


def _train_text(scene: Scene, ops: Sequence[_Op], rng: random.Random) -> Optional[str]:
    """The imperative ("train") text of an edit."""
    clauses = []
    for j, op in enumerate(ops):
        if isinstance(op, _Add):
            tpl = rng.choice(_TRAIN_ADD_ALONE if len(ops) == 1 else _TRAIN_ADD)
            noun = _a(" ".join(getattr(op.new, a) for a in _OBJECT_ATTRS))
            clauses.append(tpl.format(n=noun, p=op.new.position))
            continue
        attrs = _choose_ref(scene.objects, op.index, rng, avoid=_created(ops, j))
        if attrs is None:
            return None
        if isinstance(op, _Remove):
            subject = f"the {_noun(scene.objects[op.index], attrs, rng)}"
            clauses.append(rng.choice(_TRAIN_REMOVE).format(o=subject))
        else:
            clauses.append(_train_change(scene.objects[op.index], op.new, attrs, rng))
    rng.shuffle(clauses)
    joiner = rng.choice((" and ", " and ", ", then "))
    return joiner.join(clauses)


# --- eval family: descriptive, held out ------------------------------------
# Two frames.  "State" frame: "the same scene but <the X is Y>", "where <...>".
# "With" frame: "with <a Y instead of the X>", "that has <no X>".  Every word used
# here also occurs in captions (enforced by tests/test_shapes.py).

_EVAL_STATE_FRAMES = ("the same scene but {x}", "where {x}", "the same scene where {x}")
_EVAL_WITH_FRAMES = ("with {x}", "that has {x}", "the same scene with {x}")


def _eval_state_clause(scene: Scene, op: _Op, attrs: Optional[Attrs], rng: random.Random) -> str:
    """"the red circle is green and at the top right", "there is no blue star", ..."""
    if isinstance(op, _Add):
        noun = _a(" ".join(getattr(op.new, a) for a in _OBJECT_ATTRS))
        where = f"{_prep(rng)} the {op.new.position}"
        return rng.choice((f"there is also {noun} {where}", f"there is {noun} {where} too"))
    assert attrs is not None
    old = scene.objects[op.index]
    subject = f"the {_noun(old, attrs, rng)}"
    if isinstance(op, _Remove):
        return f"there is no {_noun(old, attrs, rng)}"
    new = op.new
    changed = _changed_attrs(old, new)
    parts = []
    if "shape" in changed:
        parts.append(_a(" ".join([getattr(new, a) for a in ("size", "color") if a in changed] + [new.shape])))
    else:
        adjectives = [getattr(new, a) for a in ("size", "color") if a in changed]
        if adjectives:
            parts.append(" and ".join(adjectives))
    if "position" in changed:
        parts.append(f"{_prep(rng)} the {new.position}")
    return f"{subject} is {' and '.join(parts)}"


def _eval_with_item(scene: Scene, op: _Op, attrs: Optional[Attrs], rng: random.Random) -> str:
    """"a green circle instead of the red one", "no blue star", "a small red square in the top left too"."""
    if isinstance(op, _Add):
        noun = _a(" ".join(getattr(op.new, a) for a in _OBJECT_ATTRS))
        return f"{noun} {_prep(rng)} the {op.new.position} too"
    assert attrs is not None
    old = scene.objects[op.index]
    if isinstance(op, _Remove):
        return f"no {_noun(old, attrs, rng)}"
    new = op.new
    changed = _changed_attrs(old, new)
    if changed == ["position"]:
        return f"the {_noun(old, attrs, rng)} {_prep(rng)} the {new.position}"
    # Name the new object with the attributes the reference used plus the changed ones;
    # whatever is not said stays as it was ("instead of" convention).
    shown = [a for a in _OBJECT_ATTRS if a in attrs or a in changed]
    noun = _a(" ".join(getattr(new, a) for a in shown))
    if "position" in changed or "position" in attrs:
        noun += f" {_prep(rng)} the {new.position}"
    if "shape" not in changed and not ("position" in attrs and "position" in changed):
        # "instead of the red one": the changed attributes' old values; with the
        # unchanged words of the noun this repeats the (unique) reference.
        old_words = [getattr(old, a) for a in ("size", "color") if a in changed]
        if old_words:
            return f"{noun} instead of the {' '.join(old_words)} one"
    return f"{noun} instead of the {_noun(old, attrs, rng)}"


def _eval_text(scene: Scene, ops: Sequence[_Op], rng: random.Random) -> Optional[str]:
    """The descriptive ("eval") text of an edit."""
    refs: List[Optional[Attrs]] = []
    for j, op in enumerate(ops):
        if isinstance(op, _Add):
            refs.append(None)
            continue
        attrs = _choose_ref(scene.objects, op.index, rng, avoid=_created(ops, j))
        if attrs is None:
            return None
        refs.append(attrs)
    order = list(range(len(ops)))
    rng.shuffle(order)
    # "with the red circle at the center at the top right" is unreadable: when an object
    # named by its cell moves, describe the new state instead ("... is at the top right").
    moved_by_cell = any(
        isinstance(op, _Change) and attrs is not None and "position" in attrs and op.new.cell != scene.objects[op.index].cell
        for op, attrs in zip(ops, refs)
    )
    use_state_frame = rng.random() < 0.5
    if use_state_frame or moved_by_cell:
        frame = rng.choice(_EVAL_STATE_FRAMES)
        body = " and ".join(_eval_state_clause(scene, ops[j], refs[j], rng) for j in order)
    else:
        frame = rng.choice(_EVAL_WITH_FRAMES)
        body = " and ".join(_eval_with_item(scene, ops[j], refs[j], rng) for j in order)
    return frame.format(x=body)


def _make_edit(scene: Scene, ops: Sequence[Optional[_Op]], kind: str, rng: random.Random) -> Optional[Edit]:
    """Apply planned ops and phrase them in both families; None if any step is impossible."""
    if any(op is None for op in ops):
        return None
    plan = [op for op in ops if op is not None]
    target = _apply(scene, plan)
    if target is None or target.key == scene.key:
        return None
    texts = {}
    for family, phrase in (("train", _train_text), ("eval", _eval_text)):
        text = phrase(scene, plan, rng)
        if text is None:
            return None
        texts[family] = text
    return Edit(source=scene, target=target, kind=kind, texts=texts)


# --- planners ---------------------------------------------------------------


def _pick_index(scene: Scene, rng: random.Random, index: Optional[int], busy: Sequence[int]) -> Optional[int]:
    """An object index not in `busy` (explicit `index` is validated)."""
    if index is not None:
        if not 0 <= index < len(scene.objects):
            raise ValueError(f"index={index} is out of range for a scene with {len(scene.objects)} object(s)")
        return None if index in busy else index
    free = [i for i in range(len(scene.objects)) if i not in busy]
    return rng.choice(free) if free else None


def _pick_cell(scene: Scene, rng: random.Random, busy_cells: Sequence[Tuple[int, int]]) -> Optional[Tuple[int, int]]:
    """A cell empty in `scene` and not claimed by another op."""
    free = [c for c in scene.free_cells() if c not in busy_cells]
    return rng.choice(free) if free else None


def _plan_change(
    scene: Scene,
    rng: random.Random,
    attrs: Sequence[str],
    index: Optional[int] = None,
    values: Optional[Mapping[str, Any]] = None,
    busy: Sequence[int] = (),
    busy_cells: Sequence[Tuple[int, int]] = (),
) -> Optional[_Change]:
    """Change the listed attributes ("shape", "color", "size", "position") of one object to new values."""
    i = _pick_index(scene, rng, index, busy)
    if i is None:
        return None
    old = scene.objects[i]
    values = dict(values or {})
    fields: Dict[str, Any] = {}
    choices = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES}
    for attr in attrs:
        if attr == "position":
            cell = values.get("cell")
            if cell is None:
                cell = _pick_cell(scene, rng, busy_cells)
                if cell is None:
                    return None
            elif tuple(cell) not in scene.free_cells():
                raise ValueError(f"cannot move to cell {tuple(cell)}: it is occupied or outside the grid")
            fields["row"], fields["col"] = cell
            continue
        value = values.get(attr)
        if value is None:
            value = rng.choice([v for v in choices[attr] if v != getattr(old, attr)])
        elif value == getattr(old, attr):
            raise ValueError(f"new {attr} {value!r} is the object's current {attr}; an edit must change it")
        fields[attr] = value
    return _Change(i, dataclasses.replace(old, **fields))


def _plan_add(scene: Scene, rng: random.Random, obj: Optional[SceneObject] = None, busy_cells: Sequence[Tuple[int, int]] = ()) -> Optional[_Add]:
    """Add a random (or the given) object in an empty cell."""
    if obj is not None:
        if obj.cell not in scene.free_cells():
            raise ValueError(f"cannot add at cell {obj.cell}: it is already occupied")
        return _Add(obj)
    cell = _pick_cell(scene, rng, busy_cells)
    return None if cell is None else _Add(random_object(rng, *cell))


def _plan_remove(scene: Scene, rng: random.Random, index: Optional[int] = None, busy: Sequence[int] = ()) -> Optional[_Remove]:
    """Remove one object."""
    i = _pick_index(scene, rng, index, busy)
    return None if i is None else _Remove(i)


# --- public single-kind edits ------------------------------------------------


def edit_color(scene: Scene, rng: random.Random, index: Optional[int] = None, color: Optional[str] = None) -> Optional[Edit]:
    """Recolour one object (random or `index`) to a new (random or given) colour."""
    return _make_edit(scene, [_plan_change(scene, rng, ["color"], index, {"color": color})], "color", rng)


def edit_shape(scene: Scene, rng: random.Random, index: Optional[int] = None, shape: Optional[str] = None) -> Optional[Edit]:
    """Turn one object into another shape, keeping colour, size and cell."""
    return _make_edit(scene, [_plan_change(scene, rng, ["shape"], index, {"shape": shape})], "shape", rng)


def edit_size(scene: Scene, rng: random.Random, index: Optional[int] = None) -> Optional[Edit]:
    """Toggle one object's size (small <-> large)."""
    return _make_edit(scene, [_plan_change(scene, rng, ["size"], index)], "size", rng)


def edit_move(scene: Scene, rng: random.Random, index: Optional[int] = None, cell: Optional[Tuple[int, int]] = None) -> Optional[Edit]:
    """Move one object to an empty cell; None if the grid is full."""
    return _make_edit(scene, [_plan_change(scene, rng, ["position"], index, {"cell": cell})], "move", rng)


def edit_add(scene: Scene, rng: random.Random, obj: Optional[SceneObject] = None) -> Optional[Edit]:
    """Add a new object in an empty cell; None if the grid is full."""
    return _make_edit(scene, [_plan_add(scene, rng, obj)], "add", rng)


def edit_remove(scene: Scene, rng: random.Random, index: Optional[int] = None) -> Optional[Edit]:
    """Remove one object; None for a one-object scene."""
    if len(scene.objects) < 2:
        return None
    return _make_edit(scene, [_plan_remove(scene, rng, index)], "remove", rng)


_ATTRIBUTE_KINDS = {"color": "color", "shape": "shape", "size": "size", "move": "position"}


def _combined(first: str, second: str) -> Callable[[Scene, random.Random], Optional[Edit]]:
    """An edit function applying two single kinds: one object restyled twice, or two objects."""
    kind = f"{first}+{second}"

    def edit(scene: Scene, rng: random.Random) -> Optional[Edit]:
        if first in _ATTRIBUTE_KINDS and second in _ATTRIBUTE_KINDS:
            # Two attribute changes of the same object ("make the red circle green and large").
            attrs = [_ATTRIBUTE_KINDS[first], _ATTRIBUTE_KINDS[second]]
            return _make_edit(scene, [_plan_change(scene, rng, attrs)], kind, rng)
        # add/remove with anything: two different objects.
        ops: List[Optional[_Op]] = []
        busy: List[int] = []
        busy_cells: List[Tuple[int, int]] = []
        for k in (first, second):
            if k == "add":
                op: Optional[_Op] = _plan_add(scene, rng, busy_cells=busy_cells)
                if op is not None:
                    busy_cells.append(op.new.cell)
            elif k == "remove":
                op = _plan_remove(scene, rng, busy=busy)
                if op is not None:
                    busy.append(op.index)
            else:
                op = _plan_change(scene, rng, [_ATTRIBUTE_KINDS[k]], busy=busy, busy_cells=busy_cells)
                if op is not None:
                    busy.append(op.index)
                    busy_cells.append(op.new.cell)
            if op is None:
                return None
            ops.append(op)
        return _make_edit(scene, ops, kind, rng)

    edit.__name__ = f"edit_{first}_{second}"
    edit.__doc__ = f"Combined edit: {first} and {second}."
    return edit


EditFunction = Callable[..., Optional[Edit]]
EDIT_KINDS: Registry[EditFunction] = Registry("edit kind")
for _name, _fn in (
    ("color", edit_color),
    ("shape", edit_shape),
    ("size", edit_size),
    ("move", edit_move),
    ("add", edit_add),
    ("remove", edit_remove),
):
    EDIT_KINDS.add(_name, _fn)
COMBINED_KINDS: Tuple[str, ...] = tuple(
    f"{a}+{b}" for i, a in enumerate(SINGLE_KINDS) for b in SINGLE_KINDS[i + 1 :]
)
for _kind in COMBINED_KINDS:
    EDIT_KINDS.add(_kind, _combined(*_kind.split("+")))
ALL_KINDS: Tuple[str, ...] = SINGLE_KINDS + COMBINED_KINDS

# Colour changes common, move/size rare; combined kinds share a small remainder.
LONG_TAIL_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {
        "color": 0.40,
        "shape": 0.18,
        "add": 0.12,
        "remove": 0.12,
        "size": 0.04,
        "move": 0.04,
        **{k: 0.10 / len(COMBINED_KINDS) for k in COMBINED_KINDS},
    }
)


def _normalise_weights(kind_weights: Optional[Mapping[str, float]]) -> Tuple[List[str], List[float]]:
    """Kinds and their normalised weights (uniform over all kinds when None)."""
    if kind_weights is None:
        return list(ALL_KINDS), [1.0 / len(ALL_KINDS)] * len(ALL_KINDS)
    unknown = sorted(k for k in kind_weights if k not in EDIT_KINDS)
    if unknown:
        raise KeyError(f"kind_weights: unknown edit kind(s) {unknown}; choose from {EDIT_KINDS.names()}")
    bad = sorted(k for k, w in kind_weights.items() if not (isinstance(w, (int, float)) and w >= 0))
    if bad:
        raise ValueError(f"kind_weights: weight(s) for {bad} must be non-negative numbers")
    kinds = [k for k in ALL_KINDS if kind_weights.get(k, 0) > 0]
    total = sum(kind_weights[k] for k in kinds)
    if not kinds or total <= 0:
        raise ValueError("kind_weights: at least one kind needs a positive weight")
    return kinds, [kind_weights[k] / total for k in kinds]


# ----------------------------------------------------------------------------
# Evaluation sets
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalQuery:
    """One query: gallery index of the reference, the modification text, and what a hit is."""

    reference_index: int
    text: str
    kind: str
    target_key: str
    sibling_keys: Tuple[str, ...]
    edit: Edit


@dataclass(frozen=True)
class EvalSet:
    """A gallery of distinct scenes and queries into it."""

    gallery: Tuple[Scene, ...]
    queries: Tuple[EvalQuery, ...]
    family: str = "eval"
    _by_key: Dict[str, List[int]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_key: Dict[str, List[int]] = {}
        for i, scene in enumerate(self.gallery):
            by_key.setdefault(scene.key, []).append(i)
        object.__setattr__(self, "_by_key", by_key)

    def index_of(self, key: str) -> List[int]:
        """Gallery indices whose scene key is `key`."""
        return list(self._by_key.get(key, []))

    def positives(self, i: int) -> List[int]:
        """Every gallery index holding query i's target scene content."""
        return self.index_of(self.queries[i].target_key)

    def __len__(self) -> int:
        return len(self.queries)


# ----------------------------------------------------------------------------
# The world
# ----------------------------------------------------------------------------


@dataclass
class ShapesWorldConfig(Config):
    """Settings of a shapes world: seed, image side, objects per random scene."""

    seed: int = 0
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4

    def __post_init__(self) -> None:
        for name in ("seed", "image_size", "min_objects", "max_objects"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"ShapesWorldConfig.{name} must be an int, got {value!r}")
        _check_image_size(self.image_size)
        if not 1 <= self.min_objects <= self.max_objects <= GRID * GRID:
            raise ValueError(
                f"ShapesWorldConfig: need 1 <= min_objects <= max_objects <= {GRID * GRID}, "
                f"got min_objects={self.min_objects}, max_objects={self.max_objects}"
            )


def _progress(iterable: Iterable[Any], total: int, desc: str, enabled: bool) -> Iterable[Any]:
    """Wrap in a tqdm bar when enabled."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc)


def _atomic_write_text(path: Path, text: str) -> None:
    """Atomic text write; imported lazily because zscir.checkpoint pulls in torch."""
    from ..checkpoint import atomic_write_text

    atomic_write_text(path, text)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    """Encode and write one PNG."""
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


class ShapesWorld:
    """Seeded generator of shapes-world scenes, captions, triplets and evaluation sets."""

    _MAX_ATTEMPTS = 200

    def __init__(self, config: Optional[ShapesWorldConfig] = None, **overrides: Any) -> None:
        config = config or ShapesWorldConfig()
        self.config = config.replace(**overrides) if overrides else config

    def __repr__(self) -> str:
        return f"ShapesWorld({self.config!r})"

    @property
    def image_size(self) -> int:
        """Rendered image side in pixels."""
        return self.config.image_size

    def rng(self, stream: str) -> random.Random:
        """A fresh deterministic random stream named `stream`, independent of other names."""
        digest = hashlib.sha256(f"zscir.shapes|{self.config.seed}|{stream}".encode("utf-8")).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def random_scene(self, rng: random.Random) -> Scene:
        """A random scene under this world's object-count limits."""
        return random_scene(rng, self.config.min_objects, self.config.max_objects)

    def render(self, scene: Scene) -> Image.Image:
        """Render at this world's image size."""
        return render(scene, self.config.image_size)

    def render_array(self, scenes: Sequence[Scene]) -> np.ndarray:
        """Batch-render at this world's image size."""
        return render_array(scenes, self.config.image_size)

    def scenes(self, n: int, stream: str = "scenes") -> List[Scene]:
        """`n` random scenes (unlabelled images) from `stream`."""
        rng = self.rng(stream)
        return [self.random_scene(rng) for _ in range(n)]

    def captioned_scenes(self, n: int, stream: str = "clip") -> List[Tuple[Scene, str]]:
        """`n` (scene, caption) pairs for CLIP pretraining."""
        rng = self.rng(stream)
        out = []
        for _ in range(n):
            scene = self.random_scene(rng)
            out.append((scene, caption(scene, rng)))
        return out

    def _edit_of_kind(self, kind: str, rng: random.Random, scene: Optional[Scene] = None) -> Edit:
        """An edit of `kind`, redrawing the source scene until the kind applies."""
        fn = EDIT_KINDS.get(kind)
        for _ in range(self._MAX_ATTEMPTS):
            source = scene if scene is not None else self.random_scene(rng)
            edit = fn(source, rng)
            if edit is not None:
                return edit
        raise RuntimeError(
            f"edit kind {kind!r} could not be applied in {self._MAX_ATTEMPTS} attempts with "
            f"min_objects={self.config.min_objects}, max_objects={self.config.max_objects}"
        )

    def make_triplets(
        self,
        n: int,
        family: str = "train",
        stream: str = "triplets",
        kind_weights: Optional[Mapping[str, float]] = None,
        progress: bool = False,
    ) -> List[Edit]:
        """`n` (reference, text, target) edits; kinds drawn by `kind_weights` (uniform when None)."""
        _check_family(family)
        kinds, weights = _normalise_weights(kind_weights)
        rng = self.rng(stream)
        out = []
        for _ in _progress(range(n), n, "triplets", progress):
            kind = rng.choices(kinds, weights=weights)[0]
            out.append(self._edit_of_kind(kind, rng).with_family(family))
        return out

    def make_eval_set(
        self,
        n_queries: int = 1000,
        n_random: Optional[int] = None,
        siblings_per_query: int = 3,
        family: str = "eval",
        stream: str = "eval",
        kind_weights: Optional[Mapping[str, float]] = None,
        progress: bool = False,
    ) -> EvalSet:
        """Queries plus a gallery of targets, references, sibling hard negatives and random scenes.

        `n_random` defaults to n_queries // 4, so 1,000 queries give a gallery of about 5,000 images.
        """
        _check_family(family)
        if n_random is None:
            n_random = n_queries // 4
        if n_queries < 0 or n_random < 0 or siblings_per_query < 0:
            raise ValueError(
                f"make_eval_set: n_queries={n_queries}, n_random={n_random}, siblings_per_query={siblings_per_query} must be >= 0"
            )
        kinds, weights = _normalise_weights(kind_weights)
        rng = self.rng(stream)
        gallery: List[Scene] = []
        index: Dict[str, int] = {}

        def put(scene: Scene) -> None:
            if scene.key not in index:
                index[scene.key] = len(gallery)
                gallery.append(scene)

        drafts = []
        for _ in _progress(range(n_queries), n_queries, "eval queries", progress):
            kind = rng.choices(kinds, weights=weights)[0]
            edit = self._edit_of_kind(kind, rng).with_family(family)
            siblings: List[Scene] = []
            seen = {edit.target.key, edit.source.key}
            for _attempt in range(siblings_per_query * 10):
                if len(siblings) >= siblings_per_query:
                    break
                other = EDIT_KINDS.get(rng.choice(ALL_KINDS))(edit.source, rng)
                if other is not None and other.target.key not in seen:
                    seen.add(other.target.key)
                    siblings.append(other.target)
            for scene in (edit.source, edit.target, *siblings):
                put(scene)
            drafts.append((edit, tuple(s.key for s in siblings)))
        for _ in range(n_random):
            put(self.random_scene(rng))
        # Shuffle so that gallery position carries no hint (e.g. target right after reference).
        order = list(range(len(gallery)))
        rng.shuffle(order)
        gallery = [gallery[i] for i in order]
        position = {scene.key: i for i, scene in enumerate(gallery)}
        queries = tuple(
            EvalQuery(
                reference_index=position[edit.source.key],
                text=edit.texts[family],
                kind=edit.kind,
                target_key=edit.target.key,
                sibling_keys=sibling_keys,
                edit=edit,
            )
            for edit, sibling_keys in drafts
        )
        return EvalSet(gallery=tuple(gallery), queries=queries, family=family)

    def concept_phrases(self) -> List[str]:
        """Short concept phrases of this world ("red circle", "large square", "circle", "red", "top left", ...)."""
        phrases: List[str] = list(SHAPES) + list(COLORS) + list(SIZES)
        phrases += [position_phrase(r, c) for r, c in _CELLS]
        phrases += [f"{c} {s}" for c in COLORS for s in SHAPES]
        phrases += [f"{z} {s}" for z in SIZES for s in SHAPES]
        phrases += [f"{z} {c}" for z in SIZES for c in COLORS]
        return phrases

    # --- exports -------------------------------------------------------------

    def _write_images(self, scenes: Sequence[Scene], folder: Path, progress: bool, batch: int = 256) -> Dict[str, str]:
        """Render distinct scenes to folder/images/<id>.png; returns key -> relative path."""
        image_dir = folder / "images"
        image_dir.mkdir(parents=True, exist_ok=True)
        unique: Dict[str, Scene] = {}
        for scene in scenes:
            unique.setdefault(scene.key, scene)
        todo = list(unique.values())
        paths = {}
        starts = range(0, len(todo), batch)
        for start in _progress(starts, len(starts), "writing images", progress):
            chunk = todo[start : start + batch]
            pixels = self.render_array(chunk)
            for scene, img in zip(chunk, pixels):
                rel = f"images/{scene.id}.png"
                _write_png(folder / rel, img)
                paths[scene.key] = rel
        return paths

    def _write_world(self, folder: Path) -> None:
        """Record the world settings next to an export (provenance)."""
        _atomic_write_text(folder / "shapes_world.json", json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")

    def export_generic(self, eval_set: EvalSet, folder: Union[str, Path], progress: bool = True) -> Path:
        """Write an eval set in the generic CIR format: images/, gallery.txt, queries.jsonl."""
        folder = Path(folder)
        paths = self._write_images(eval_set.gallery, folder, progress)
        gallery_lines = [paths[s.key] for s in eval_set.gallery]
        lines = []
        for i, q in enumerate(eval_set.queries):
            record = {
                "id": f"q{i:06d}",
                "reference": paths[eval_set.gallery[q.reference_index].key],
                "modification": q.text,
                "targets": [gallery_lines[j] for j in eval_set.positives(i)],
                "kind": q.kind,
            }
            lines.append(json.dumps(record, sort_keys=True))
        _atomic_write_text(folder / "gallery.txt", "".join(line + "\n" for line in gallery_lines))
        _atomic_write_text(folder / "queries.jsonl", "".join(line + "\n" for line in lines))
        self._write_world(folder)
        return folder

    def export_captions(self, pairs: Sequence[Tuple[Scene, str]], folder: Union[str, Path], progress: bool = True) -> Path:
        """Write (scene, caption) pairs as images/ + captions.jsonl."""
        folder = Path(folder)
        paths = self._write_images([s for s, _ in pairs], folder, progress)
        lines = [json.dumps({"image": paths[s.key], "caption": text}, sort_keys=True) for s, text in pairs]
        _atomic_write_text(folder / "captions.jsonl", "".join(line + "\n" for line in lines))
        self._write_world(folder)
        return folder

    def export_triplets(self, edits: Sequence[Edit], folder: Union[str, Path], progress: bool = True) -> Path:
        """Write edits as images/ + triplets.jsonl (reference, modification in each edit's family, target, kind)."""
        folder = Path(folder)
        scenes = [s for e in edits for s in (e.source, e.target)]
        paths = self._write_images(scenes, folder, progress)
        lines = [
            json.dumps(
                {"reference": paths[e.source.key], "modification": e.text, "target": paths[e.target.key], "kind": e.kind},
                sort_keys=True,
            )
            for e in edits
        ]
        _atomic_write_text(folder / "triplets.jsonl", "".join(line + "\n" for line in lines))
        self._write_world(folder)
        return folder


# ----------------------------------------------------------------------------
# Command line (registered by zscir.cli)
# ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the `shapes` export command."""
    parser.add_argument("what", choices=("eval", "triplets", "captions"), help="what to export")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=1000, help="number of queries / triplets / captions")
    parser.add_argument("--seed", type=int, default=0, help="world seed")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--min-objects", type=int, default=1)
    parser.add_argument("--max-objects", type=int, default=4)
    parser.add_argument("--family", choices=FAMILIES, default=None, help="phrasing family (default: eval for eval sets, train for triplets)")
    parser.add_argument("--n-random", type=int, default=None, help="random gallery distractors (eval; default n // 4)")
    parser.add_argument("--siblings", type=int, default=3, help="sibling hard negatives per query (eval)")
    parser.add_argument("--long-tail", action="store_true", help="draw kinds with LONG_TAIL_WEIGHTS")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    """Export a shapes-world eval set, triplet set or caption set to a folder."""
    world = ShapesWorld(
        ShapesWorldConfig(seed=args.seed, image_size=args.image_size, min_objects=args.min_objects, max_objects=args.max_objects)
    )
    progress = not args.no_progress
    weights = LONG_TAIL_WEIGHTS if args.long_tail else None
    if args.what == "eval":
        eval_set = world.make_eval_set(
            args.n, n_random=args.n_random, siblings_per_query=args.siblings, family=args.family or "eval", kind_weights=weights, progress=progress
        )
        folder = world.export_generic(eval_set, args.out, progress=progress)
        print(f"wrote {len(eval_set.queries)} queries and a {len(eval_set.gallery)}-image gallery to {folder}")
    elif args.what == "triplets":
        edits = world.make_triplets(args.n, family=args.family or "train", kind_weights=weights, progress=progress)
        folder = world.export_triplets(edits, args.out, progress=progress)
        print(f"wrote {len(edits)} triplets to {folder}")
    else:
        pairs = world.captioned_scenes(args.n)
        folder = world.export_captions(pairs, args.out, progress=progress)
        print(f"wrote {len(pairs)} captions to {folder}")
    return 0
