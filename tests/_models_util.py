"""Helpers for tests/test_models.py: synthetic images and per-family expectations."""

from __future__ import annotations

from PIL import Image, ImageDraw

COLOURS = [(220, 30, 30), (30, 180, 60), (40, 60, 230), (240, 220, 40), (160, 40, 200), (250, 140, 20)]
BACKGROUNDS = [(255, 255, 255), (20, 20, 20), (128, 128, 128), (200, 230, 255)]


def shape_image(i: int, size: int = 96, width: int | None = None) -> Image.Image:
    """A distinct synthetic picture per ``i``: one coloured circle / square / triangle on a background."""
    w, h = width or size, size
    im = Image.new("RGB", (w, h), BACKGROUNDS[i % len(BACKGROUNDS)])
    d = ImageDraw.Draw(im)
    colour = COLOURS[(i * 5 + 1) % len(COLOURS)]
    cx, cy, r = w * (0.3 + 0.4 * ((i * 7) % 3) / 2), h * (0.3 + 0.4 * ((i * 3) % 2)), min(w, h) * 0.25
    kind = i % 3
    if kind == 0:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == 1:
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return im


def shape_images(n: int = 4, size: int = 96) -> list[Image.Image]:
    return [shape_image(i, size) for i in range(n)]
