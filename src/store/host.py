"""Device → host transfer of one batch's outputs in the storage dtype, without stalling the loop.

``to_host`` casts a batch into one flat buffer where it lives and starts one copy into (pinned) host
memory; on a GPU the copy is non-blocking and an event marks its end, so the extraction loop goes on
to the next forward while the commit thread waits for the copy (``HostCopy.wait``). The overflow
check (a value finite in the model that overflows the storage dtype) is reduced on the device and
read in ``wait``, so it costs no device synchronisation in the loop either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlmc.store.vectors import cast_checked_many
from vlmc.utils.cli import UsageError


@dataclass
class HostCopy:
    """One batch's tensors on their way to the host in the storage dtype; ``wait`` returns them.

    Attributes:
        tensors: host tensors (views of one flat buffer); their values are final only after ``wait``.
        event: the copy's CUDA event (``None`` when the copy was synchronous).
        finite: ``[n, 2]`` bool per tensor: (source finite, cast finite); ``None`` when checked already.
        peaks: ``[n]`` largest absolute source value per tensor (for the error message).
        dtype: the storage dtype.
    """

    tensors: list[Tensor]
    event: Any = None
    finite: Tensor | None = None
    peaks: Tensor | None = None
    dtype: torch.dtype | None = None

    def wait(self) -> list[Tensor]:
        """The host tensors, once the copy has landed.

        Raises:
            UsageError: a value finite in the model overflows the storage dtype (as ``cast_checked``).
        """
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        if self.finite is not None:
            overflow = self.finite[:, 0] & ~self.finite[:, 1]
            self.finite = None
            if bool(overflow.any()):
                peak = float(self.peaks[overflow].max())
                raise UsageError(f"values up to {peak:.3g} overflow {self.dtype}; use --store_dtype fp32 or bf16")
        return self.tensors


def to_host(xs: Sequence[Tensor], dtype: torch.dtype, pin: bool | None = None, deferred: bool | None = None) -> HostCopy:
    """Start moving ``xs`` (one batch, one device) to the host in ``dtype``.

    Args:
        xs: per-image tensors, all on one device.
        dtype: the storage dtype.
        pin: copy into pinned host memory with a non-blocking copy (default: on a CUDA device).
        deferred: reduce the overflow check on the device and read it in ``wait`` (default: off the
            CPU). Without it, ``cast_checked_many`` runs here, synchronously, as before.

    Raises:
        UsageError: (only without ``deferred``) a finite value overflows ``dtype``.
    """
    if not xs:
        return HostCopy([])
    src = xs[0].device
    if any(x.device != src for x in xs):
        raise ValueError("to_host expects one batch: every tensor on one device")
    pin = src.type == "cuda" if pin is None else pin
    deferred = src.type != "cpu" if deferred is None else deferred
    if not deferred:
        return HostCopy(cast_checked_many(xs, dtype))
    sizes = [x.numel() for x in xs]
    flat = torch.empty(sum(sizes), dtype=dtype, device=src)
    parts = flat.split(sizes)
    for part, x in zip(parts, xs, strict=True):
        part.view(x.shape).copy_(x)  # cast while copying
    finite = peaks = None
    if flat.is_floating_point() and any(x.dtype != dtype for x in xs):
        finite, peaks = _finite_flags(xs, parts)
    host = _to_host_buffer(flat, pin)
    if finite is not None:
        finite, peaks = _to_host_buffer(finite, pin), _to_host_buffer(peaks, pin)
    event = None
    if src.type == "cuda":
        event = torch.cuda.Event()
        event.record()
    tensors = [part.view(x.shape) for part, x in zip(host.split(sizes), xs, strict=True)]
    return HostCopy(tensors, event, finite, peaks, dtype)


def _to_host_buffer(t: Tensor, pin: bool) -> Tensor:
    """``t`` copied into a new (pinned) host tensor; non-blocking when pinned. A host ``t`` is copied too."""
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
    out.copy_(t, non_blocking=pin)
    return out


def _peaks(ts: Sequence[Tensor]) -> Tensor:
    """``[n]`` float32 max |value| of each tensor (0 when empty), in one fused kernel (``_foreach_norm``).

    An inf anywhere gives inf; a NaN gives NaN where the backend propagates it, else it is ignored in
    both the source and the cast peak, so the verdict in ``HostCopy.wait`` is the same either way.
    """
    full = [t for t in ts if t.numel()]
    norms = list(torch._foreach_norm(full, float("inf"))) if full else []
    if len(full) < len(ts):  # rare: put zeros where the tensors are empty
        it = iter(norms)
        norms = [next(it) if t.numel() else torch.zeros((), dtype=t.dtype, device=t.device) for t in ts]
    if len({n.dtype for n in norms}) > 1:
        norms = [n.float() for n in norms]
    return torch.stack(norms).float()


def _finite_flags(xs: Sequence[Tensor], parts: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``[n, 2]`` (source finite, cast finite) and ``[n]`` peak |source| per tensor, on their device."""
    src, cast = _peaks(xs), _peaks(parts)
    return torch.stack([torch.isfinite(src), torch.isfinite(cast)], dim=1), src
