"""Image folders in, RGB ``PIL`` images out, with an explicit policy for broken or odd files.

Folder layout
-------------
``<root>/<shard>/<key>.<ext>`` with ``ext`` one of :data:`IMAGE_EXTENSIONS` (case-insensitive) and an
optional ``<key>.txt`` beside the image holding one reference caption.

* **Sharded root**: every image sits one level down, in a subfolder; the subfolder's name is the shard
  name (``"00000"``, ``"photos"``...). Deeper folders are ignored.
* **Flat root**: images sit directly in ``root`` and there is no subfolder with images. The whole root is
  then ONE shard named :data:`FLAT_SHARD` (``"_root"``). The name is fixed (it does not depend on the
  folder's own name, so moving or renaming the folder keeps every image's identity) and it is a valid
  path component (unlike ``""`` or ``"."``), so stages can write ``<out>/<shard>/...`` unchanged.
* **Mixed root** (images both directly in ``root`` and in subfolders) is refused with a
  :class:`~vlmc.utils.cli.UsageError`: it is almost always a wrong ``--root``, and silently picking one
  reading would change which images a run sees.

Hidden files and folders (names starting with ``.``) are ignored. A key is the file name without its last
suffix and is always a ``str`` (``"000010000"`` stays ``"000010000"``). Two images with the same key in one
shard (``a.jpg`` and ``a.png``) are refused. An image is identified by ``(shard, key)``: keys may repeat
across shards. Records are sorted by shard, then key (plain string order), so every run sees the same order.

Loading policy (:func:`load_image`)
-----------------------------------
Converted to 8-bit RGB where a user would expect a picture: ``CMYK`` (through its ICC profile when it has
one), ``1``/``L``, unsigned 16-bit grey (``I;16``/``I;16L``/``I;16B``: scaled by 255/65535 with rounding,
never clipped), 32-bit ``I`` (taken as 8-bit when all values lie in 0-255, as 16-bit when in 0-65535,
else min-max stretched; other ``I;16*`` modes are min-max stretched), float ``F`` ([0, 1] scaled by 255,
else min-max stretched; a constant image outside [0, 1] becomes black), palette and alpha
modes (composited over white), EXIF orientation applied, first frame of animated or multi-page files.

Skipped with :class:`ImageSkipped`, whose ``code`` is one of :data:`SKIP_CODES`: ``missing``,
``unreadable`` (permissions, a folder), ``empty_file`` (zero bytes), ``not_an_image``, ``too_large``
(more than ``max_pixels`` pixels, or PIL's own ``DecompressionBombError`` / decompressed-data limits),
``truncated``, ``corrupt`` (any other decoding failure), ``unsupported_mode``. Image size is checked from
the header before any pixel is decoded. PIL's ``DecompressionBombWarning`` never leaks out: our
``max_pixels`` check on the header supersedes it. ``ImageFile.LOAD_TRUNCATED_IMAGES`` is forced to
``False`` while a file is decoded (and restored after), so a truncated file is never silently padded.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from vlmc.utils.cli import UsageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_SUFFIX = ".txt"
FLAT_SHARD = "_root"
DEFAULT_MAX_PIXELS = 64_000_000
SKIP_CODES: tuple[str, ...] = (
    "missing",
    "unreadable",
    "empty_file",
    "not_an_image",
    "too_large",
    "truncated",
    "corrupt",
    "unsupported_mode",
)
_UINT16_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA", "P"}
_WHITE = (255, 255, 255)


# --------------------------------------------------------------------------------------------- records
@dataclass(frozen=True, order=True)
class ImageRecord:
    """One image of a folder: ``(shard, key)`` identifies it; sorting orders by shard, then key.

    Attributes:
        shard: Subfolder name, or :data:`FLAT_SHARD` for a flat root.
        key: File name without its extension; always a string.
        path: The image file.
        caption_path: ``<key>.txt`` beside the image, or ``None`` when there is none.
    """

    shard: str
    key: str
    path: Path
    caption_path: Path | None = None

    @property
    def id(self) -> tuple[str, str]:
        """``(shard, key)``."""
        return (self.shard, self.key)


def is_image_file(path: Path) -> bool:
    """True for a visible entry whose suffix is in :data:`IMAGE_EXTENSIONS` and that is not a folder.

    Besides regular files this includes dangling symbolic links, link loops, FIFOs and other special
    files named like images: they become records that :func:`load_image` skips with a reason, so they
    are listed in the manifest instead of vanishing.
    """
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and not path.is_dir()


def _list_dir(folder: Path) -> list[Path]:
    """Visible entries of ``folder``; an unreadable folder is a ``UsageError``."""
    try:
        return [p for p in folder.iterdir() if not p.name.startswith(".")]
    except PermissionError:
        raise UsageError(f"cannot read image folder {folder}: permission denied") from None


def _scan_shard(shard: str, folder: Path) -> list[ImageRecord]:
    """Records of the images directly inside ``folder`` (one shard)."""
    entries = _list_dir(folder)
    names = {p.name for p in entries}
    records: dict[str, ImageRecord] = {}
    for path in entries:
        if not is_image_file(path):
            continue
        key = path.stem
        if key in records:
            other = records[key].path.name
            raise UsageError(
                f"shard {shard!r} has two images with key {key!r} ({other}, {path.name}); keep one"
            )
        caption = folder / f"{key}{CAPTION_SUFFIX}"
        records[key] = ImageRecord(shard, key, path, caption if caption.name in names else None)
    return list(records.values())


def _layout(root: Path) -> dict[str, Path]:
    """Shard name → folder, deciding between a flat and a sharded root."""
    entries = _list_dir(root)
    loose = [p for p in entries if is_image_file(p)]
    subdirs = sorted((p for p in entries if p.is_dir()), key=lambda p: p.name)
    sharded = [d for d in subdirs if any(is_image_file(p) for p in _list_dir(d))]
    if loose and sharded:
        raise UsageError(
            f"{root} mixes images directly in it ({loose[0].name}, ...) with shard subfolders "
            f"({sharded[0].name}, ...): move the loose images into a subfolder, or point at one shard"
        )
    if loose:
        return {FLAT_SHARD: root}
    return {d.name: d for d in sharded}


def discover_images(
    root: str | os.PathLike,
    shards: Iterable[str] | None = None,
    max_items: int | None = None,
) -> list[ImageRecord]:
    """List the images under ``root`` (see the module docstring for the layout and shard naming).

    Args:
        root: Image root folder, flat or sharded.
        shards: Keep only these shard names (each must exist); ``None`` keeps all.
        max_items: Keep the first N records in (shard, key) order; ``None`` keeps all.

    Returns:
        Records sorted by (shard, key).

    Raises:
        UsageError: Root missing or not a folder, mixed layout, duplicate key in a shard, unknown shard
            requested, ``max_items`` < 1, or no image found.
    """
    root = Path(root)
    if not root.exists():
        raise UsageError(f"image root {root} does not exist")
    if not root.is_dir():
        raise UsageError(f"image root {root} is not a directory")
    if max_items is not None and max_items < 1:
        raise UsageError(f"max_items must be at least 1, got {max_items}")
    layout = _layout(root)
    if shards is not None:
        wanted = list(dict.fromkeys([shards] if isinstance(shards, str) else shards))
        unknown = [s for s in wanted if s not in layout]
        if unknown:
            have = ", ".join(sorted(layout)) or "none"
            raise UsageError(f"shard(s) {', '.join(unknown)} not found under {root} (found: {have})")
        layout = {s: layout[s] for s in wanted}
    records = sorted(r for shard, folder in layout.items() for r in _scan_shard(shard, folder))
    if not records:
        exts = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
        raise UsageError(f"no images found under {root} (looked for {exts} in it and its subfolders)")
    return records[:max_items] if max_items is not None else records


def read_caption(record: ImageRecord) -> str | None:
    """The reference caption of ``record``: whitespace collapsed to single spaces; ``None`` if absent or empty.

    Args:
        record: An image record from :func:`discover_images`.

    Returns:
        The caption text, or ``None``.
    """
    if record.caption_path is None:
        return None
    try:
        text = record.caption_path.read_text(encoding="utf-8-sig", errors="replace")
    except FileNotFoundError:
        return None
    return " ".join(text.split()) or None


# ---------------------------------------------------------------------------------------------- loading
class ImageSkipped(Exception):
    """An image the policy refuses; ``code`` is one of :data:`SKIP_CODES`, ``str()`` is ``"code: detail"``."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}" if self.detail else self.code


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    """Refuse truncated files and silence PIL's bomb warning (our header check supersedes it)."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _open_file(path: Path) -> BinaryIO:
    """Open ``path`` for reading, mapping OS problems, special files and zero bytes to :class:`ImageSkipped`."""
    try:  # O_NONBLOCK: a FIFO named like an image must not block the loader (no effect on regular files)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ImageSkipped("missing", "dangling symbolic link" if path.is_symlink() else "file not found") from None
    except PermissionError:
        raise ImageSkipped("unreadable", "permission denied") from None
    except IsADirectoryError:
        raise ImageSkipped("unreadable", "is a directory") from None
    except OSError as e:
        raise ImageSkipped("unreadable", "symbolic link loop" if e.errno == errno.ELOOP else e.strerror or str(e)) from None
    mode, size = (st := os.fstat(fd)).st_mode, st.st_size
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ImageSkipped("unreadable", "is a directory" if stat.S_ISDIR(mode) else f"not a regular file ({_file_kind(mode)})")
    if size == 0:
        os.close(fd)
        raise ImageSkipped("empty_file", "zero bytes")
    return os.fdopen(fd, "rb")


def _file_kind(mode: int) -> str:
    """A word for a special file's type (``FIFO``, ``socket``, ``character device``, ...)."""
    for test, word in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return word
    return "special file"


