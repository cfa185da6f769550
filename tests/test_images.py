"""Robust image decoding, folder/list reading, and skipping bad images in batches."""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from zscir.data.images import (
    ImageLoadError,
    ImageListDataset,
    collate_skip_bad,
    hf_image_source,
    iter_image_batches,
    list_images,
    load_image,
    read_file_list,
    to_rgb,
)


def _save(im: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def _jpeg_bytes(size=(64, 48), color=(200, 30, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# ----------------------------------------------------------------------- decoding
def test_missing_file_and_directory_name_the_path(tmp_path):
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "nope.jpg")
    assert info.value.path == str(tmp_path / "nope.jpg")
    assert "nope.jpg" in str(info.value) and "not found" in info.value.reason
    assert isinstance(info.value, OSError)
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


def test_not_an_image_and_empty_file(tmp_path):
    (tmp_path / "a.jpg").write_text("hello, I am text")
    (tmp_path / "b.png").write_bytes(b"")
    for name in ("a.jpg", "b.png"):
        with pytest.raises(ImageLoadError) as info:
            load_image(tmp_path / name)
        assert name in str(info.value)


@pytest.mark.parametrize("fmt,keep", [("JPEG", 0.5), ("PNG", 0.5), ("JPEG", 0.9), ("PNG", 0.97)])
def test_truncated_files_raise_instead_of_partial_image(tmp_path, fmt, keep):
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * keep)])
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_corrupt_bytes_in_the_middle_of_a_png(tmp_path):
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[len(data) // 2: len(data) // 2 + 64] = b"\x00" * 64  # breaks the zlib stream / CRC
    (tmp_path / "bad.png").write_bytes(bytes(data))
    with pytest.raises(ImageLoadError, match="bad.png"):
        load_image(tmp_path / "bad.png")


def test_modes_convert_to_rgb(tmp_path):
    grey = _save(Image.new("L", (10, 8), 77), tmp_path / "l.png")
    assert load_image(grey).getpixel((0, 0)) == (77, 77, 77)

    cmyk = _save(Image.new("CMYK", (10, 8), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=100)
    r, g, b = load_image(cmyk).getpixel((5, 4))
    assert r > 200 and g < 60 and b < 60  # pure red in CMYK

    rgba = Image.new("RGBA", (10, 8), (0, 0, 255, 0))
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    out = load_image(_save(rgba, tmp_path / "a.png"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)  # fully transparent -> white background
    assert out.getpixel((1, 1)) == (0, 0, 255)

    la = Image.new("LA", (4, 4), (0, 128))  # black at half opacity over white
    assert abs(load_image(_save(la, tmp_path / "la.png")).getpixel((0, 0))[0] - 127) <= 1


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    pal = Image.new("P", (6, 6), 0)
    pal.putpalette([10, 20, 30, 250, 0, 0] + [0] * 762)
    pal.putpixel((2, 2), 1)
    path = _save(pal, tmp_path / "p.png", transparency=0)
    out = load_image(path)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((2, 2)) == (250, 0, 0)
    gif = _save(pal, tmp_path / "p.gif", transparency=0)
    assert load_image(gif).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_and_float_images_scale_to_8_bit(tmp_path):
    arr16 = np.full((5, 7), 65535, dtype=np.uint16)
    arr16[0, 0] = 0
    arr16[1, 1] = 257 * 100
    path = tmp_path / "i16.png"
    Image.fromarray(arr16).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # PIL reads 16-bit grey PNG as I;16 or I
    out = load_image(path)
    assert out.getpixel((0, 0)) == (0, 0, 0)
    assert out.getpixel((1, 1)) == (100, 100, 100)
    assert out.getpixel((3, 3)) == (255, 255, 255)

    f = np.linspace(0.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
    path_f = tmp_path / "f.tif"
    Image.fromarray(f, mode="F").save(path_f)
    out_f = load_image(path_f)
    assert out_f.getpixel((0, 0)) == (0, 0, 0) and out_f.getpixel((3, 2)) == (255, 255, 255)

    wide = Image.fromarray(np.array([[-5.0, 5.0, np.nan]], dtype=np.float32), mode="F")
    px = [to_rgb(wide).getpixel((x, 0))[0] for x in range(3)]
    assert px[0] == 0 and px[1] == 255  # min-max stretched; NaN mapped to 0 before stretching
    assert 0 < px[2] < 255


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(im, tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)
    assert sum(out.getpixel((10, 5))) > 600 and sum(out.getpixel((10, 35))) < 100  # white half on top


def test_huge_jpeg_is_drafted_and_downscaled_not_refused(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (1600, 1200), (0, 128, 0)), tmp_path / "big.jpg")
    # make PIL's own decompression-bomb guard trip at this size: load_image must still succeed
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    out = load_image(path, max_pixels=30_000, max_decode_pixels=100_000)  # only reachable via the JPEG draft
    assert out.width * out.height <= 30_000
    assert abs(out.width / out.height - 4 / 3) < 0.05
    assert Image.MAX_IMAGE_PIXELS == 200_000  # the global limit is restored


def test_huge_png_downscaled_or_refused_by_decode_limit(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (800, 600), (9, 9, 9)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    out = load_image(path, max_pixels=10_000)
    assert out.width * out.height <= 10_000 and out.getpixel((0, 0)) == (9, 9, 9)
    with pytest.raises(ImageLoadError, match="max_decode_pixels"):
        load_image(path, max_decode_pixels=100_000)


def test_extreme_aspect_ratio_is_refused_from_the_header(tmp_path):
    strip = _save(Image.new("L", (200_000, 1), 7), tmp_path / "strip.png")
    assert strip.stat().st_size < 2_000  # tiny on disk; resizing its short side to a model's 64 px is 819M pixels
    with pytest.raises(ImageLoadError, match=r"strip.png.*200000x1.*aspect ratio 200000:1.*max_aspect_ratio=100"):
        load_image(strip)
    with pytest.raises(ImageLoadError, match="aspect ratio"):
        load_image(_save(Image.new("RGB", (3, 900), 0), tmp_path / "tall.png"))  # either orientation
    assert load_image(_save(Image.new("RGB", (1000, 10), 0), tmp_path / "ok.png")).size == (1000, 10)  # 100:1 loads
    assert load_image(strip, max_aspect_ratio=300_000).size == (200_000, 1)  # the limit is a parameter
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        load_image(strip, max_aspect_ratio=0.5)


def test_a_strip_in_a_gallery_is_reported_and_skipped_before_any_resize(tmp_path):
    """A 200000x1 PNG among good images: skipped like a corrupt image; the model's resize never sees it."""
    paths = _gallery(tmp_path, n=4, bad=())
    paths.insert(2, _save(Image.new("L", (200_000, 1), 7), tmp_path / "strip.png"))
    seen = []

    def clip_like(im):  # a CLIP preprocess would resize the short side to 64 px here (2.4 GB for the strip)
        seen.append(im.size)
        return _to_tensor(im)

    failures = []
    batches = list(iter_image_batches(paths, clip_like, batch_size=8, progress=False, on_failure=failures.append))
    assert torch.cat([i for i, _ in batches]).tolist() == [0, 1, 3, 4]
    assert [(f.index, Path(f.path).name) for f in failures] == [(2, "strip.png")]
    assert "aspect ratio" in failures[0].reason
    assert max(max(size) for size in seen) < 100  # only the good images reached the transform
    (idx, images), = list(iter_image_batches(paths, None, batch_size=8, progress=False))  # the eval path: PIL images
    assert idx.tolist() == [0, 1, 3, 4]


def test_min_side_draft_keeps_the_short_side(tmp_path):
    path = _save(Image.new("RGB", (1000, 600), (1, 2, 3)), tmp_path / "x.jpg")
    out = load_image(path, min_side=100)
    assert min(out.size) >= 100 and out.size[0] < 1000  # decoded at reduced DCT scale


def test_bytes_and_file_objects_are_accepted():
    data = _jpeg_bytes()
    assert load_image(data).size == (64, 48)
    assert load_image(io.BytesIO(data)).size == (64, 48)
    with pytest.raises(ImageLoadError, match="my-label"):
        load_image(data[:100], name="my-label")


# --------------------------------------------------------------- folders and lists
def test_list_images_recursive_sorted_and_filtered(tmp_path):
    for rel in ["b/2.png", "a/10.JPG", "a/1.jpg", "._hidden.jpg", "notes.txt", ".git/x.png", "c.webp"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a/1.jpg", "a/10.JPG", "b/2.png", "c.webp"]
    assert list_images(tmp_path, extensions=["png"]) == [tmp_path / "b/2.png"]


def test_list_images_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        list_images(tmp_path / "empty")


def test_list_images_survives_symlink_loop(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.png").write_bytes(b"x")
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d", target_is_directory=True)
    assert list_images(tmp_path) == [tmp_path / "d" / "x.png"]


def test_read_file_list(tmp_path):
    lst = tmp_path / "lists" / "gallery.txt"
    lst.parent.mkdir()
    lst.write_text("# gallery\n\nimg/a.jpg\n  img/b.jpg  \n/abs/c.png\n")
    assert read_file_list(lst) == [tmp_path / "lists/img/a.jpg", tmp_path / "lists/img/b.jpg", Path("/abs/c.png")]
    assert read_file_list(lst, root=tmp_path)[0] == tmp_path / "img/a.jpg"

    lst.write_text("a.jpg\nb.jpg\n./a.jpg\n")
    with pytest.raises(ValueError, match=r"gallery.txt:3: duplicate .*line 1"):
        read_file_list(lst)
    lst.write_text("a.jpg\n")
    with pytest.raises(ValueError, match=r"gallery.txt:1: image file not found"):
        read_file_list(lst, must_exist=True)
    lst.write_bytes(b"ok.jpg\n\xff\xfe.jpg\n")
    with pytest.raises(ValueError, match=r"gallery.txt:2: not valid UTF-8"):
        read_file_list(lst)
    lst.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="no entries"):
        read_file_list(lst)
    with pytest.raises(FileNotFoundError, match="nothing.txt"):
        read_file_list(tmp_path / "nothing.txt")


# ----------------------------------------------------------- dataset and batches
def _gallery(tmp_path: Path, n: int = 7, bad=(2, 5)) -> list:
    paths = []
    for i in range(n):
        p = tmp_path / f"g{i}.png"
        if i in bad:
            p.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        else:
            Image.new("RGB", (8 + i, 8), (i * 30, 0, 0)).save(p)
        paths.append(p)
    return paths


def _to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255.0


def test_dataset_marks_bad_samples_and_collate_drops_them(tmp_path):
    paths = _gallery(tmp_path)
    ds = ImageListDataset(paths, _to_tensor)
    assert ds[2].pixels is None and "g2.png" in ds[2].name and ds[2].error
    assert ds[0].error is None and ds[0].pixels.shape == (3, 8, 8)
    batch = collate_skip_bad([ds[i] for i in range(4)])
    assert batch.indices.tolist() == [0, 1, 3]
    assert batch.pixels.shape == (3, 3, 8, 8)
    assert [f.index for f in batch.failures] == [2]
    assert collate_skip_bad([ds[2]]).pixels is None


def test_iter_image_batches_skips_logs_and_reports(tmp_path, caplog):
    paths = _gallery(tmp_path)
    log = tmp_path / "logs" / "bad.tsv"
    failures = []
    with caplog.at_level(logging.WARNING, logger="zscir.data.images"):
        batches = list(iter_image_batches(paths, _to_tensor, batch_size=3, log=log, progress=False, on_failure=failures.append))
    got = torch.cat([idx for idx, _ in batches]).tolist()
    assert got == [0, 1, 3, 4, 6]
    assert all(px.shape[0] == len(idx) for idx, px in batches)
    # pixels line up with indices: image i is i*30 red
    first_red = torch.cat([px[:, 0, 0, 0] for _, px in batches])
    assert torch.allclose(first_red * 255, torch.tensor([0.0, 30, 90, 120, 180]), atol=1)
    lines = log.read_text().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["2", "5"] and "g5.png" in lines[1]
    assert [f.index for f in failures] == [2, 5]
    assert "skipped 2 of 7" in caplog.text


def test_iter_image_batches_with_workers(tmp_path):
    paths = _gallery(tmp_path, n=6, bad=(0,))
    got = [idx.tolist() for idx, _ in iter_image_batches(paths, _to_tensor, batch_size=2, num_workers=2, progress=False)]
    assert sum(got, []) == [1, 2, 3, 4, 5]


def test_all_bad_images_abort_early(tmp_path, caplog):
    paths = _gallery(tmp_path, n=6, bad=(0, 1, 2, 3, 4))
    with pytest.raises(RuntimeError, match="all of the first 4 images failed"):
        list(iter_image_batches(paths, _to_tensor, batch_size=2, progress=False, abort_after=4))
    # fewer failures than abort_after: nothing to yield, reported, no exception
    with caplog.at_level(logging.WARNING, logger="zscir.data.images"):
        assert list(iter_image_batches(paths[:3], _to_tensor, batch_size=2, progress=False)) == []
    assert "none of the 3 images could be loaded" in caplog.text


def test_untransformed_batches_are_lists_of_pil(tmp_path):
    paths = _gallery(tmp_path, n=3, bad=())
    (idx, images), = list(iter_image_batches(paths, None, batch_size=8, progress=False))
    assert idx.tolist() == [0, 1, 2] and all(isinstance(im, Image.Image) and im.mode == "RGB" for im in images)


def test_hf_image_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    good = Image.new("RGBA", (12, 10), (0, 255, 0, 255))
    path_img = _save(Image.new("L", (5, 5), 9), tmp_path / "on_disk.png")
    ds = datasets.Dataset.from_dict(
        {"image": [good, {"bytes": b"not an image", "path": "broken.jpg"}, str(path_img)], "label": [1, 2, 3]}
    ).cast_column("image", datasets.Image())
    src = hf_image_source(ds, "image")
    assert len(src) == 3
    assert src.load(0).mode == "RGB" and src.load(0).getpixel((0, 0)) == (0, 255, 0)
    with pytest.raises(ImageLoadError, match=r"image\[1\]:broken.jpg"):
        src.load(1)
    assert src.load(2).getpixel((0, 0)) == (9, 9, 9)
    strips = datasets.Dataset.from_dict({"image": [Image.new("L", (5000, 2), 3)]}).cast_column("image", datasets.Image())
    with pytest.raises(ImageLoadError, match=r"image\[0\].*aspect ratio 2500:1"):
        hf_image_source(strips, "image").load(0)
    batches = list(iter_image_batches(src, _to_tensor, batch_size=2, progress=False))
    assert torch.cat([i for i, _ in batches]).tolist() == [0, 2]
    assert src.fingerprint() == hf_image_source(ds, "image").fingerprint()
    assert src.fingerprint() != hf_image_source(ds.select([0, 2]), "image").fingerprint()
    with pytest.raises(KeyError, match="no column 'img'"):
        hf_image_source(ds, "img")
