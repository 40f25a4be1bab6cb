"""Stage-4 batch loaders that keep a GPU busy: the split resident in device memory, or a prefetch thread.

Both yield exactly the batches of ``make_loader`` (the same ``ShapeBatchSampler`` plan: same
indices, same order, same values in the store's dtype), so training losses do not depend on the
loader (tested):

* ``DeviceLoader`` (``--loader device``): every image of the split is copied once into device memory
  (one tensor per token shape, in the store dtype); a batch is an ``index_select`` there.
* ``PrefetchLoader`` (``--loader prefetch``): a background thread gathers the next batches from the
  mmap'd chunk files into pinned host memory (pinning only on CUDA); each is copied to the device on
  a side stream while the previous batch trains.
* ``workers``: today's ``DataLoader`` with ``--num_workers`` processes (``make_loader``).

``--loader auto`` picks ``device`` on a GPU when the split fits in a share of its free memory
(``torch.cuda.mem_get_info``), else ``prefetch``; on the CPU it keeps ``workers``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from vlmc.store.batches import ShapeBatchSampler, collate_pairs
from vlmc.store.reader import ChunkCache, Sample
from vlmc.utils.cli import UsageError

log = logging.getLogger(__name__)

LOADERS = ("auto", "device", "prefetch", "workers")
DEVICE_FRACTION = 0.5  # auto: keep the split on the device when it needs at most this share of the free memory


def split_bytes(samples: Sequence[Sample]) -> int:
    """Bytes of every (E_pre, E_post) of ``samples`` in the store's dtype (read from one row per token shape)."""
    cache = ChunkCache()
    per_shape: dict[tuple, int] = {}
    for s in samples:
        if s.shape not in per_shape:
            pre, post = cache.get(s.pre_file)[s.row], cache.get(s.post_file)[s.row]
            per_shape[s.shape] = pre.nbytes + post.nbytes
    return sum(per_shape[s.shape] for s in samples)


def resolve_loader(mode: str, samples: Sequence[Sample], device: torch.device) -> str:
    """``device``, ``prefetch`` or ``workers`` for ``--loader mode`` (``auto`` decides from free device memory).

    Raises:
        UsageError: an unknown mode, or ``device`` on a GPU whose free memory is smaller than the split.
    """
    if mode not in LOADERS:
        raise UsageError(f"unknown --loader {mode!r}; choose {', '.join(LOADERS)}")
    if mode not in ("auto", "device") or device.type != "cuda":
        return "workers" if mode == "auto" else mode
    need = split_bytes(samples)
    free, _ = torch.cuda.mem_get_info(device)
    if mode == "device":
        if need > free:
            raise UsageError(f"--loader device: the split needs {need / 1e9:.2f} GB, {free / 1e9:.2f} GB of device "
                             "memory are free; use --loader prefetch")
        return mode
    chosen = "device" if need <= DEVICE_FRACTION * free else "prefetch"
    log.info("--loader auto: the split needs %.2f GB, %.2f GB of device memory free: %s", need / 1e9, free / 1e9, chosen)
    return chosen


class DeviceLoader:
    """Batches of ``sampler``'s plan gathered from the whole split held in device memory.

    Args:
        samples: the split (the sampler's indices point into it).
        sampler: the batch plan (``set_epoch`` on it before iterating, as with ``make_loader``).
        device: where the split lives.
    """

    def __init__(self, samples: Sequence[Sample], sampler: ShapeBatchSampler, device: torch.device) -> None:
        self.samples, self.sampler, self.device = samples, sampler, device
        self.slot: list[tuple[int, int]] = []  # sample index -> (shape group, position in the group)
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(samples):
            g = groups.setdefault(s.shape, [])
            self.slot.append((list(groups).index(s.shape), len(g)))
            g.append(i)
        self.pre: list[Tensor] = []
        self.post: list[Tensor] = []
        cache = ChunkCache()
        for members in groups.values():
            self.pre.append(_gather_to(cache, [samples[i] for i in members], "pre_file", device))
            self.post.append(_gather_to(cache, [samples[i] for i in members], "post_file", device))

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for idx in self.sampler:
            group = self.slot[idx[0]][0]
            pos = torch.tensor([self.slot[i][1] for i in idx], dtype=torch.int64).to(self.device, non_blocking=True)
            yield {"post": self.post[group].index_select(0, pos), "pre": self.pre[group].index_select(0, pos),
                   "index": torch.tensor(idx, dtype=torch.int64)}


