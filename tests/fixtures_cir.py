"""Helpers for the evaluation tests: fake retrieval models, and tiny benchmark folders in the official layouts.

The folder writers (zscir.data.benchmarks.fixtures) write 8x8 solid-colour PNGs whose colour encodes a global
image number (red = n % 256, green = n // 256, blue = 123), so a fake model can tell which image it was given
from the pixels alone.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image

ANNOTATIONS_ENV = "ZSCIR_ANNOTATIONS"


def shared_annotations_dir() -> Path:
    """The real FashionIQ/CIRR/CIRCO annotation folder (``$ZSCIR_ANNOTATIONS`` overrides)."""
    env = os.environ.get(ANNOTATIONS_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cir-annotations"


# ------------------------------------------------------------------------------ images
# The folder writers live in the package (examples/evaluate_benchmarks.sh --tiny uses them); re-exported here.
from zscir.data.benchmarks.fixtures import (MARKER_BLUE, FixtureFolder, image_number, make_circo,  # noqa: E402,F401
                                            make_cirr, make_fashioniq, make_generic, number_png_bytes,
                                            write_number_png)


def placeholder_png_bytes() -> bytes:
    """Bytes of one tiny grey PNG, written under every name of the real-file tests."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------ models
def _text_vector(text: str, dim: int) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


