"""Image discovery, the loading policy (every corrupt / convertible case built on the fly) and the DataLoader."""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from vlmc.data.images import (
    DEFAULT_MAX_PIXELS,
    FLAT_SHARD,
    SKIP_CODES,
    ImageDataset,
    ImageRecord,
    ImageSkipped,
    discover_images,
    load_image,
    make_loader,
    read_caption,
    split_batch,
    to_rgb,
    try_load_image,
)
from vlmc.utils.cli import UsageError

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


# --------------------------------------------------------------------------------------------- helpers
def solid(path: Path, colour=RED, size=(16, 12), mode="RGB", fmt=None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, format=fmt, **save)
    return path


def png_bytes(im: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **save)
    return buf.getvalue()


def jpeg_bytes(im: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, **save)
    return buf.getvalue()


def noisy(size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR for ``width x height`` and no pixel data (a cheap 'bomb')."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def px(im: Image.Image, xy=(0, 0)) -> tuple[int, ...]:
    return tuple(im.getpixel(xy))


def close(a, b, tol=6) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b, strict=True))


def skip_code(path: Path, **kw) -> str:
    with pytest.raises(ImageSkipped) as e:
        load_image(path, **kw)
    assert e.value.code in SKIP_CODES
    assert str(e.value).startswith(e.value.code)
    return e.value.code


# ------------------------------------------------------------------------------------------- discovery
def test_flat_root_is_one_shard_and_keys_stay_strings(tmp_path):
    for key in ["000010000", "2", "10", "a.b"]:
        solid(tmp_path / f"{key}.png")
    (tmp_path / "000010000.txt").write_text("  a red\n square \n")
    recs = discover_images(tmp_path)
    assert [r.shard for r in recs] == [FLAT_SHARD] * 4
    assert [r.key for r in recs] == ["000010000", "10", "2", "a.b"]
    assert all(isinstance(r.key, str) for r in recs)
    assert read_caption(recs[0]) == "a red square"
    assert recs[1].caption_path is None and read_caption(recs[1]) is None


def test_sharded_root_sorted_with_captions_and_repeated_keys(tmp_path):
    solid(tmp_path / "00001" / "000010000.jpg")
    solid(tmp_path / "00000" / "000010001.PNG")
    solid(tmp_path / "00000" / "000010000.jpeg")
    (tmp_path / "00000" / "000010000.txt").write_text("\ufeffcaption one", encoding="utf-8")
    (tmp_path / "00000" / "000010001.txt").write_text("   \n")
    (tmp_path / "notes.md").write_text("not an image")
    solid(tmp_path / "00000" / "deeper" / "ignored.png")
    solid(tmp_path / "00000" / ".hidden.png")
    (tmp_path / "empty_dir").mkdir()
    recs = discover_images(tmp_path)
    assert [r.id for r in recs] == [("00000", "000010000"), ("00000", "000010001"), ("00001", "000010000")]
    assert read_caption(recs[0]) == "caption one"
    assert read_caption(recs[1]) is None  # blank caption file
    assert recs[2].caption_path is None
    assert recs == sorted(recs)


def test_shard_filter_and_max_items(tmp_path):
    for shard in ["a", "b", "c"]:
        for key in ["1", "2"]:
            solid(tmp_path / shard / f"{key}.png")
    assert [r.id for r in discover_images(tmp_path, shards=["c", "a"])] == [
        ("a", "1"),
        ("a", "2"),
        ("c", "1"),
        ("c", "2"),
    ]
    assert [r.id for r in discover_images(tmp_path, max_items=3)] == [("a", "1"), ("a", "2"), ("b", "1")]
    with pytest.raises(UsageError, match="zz not found"):
        discover_images(tmp_path, shards=["a", "zz"])
    with pytest.raises(UsageError, match="max_items"):
        discover_images(tmp_path, max_items=0)


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda p: p / "nope", "does not exist"),
        (lambda p: (p / "file.png").write_bytes(b"x") and p / "file.png", "not a directory"),
        (lambda p: p, "no images found"),
        (lambda p: (p / "cap.txt").write_text("only a caption") and p, "no images found"),
    ],
    ids=["missing", "file", "empty", "captions-only"],
)
def test_discovery_errors(tmp_path, setup, match):
    with pytest.raises(UsageError, match=match):
        discover_images(setup(tmp_path))


def test_mixed_layout_and_duplicate_keys_refused(tmp_path):
    solid(tmp_path / "loose.png")
    solid(tmp_path / "s0" / "k.png")
    with pytest.raises(UsageError, match="mixes images"):
        discover_images(tmp_path)
    solid(tmp_path / "s0" / "k.jpg")
    with pytest.raises(UsageError, match="two images with key 'k'"):
        discover_images(tmp_path / "s0")


