"""Stage-4 data: (E_pre, E_post) pairs over stage-1 stores, the persisted split, normalisation stats.

An image is identified by ``(shard, key)`` (keys are strings and may repeat across shards). A
``Sample`` remembers where its tensors live (chunk file + row); tensors are loaded lazily and mmap'd
in whichever process reads them, so a dataset pickles cheaply into DataLoader workers.

Batches never mix token shapes: ``ShapeBatchSampler`` groups images by their (pre grid, post grid),
so ragged stores (Qwen images of different aspect ratios) train without padding.

Normalisation: per-channel mean/std of E_pre and E_post over every token of the TRAINING split only,
accumulated in float64 (Chan's parallel update), saved once to ``normalization.safetensors``.
"""

from __future__ import annotations

import math
import os
import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from vlmc.data.images import IMAGE_EXTENSIONS
from vlmc.models.base import Correspondence
from vlmc.store.vectors import (
    ShardReader,
    ShardWriter,
    digest_keys,
    find_shard_dirs,
    pack,
    unpack,
    verified_chunk,
)
from vlmc.store.verify import check_finite, check_same_keys
from vlmc.utils.cli import DTYPES, UsageError
from vlmc.utils.io import atomic_open, atomic_write_json, read_json, safe_torch_load, sha256_file

SPLIT_FILE = "split.json"
STATS_FILE = "normalization.safetensors"
Grid = tuple[int, int]
SampleId = tuple[str, str]


def parse_correspondence(text: str | None) -> Correspondence:
    """Manifest ``correspondence`` (``1:1``, ``merge 2x2``, ``none``) → ``Correspondence``."""
    text = (text or "").strip()
    if text in ("1:1", "none"):
        return Correspondence(text)  # type: ignore[arg-type]
    if text.startswith("merge "):
        a, _, b = text[len("merge ") :].partition("x")
        if a.isdigit() and a == b:
            return Correspondence("merge", int(a))
    raise UsageError(f"unknown correspondence {text!r} in manifest (expected '1:1', 'merge NxN' or 'none')")


# -- the store ------------------------------------------------------------------------------------


@dataclass
class ShardPair:
    """Where one shard's E_pre and E_post live (the same folder for a stage-1 store)."""

    shard: str
    pre: ShardReader
    post: ShardReader


@dataclass
class Store:
    """The shards of one model's stage-1 output, with the manifest facts stage 4 needs."""

    shards: list[ShardPair]
    model: str
    family: str | None
    source: str | None
    correspondence: Correspondence
    d_pre: int
    d_post: int
    store_dtype: str
    save_every: int

    @property
    def manifest(self) -> dict[str, Any]:
        """The first shard's pre manifest (shared facts)."""
        return self.shards[0].pre.manifest


def resolve_vec_dir(vec_dir: str | os.PathLike, embed_model: str | None) -> Path:
    """``data/vector`` + ``llava`` → ``data/vector/llava`` when that folder exists, else ``vec_dir`` itself."""
    p = Path(vec_dir)
    if embed_model and (p / embed_model).is_dir() and not (p / "manifest.json").exists():
        return p / embed_model
    return p


def open_store(
    vec_dir: str | os.PathLike | None = None,
    pre_dir: str | os.PathLike | None = None,
    post_dir: str | os.PathLike | None = None,
    embed_model: str | None = None,
    shards: Sequence[str] | None = None,
) -> Store:
    """Open every shard of a model's store.

    Args:
        vec_dir: a model folder (``data/vector/llava``), a single shard folder, or the base folder
            (``data/vector``, combined with ``embed_model``).
        pre_dir: alternatively, where E_pre shards live (e.g. a ``<model>_recon`` export) ...
        post_dir: ... and where the matching E_post shards live (shards paired by name).
        embed_model: model name; checked against the manifests' ``model`` when given.
        shards: only these shard names (default: all).
    """
    if (pre_dir is None) != (post_dir is None):
        raise UsageError("--pre_dir and --post_dir go together")
    if pre_dir is not None:
        pre_dirs = {d.name: d for d in find_shard_dirs(pre_dir)}
        post_dirs = {d.name: d for d in find_shard_dirs(post_dir)}
        missing = sorted(set(pre_dirs) - set(post_dirs))
        if missing:
            raise UsageError(f"--post_dir has no shard(s) {', '.join(missing)} that --pre_dir has")
        pairs = [(n, pre_dirs[n], post_dirs[n]) for n in sorted(pre_dirs)]
    else:
        if vec_dir is None:
            raise UsageError("give --vec_dir, or --pre_dir and --post_dir")
        pairs = [(d.name, d, d) for d in find_shard_dirs(resolve_vec_dir(vec_dir, embed_model))]
    if shards:
        pairs = [p for p in pairs if p[0] in set(shards)]
        if not pairs:
            raise UsageError(f"none of the shards {', '.join(shards)} exist")
    opened = [ShardPair(n, ShardReader.open(a), ShardReader.open(b)) for n, a, b in pairs]
    return _describe(opened, embed_model)


