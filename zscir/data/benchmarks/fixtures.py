"""Tiny benchmark folders in the official FashionIQ, CIRR, CIRCO and generic layouts (offline stand-ins).

They let the evaluation commands run end to end without the real data (``examples/evaluate_benchmarks.sh
--tiny``, the tests): 8x8 solid-colour PNGs whose colour encodes a global image number (red = n % 256,
green = n // 256, blue = 123), so a fake model can tell which image it was given from the pixels alone, and
annotation files with a few queries per split in each data set's own format.

>>> from zscir.data.benchmarks.fixtures import write_all
>>> folders = write_all("bench")          # bench/fashioniq, bench/cirr, bench/circo, bench/generic
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Union

from PIL import Image

__all__ = ["FixtureFolder", "MARKER_BLUE", "image_number", "make_circo", "make_cirr", "make_fashioniq",
           "make_generic", "number_png_bytes", "write_all", "write_number_png"]

MARKER_BLUE = 123


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


def write_all(root: Union[str, Path]) -> Dict[str, FixtureFolder]:
    """Write the four tiny benchmark folders under `root` (fashioniq, cirr, circo, generic)."""
    root = Path(root)
    return {"fashioniq": make_fashioniq(root / "fashioniq"), "cirr": make_cirr(root / "cirr"),
            "circo": make_circo(root / "circo"), "generic": make_generic(root / "generic")}
