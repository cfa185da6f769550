"""The shapes world: seeded caption sets, training triplets and evaluation sets, and their folder exports."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from ..config import Config
from .captions import caption
from .edits import ALL_KINDS, EDIT_KINDS, Edit, _check_family, _normalise_weights
from .render import _check_image_size, render, render_array
from .scene import COLORS, GRID, SHAPES, SIZES, Scene, _CELLS, position_phrase, random_scene

__all__ = ["EvalQuery", "EvalSet", "ShapesWorldConfig", "ShapesWorld"]

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

    def captions_of(self, scenes: Sequence[Scene], per_image: int, stream: str = "stage1-captions") -> List[List[str]]:
        """Up to `per_image` distinct captions of each scene, drawn like CLIP's training captions (a caption corpus)."""
        rng = self.rng(stream)
        out = []
        for scene in scenes:
            caps: List[str] = []
            for _ in range(per_image):
                text = caption(scene, rng)
                if text not in caps:
                    caps.append(text)
            out.append(caps)
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
        negatives: int = 0,
    ) -> List[Edit]:
        """`n` (reference, text, target) edits; kinds drawn by `kind_weights` (uniform when None).

        With `negatives` > 0 each edit carries hard negatives: its reference, then up to `negatives`
        siblings (other edits of the same reference). They come from their own random stream, so the
        edits are the same with or without them.
        """
        _check_family(family)
        if negatives < 0:
            raise ValueError(f"make_triplets: negatives must be >= 0, got {negatives}")
        kinds, weights = _normalise_weights(kind_weights)
        rng = self.rng(stream)
        neg_rng = self.rng(f"{stream}/negatives")
        out = []
        for _ in _progress(range(n), n, "triplets", progress):
            kind = rng.choices(kinds, weights=weights)[0]
            edit = self._edit_of_kind(kind, rng).with_family(family)
            if negatives:
                siblings = self.siblings(edit, negatives, neg_rng)
                edit = dataclasses.replace(edit, negatives=(edit.source, *siblings))
            out.append(edit)
        return out

    def siblings(self, edit: Edit, n: int, rng: random.Random) -> List[Scene]:
        """Up to `n` targets of other random edits of `edit`'s reference (distinct from its target and reference)."""
        out: List[Scene] = []
        seen = {edit.target.key, edit.source.key}
        for _attempt in range(n * 10):
            if len(out) >= n:
                break
            other = EDIT_KINDS.get(rng.choice(ALL_KINDS))(edit.source, rng)
            if other is not None and other.target.key not in seen:
                seen.add(other.target.key)
                out.append(other.target)
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
            siblings = self.siblings(edit, siblings_per_query, rng)
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
        """Write edits as images/ + triplets.jsonl (reference, modification in each edit's family, target, kind, negatives)."""
        folder = Path(folder)
        scenes = [s for e in edits for s in (e.source, e.target)]
        scenes += [s for e in edits for s in e.negatives]
        paths = self._write_images(scenes, folder, progress)
        lines = []
        for e in edits:
            row = {"reference": paths[e.source.key], "modification": e.text, "target": paths[e.target.key], "kind": e.kind}
            if e.negatives:
                row["negatives"] = [paths[s.key] for s in e.negatives]
            lines.append(json.dumps(row, sort_keys=True))
        _atomic_write_text(folder / "triplets.jsonl", "".join(line + "\n" for line in lines))
        self._write_world(folder)
        return folder
