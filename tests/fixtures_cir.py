"""Helpers for the evaluation tests: fake retrieval models and tiny benchmark folders in the official layouts.

Fixture images are 8x8 solid-colour PNGs whose colour encodes a global image
number (red = n % 256, green = n // 256, blue = 123), so a fake model can tell
which image it was given from the pixels alone.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image

ANNOTATIONS_ENV = "ZSCIR_ANNOTATIONS"
MARKER_BLUE = 123


def shared_annotations_dir() -> Path:
    """The real FashionIQ/CIRR/CIRCO annotation folder (``$ZSCIR_ANNOTATIONS`` overrides)."""
    env = os.environ.get(ANNOTATIONS_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cir-annotations"


# ------------------------------------------------------------------------------ images
def image_number(image: Image.Image) -> int:
    """Decode the number a fixture image encodes in its colour."""
    r, g, b = image.convert("RGB").getpixel((0, 0))
    if b != MARKER_BLUE:
        raise ValueError(f"not a fixture image (blue channel {b})")
    return r + 256 * g


def write_number_png(path: Path, number: int) -> None:
    """Write an 8x8 PNG whose colour encodes `number`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (number % 256, number // 256, MARKER_BLUE)).save(path, format="PNG")


def number_png_bytes(number: int) -> bytes:
    """The bytes of an 8x8 PNG whose colour encodes `number` (as write_number_png), built without PIL: fast."""
    if not 0 <= number < 65536:
        raise ValueError(f"image numbers are 16-bit, got {number}")
    row = b"\x00" + bytes((number % 256, number // 256, MARKER_BLUE)) * 8  # filter byte + 8 RGB pixels

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)  # 8x8, 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * 8)) + chunk(b"IEND", b"")


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


# ----------------------------------------------------------------------------- folders
@dataclass
class FixtureFolder:
    """A written benchmark folder and what the test needs to know about it."""

    root: Path
    number_of: Dict[object, int] = field(default_factory=dict)  # image id -> image number
    val: List[dict] = field(default_factory=list)
    test: List[dict] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        """Size of the one-hot space a ScriptedModel needs."""
        return max(self.number_of.values()) + 1


def _dump(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def make_fashioniq(root: Path, per_category: int = 12) -> FixtureFolder:
    """FashionIQ layout: 3 categories x `per_category` images, 3 val and 2 test queries per category."""
    fx = FixtureFolder(root)
    number = 0
    for category in ("dress", "shirt", "toptee"):
        names = [f"{category[0].upper()}{i:03d}" for i in range(per_category)]
        for name in names:
            fx.number_of[name] = number
            write_number_png(root / "images" / f"{name}.png", number)
            number += 1
        for split in ("val", "test"):
            _dump(root / "image_splits" / f"split.{category}.{split}.json", names)
        val = [
            {"target": names[i + 1], "candidate": names[i], "captions": [f"is {category} {i} red.", f" has {category} {i} dots?"]}
            for i in range(3)
        ]
        test = [{"candidate": names[i], "captions": [f"test {category} {i} a", f"test {category} {i} b"]} for i in range(2)]
        _dump(root / "captions" / f"cap.{category}.val.json", val)
        _dump(root / "captions" / f"cap.{category}.test.json", test)
        fx.val += [dict(row, category=category, index=i) for i, row in enumerate(val)]
        fx.test += [dict(row, category=category, index=i) for i, row in enumerate(test)]
    return fx


def make_cirr(root: Path, image_root: str = "img_raw") -> FixtureFolder:
    """CIRR layout: per split 12 images in 2 groups of 6; 4 val and 3 test1 queries."""
    fx = FixtureFolder(root)
    number = 0
    for split, folder in (("val", "dev"), ("test1", "test1")):
        names = [f"{folder}-{i}-0-img{i % 2}" for i in range(12)]
        split_map = {}
        for name in names:
            fx.number_of[name] = number
            write_number_png(root / image_root / folder / f"{name}.png", number)
            split_map[name] = f"./{folder}/{name}.png"
            number += 1
        _dump(root / "image_splits" / f"split.rc2.{split}.json", split_map)
        groups = [names[:6], names[6:]]
        rows = []
        specs = [(0, 0, 2), (0, 3, 1), (1, 1, 5), (1, 4, 0)] if split == "val" else [(0, 0, None), (1, 2, None), (1, 5, None)]
        for q, (group, ref, target) in enumerate(specs):
            members = groups[group]
            row = {
                "pairid": (100 if split == "val" else 200) + q,
                "reference": members[ref],
                "caption": f"{split} caption {q}",
                "img_set": {"id": group, "members": members, "reference_rank": ref},
            }
            if target is not None:
                row["target_hard"] = members[target]
                row["target_soft"] = {members[target]: 1.0}
                row["img_set"]["target_rank"] = target
            rows.append(row)
        _dump(root / "captions" / f"cap.rc2.{split}.json", rows)
        (fx.val if split == "val" else fx.test).extend(rows)
    return fx


def make_circo(root: Path, extra_images: int = 4) -> FixtureFolder:
    """CIRCO layout: 16 + `extra_images` COCO ids; 3 val queries (several ground truths) and 4 test queries."""
    fx = FixtureFolder(root)
    ids = [1000 + 7 * i for i in range(16 + extra_images)]
    images = []
    for number, image_id in enumerate(ids):
        fx.number_of[image_id] = number
        name = f"{image_id:012d}.png"
        write_number_png(root / "COCO2017_unlabeled" / "unlabeled2017" / name, number)
        images.append({"id": image_id, "file_name": name, "width": 8, "height": 8})
    _dump(root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json", {"images": images})
    val = [
        {"id": 0, "reference_img_id": ids[0], "target_img_id": ids[1], "gt_img_ids": [ids[1], ids[2], ids[3]],
         "relative_caption": "has two dogs", "shared_concept": "a dog", "semantic_aspects": ["cardinality"]},
        {"id": 1, "reference_img_id": ids[4], "target_img_id": ids[5], "gt_img_ids": [ids[5]],
         "relative_caption": "is at night", "shared_concept": "a street", "semantic_aspects": []},
        {"id": 2, "reference_img_id": ids[6], "target_img_id": ids[7], "gt_img_ids": [ids[7], ids[8]],
         "relative_caption": "is red", "shared_concept": "a car", "semantic_aspects": []},
    ]
    test = [
        {"id": i, "reference_img_id": ids[10 + i], "relative_caption": f"test caption {i}", "shared_concept": f"concept {i}"}
        for i in range(4)
    ]
    _dump(root / "annotations" / "val.json", val)
    _dump(root / "annotations" / "test.json", test)
    fx.val, fx.test = val, test
    return fx


def make_generic(root: Path, with_gallery: bool = False) -> FixtureFolder:
    """Generic layout: 10 images under imgs/, 4 queries of two kinds (one with two targets)."""
    fx = FixtureFolder(root)
    names = [f"imgs/{i:02d}.png" for i in range(10)]
    for number, name in enumerate(names):
        fx.number_of[name] = number
        write_number_png(root / name, number)
    rows = [
        {"id": "q0", "reference": names[0], "modification": "make it blue", "targets": [names[1]], "kind": "color"},
        {"id": "q1", "reference": names[2], "modification": "add a circle", "targets": [names[3], names[4]], "kind": "shape"},
        {"id": "q2", "reference": names[5], "modification": "make it green", "targets": [names[6]], "kind": "color"},
        {"id": 3, "reference": names[7], "modification": "remove the square", "targets": [names[8]], "kind": "shape"},
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if with_gallery:
        (root / "gallery.txt").write_text("".join(f"{n}\n" for n in names))
    fx.val = rows
    return fx


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
