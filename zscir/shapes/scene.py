"""The shapes-world scene model: vocabulary, objects in a 3x3 grid, scenes, and how to refer to one object."""
from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "SHAPES",
    "COLORS",
    "SIZES",
    "ROWS",
    "COLS",
    "GRID",
    "SceneObject",
    "Scene",
    "position_phrase",
    "random_object",
    "random_scene",
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
GRID = 3
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
