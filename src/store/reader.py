"""Reading a stage-1 store: its shards and manifest facts (``Store``), and its images as ``Sample``s.

An image is identified by ``(shard, key)`` (keys are strings and may repeat across shards). A
``Sample`` remembers where its tensors live (chunk file + row); tensors are loaded lazily and mmap'd
in whichever process reads them (``ChunkCache``), so a sample list pickles cheaply into DataLoader
workers. Every stage that reads (E_pre, E_post) pairs of a store goes through this module.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from vlmc.models.base import Correspondence
from vlmc.store.vectors import ShardReader, find_shard_dirs, unpack, verified_chunk
from vlmc.store.verify import check_finite, check_same_keys
from vlmc.utils.cli import UsageError
from vlmc.utils.io import safe_torch_load

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
