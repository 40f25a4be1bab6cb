"""Captioned synthetic scenes: coloured shapes on a 3x3 grid, whose caption states the whole truth.

A scene holds 1 to 3 objects, each with a shape (:data:`SHAPES`), a colour (:data:`COLOURS`), a size
(:data:`SIZES`) and a position: one cell of a 3x3 grid (:data:`POSITIONS`), never two objects in one cell,
so objects never overlap. Objects are jittered, scaled and rotated slightly inside their cell, on a light
background with a faint low-frequency texture. Scenes are drawn at 4x and box-downsampled (anti-aliased).

Determinism: scene ``key`` under ``seed`` depends on nothing else (not on the shard, ``n`` or the other
keys): every random draw comes from ``random.Random(sha256(seed, key)).random()``, the one method whose
sequence Python guarantees across versions.

Caption grammar (fixed)::

    <count> object(s): <phrase>[, <phrase>] [and <phrase>].
    phrase   = "a <size> <colour> <shape> <where>"
    where    = "in the center" | "on the left" | "on the right" | "at the top" | "at the bottom"
               | "at the top left" | "at the top right" | "at the bottom left" | "at the bottom right"

e.g. ``"two objects: a large red circle at the top left and a small blue square in the center."``
Phrases are listed in grid order (row by row). :func:`parse_caption` reads this grammar back exactly and
reads free text leniently; :func:`attribute_scores` scores a predicted caption per attribute.

CLI: ``python src/data/scenes.py --out DIR --n 1000 --shards 4 --seed 0 --size 224`` writes
``DIR/<shard>/<key>.png`` and ``<key>.txt`` (shards ``00000``, ``00001``..., keys ``000000000``...).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vlmc.utils import cli
from vlmc.utils.cli import UsageError, ensure_writable_dir, entry_point, make_parser, progress_bar
from vlmc.utils.io import atomic_open, atomic_write_text

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 60, 190),
    "orange": (245, 135, 25),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position", "count")
MAX_OBJECTS = 3
KEY_DIGITS = 9
_COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SUPERSAMPLE = 4
_RADIUS = {"small": 0.19, "large": 0.38}  # fraction of a grid cell
_JITTER = 0.08  # max centre shift, fraction of a cell (large + jitter stays inside the cell)

# Synthetic scenes are a light background (pixel mean 0.89, std 0.11 per channel at 96 px) with small
# coloured shapes. Under CLIP's ImageNet normalisation the background is a large constant input that
# swamps the shapes, and a tower trained from scratch on captions learnt nothing of the image in 1500
# steps (captions identical for every image; measured). The testbed normalises with these instead:
# the background maps near 0 and the shapes stand out.
SCENE_PIXEL_MEAN, SCENE_PIXEL_STD = 0.85, 0.2


# ----------------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class SceneObject:
    """One shape: the four captioned attributes plus render-only jitter (not in the caption)."""

    shape: str
    colour: str
    size: str
    position: str
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    angle: float = 0.0

    def attributes(self) -> dict[str, str]:
        """``{"shape", "colour", "size", "position"}``."""
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "position": self.position}


@dataclass(frozen=True)
class Scene:
    """A scene: objects in grid order plus the background (tone, texture amplitude and seed)."""

    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int] = (235, 235, 235)
    texture: float = 0.0
    texture_seed: int = 0

    def attributes(self) -> dict[str, Any]:
        """``{"count": n, "objects": [attributes per object, grid order]}``, as :func:`parse_caption` returns."""
        return {"count": len(self.objects), "objects": [o.attributes() for o in self.objects]}


def _rng(seed: int, key: str) -> random.Random:
    """A generator that depends only on ``(seed, key)``."""
    digest = hashlib.sha256(f"vlmc-scenes\0{seed}\0{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _pick(rng: random.Random, items: Sequence[Any]) -> Any:
    """One item, drawn with ``rng.random()`` only (stable across Python versions)."""
    return items[min(int(rng.random() * len(items)), len(items) - 1)]


def _uniform(rng: random.Random, lo: float, hi: float) -> float:
    return lo + (hi - lo) * rng.random()


def _sample(rng: random.Random, items: Sequence[Any], k: int) -> list[Any]:
    """``k`` distinct items (partial Fisher-Yates with ``rng.random()``)."""
    pool = list(items)
    for i in range(k):
        j = i + min(int(rng.random() * (len(pool) - i)), len(pool) - i - 1)
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:k]


def make_scene(key: str, seed: int = 0) -> Scene:
    """The scene for ``key`` under ``seed``; reproducible independently of any other key.

    Args:
        key: Image key (any string).
        seed: Dataset seed.

    Returns:
        The scene, objects in grid order.
    """
    rng = _rng(seed, str(key))
    count = 1 + _pick(rng, range(MAX_OBJECTS))
    cells = sorted(_sample(rng, range(len(POSITIONS)), count))
    objects = tuple(
        SceneObject(
            shape=_pick(rng, SHAPES),
            colour=_pick(rng, list(COLOURS)),
            size=_pick(rng, SIZES),
            position=POSITIONS[cell],
            dx=_uniform(rng, -_JITTER, _JITTER),
            dy=_uniform(rng, -_JITTER, _JITTER),
            scale=_uniform(rng, 0.9, 1.1),
            angle=_uniform(rng, -15.0, 15.0),
        )
        for cell in cells
    )
    tone = int(_uniform(rng, 215, 248))
    tint = _pick(rng, [(0, 0, 0), (4, 2, -4), (-4, 0, 4), (2, 4, -2)])
    background = tuple(max(0, min(255, tone + t)) for t in tint)
    return Scene(objects, background, _uniform(rng, 0.0, 10.0), int(rng.random() * 2**31))


# ------------------------------------------------------------------------------------------- captioning
_WHERE = {"center": "in the center", "left": "on the left", "right": "on the right"}


def _where(position: str) -> str:
    return _WHERE.get(position, f"at the {position}")


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene) -> str:
    """The scene's caption in the fixed grammar (module docstring)."""
    n = len(scene.objects)
    head = f"{_COUNT_WORDS[n] if n < len(_COUNT_WORDS) else n} object{'' if n == 1 else 's'}"
    phrases = [f"a {o.size} {o.colour} {o.shape} {_where(o.position)}" for o in scene.objects]
    return f"{head}: {_join(phrases)}."


