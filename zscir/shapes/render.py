"""Rendering shapes-world scenes: precomputed anti-aliased masks per shape, size, cell and image size."""
from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Dict, Mapping, Sequence, Tuple

import numpy as np
from PIL import Image

from .scene import COLORS, GRID, SHAPES, Scene, SceneObject

__all__ = ["BACKGROUND", "render", "render_array", "cell_center"]

BACKGROUND: Tuple[int, int, int] = (18, 18, 24)
# Object radius as a fraction of the cell side; < 0.5 so shapes in neighbouring cells never touch.
SIZE_RADIUS: Mapping[str, float] = MappingProxyType({"small": 0.27, "large": 0.45})
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