class PixelModel:
    """Deterministic fake model: images -> fixed random projection of 4x4 pixels; query -> image + text vector."""

    def __init__(self, dim: int = 16, seed: int = 0) -> None:
        self.dim = dim
        self.projection = torch.randn(48, dim, generator=torch.Generator().manual_seed(seed))
        self.cache_key = f"pixel-model-{dim}-{seed}"
        self.image_calls = 0
        self.query_calls = 0

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        rows = [torch.tensor(list(im.convert("RGB").resize((4, 4)).tobytes()), dtype=torch.float32) / 255.0 for im in images]
        return torch.stack(rows)

    def _embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return F.normalize(self._pixels(images) @ self.projection, dim=-1)

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[N, dim] normalised projections of the pixels."""
        self.image_calls += 1
        return self._embed(images)

    def encode_query(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """[N, dim] normalised (image embedding + hashed text vector)."""
        assert len(images) == len(texts)
        self.query_calls += 1
        text = torch.stack([_text_vector(t, self.dim) for t in texts])
        return F.normalize(self._embed(images) + 0.5 * text, dim=-1)


class ScriptedModel:
    """Fake model whose rankings are dictated per query text.

    Image embeddings are one-hot by image number; a query text's embedding gives
    the images listed in ``script[text]`` strictly decreasing scores (first =
    best) and every other image score 0, so those fall back to gallery order.
    An oracle is a script that lists only the true target: its query embedding
    equals the target's image embedding.
    """

    def __init__(self, num_images: int, script: Mapping[str, Sequence[int]], cache_key: str = "scripted") -> None:
        self.num_images = num_images
        self.script = {k: list(v) for k, v in script.items()}
        self.cache_key = cache_key
        self.texts_seen: List[str] = []
        self.nan_images: set = set()

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """One-hot rows by image number (NaN rows for numbers in `nan_images`)."""
        out = torch.zeros(len(images), self.num_images)
        for row, im in enumerate(images):
            n = image_number(im)
            out[row, n] = 1.0
            if n in self.nan_images:
                out[row] = float("nan")
        return out

    def encode_query(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """Scripted score vectors for the texts (the images are checked to be fixture images)."""
        assert len(images) == len(texts)
        out = torch.zeros(len(texts), self.num_images)
        for row, (im, text) in enumerate(zip(images, texts)):
            image_number(im)
            self.texts_seen.append(text)
            order = self.script[text]
            for rank, n in enumerate(order):
                out[row, n] = float(len(order) - rank)
        return F.normalize(out, dim=-1)


class TiedModel:
    """Every image gets the same embedding (one-hot on axis 0): all gallery scores tie exactly."""

    def __init__(self, dim: int = 8) -> None:
        self.dim = dim
        self.cache_key = f"tied-{dim}"

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Identical one-hot rows."""
        out = torch.zeros(len(images), self.dim)
        out[:, 0] = 1.0
        return out

    def encode_query(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """Hashed text vectors (their score with every image is the same)."""
        return F.normalize(torch.stack([_text_vector(t, self.dim) for t in texts]), dim=-1)


def scripted_ranking(fx: FixtureFolder, ids: Sequence[object]) -> List[int]:
    """Image numbers for a script, given image ids best first."""
    return [fx.number_of[i] for i in ids]


# ------------------------------------------------------------------ real annotation roots
REAL_SPLITS: Dict[str, Tuple[str, ...]] = {"fashioniq": ("val", "test"), "cirr": ("val", "test1"), "circo": ("val", "test")}
CIRCO_DISTRACTORS = 60  # COCO ids no annotation mentions, so the CIRCO gallery has distractors


@dataclass
class RealRoots:
    """Benchmark roots over the real annotation files, with an image file under every name they list."""

    roots: Dict[str, Path]
    name_of: Dict[int, object] = field(default_factory=dict)  # image number -> image id (numbered images only)


class _ImageWriter:
    """Places one image file per path: hard links to one grey PNG, or (numbered) a PNG encoding each id's number."""

    def __init__(self, base: Path, numbered: bool) -> None:
        self.numbered = numbered
        self.placeholder = base / "placeholder.png"
        self.placeholder.write_bytes(placeholder_png_bytes())
        self.number_of: Dict[object, int] = {}
        self.made: set = set()

    def place(self, items: Iterable[Tuple[Path, object]]) -> None:
        """Write an image at each path (named by its image id), once per path."""
        data = None
        for path, image_id in items:
            if path in self.made:
                continue
            self.made.add(path)
            if path.parent not in self.made:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.made.add(path.parent)
            if self.numbered:
                number = self.number_of.setdefault(image_id, len(self.number_of))
                path.write_bytes(number_png_bytes(number))
                continue
            try:  # hard links: much faster than 30k writes
                os.link(self.placeholder, path)
            except OSError:
                data = data if data is not None else self.placeholder.read_bytes()
                path.write_bytes(data)


def build_real_roots(base: Path, annotations: Path, numbered: bool = False,
                     splits: Optional[Mapping[str, Sequence[str]]] = None) -> RealRoots:
    """FashionIQ, CIRR and CIRCO roots in `base` over the real files in `annotations`, images for `splits`.

    The annotation folders are linked in; every image the chosen splits list
    gets a file: one shared grey placeholder, or with `numbered` a distinct PNG
    whose colour encodes a number (``name_of`` maps it back to the image id).
    The CIRCO image list holds the ids of both CIRCO splits plus distractors.
    """
    splits = dict(REAL_SPLITS, **(splits or {}))
    writer = _ImageWriter(base, numbered)
    roots: Dict[str, Path] = {}

    fiq = base / "fashioniq"
    fiq.mkdir()
    for sub in ("captions", "image_splits"):
        os.symlink(annotations / "fashioniq" / sub, fiq / sub)
    names: Dict[str, None] = {}
    for split in splits["fashioniq"]:
        for split_file in sorted((annotations / "fashioniq" / "image_splits").glob(f"split.*.{split}.json")):
            names.update(dict.fromkeys(json.loads(split_file.read_text())))
    writer.place((fiq / "images" / f"{n}.png", n) for n in names)
    roots["fashioniq"] = fiq

    cirr = base / "cirr"
    cirr.mkdir()
    for sub in ("captions", "image_splits"):
        os.symlink(annotations / "cirr" / sub, cirr / sub)
    for split in splits["cirr"]:
        rel = json.loads((annotations / "cirr" / "image_splits" / f"split.rc2.{split}.json").read_text())
        writer.place((cirr / "img_raw" / r, n) for n, r in rel.items())
    roots["cirr"] = cirr

    circo = base / "circo"
    circo.mkdir()
    os.symlink(annotations / "circo" / "annotations", circo / "annotations")
    ids = set()
    for split in REAL_SPLITS["circo"]:
        for row in json.loads((annotations / "circo" / "annotations" / f"{split}.json").read_text()):
            ids.add(row["reference_img_id"])
            ids.update(row.get("gt_img_ids", []))
    extra = [900000000 + i for i in range(CIRCO_DISTRACTORS)]
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in sorted(ids) + extra]
    info = circo / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
    info.parent.mkdir(parents=True)
    info.write_text(json.dumps({"images": images}))
    writer.place((circo / "COCO2017_unlabeled" / "unlabeled2017" / im["file_name"], im["id"]) for im in images)
    roots["circo"] = circo
    return RealRoots(roots, {number: image_id for image_id, number in writer.number_of.items()})