def _gather_to(cache: ChunkCache, samples: Sequence[Sample], file_attr: str, device: torch.device) -> Tensor:
    """``[N, T, D]`` on ``device`` of one token shape's samples, copied chunk file by chunk file."""
    first = cache.get(getattr(samples[0], file_attr))[samples[0].row]
    out = torch.empty((len(samples), *first.shape), dtype=first.dtype, device=device)
    start = 0
    while start < len(samples):
        path = getattr(samples[start], file_attr)
        end = start
        while end < len(samples) and getattr(samples[end], file_attr) == path:
            end += 1
        rows = cache.get(path)
        out[start:end].copy_(torch.stack([rows[s.row] for s in samples[start:end]]))
        start = end
    return out


class PrefetchLoader:
    """Batches of ``sampler``'s plan gathered by a background thread, copied to the device ahead of use.

    Args:
        samples: the split.
        sampler: the batch plan.
        device: the training device.
        depth: batches gathered ahead (bounded queue).
        pin: gather into pinned host memory (default: on CUDA); the copy then overlaps compute.
    """

    def __init__(self, samples: Sequence[Sample], sampler: ShapeBatchSampler, device: torch.device,
                 depth: int = 4, pin: bool | None = None) -> None:
        self.samples, self.sampler, self.device, self.depth = samples, sampler, device, depth
        self.pin = device.type == "cuda" if pin is None else pin
        self.cache = ChunkCache()

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = list(self.sampler)
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(plan, q, stop), name="vlmc-prefetch", daemon=True)
        worker.start()
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        try:
            ahead = None
            for _ in plan:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                nxt = self._start_copy(item, stream)
                if ahead is not None:
                    yield self._ready(ahead, stream)
                ahead = nxt
            if ahead is not None:
                yield self._ready(ahead, stream)
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    worker.join(0.01)

    def _produce(self, plan: list[list[int]], q: queue.Queue, stop: threading.Event) -> None:
        """Gather each batch into (pinned) host memory and queue it, in plan order; an error is queued too."""
        try:
            for idx in plan:
                items = [(self.cache.get(self.samples[i].post_file)[self.samples[i].row],
                          self.cache.get(self.samples[i].pre_file)[self.samples[i].row], i) for i in idx]
                batch = collate_pairs(items) if not self.pin else _collate_pinned(items)
                while not stop.is_set():
                    try:
                        q.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread
            q.put(e)

    def _start_copy(self, batch: dict[str, Any], stream: Any) -> tuple[dict[str, Any], Any]:
        """Enqueue the host → device copy of a batch on the side stream (CPU: the batch as is)."""
        if stream is None:
            return batch, None
        with torch.cuda.stream(stream):
            out = {k: (v.to(self.device, non_blocking=True) if k != "index" else v) for k, v in batch.items()}
            event = torch.cuda.Event()
            event.record(stream)
        return out, event

    def _ready(self, pending: tuple[dict[str, Any], Any], stream: Any) -> dict[str, Any]:
        """The batch, once its copy is done, usable on the current stream."""
        batch, event = pending
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for k in ("post", "pre"):
                batch[k].record_stream(current)  # its memory came from the side stream
        return batch


def _collate_pinned(items: list[tuple[Tensor, Tensor, int]]) -> dict[str, Any]:
    """``collate_pairs`` stacking straight into pinned host memory (one copy from the mmap'd pages)."""
    out: dict[str, Any] = {}
    for k, j in (("post", 0), ("pre", 1)):
        first = items[0][j]
        buf = torch.empty((len(items), *first.shape), dtype=first.dtype, pin_memory=True)
        torch.stack([it[j] for it in items], out=buf)
        out[k] = buf
    out["index"] = torch.tensor([it[2] for it in items], dtype=torch.int64)
    return out


def make_fast_loader(
    mode: str, samples: Sequence[Sample], batch_size: int, shuffle: bool, seed: int, device: torch.device
) -> tuple[DeviceLoader | PrefetchLoader, ShapeBatchSampler]:
    """A ``device`` or ``prefetch`` loader over ``samples`` and its sampler (as ``make_loader`` returns)."""
    sampler = ShapeBatchSampler(samples, batch_size, shuffle, seed)
    if mode == "device":
        return DeviceLoader(samples, sampler, device), sampler
    if mode == "prefetch":
        return PrefetchLoader(samples, sampler, device), sampler
    raise ValueError(f"make_fast_loader: mode {mode!r} is not device or prefetch")