# -------------------------------------------------------------------------------------------- rendering
def _polygon(shape: str, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices (relative to the centre) of a non-circle shape of radius ``r``, rotated by ``angle``."""
    if shape == "square":
        pts = [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a) + 0.15) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "star":
        pts = [
            ((1.0 if i % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
             (1.0 if i % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5))
            for i in range(10)
        ]  # fmt: skip
    elif shape == "cross":
        a, b = 0.3, 0.9
        pts = [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(r * (x * c - y * s), r * (x * s + y * c)) for x, y in pts]


def _background(scene: Scene, side: int) -> Image.Image:
    """The plain tone plus a faint smooth texture (8x8 noise upsampled)."""
    rng = random.Random(scene.texture_seed)
    noise = np.array([[rng.random() - 0.5 for _ in range(8)] for _ in range(8)], dtype=np.float32)
    smooth = np.asarray(Image.fromarray(noise, mode="F").resize((side, side), Image.Resampling.BICUBIC))
    base = np.asarray(scene.background, dtype=np.float32)[None, None, :]
    pixels = np.clip(np.rint(base + 2.0 * scene.texture * smooth[..., None]), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, cell: float) -> None:
    row, col = divmod(POSITIONS.index(obj.position), 3)
    cx, cy = (col + 0.5 + obj.dx) * cell, (row + 0.5 + obj.dy) * cell
    r = _RADIUS[obj.size] * obj.scale * cell
    fill = COLOURS[obj.colour]
    outline = tuple(int(v * 0.6) for v in fill)
    width = max(1, round(cell * 0.02))
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=width)
    else:
        pts = [(cx + x, cy + y) for x, y in _polygon(obj.shape, r, obj.angle)]
        draw.polygon(pts, fill=fill, outline=outline, width=width)


def render_scene(scene: Scene, size: int = 224) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image (pure function of its arguments)."""
    side = size * _SUPERSAMPLE
    image = _background(scene, side)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, side / 3)
    return image.resize((size, size), Image.Resampling.BOX)