def _decode_error(e: Exception) -> ImageSkipped:
    """Map a PIL decoding exception to a skip reason."""
    msg = str(e) or type(e).__name__
    if isinstance(e, Image.DecompressionBombError):
        return ImageSkipped("too_large", f"PIL decompression-bomb limit: {msg}")
    if isinstance(e, ValueError) and "decompressed data too large" in msg.lower():
        return ImageSkipped("too_large", msg)
    if isinstance(e, EOFError) or "truncated" in msg.lower():
        return ImageSkipped("truncated", msg)
    return ImageSkipped("corrupt", f"{type(e).__name__}: {msg}")


def _decode(f: BinaryIO, max_pixels: int) -> Image.Image:
    """Open, size-check (header only) and fully decode the image in ``f`` (first frame)."""
    with _strict_decoding():
        try:
            im = Image.open(f)
        except UnidentifiedImageError:
            raise ImageSkipped("not_an_image", "PIL cannot identify the file") from None
        except Exception as e:  # PIL raises many types for malformed headers
            raise _decode_error(e) from None
        w, h = im.size
        if w * h > max_pixels:
            raise ImageSkipped("too_large", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
        try:
            im.load()
        except Exception as e:  # any decoder failure means this file is unusable
            raise _decode_error(e) from None
    return im


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    """Rotate/flip by the EXIF orientation tag; a broken EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception as e:  # a malformed EXIF block must not cost the image
        log.debug("ignoring unreadable EXIF orientation: %s", e)
        return im


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map integer/float grey pixels to uint8 without clipping (see the module docstring)."""
    if mode in _UINT16_MODES:
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    a = arr.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        scale, offset = 255.0, 0.0
    elif mode == "I" and lo >= 0 and hi <= 255:
        scale, offset = 1.0, 0.0
    elif mode == "I" and lo >= 0 and hi <= 65535:
        scale, offset = 255.0 / 65535.0, 0.0
    else:
        scale, offset = (255.0 / (hi - lo) if hi > lo else 0.0), lo
    return np.clip(np.rint((a - offset) * scale), 0, 255).astype(np.uint8)


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """CMYK → RGB through the embedded ICC profile when there is one, else PIL's formula."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception as e:  # a broken profile falls back to the plain conversion
            log.debug("ICC conversion failed (%s); using plain CMYK→RGB", e)
    return im.convert("RGB")


def _over_white(im: Image.Image) -> Image.Image:
    """Composite an image with alpha (or a palette with transparency) over white."""
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a decoded image of any PIL mode to 8-bit RGB following the loading policy.

    Args:
        im: A loaded PIL image.

    Returns:
        An RGB image (``im`` itself when it already is RGB).

    Raises:
        ImageSkipped: ``unsupported_mode`` when PIL cannot convert the mode.
    """
    mode = im.mode
    try:
        if mode == "RGB":
            return im
        if mode == "CMYK":
            return _cmyk_to_rgb(im)
        if mode.startswith("I") or mode == "F":
            return Image.fromarray(_scale_to_uint8(np.asarray(im), mode), mode="L").convert("RGB")
        if mode in _ALPHA_MODES:
            return _over_white(im)
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageSkipped("unsupported_mode", f"cannot convert mode {mode} to RGB: {e}") from None


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load one image file as 8-bit RGB, or raise :class:`ImageSkipped` with a short reason.

    Args:
        path: The image file.
        max_pixels: Refuse images with more pixels than this (checked on the header, before decoding).

    Returns:
        A fully loaded RGB image, EXIF orientation applied, not tied to any open file.

    Raises:
        ImageSkipped: The file is refused; ``code`` says why (see :data:`SKIP_CODES`).
        ValueError: ``max_pixels`` < 1.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1, got {max_pixels}")
    with _open_file(Path(path)) as f:
        decoded = _decode(f, max_pixels)
        oriented = _apply_exif_orientation(decoded)
    rgb = to_rgb(oriented)
    return rgb.copy() if rgb is decoded else rgb  # never hand out an image tied to the closed file


def try_load_image(
    path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image | None, str | None]:
    """:func:`load_image` that returns ``(image, None)`` or ``(None, "code: detail")`` instead of raising."""
    try:
        return load_image(path, max_pixels), None
    except ImageSkipped as e:
        return None, str(e)


# ------------------------------------------------------------------------------------------ torch data
class LoadedImage(NamedTuple):
    """One dataset item: the record, the RGB image (or transformed value) or ``None``, and why it was skipped."""

    record: ImageRecord
    image: Any
    skip_reason: str | None


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset over image records that never raises for a bad file.

    Each item is a :class:`LoadedImage`: ``image`` is ``None`` and ``skip_reason`` is ``"code: detail"``
    when the file is refused by :func:`load_image`. Picklable, so it works with ``num_workers > 0``
    (``transform``, when given, must be picklable too: a module-level function or class instance).

    Args:
        records: Records from :func:`discover_images`.
        max_pixels: Passed to :func:`load_image`.
        transform: Optional callable applied to each loaded RGB image (in the worker).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        max_pixels: int = DEFAULT_MAX_PIXELS,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        self.records = list(records)
        self.max_pixels = max_pixels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> LoadedImage:
        record = self.records[index]
        image, reason = try_load_image(record.path, self.max_pixels)
        if image is not None and self.transform is not None:
            image = self.transform(image)
        return LoadedImage(record, image, reason)


def collate_loaded(batch: list[LoadedImage]) -> list[LoadedImage]:
    """DataLoader ``collate_fn`` that keeps items as a list (PIL images and ``None`` do not stack)."""
    return list(batch)


def split_batch(batch: Iterable[LoadedImage]) -> tuple[list[LoadedImage], list[LoadedImage]]:
    """``(loaded, skipped)`` items of a collated batch, order kept."""
    loaded: list[LoadedImage] = []
    skipped: list[LoadedImage] = []
    for item in batch:
        (skipped if item.image is None else loaded).append(item)
    return loaded, skipped


def make_loader(
    records: Sequence[ImageRecord],
    batch_size: int = 8,
    num_workers: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    transform: Callable[[Image.Image], Any] | None = None,
) -> torch.utils.data.DataLoader:
    """An in-order DataLoader of ``list[LoadedImage]`` batches over ``records``.

    Args:
        records: Records from :func:`discover_images`.
        batch_size: Items per batch.
        num_workers: Worker processes (0 loads in the calling process).
        max_pixels: Passed to :func:`load_image`.
        transform: Optional picklable callable applied to each loaded image.

    Returns:
        A DataLoader whose batches are lists of :class:`LoadedImage`, in record order.
    """
    return torch.utils.data.DataLoader(
        ImageDataset(records, max_pixels, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_loaded,
        persistent_workers=False,
    )