def _describe(shards: list[ShardPair], embed_model: str | None) -> Store:
    m = shards[0].pre.manifest
    for sp in shards:
        for reader in (sp.pre, sp.post):
            mm = reader.manifest
            for field in ("correspondence",):
                if mm.get(field) != m.get(field):
                    raise UsageError(f"{reader.dir}: {field}={mm.get(field)!r} differs from {m.get(field)!r}")
            if embed_model and mm.get("model") not in (embed_model, None) and sp.pre is sp.post:
                raise UsageError(f"{reader.dir}: holds model {mm.get('model')!r}, not --embed_model {embed_model!r}")
    post_m = shards[0].post.manifest
    d_pre, d_post = (m.get("pre") or {}).get("dim"), (post_m.get("post") or {}).get("dim")
    if not d_pre or not d_post:
        raise UsageError(f"{shards[0].pre.dir}: manifest lacks pre/post dims")
    return Store(
        shards=shards,
        model=embed_model or m.get("model") or shards[0].pre.dir.parent.name,
        family=m.get("family"),
        source=m.get("source"),
        correspondence=parse_correspondence(m.get("correspondence")),
        d_pre=int(d_pre),
        d_post=int(d_post),
        store_dtype=m.get("store_dtype", "fp16"),
        save_every=int(m.get("save_every", 256)),
    )


# -- samples --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One image: its id, where its tensors live, and its token grids."""

    shard: str
    key: str
    chunk: int
    pre_file: str
    post_file: str
    row: int
    pre_grid: Grid
    post_grid: Grid

    @property
    def id(self) -> SampleId:
        return (self.shard, self.key)

    @property
    def shape(self) -> tuple[Grid, Grid]:
        return (self.pre_grid, self.post_grid)


def _grids(chunk: dict[str, Any], manifest_entry: dict[str, Any] | None, n: int, path: Path) -> list[Grid]:
    if "grids" in chunk:
        return [(int(h), int(w)) for h, w in chunk["grids"].tolist()]
    grid = (manifest_entry or {}).get("grid")
    if grid:
        return [(int(grid[0]), int(grid[1]))] * n
    tokens = [v.shape[0] for v in unpack(chunk)] if "vecs" in chunk else []
    if tokens and all(math.isqrt(t) ** 2 == t for t in tokens):
        return [(math.isqrt(t), math.isqrt(t)) for t in tokens]
    raise UsageError(f"{path}: no token grids stored and none in the manifest")


def index_samples(store: Store, limit: int = 0) -> list[Sample]:
    """Every (E_pre, E_post) pair of the store in (shard, store) order; at most ``limit`` images (0 = all).

    Raises:
        UsageError: pre/post chunks disagree on keys, or an image id repeats within a shard.
    """
    out: list[Sample] = []
    for sp in store.shards:
        seen: set[str] = set()
        pre_chunks = sp.pre.manifest["chunks"]
        post_chunks = {c["index"]: c for c in sp.post.manifest["chunks"]}
        for pc in pre_chunks:
            if pc["rows"] == 0:
                continue
            qc = post_chunks.get(pc["index"])
            if qc is None:
                raise UsageError(f"{sp.post.dir}: no chunk {pc['index']} to match {sp.pre.dir}")
            pre_path, post_path = sp.pre.dir / pc["files"]["pre"]["name"], sp.post.dir / qc["files"]["post"]["name"]
            pre, post = verified_chunk(sp.pre.dir, pc, "pre"), verified_chunk(sp.post.dir, qc, "post")
            check_same_keys(pre_path, pre["keys"], post_path, post["keys"])
            check_finite(pre_path, pre), check_finite(post_path, post)
            n = len(pre["keys"])
            pg = _grids(pre, sp.pre.manifest.get("pre"), n, pre_path)
            qg = _grids(post, sp.post.manifest.get("post"), n, post_path)
            for row, key in enumerate(pre["keys"]):
                if key in seen:
                    raise UsageError(f"{sp.pre.dir}: key {key!r} appears twice in shard {sp.shard}")
                seen.add(key)
                out.append(Sample(sp.shard, str(key), pc["index"], str(pre_path), str(post_path), row, pg[row], qg[row]))
                if limit and len(out) >= limit:
                    return out
    if not out:
        raise UsageError("the store holds no images")
    return out


class ChunkCache:
    """Per-process cache of mmap'd chunk files → per-image token views."""

    def __init__(self) -> None:
        self._files: dict[str, list[Tensor]] = {}

    def get(self, path: str) -> list[Tensor]:
        if path not in self._files:
            chunk = safe_torch_load(path)
            if "vecs" not in chunk:
                raise UsageError(f"{path}: token vectors were not saved (--save pooled); stage 4 needs --save both")
            self._files[path] = unpack(chunk)
        return self._files[path]

    def __getstate__(self) -> dict[str, Any]:  # workers reopen files themselves
        return {"_files": {}}


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


# -- split ----------------------------------------------------------------------------------------


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


# -- normalisation --------------------------------------------------------------------------------


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


# -- synthetic stores (tests, benchmarks, demos without a model) ----------------------------------


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