# ---------------------------------------------------------------------------------------------- parsing
_SHAPE_WORDS = {w: s for s in SHAPES for w in (s, s + "s", s + "es")} | {"disc": "circle", "disk": "circle"}
_COLOUR_WORDS = {c: c for c in COLOURS} | {"violet": "purple"}
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
_SIZE_WORDS |= {"huge": "large"}
_POSITION_WORDS = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom", "left": "left"}
_POSITION_WORDS |= {"right": "right", "center": "center", "centre": "center", "middle": "center"}
_POSITION_WORDS |= {"central": "center"}
_SEPARATORS = {",", ";", ":", ".", "!", "?", "and"}
_COUNT_NOUNS = {"object", "objects", "shape", "shapes", "item", "items", "thing", "things"}
_NUMBERS = {w: i for i, w in enumerate(_COUNT_WORDS)}
_TOKEN = re.compile(r"[a-z]+|\d+|[,;:.!?]")


def _position(words: list[str]) -> str | None:
    """Grid position from position words (first vertical and first horizontal word win)."""
    vertical = next((w for w in words if w in ("top", "bottom")), None)
    horizontal = next((w for w in words if w in ("left", "right")), None)
    if vertical and horizontal:
        return f"{vertical} {horizontal}"
    return vertical or horizontal or ("center" if "center" in words else None)


def _explicit_count(tokens: list[str]) -> int | None:
    """``N objects`` / ``N shapes`` (word or digits), first occurrence."""
    for word, noun in zip(tokens, tokens[1:], strict=False):
        if noun in _COUNT_NOUNS and (word in _NUMBERS or word.isdigit()):
            return _NUMBERS[word] if word in _NUMBERS else int(word)
    return None


def _parse_objects(tokens: list[str]) -> list[dict[str, Any]]:
    """Objects from a token stream: size/colour words before a shape, position words around it."""
    objects: list[dict[str, Any]] = []
    pending: dict[str, Any] = {"size": None, "colour": None, "where": []}
    current: dict[str, Any] | None = None
    for tok in tokens:
        if tok in _SEPARATORS:
            current = None
        elif tok in _SIZE_WORDS or tok in _COLOUR_WORDS:
            current = None
            pending["size" if tok in _SIZE_WORDS else "colour"] = _SIZE_WORDS.get(tok) or _COLOUR_WORDS[tok]
        elif tok in _SHAPE_WORDS:
            current = {"shape": _SHAPE_WORDS[tok], "colour": pending["colour"], "size": pending["size"]}
            current["where"] = pending["where"]
            objects.append(current)
            pending = {"size": None, "colour": None, "where": []}
        elif tok in _POSITION_WORDS:
            (current or pending)["where"].append(_POSITION_WORDS[tok])
    return [
        {"shape": o["shape"], "colour": o["colour"], "size": o["size"], "position": _position(o["where"])}
        for o in objects
    ]


def parse_caption(text: str | None) -> dict[str, Any]:
    """Read scene attributes back from a caption; lenient with free text, exact on the fixed grammar.

    Args:
        text: Any text (``None`` counts as empty).

    Returns:
        ``{"count": int, "objects": [{"shape", "colour", "size", "position"}]}`` in mention order; an
        attribute a phrase does not state is ``None``. ``count`` is an explicit "N objects" when the text
        has one, else the number of shapes mentioned.
    """
    tokens = _TOKEN.findall((text or "").lower())
    objects = _parse_objects(tokens)
    count = _explicit_count(tokens)
    return {"count": len(objects) if count is None else count, "objects": objects}


def is_scene_caption(text: str | None) -> bool:
    """Whether ``text`` states a whole scene: a count of 1-3 matching its objects, each fully described."""
    parsed = parse_caption(text)
    objs = parsed["objects"]
    return (
        1 <= parsed["count"] <= MAX_OBJECTS
        and len(objs) == parsed["count"]
        and all(o[a] is not None for o in objs for a in ATTRIBUTES[:4])
    )


