"""The persisted train / val / test split of a store's images (``split.json``) and image content hashes."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmc.data.images import IMAGE_EXTENSIONS
from vlmc.store.reader import Sample
from vlmc.utils.cli import UsageError
from vlmc.utils.io import atomic_write_json, read_json, sha256_file

SPLIT_FILE = "split.json"
SPLIT_PARTS = ("train", "val", "test")


def make_split(
    samples: Sequence[Sample],
    train_split: float,
    seed: int,
    train_shards: Sequence[str] = (),
    val_shards: Sequence[str] = (),
    val_split: float | None = None,
    test_shards: Sequence[str] = (),
) -> dict[str, list[list[str]]]:
    """Train / val / test ids: by shard names when given, else seeded random fractions of images.

    ``train`` is fitted on, ``val`` selects (ridge strength, best epoch, early stop), ``test`` is never
    seen by either and is what every reported number uses. Random: ``train_split`` of the images train,
    ``val_split`` (default: all the rest) val, the remainder test. Shards: ``test_shards`` test,
    ``val_shards`` val (default: every shard not named for train or test), ``train_shards`` train
    (default: the rest). ``test`` may be empty (evaluate on another store); train and val may not.

    Raises:
        UsageError: train or val would be empty, the fractions do not fit, or the shard lists overlap /
            name unknown shards.
    """
    ids = sorted({s.id for s in samples})
    if train_shards or val_shards or test_shards:
        known = {s for s, _ in ids}
        named = [set(train_shards), set(val_shards), set(test_shards)]
        unknown = sorted(set().union(*named) - known)
        if unknown:
            raise UsageError(f"unknown shard(s) in --train_shards/--val_shards/--test_shards: {', '.join(unknown)}")
        if any(a & b for i, a in enumerate(named) for b in named[i + 1:]):
            raise UsageError("--train_shards, --val_shards and --test_shards overlap")
        test_set = named[2]
        val_set = named[1] or known - named[0] - test_set
        train_set = named[0] or known - val_set - test_set
        parts = [[i for i in ids if i[0] in sset] for sset in (train_set, val_set, test_set)]
    else:
        val_split = 1.0 - train_split if val_split is None else val_split
        if not 0.0 < train_split < 1.0 or not 0.0 < val_split < 1.0 or train_split + val_split > 1.0 + 1e-9:
            raise UsageError("--train_split and --val_split must be in (0, 1) with a sum of at most 1")
        order = list(ids)
        random.Random(seed).shuffle(order)
        n = len(order)
        n_train = min(max(1, round(train_split * n)), n - 1)
        n_val = min(max(1, round((train_split + val_split) * n) - n_train), n - n_train)
        parts = [sorted(order[:n_train]), sorted(order[n_train : n_train + n_val]), sorted(order[n_train + n_val :])]
    if not parts[0] or not parts[1]:
        raise UsageError(f"split leaves {len(parts[0])} train and {len(parts[1])} val images; both must be non-empty")
    return {name: [list(i) for i in part] for name, part in zip(SPLIT_PARTS, parts, strict=True)}


def image_file(root: str | os.PathLike, shard: str, key: str) -> Path | None:
    """The image file ``<root>/<shard>/<key>.<ext>`` (any image extension), or None."""
    folder = Path(root) / shard
    for ext in IMAGE_EXTENSIONS:
        for cand in (folder / f"{key}{ext}", folder / f"{key}{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


def content_hashes(root: str | os.PathLike, ids: Sequence[Sequence[str]]) -> dict[str, str]:
    """``{"<shard>/<key>": sha256 of the image file}`` for ``ids`` under the image root ``root``.

    Raises:
        UsageError: an image file is missing (the content of every listed image must be known).
    """
    out = {}
    for shard, key in ids:
        f = image_file(root, shard, key)
        if f is None:
            raise UsageError(f"--image_root {root}: no image file for ({shard}, {key})")
        out[f"{shard}/{key}"] = sha256_file(f)
    return out


def save_split(path: str | os.PathLike, split: dict[str, Any]) -> None:
    """Write ``split.json`` atomically."""
    atomic_write_json(path, split)


def load_split(path: str | os.PathLike) -> dict[str, Any]:
    """Read ``split.json`` (ids stay strings). A split written before the test part gets ``test: []``."""
    split = read_json(path)
    split.setdefault("test", [])
    for part in SPLIT_PARTS:
        if part not in split or not all(isinstance(x, list) and len(x) == 2 for x in split[part]):
            raise UsageError(f"{path}: malformed split (expected {{'train': [[shard, key], ...], 'val': [...], "
                             "'test': [...]}})")
        split[part] = [[str(s), str(k)] for s, k in split[part]]
    seen: dict[tuple[str, str], str] = {}
    for part in SPLIT_PARTS:
        for i in split[part]:
            if tuple(i) in seen:
                raise UsageError(f"{path}: ({i[0]}, {i[1]}) is in both {seen[tuple(i)]} and {part}")
            seen[tuple(i)] = part
    return split


def apply_split(samples: Sequence[Sample], split: dict[str, list[list[str]]], part: str) -> list[Sample]:
    """The samples of one split part, in store order; every listed id must exist in the store."""
    by_id = {s.id: s for s in samples}
    wanted = [tuple(x) for x in split[part]]
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise UsageError(f"{len(missing)} {part} image(s) of split.json are not in the store, e.g. {missing[0]}")
    chosen = set(wanted)
    return [s for s in samples if s.id in chosen]
