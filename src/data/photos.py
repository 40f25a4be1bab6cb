"""Real photos that ship inside installed packages (no network), each with a hand-written caption.

Sources: files bundled in the scikit-image wheel (``skimage/data/*``; the ones :mod:`skimage.data` would
fetch with pooch are not used), scikit-learn's ``load_sample_images`` files and matplotlib's sample data.
Files are read directly from the installed packages with PIL, so nothing here can trigger a download.
Each caption was written by looking at the image. Only images whose licence is stated (public domain,
CC0 or CC BY) are listed; ``licence`` records it, ``origin`` where it comes from.
"""

from __future__ import annotations

import importlib.resources
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vlmc.utils.io import atomic_open, atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_MAX_SIDE = 512
DEFAULT_JPEG_QUALITY = 90


@dataclass(frozen=True)
class Photo:
    """A bundled photo: ``key`` (output file name), where to find it, its caption and licence."""

    key: str
    package: str
    resource: str
    caption: str
    licence: str
    origin: str

    def path(self) -> Path:
        """The file inside the installed package (may not exist if the package lacks it)."""
        if self.package == "matplotlib":
            import matplotlib.cbook

            return Path(matplotlib.cbook.get_sample_data(self.resource, asfileobj=False))
        return Path(str(importlib.resources.files(self.package).joinpath(self.resource)))


_SK = "skimage"
_SKL = "sklearn.datasets"
PHOTOS: tuple[Photo, ...] = (
    Photo(
        "astronaut", _SK, "data/astronaut.png",
        "A smiling astronaut with short blond hair in an orange spacesuit poses beside a white helmet, "
        "in front of an American flag and a model of the space shuttle.",
        "public domain (NASA)", "scikit-image skimage.data.astronaut",
    ),
    Photo(
        "camera", _SK, "data/camera.png",
        "A black-and-white photo of a man in a dark coat looking through a video camera on a tripod "
        "on a grassy field, with buildings in the distance.",
        "CC0 (Lav Varshney)", "scikit-image skimage.data.camera",
    ),
    Photo(
        "chelsea", _SK, "data/chelsea.png",
        "A close-up of a tabby cat's face with yellow-green eyes and a pink nose.",
        "CC0 (Stefan van der Walt)", "scikit-image skimage.data.chelsea",
    ),
    Photo(
        "coffee", _SK, "data/coffee.png",
        "A red cup of espresso on a matching red saucer with a small spoon, on a wooden table.",
        "CC0 (Rachel Michetti)", "scikit-image skimage.data.coffee",
    ),
    Photo(
        "coins", _SK, "data/coins.png",
        "A black-and-white photo of rows of ancient coins with embossed heads laid out on a dark background.",
        "no known copyright restrictions (Brooklyn Museum)", "scikit-image skimage.data.coins",
    ),
    Photo(
        "brick", _SK, "data/brick.png",
        "A grayscale photo of a wall of long narrow bricks laid in a staggered pattern.",
        "CC0 (CC0Textures)", "scikit-image skimage.data.brick",
    ),
    Photo(
        "grass", _SK, "data/grass.png",
        "A grayscale close-up of short grass with a few small leaves.",
        "CC0 (CC0Textures)", "scikit-image skimage.data.grass",
    ),
    Photo(
        "gravel", _SK, "data/gravel.png",
        "A grayscale close-up of a surface covered in small angular gravel stones.",
        "CC0 (CC0Textures)", "scikit-image skimage.data.gravel",
    ),
    Photo(
        "horse", _SK, "data/horse.png",
        "A black silhouette of a horse standing in profile facing right, on a white background.",
        "CC0 (Andreas Preuss)", "scikit-image skimage.data.horse",
    ),
    Photo(
        "hubble_deep_field", _SK, "data/hubble_deep_field.jpg",
        "A deep-space image of countless small galaxies of different colours scattered across a black sky.",
        "public domain (NASA)", "scikit-image skimage.data.hubble_deep_field",
    ),
    Photo(
        "immunohistochemistry", _SK, "data/ihc.png",
        "A microscope image of tissue with brown-stained glands surrounded by pale tissue dotted with "
        "blue cell nuclei.",
        "no known copyright restrictions", "scikit-image skimage.data.immunohistochemistry",
    ),
    Photo(
        "retina", _SK, "data/retina.jpg",
        "A photograph of a human retina: a round orange-red disc with branching blood vessels and a bright "
        "optic disc on the left, on a black background.",
        "CC0 (Wikimedia Commons)", "scikit-image skimage.data.retina",
    ),
    Photo(
        "rocket", _SK, "data/rocket.jpg",
        "A white rocket standing on its launch pad between tall lattice towers at dusk, lit by bright lamps.",
        "public domain (SpaceX)", "scikit-image skimage.data.rocket",
    ),
    Photo(
        "text", _SK, "data/text.png",
        "A grayscale photo of handwritten mathematical formulas on paper, seen at an angle.",
        "public domain (Wikipedia)", "scikit-image skimage.data.text",
    ),
    Photo(
        "china", _SKL, "images/china.jpg",
        "A Chinese pagoda with red pillars and green-and-orange tiled roofs on a wooded hill above a lake.",
        "CC BY 2.0 (danielbuechele on Flickr)", "scikit-learn load_sample_images china.jpg",
    ),
    Photo(
        "flower", _SKL, "images/flower.jpg",
        "A close-up of a peach-coloured dahlia with rounded petals against a blurred dark green background.",
        "CC BY 2.0 (vultilion on Flickr)", "scikit-learn load_sample_images flower.jpg",
    ),
    Photo(
        "grace_hopper", "matplotlib", "grace_hopper.jpg",
        "A portrait of an elderly woman with glasses in a dark navy uniform and officer's cap, "
        "in front of an American flag.",
        "public domain (U.S. Navy official portrait)", "matplotlib sample_data grace_hopper.jpg",
    ),
)  # fmt: skip


