"""Normalisation statistics of a store's vectors (``normalization.safetensors``) and the ``Standardizer``.

Per-channel mean/std of E_pre and E_post over every token of the TRAINING split only, accumulated
in float64 (Chan's parallel update), saved once and never rewritten.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from vlmc.store.batches import make_loader
from vlmc.store.reader import Sample
from vlmc.utils.cli import UsageError
from vlmc.utils.io import atomic_open

STATS_FILE = "normalization.safetensors"


class RunningMoments:
    """Per-channel count / mean / M2 in float64, merged batch by batch (Chan et al.)."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dtype=torch.float64, device=device)

    def update(self, x: Tensor) -> None:
        """Add rows of ``x`` ``[..., D]``."""
        x = x.reshape(-1, x.shape[-1]).to(self.mean.device, torch.float64)
        nb = x.shape[0]
        if nb == 0:
            return
        bmean = x.mean(0)
        bm2 = ((x - bmean) ** 2).sum(0)
        n = self.n + nb
        delta = bmean - self.mean
        self.mean += delta * (nb / n)
        self.m2 += bm2 + delta**2 * (self.n * nb / n)
        self.n = n

    def std(self) -> Tensor:
        """Population std; channels with no variance get 1 (so standardising never divides by 0)."""
        var = self.m2 / max(self.n, 1)
        std = var.sqrt()
        return torch.where(std > 1e-12, std, torch.ones_like(std))


@dataclass
class NormStats:
    """Per-channel float64 mean/std of E_pre and E_post over the training split's tokens."""

    pre_mean: Tensor
    pre_std: Tensor
    post_mean: Tensor
    post_std: Tensor
    meta: dict[str, str]

    def tensors(self) -> dict[str, Tensor]:
        return {k: getattr(self, k).detach().cpu().to(torch.float64).contiguous() for k in
                ("pre_mean", "pre_std", "post_mean", "post_std")}


def compute_stats(
    samples: Sequence[Sample],
    device: torch.device,
    batch_size: int = 32,
    num_workers: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> NormStats:
    """Per-channel mean/std of every token of ``samples`` (the TRAINING split), in float64."""
    loader, _ = make_loader(samples, batch_size, False, 0, num_workers, pin=False)
    pre = post = None
    n_img = 0
    for batch in loader:
        if should_stop is not None and should_stop():
            raise InterruptedError("stopped while computing normalisation statistics")
        if pre is None:
            pre = RunningMoments(batch["pre"].shape[-1], device)
            post = RunningMoments(batch["post"].shape[-1], device)
        pre.update(batch["pre"].to(device))
        post.update(batch["post"].to(device))
        n_img += batch["pre"].shape[0]
    assert pre is not None and post is not None
    meta = {"n_images": str(n_img), "n_pre_tokens": str(pre.n), "n_post_tokens": str(post.n), "split": "train"}
    return NormStats(pre.mean.cpu(), pre.std().cpu(), post.mean.cpu(), post.std().cpu(), meta)


def save_stats(path: str | os.PathLike, stats: NormStats) -> None:
    """Write ``normalization.safetensors`` atomically (float64 tensors + string metadata)."""
    data = st_save(stats.tensors(), metadata=dict(stats.meta))
    with atomic_open(path, "wb") as f:
        f.write(data)


def load_stats(path: str | os.PathLike) -> NormStats:
    """Read ``normalization.safetensors`` (never rewrites it)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no normalisation statistics (train the reconstructor first)")
    t = st_load(p.read_bytes())
    with safe_open(str(p), framework="pt") as f:
        meta = dict(f.metadata() or {})
    try:
        return NormStats(t["pre_mean"], t["pre_std"], t["post_mean"], t["post_std"], meta)
    except KeyError as e:
        raise UsageError(f"{p}: missing tensor {e}") from None


class Standardizer:
    """Moves a batch into the reconstructor's space and back, on the device, in float32.

    With ``enabled=False`` the model works in the original space (identity maps), but
    ``std_pre_metric`` still standardises with the stats so reported MSEs stay comparable.
    """

    def __init__(self, stats: NormStats, device: torch.device, enabled: bool = True) -> None:
        f = {k: v.to(device=device, dtype=torch.float32) for k, v in stats.tensors().items()}
        self.pre_mean, self.pre_std = f["pre_mean"], f["pre_std"]
        self.post_mean, self.post_std = f["post_mean"], f["post_std"]
        self.enabled = enabled

    def post_in(self, x: Tensor) -> Tensor:
        """E_post (original) → model input."""
        x = x.float()
        return (x - self.post_mean) / self.post_std if self.enabled else x

    def pre_in(self, x: Tensor) -> Tensor:
        """E_pre (original) → model target space."""
        x = x.float()
        return (x - self.pre_mean) / self.pre_std if self.enabled else x

    def pre_out(self, y: Tensor) -> Tensor:
        """Model output → E_pre in the original space."""
        y = y.float()
        return y * self.pre_std + self.pre_mean if self.enabled else y

    def pre_metric(self, x_orig: Tensor) -> Tensor:
        """E_pre (original) → standardised space, regardless of ``enabled`` (for comparable MSE)."""
        return (x_orig.float() - self.pre_mean) / self.pre_std

    def post_metric(self, x_orig: Tensor) -> Tensor:
        """E_post (original) → standardised space."""
        return (x_orig.float() - self.post_mean) / self.post_std
