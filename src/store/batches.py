"""Batches of (E_post, E_pre) pairs read from a store: shape-grouped, deterministic, resumable mid-epoch.

Batches never mix token shapes: ``ShapeBatchSampler`` groups images by their (pre grid, post grid),
so ragged stores (Qwen images of different aspect ratios) are read without padding.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from vlmc.store.reader import ChunkCache, Grid, Sample


class PairDataset(Dataset):
    """``(E_post, E_pre)`` of each sample in the store's dtype; standardisation happens on the device."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = list(samples)
        self.cache = ChunkCache()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        s = self.samples[i]
        return self.cache.get(s.post_file)[s.row], self.cache.get(s.pre_file)[s.row], i


def collate_pairs(items: list[tuple[Tensor, Tensor, int]]) -> dict[str, Any]:
    """Stack a same-shape batch: ``{"post": [B,Tq,Dq], "pre": [B,Tp,Dp], "index": [B]}``."""
    return {
        "post": torch.stack([it[0] for it in items]),
        "pre": torch.stack([it[1] for it in items]),
        "index": torch.tensor([it[2] for it in items], dtype=torch.int64),
    }


def plan_batches(
    samples: Sequence[Sample], batch_size: int, shuffle: bool = False, seed: int = 0, indices: Sequence[int] | None = None
) -> list[list[int]]:
    """Batches of sample indices that never mix token shapes.

    Without ``shuffle``: store order within each shape group. With it: a permutation within every
    group and of the batch order, fully determined by ``seed``.
    """
    idx = list(range(len(samples))) if indices is None else list(indices)
    groups: dict[tuple[Grid, Grid], list[int]] = defaultdict(list)
    for i in idx:
        groups[samples[i].shape].append(i)
    rng = random.Random(seed)
    batches = []
    for shape in sorted(groups):
        g = groups[shape]
        if shuffle:
            rng.shuffle(g)
        batches += [g[j : j + batch_size] for j in range(0, len(g), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


class ShapeBatchSampler(Sampler[list[int]]):
    """Deterministic per-epoch batches (``seed``, ``epoch``); ``start`` skips batches (mid-epoch resume)."""

    def __init__(self, samples: Sequence[Sample], batch_size: int, shuffle: bool, seed: int = 0) -> None:
        self.samples, self.batch_size, self.shuffle, self.seed = samples, batch_size, shuffle, seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def plan(self) -> list[list[int]]:
        return plan_batches(self.samples, self.batch_size, self.shuffle, self.seed * 100_003 + self.epoch)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.plan()[self.start :])

    def __len__(self) -> int:
        return len(self.plan()) - self.start


def make_loader(
    samples: Sequence[Sample], batch_size: int, shuffle: bool, seed: int, num_workers: int, pin: bool
) -> tuple[DataLoader, ShapeBatchSampler]:
    """A DataLoader over ``samples`` with shape-grouped batches, and its sampler (for ``set_epoch``)."""
    sampler = ShapeBatchSampler(samples, batch_size, shuffle, seed)
    loader = DataLoader(
        PairDataset(samples),
        batch_sampler=sampler,
        collate_fn=collate_pairs,
        num_workers=num_workers,
        pin_memory=pin,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),  # never draws from the global RNG (exact mid-epoch resume)
    )
    return loader, sampler