def available_photos() -> list[Photo]:
    """The photos whose files exist in the installed packages (missing ones are logged and left out)."""
    found = []
    for photo in PHOTOS:
        try:
            ok = photo.path().is_file()
        except (ImportError, OSError, ValueError) as e:
            ok = False
            log.debug("photo %s unavailable: %s", photo.key, e)
        if ok:
            found.append(photo)
        else:
            log.warning("photo %s not found in %s; left out", photo.key, photo.package)
    return found


def load_photo(photo: Photo, max_side: int | None = DEFAULT_MAX_SIDE) -> Image.Image:
    """Open a bundled photo, keeping its mode (grey stays grey, alpha stays alpha), longer side ≤ ``max_side``."""
    with Image.open(photo.path()) as im:
        im.load()
        out = im.copy()
    if max_side is not None and max(out.size) > max_side:
        scale = max_side / max(out.size)
        size = (max(1, round(out.width * scale)), max(1, round(out.height * scale)))
        out = out.resize(size, Image.Resampling.LANCZOS)
    return out


def _save(im: Image.Image, folder: Path, key: str, quality: int) -> Path:
    """JPEG for RGB/grey, PNG when the image has alpha or a palette (JPEG cannot hold them)."""
    png = im.mode not in ("RGB", "L")
    path = folder / f"{key}.{'png' if png else 'jpg'}"
    with atomic_open(path, "wb") as f:
        if png:
            im.save(f, format="PNG", optimize=True)
        else:
            im.save(f, format="JPEG", quality=quality, optimize=True)
    return path


def export_photos(
    out_dir: str | Path,
    max_side: int | None = DEFAULT_MAX_SIDE,
    quality: int = DEFAULT_JPEG_QUALITY,
    keys: list[str] | None = None,
) -> list[Path]:
    """Write the available photos as ``<out_dir>/<key>.jpg|png`` plus ``<key>.txt`` (caption), atomically.

    Args:
        out_dir: Destination folder (one shard).
        max_side: Longer side limit (downscaled with Lanczos); ``None`` keeps the original size.
        quality: JPEG quality.
        keys: Only these photo keys (all available ones when ``None``).

    Returns:
        The image paths written, in :data:`PHOTOS` order.
    """
    folder = Path(out_dir)
    photos = [p for p in available_photos() if keys is None or p.key in keys]
    written = []
    for photo in photos:
        atomic_write_text(folder / f"{photo.key}.txt", photo.caption + "\n")
        written.append(_save(load_photo(photo, max_side), folder, photo.key, quality))
    return written