# ------------------------------------------------------------------------------------ loading: skipped
def test_zero_bytes_not_an_image_missing_directory(tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, I am not a JPEG\n")
    (tmp_path / "dir.png").mkdir()
    assert skip_code(tmp_path / "zero.jpg") == "empty_file"
    assert skip_code(tmp_path / "text.jpg") == "not_an_image"
    assert skip_code(tmp_path / "absent.png") == "missing"
    assert skip_code(tmp_path / "dir.png") == "unreadable"


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_files_refused_even_if_pil_is_told_to_accept(tmp_path, monkeypatch, fmt, keep):
    data = jpeg_bytes(noisy()) if fmt == "jpeg" else png_bytes(noisy())
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(data[: int(len(data) * keep)])
    assert skip_code(path) == "truncated"
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert skip_code(path) == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored after the call


def test_corrupt_pixel_data(tmp_path):
    data = bytearray(png_bytes(noisy()))
    data[60:200] = bytes(140)  # smash IDAT bytes: CRC / zlib failure
    (tmp_path / "bad.png").write_bytes(bytes(data))
    assert skip_code(tmp_path / "bad.png") in {"corrupt", "truncated"}


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_permissions(tmp_path):
    path = solid(tmp_path / "locked.png")
    path.chmod(0)
    try:
        assert skip_code(path) == "unreadable"
    finally:
        path.chmod(0o644)


def test_permission_error_is_unreadable_even_as_root(tmp_path, monkeypatch):
    import vlmc.data.images as images

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    path = solid(tmp_path / "ok.png")
    monkeypatch.setattr(images.os, "open", denied)  # the loader opens with os.open (O_NONBLOCK)
    assert skip_code(path) == "unreadable"


def test_over_max_pixels_and_pil_bombs(tmp_path):
    path = solid(tmp_path / "big.png", size=(100, 60))
    assert skip_code(path, max_pixels=5999) == "too_large"
    assert load_image(path, max_pixels=6000).size == (100, 60)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(40_000, 40_000))  # 1.6 G pixels, a few bytes on disk
    assert skip_code(bomb) == "too_large"
    err = pytest.raises(ImageSkipped, load_image, bomb, max_pixels=10**12).value
    assert err.code == "too_large" and "PIL" in err.detail  # PIL's own DecompressionBombError
    warn = tmp_path / "warn.png"  # above PIL's warning threshold, below its error threshold
    warn.write_bytes(png_header_only(10_000, 10_000))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert skip_code(warn) == "too_large"
        assert skip_code(warn, max_pixels=10**9) in {"truncated", "corrupt"}
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert DEFAULT_MAX_PIXELS <= Image.MAX_IMAGE_PIXELS
    with pytest.raises(ValueError):
        load_image(path, max_pixels=0)


# ---------------------------------------------------------------------------------- loading: converted
def test_rgb_roundtrip_and_not_tied_to_file(tmp_path):
    path = solid(tmp_path / "ok.png", colour=(10, 20, 30))
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (16, 12) and px(im) == (10, 20, 30)
    os.remove(path)
    assert im.copy().getpixel((3, 3)) == (10, 20, 30)
    assert pickle.loads(pickle.dumps(im)).getpixel((1, 1)) == (10, 20, 30)


def test_cmyk_jpeg(tmp_path):
    path = solid(tmp_path / "cmyk.jpg", colour=(0, 255, 255, 0), mode="CMYK", quality=95)
    assert Image.open(path).mode == "CMYK"
    im = load_image(path)
    assert im.mode == "RGB" and close(px(im, (8, 6)), RED, tol=10)


def test_cmyk_with_broken_icc_profile_falls_back(tmp_path):
    path = solid(tmp_path / "icc.jpg", colour=(0, 255, 255, 0), mode="CMYK", icc_profile=b"garbage" * 20)
    assert close(px(load_image(path), (8, 6)), RED, tol=10)


@pytest.mark.parametrize("mode, value, rgb", [("L", 77, (77,) * 3), ("1", 1, WHITE), ("1", 0, (0, 0, 0))])
def test_grey_and_bilevel(tmp_path, mode, value, rgb):
    path = solid(tmp_path / f"g{mode}.png", colour=value, mode=mode)
    assert px(load_image(path)) == rgb


