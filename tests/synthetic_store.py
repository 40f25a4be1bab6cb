"""Synthetic stage-1 stores for tests and benchmarks: random E_pre and a fixed random connector's E_post.

Not production code: tests import it from tests/, benchmarks put the repo root on ``sys.path`` first.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from vlmc.store.reader import Grid, parse_correspondence
from vlmc.store.vectors import ShardWriter, digest_keys, pack
from vlmc.utils.cli import DTYPES


def synthetic_connector(
    kind: str, d_pre: int, d_post: int, merge: int = 2, n_latents: int = 4, seed: int = 0
) -> Callable[[Tensor, Grid], Tensor]:
    """A fixed random connector ``f(pre [T, D_pre], pre_grid) → post``.

    ``kind``: ``linear`` (1:1), ``gelu`` (1:1, LLaVA-like Linear-GELU-Linear), ``merge`` (concatenate
    each ``merge x merge`` block, then Linear-GELU-Linear, Qwen-like), ``perceiver`` (``n_latents``
    learned queries cross-attending to the tokens, Idefics2-like).
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=g) * scale / math.sqrt(shape[0])

    if kind == "linear":
        w, b = rnd(d_pre, d_post), torch.randn(d_post, generator=g) * 0.1
        return lambda pre, grid: pre.float() @ w + b
    if kind == "gelu":
        w1, w2 = rnd(d_pre, 2 * d_post, scale=2.0), rnd(2 * d_post, d_post)
        b1 = torch.randn(2 * d_post, generator=g) * 0.5
        return lambda pre, grid: torch.nn.functional.gelu(pre.float() @ w1 + b1) @ w2
    if kind == "merge":
        w1, w2 = rnd(merge * merge * d_pre, 2 * d_post, scale=2.0), rnd(2 * d_post, d_post)

        def merged(pre: Tensor, grid: Grid) -> Tensor:
            h, w = grid
            x = pre.float().reshape(h // merge, merge, w // merge, merge, -1).permute(0, 2, 1, 3, 4)
            return torch.nn.functional.gelu(x.reshape((h // merge) * (w // merge), -1) @ w1) @ w2

        return merged
    if kind == "perceiver":
        q, wk, wv, wo = torch.randn(n_latents, d_pre, generator=g), rnd(d_pre, d_pre), rnd(d_pre, d_pre), rnd(d_pre, d_post)

        def perceive(pre: Tensor, grid: Grid) -> Tensor:
            x = pre.float()
            att = torch.softmax(q @ (x @ wk).T / math.sqrt(d_pre), dim=-1)
            return (att @ (x @ wv) + q) @ wo

        return perceive
    raise ValueError(f"unknown synthetic connector {kind!r}")


def write_synthetic_store(
    out_dir: str | os.PathLike,
    connector: Callable[[Tensor, Grid], Tensor],
    correspondence: str,
    pre_grid: Grid,
    d_pre: int,
    shards: dict[str, Sequence[str]],
    save_every: int = 8,
    store_dtype: torch.dtype = torch.float32,
    model: str = "synth",
    family: str | None = None,
    seed: int = 0,
    low_rank: int = 0,
) -> Path:
    """Write a stage-1 store ``<out_dir>/<shard>/`` of random E_pre and ``connector(E_pre)``.

    E_pre rows are Gaussian with per-channel offsets/scales (so normalisation matters) and, with
    ``low_rank > 0``, lie near a ``low_rank``-dimensional subspace (like real ViT features).
    """
    g = torch.Generator().manual_seed(seed)
    offset, scale = torch.randn(d_pre, generator=g) * 2, torch.rand(d_pre, generator=g) * 3 + 0.2
    basis = torch.randn(low_rank, d_pre, generator=g) if low_rank else None
    t_pre = pre_grid[0] * pre_grid[1]
    out = Path(out_dir)
    for shard, keys in shards.items():
        meta = {"model": model, "family": family, "source": "synthetic", "correspondence": correspondence,
                "store_dtype": {v: k for k, v in DTYPES.items()}[store_dtype], "save": "both", "save_every": save_every,
                "shard": shard, "kinds": ["pre", "post"]}
        writer = ShardWriter(out / shard, meta, resume=False)
        for ci, start in enumerate(range(0, len(keys), save_every)):
            ck = list(keys[start : start + save_every])
            z = torch.randn(len(ck), t_pre, low_rank or d_pre, generator=g)
            pre = (z @ basis if basis is not None else z) * scale + offset
            post = [connector(p, pre_grid) for p in pre]
            post_grid = _post_grid(correspondence, pre_grid, post[0].shape[0])
            writer.meta.update({"pre": {"tokens": t_pre, "dim": d_pre, "grid": list(pre_grid)},
                                "post": {"tokens": post[0].shape[0], "dim": post[0].shape[1], "grid": list(post_grid)}})
            data = {"pre": pack(list(pre), ck, store_dtype, "both"), "post": pack(post, ck, store_dtype, "both")}
            data["pre"]["grids"] = torch.tensor([pre_grid] * len(ck))
            data["post"]["grids"] = torch.tensor([post_grid] * len(ck))
            writer.write_chunk(ci, digest_keys(ck), ck, data, skipped=[])
        writer.write_manifest(complete=True)
    return out


def _post_grid(correspondence: str, pre_grid: Grid, t_post: int) -> Grid:
    c = parse_correspondence(correspondence)
    if c.kind == "1:1":
        return pre_grid
    if c.kind == "merge":
        return (pre_grid[0] // c.merge, pre_grid[1] // c.merge)
    return (t_post, 1)
