"""Shapes-world modifications: planning, applying, and phrasing them in a training and a held-out family."""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..registry import Registry
from .scene import COLORS, SHAPES, SIZES, Attrs, Scene, SceneObject, _a, _choose_ref, _join_and, _noun, _OBJECT_ATTRS, _prep, random_object

__all__ = [
    "FAMILIES",
    "SINGLE_KINDS",
    "COMBINED_KINDS",
    "ALL_KINDS",
    "EDIT_KINDS",
    "LONG_TAIL_WEIGHTS",
    "Edit",
    "edit_color",
    "edit_shape",
    "edit_size",
    "edit_move",
    "edit_add",
    "edit_remove",
]

FAMILIES: Tuple[str, ...] = ("train", "eval")
SINGLE_KINDS: Tuple[str, ...] = ("color", "shape", "size", "move", "add", "remove")


@dataclass(frozen=True)
class Edit:
    """A modification: `source` scene, `target` scene, its `kind`, and one text per phrasing family."""

    source: Scene
    target: Scene
    kind: str
    texts: Dict[str, str]
    family: str = "train"
    negatives: Tuple[Scene, ...] = ()  # hard negatives: the reference and sibling edits of it (ShapesWorld.make_triplets)

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
            **({"negatives": [n.to_dict() for n in self.negatives]} if self.negatives else {}),
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