def test_16bit_grey_png_scaled_not_clipped(tmp_path):
    values = np.array([[0, 255, 257 * 100, 32768, 65535, 300]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    im = load_image(path)
    got = [im.getpixel((x, 0))[0] for x in range(values.shape[1])]
    assert got == [0, 1, 100, 128, 255, 1]
    assert all(im.getpixel((x, 0)) == (got[x],) * 3 for x in range(values.shape[1]))


def test_32bit_int_and_float_modes():
    as_i8 = Image.fromarray(np.array([[0, 128, 255]], dtype=np.int32), mode="I")
    as_i16 = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32), mode="I")
    as_f01 = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    as_fwide = Image.fromarray(np.array([[-2.0, 0.0, 2.0]], dtype=np.float32), mode="F")
    assert [to_rgb(as_i8).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    assert [to_rgb(as_i16).getpixel((x, 0))[0] for x in range(3)] == [0, 4, 255]
    assert [to_rgb(as_f01).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    assert [to_rgb(as_fwide).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_alpha_composited_over_white(tmp_path):
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    arr[..., 0] = 255  # red everywhere
    arr[0, :, 3] = [0, 255, 128]  # transparent, opaque, half
    path = tmp_path / "rgba.png"
    Image.fromarray(arr, mode="RGBA").save(path)
    im = load_image(path)
    assert px(im, (0, 0)) == WHITE and px(im, (1, 0)) == RED
    assert close(px(im, (2, 0)), (255, 127, 127), tol=2)
    la = solid(tmp_path / "la.png", colour=(0, 0), mode="LA")
    assert px(load_image(la)) == WHITE


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((1, 1), 1)
    for name in ("p.png", "p.gif"):
        im.save(tmp_path / name, transparency=0)
        out = load_image(tmp_path / name)
        assert px(out, (0, 0)) == WHITE and px(out, (1, 1)) == RED


def test_exif_orientation_applied(tmp_path):
    im = Image.new("RGB", (40, 20), RED)
    im.paste(BLUE, (20, 0, 40, 20))  # left red, right blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)
    assert close(px(out, (10, 5)), RED, tol=40) and close(px(out, (10, 35)), BLUE, tol=40)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert close(px(load_image(path)), RED, tol=4)


def test_png_content_with_jpg_name_is_fine(tmp_path):
    path = tmp_path / "misnamed.jpg"
    path.write_bytes(png_bytes(Image.new("RGB", (5, 5), BLUE)))
    assert px(load_image(path)) == BLUE


# ------------------------------------------------------------------------------------ dataset / loader
def _mixed_folder(root: Path) -> list[ImageRecord]:
    for i in range(7):
        solid(root / "s" / f"{i:09d}.png", colour=(i * 30, 0, 0))
    (root / "s" / "000000002.png").write_bytes(b"")
    (root / "s" / "000000005.png").write_text("nope")
    return discover_images(root)


def _flatten(loader) -> list[tuple]:
    out = []
    for batch in loader:
        assert isinstance(batch, list)
        for item in batch:
            pixels = item.image.tobytes() if item.image is not None else None
            out.append((item.record, pixels, item.skip_reason))
    return out


def test_dataset_yields_skips_and_loader_workers_agree(tmp_path):
    records = _mixed_folder(tmp_path)
    ds = ImageDataset(records)
    assert pickle.loads(pickle.dumps(ds)).records == records
    assert ds[2].image is None and ds[2].skip_reason.startswith("empty_file")
    assert ds[5].skip_reason.startswith("not_an_image")
    assert ds[3].image.mode == "RGB" and ds[3].skip_reason is None
    serial = _flatten(make_loader(records, batch_size=3, num_workers=0))
    parallel = _flatten(make_loader(records, batch_size=3, num_workers=2))
    assert serial == parallel
    assert [r for r, *_ in serial] == records
    loaded, skipped = split_batch(ds[i] for i in range(len(ds)))
    assert [s.record.key for s in skipped] == ["000000002", "000000005"]
    assert len(loaded) == 5


class Halve:
    """A picklable transform."""

    def __call__(self, im):
        return im.resize((im.width // 2, im.height // 2))


def test_dataset_transform_and_single_shard_string(tmp_path):
    solid(tmp_path / "a" / "k.png", size=(20, 10))
    solid(tmp_path / "b" / "k.png")
    records = discover_images(tmp_path, shards="a")
    assert [r.id for r in records] == [("a", "k")]
    (batch,) = list(make_loader(records, num_workers=0, transform=Halve()))
    assert batch[0].image.size == (10, 5)


def test_try_load_image(tmp_path):
    (tmp_path / "z.png").write_bytes(b"")
    assert try_load_image(tmp_path / "z.png") == (None, "empty_file: zero bytes")
    image, reason = try_load_image(solid(tmp_path / "ok.png"))
    assert reason is None and image.mode == "RGB"