# ---------------------------------------------------------------------------------------------- scoring
def _as_attributes(truth: Scene | dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(truth, Scene):
        return truth.attributes()
    if isinstance(truth, str):
        return parse_caption(truth)
    return truth


def _match(true_objs: list[dict], pred_objs: list[dict]) -> list[tuple[int, int]]:
    """Pairs (true, pred) maximising the number of agreeing attributes (one-to-one)."""
    if not true_objs or not pred_objs:
        return []
    from scipy.optimize import linear_sum_assignment

    keys = ATTRIBUTES[:4]
    agree = np.array(
        [[sum(t[k] is not None and t[k] == p.get(k) for k in keys) for p in pred_objs] for t in true_objs]
    )
    rows, cols = linear_sum_assignment(agree, maximize=True)
    return list(zip(rows.tolist(), cols.tolist(), strict=True))


def attribute_scores(
    pred_caption: str | None, true_attributes: Scene | dict[str, Any] | str
) -> dict[str, float]:
    """Per-attribute accuracy of a predicted caption against a scene's truth.

    Predicted objects are matched one-to-one to true objects so as to agree on the most attributes
    (an optimistic matching); for each of shape, colour, size and position the score is the fraction of
    true objects whose match has the right value (an unmatched true object counts as wrong). ``count`` is
    1.0 when the predicted count equals the true count. Extra predicted objects cost only ``count``.

    Args:
        pred_caption: The model's caption (any text; ``None`` = empty).
        true_attributes: A :class:`Scene`, its ``attributes()`` dict, or its true caption.

    Returns:
        ``{"shape", "colour", "size", "position", "count", "mean"}``, each in [0, 1]; ``mean`` averages
        the five.
    """
    truth = _as_attributes(true_attributes)
    pred = parse_caption(pred_caption)
    true_objs, pred_objs = truth["objects"], pred["objects"]
    scores: dict[str, float] = {}
    for attr in ATTRIBUTES[:4]:
        if not true_objs:
            scores[attr] = float(not pred_objs)
            continue
        hits = sum(pred_objs[j][attr] == true_objs[i][attr] for i, j in _match(true_objs, pred_objs))
        scores[attr] = hits / len(true_objs)
    scores["count"] = float(pred["count"] == truth["count"])
    scores["mean"] = sum(scores[a] for a in ATTRIBUTES) / len(ATTRIBUTES)
    return scores


def attribute_accuracy(pred_caption: str | None, true_attributes: Scene | dict[str, Any] | str) -> float:
    """Mean of :func:`attribute_scores` over shape, colour, size, position and count (in [0, 1])."""
    return attribute_scores(pred_caption, true_attributes)["mean"]


# ---------------------------------------------------------------------------------------------- writing
def scene_key(index: int) -> str:
    """Zero-padded key of scene ``index`` (``10000`` → ``"000010000"``)."""
    return f"{index:0{KEY_DIGITS}d}"


def write_scene(root: str | Path, shard: str, key: str, seed: int = 0, size: int = 224) -> Path:
    """Render scene ``key`` and write ``<root>/<shard>/<key>.txt`` then ``<key>.png``, each atomically.

    The caption is written first, so an image that exists always has its caption.

    Returns:
        The image path.
    """
    scene = make_scene(key, seed)
    folder = Path(root) / shard
    atomic_write_text(folder / f"{key}.txt", caption(scene) + "\n")
    path = folder / f"{key}.png"
    with atomic_open(path, "wb") as f:
        render_scene(scene, size).save(f, format="PNG")
    return path


def write_scenes(
    folder: str | Path, n: int, seed: int = 0, size: int = 224, first_index: int = 0, progress: bool = False
) -> list[Path]:
    """Write ``n`` scenes straight into ``folder`` (one shard): keys ``scene_key(first_index + i)``.

    Returns:
        The image paths written, in key order.

    Raises:
        UsageError: Invalid count, size or key range.
    """
    _validate(n, 1, size, first_index)
    folder = Path(folder)
    keys = [scene_key(first_index + i) for i in range(n)]
    return [
        write_scene(folder.parent, folder.name, key, seed, size)
        for key in progress_bar(keys, desc="scenes", unit="img", disable=not progress)
    ]


def shard_of(i: int, n: int, shards: int) -> int:
    """Shard index of item ``i`` of ``n`` split into ``shards`` contiguous, balanced blocks."""
    return i * shards // n


def generate_scenes(
    out: str | Path,
    n: int,
    shards: int = 1,
    seed: int = 0,
    size: int = 224,
    first_index: int = 0,
    progress: bool = False,
    workers: int = 1,
) -> list[tuple[str, str]]:
    """Write ``n`` scenes under ``out`` in ``shards`` shards (``00000``...), keys from ``first_index``.

    ``workers`` processes render side by side (at most one per 64 scenes).

    Returns:
        The ``(shard, key)`` pairs written, in order.

    Raises:
        UsageError: Invalid counts or size.
    """
    _validate(n, shards, size, first_index)
    written = [(f"{shard_of(i, n, shards):05d}", scene_key(first_index + i)) for i in range(n)]
    jobs = [(out, shard, key, seed, size) for shard, key in written]
    bar = dict(total=n, desc="scenes", unit="img", disable=not progress)
    workers = min(workers, max(1, n // 64))
    if workers == 1:
        for job in progress_bar(jobs, **bar):
            write_scene(*job)
    else:  # scenes are pure functions of (seed, key): the same files in any order
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in progress_bar(pool.imap_unordered(_write_job, jobs, chunksize=16), **bar):
                pass
    return written


def captions_seen(keys: Sequence[str], seed: int, train_n: int, train_seed: int = 0) -> int:
    """How many of the scenes ``keys`` (under ``seed``) have a caption identical to one of the training scenes
    ``scene_key(0) … scene_key(train_n − 1)`` under ``train_seed`` (the testbed's training sets: keys from 0).

    Keys are disjoint from training, but the caption grammar has finitely many sentences (one object: 540), so
    a held-out image can still say what a training image said; geometry does not read captions, captioning does.
    """
    seen = {caption(make_scene(scene_key(i), train_seed)) for i in range(train_n)}
    return sum(caption(make_scene(k, seed)) in seen for k in keys)


def write_seen_report(out: str | Path, written: Sequence[tuple[str, str]], seed: int, first_index: int,
                      train_n: int) -> dict[str, Any]:
    """``<out>/scenes.json``: what was written and how many captions training already saw (atomic)."""
    count = captions_seen([k for _, k in written], seed, train_n)
    report = {"n": len(written), "seed": seed, "first_index": first_index,
              "captions_seen_in_training": {"train_keys": [0, train_n], "train_seed": 0, "count": count,
                                            "fraction": count / len(written)}}
    atomic_write_text(Path(out) / "scenes.json", json.dumps(report, indent=1) + "\n")
    return report


def _write_job(job: tuple[str | Path, str, str, int, int]) -> Path:
    return write_scene(*job)


def _validate(n: int, shards: int, size: int, first_index: int) -> None:
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    if not 1 <= shards <= n:
        raise UsageError(f"--shards must be between 1 and --n ({n}), got {shards}")
    if size < 32:
        raise UsageError(f"--size must be at least 32 pixels, got {size}")
    if first_index < 0 or first_index + n > 10**KEY_DIGITS:
        raise UsageError(
            f"keys must fit {KEY_DIGITS} digits: --first-index {first_index} + --n {n} is out of range"
        )


@entry_point
def main(argv: list[str] | None = None) -> int:
    """CLI: write a folder of captioned synthetic scenes."""
    parser = make_parser(
        "Write captioned synthetic scenes (1-3 coloured shapes on a 3x3 grid) as\n"
        "OUT_DIR/<shard>/<key>.png + <key>.txt. Scene <key> depends only on (--seed, key).\n"
        "Existing files with the same names are overwritten (atomically)."
    )
    cli.add_out_dir_arg(
        parser, "--out", required=True, type=Path, default=argparse.SUPPRESS, help="output image root"
    )
    parser.add_argument("--n", type=cli.positive_int, default=1000, help="number of scenes")
    parser.add_argument("--shards", type=cli.positive_int, default=1, help="number of shard folders (00000, 00001, ...)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--size", type=cli.positive_int, default=224, help="image side in pixels")
    parser.add_argument(
        "--first-index", type=int, default=0, help="index of the first key (keys are 9-digit)"
    )
    parser.add_argument("--workers", type=cli.nonneg_int, default=1, help="rendering processes (0: one per CPU)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--count-seen", type=int, default=0, metavar="N",
        help="also write OUT_DIR/scenes.json counting the written scenes whose caption equals one of the training "
             "scenes' (keys 0..N-1, seed 0; the testbed VLMs trained on N=8000); 0 = no report",
    )
    args = parser.parse_args(argv)
    if args.count_seen < 0:
        raise UsageError(f"--count-seen must be >= 0, got {args.count_seen}")
    _validate(args.n, args.shards, args.size, args.first_index)
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    ensure_writable_dir(args.out)
    written = generate_scenes(
        args.out, args.n, args.shards, args.seed, args.size, args.first_index, progress=not args.no_progress,
        workers=args.workers or os.cpu_count() or 1,
    )
    print(f"wrote {len(written)} scenes in {args.shards} shard(s) under {args.out}")
    if args.count_seen:
        seen = write_seen_report(args.out, written, args.seed, args.first_index, args.count_seen)
        print(f"{seen['captions_seen_in_training']['count']} of {len(written)} captions also describe one of "
              f"training scenes 0..{args.count_seen - 1} (seed 0): {Path(args.out) / 'scenes.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
