"""The built-in procedural "shapes world": images, captions and modification triplets.

An offline stand-in for real composed-image-retrieval data, in the spirit of the
CSS data set (Vo et al., 2019).  A scene is 1-4 coloured shapes on a dark
background, one per cell of a 3x3 grid (:mod:`.scene`).  The world provides

* fast, deterministic rendering (:mod:`.render`: precomputed anti-aliased masks
  per shape, size, cell and image size; no per-pixel Python loops),
* captions for pretraining a tiny CLIP (:mod:`.captions`: :func:`describe`,
  :func:`caption`),
* modification operations (:mod:`.edits`, :data:`EDIT_KINDS`) that return an
  :class:`Edit` with texts in two disjoint phrasing families: ``"train"``
  (imperative: "make the red circle green") and ``"eval"`` (held-out descriptive
  wording: "the same scene but the circle is green").  Every word of the eval
  family also occurs in captions, so a CLIP trained only on captions knows it,
* :class:`ShapesWorld` (:mod:`.world`), which draws seeded caption sets, training
  triplets and evaluation sets, and exports them to the folder formats the rest
  of zscir reads.
"""
from .captions import MAX_CAPTION_TOKENS, caption, describe, full_caption
from .edits import (
    ALL_KINDS,
    COMBINED_KINDS,
    EDIT_KINDS,
    FAMILIES,
    LONG_TAIL_WEIGHTS,
    SINGLE_KINDS,
    Edit,
    edit_add,
    edit_color,
    edit_move,
    edit_remove,
    edit_shape,
    edit_size,
)
from .render import BACKGROUND, cell_center, render, render_array
from .scene import COLORS, COLS, ROWS, SHAPES, SIZES, Scene, SceneObject, position_phrase, random_object, random_scene
from .world import EvalQuery, EvalSet, ShapesWorld, ShapesWorldConfig

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
]
