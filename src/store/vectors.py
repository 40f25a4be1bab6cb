"""The stage-1 vector store: sharded ``.pt`` chunks plus a ``manifest.json`` per (model, shard).

Layout (docs/formats.md is the contract)::

    <out_dir>/<model>/<shard>/pre_vectors_00000.pt    {"keys": [str], "vecs": [N,T,D] | ragged, "pooled": [N,D]}
    <out_dir>/<model>/<shard>/post_vectors_00000.pt
    <out_dir>/<model>/<shard>/manifest.json

A chunk holds the images of one fixed slice of the shard's sorted input list (``save_every`` inputs),
so chunk boundaries never move between runs and a resumed run rewrites exactly the chunks that a
killed run had not committed. A chunk is committed when the manifest lists it; the manifest is
rewritten (atomically) after every chunk with ``complete: false`` and finally with ``complete: true``.
When images in a chunk have different token counts, ``vecs`` is stored flat ``[sum T_i, D]`` with
``lengths`` ``[N]`` (``ragged``).

Every chunk is verified against the manifest when it is read and before a resume keeps it
(``vlmc.store.verify``); stage 1 writes a shard folder under its ``vlmc.store.lock.FolderLock``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlmc.store.verify import (
    adoptable_chunks,
    check_file,
    check_finite,
    check_manifest,
    check_same_keys,
    load_chunk,
)
from vlmc.store.writer import save_hashed_many
from vlmc.utils.cli import UsageError
from vlmc.utils.io import atomic_write_json, read_json, safe_torch_load

FORMAT = "vlmc.vectors/1"
MANIFEST = "manifest.json"


def chunk_name(kind: str, index: int) -> str:
    """File name of chunk ``index`` of ``kind`` (``pre``, ``post``, ``ref`` or a module name)."""
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in kind)
    return f"{safe}_vectors_{index:05d}.pt"


def digest_keys(keys: Sequence[str]) -> str:
    """A short, order-sensitive digest of a chunk's input keys (detects a changed input slice)."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def pack(vectors: Sequence[Tensor], keys: Sequence[str], dtype: torch.dtype, save: str) -> dict[str, Any]:
    """Pack per-image token matrices into a chunk dict.

    Args:
        vectors: per image ``[T_i, D]``.
        keys: image keys (strings), one per vector.
        dtype: storage dtype.
        save: ``tokens``, ``pooled`` (mean over the given tokens, computed in float32) or ``both``.

    Raises:
        UsageError: a value is finite in the model but overflows the storage dtype.
    """
    out: dict[str, Any] = {"keys": list(keys)}
    if save in ("tokens", "both"):
        if len({v.shape for v in vectors}) == 1:
            out["vecs"] = cast_checked(torch.stack(list(vectors)), dtype)
        else:
            out["vecs"] = cast_checked(torch.cat(list(vectors)), dtype)
            out["lengths"] = torch.tensor([v.shape[0] for v in vectors], dtype=torch.int64)
    if save in ("pooled", "both"):
        out["pooled"] = cast_checked(torch.stack([v.float().mean(0) for v in vectors]), dtype)
    return out


def cast_checked(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype`` (contiguous); a ``UsageError`` if finite values overflow to inf.

    A tensor already in ``dtype`` is returned as is (contiguous): no cast, so nothing can overflow.
    """
    if x.dtype == dtype:
        return x.contiguous()
    y = x.to(dtype).contiguous()
    if y.is_floating_point() and not _all_finite(y):
        _raise_if_overflow(x, dtype)
    return y


def cast_checked_many(xs: Sequence[Tensor], dtype: torch.dtype, device: str | torch.device = "cpu") -> list[Tensor]:
    """``cast_checked`` of every tensor, moved to ``device``: one batch's vectors at once.

    The tensors are cast into one flat buffer where they live (on a GPU: before the copy to the host,
    which then moves the smaller storage dtype, in one transfer), checked for overflow with one
    reduction and returned as contiguous views of that buffer. Same values and the same
    ``UsageError`` as ``cast_checked`` on each.
    """
    device = torch.device(device)
    if not xs:
        return []
    if all(x.dtype == dtype and x.device == device for x in xs):
        return [x.contiguous() for x in xs]
    src = xs[0].device
    if any(x.device != src for x in xs):  # not one batch: one at a time
        return [cast_checked(x, dtype).to(device) for x in xs]
    sizes = [x.numel() for x in xs]
    flat = torch.empty(sum(sizes), dtype=dtype, device=src)
    for part, x in zip(flat.split(sizes), xs, strict=True):
        part.view(x.shape).copy_(x)  # cast while copying
    if flat.is_floating_point() and any(x.dtype != dtype for x in xs) and not _all_finite(flat):
        for x in xs:
            if x.dtype != dtype and not _all_finite(x.to(dtype)):
                _raise_if_overflow(x, dtype)
    flat = flat.to(device)
    return [part.view(x.shape) for part, x in zip(flat.split(sizes), xs, strict=True)]


def _all_finite(y: Tensor) -> bool:
    """Whether a floating tensor has no inf or NaN: its min and max are finite (NaN propagates).

    One pass without a temporary, ~20x cheaper on a CPU than ``torch.isfinite(y).all()``.
    """
    if y.numel() == 0:
        return True
    lo, hi = torch.aminmax(y.reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _raise_if_overflow(x: Tensor, dtype: torch.dtype) -> None:
    """The overflow ``UsageError`` when ``x`` (whose cast to ``dtype`` is not all finite) is all finite."""
    if torch.isfinite(x).all():
        raise UsageError(f"values up to {x.abs().max().item():.3g} overflow {dtype}; use --store_dtype fp32 or bf16")


def unpack(chunk: dict[str, Any]) -> list[Tensor]:
    """Per-image token matrices of a chunk dict (views, no copy)."""
    vecs = chunk["vecs"]
    if "lengths" in chunk:
        return list(torch.split(vecs, chunk["lengths"].tolist()))
    return list(vecs.unbind(0))


class ShardWriter:
    """Writes one (model, shard) folder chunk by chunk; resumable and crash-safe.

    Args:
        shard_dir: ``<out_dir>/<model>/<shard>``.
        meta: everything the manifest records about the run (model, dtype, shapes, ...).
        resume: keep chunks already committed by an earlier run with the same ``meta``.
    """

    def __init__(self, shard_dir: str | os.PathLike, meta: dict[str, Any], resume: bool) -> None:
        self.dir = Path(shard_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = dict(meta)
        self.chunks: dict[int, dict[str, Any]] = {}
        self.skipped: dict[int, list[dict[str, str]]] = {}
        old = self.dir / MANIFEST
        if resume and old.exists():
            self._adopt(read_json(old))

    def _adopt(self, old: dict[str, Any]) -> None:
        fields = ("model", "source", "store_dtype", "save", "save_every", "prompt", "img_size", "pool")
        differ = [f for f in fields if f in self.meta and old.get(f) != self.meta[f]]
        if differ:
            named = ", ".join(f"{f}={old.get(f)!r} (this run {self.meta[f]!r})" for f in differ)
            raise UsageError(
                f"{self.dir}: existing output has {named}; "
                "rerun without --skip_existing to overwrite, or choose another --out_dir"
            )
        self.chunks, self.skipped = adoptable_chunks(self.dir, old)
        for k in self.meta.get("kinds", ["pre", "post"]):  # shapes discovered by the earlier run
            if k in old:
                self.meta.setdefault(k, old[k])

    def is_done(self, index: int, input_digest: str) -> bool:
        """Whether chunk ``index`` was committed for exactly this input slice."""
        c = self.chunks.get(index)
        return c is not None and c["input_digest"] == input_digest

    def write_chunk(
        self,
        index: int,
        input_digest: str,
        keys: Sequence[str],
        data: dict[str, dict[str, Any]],
        skipped: list[dict[str, str]],
        manifest: bool = True,
    ) -> None:
        """Write every kind's chunk file atomically, then commit it in the manifest.

        Args:
            index: chunk number within the shard.
            input_digest: ``digest_keys`` of the chunk's *input* keys (skipped ones included).
            keys: keys actually stored (readable images), in row order.
            data: kind (``pre``, ``post``, or a captured module name) → chunk dict from ``pack``.
            skipped: ``{"key", "path", "reason"}`` for inputs of this chunk that could not be read.
            manifest: rewrite the manifest now (``False``: the caller's next ``write_manifest``
                commits the chunk, e.g. the final ``complete`` one right after the last chunk).
        """
        names = {kind: chunk_name(kind, index) for kind in data}
        saved = save_hashed_many([(chunk, self.dir / names[kind]) for kind, chunk in data.items()])
        files = {kind: {"name": names[kind], "bytes": size, "sha256": digest}
                 for kind, (size, digest) in zip(data, saved, strict=True)}
        self.chunks[index] = {
            "index": index,
            "rows": len(keys),
            "input_digest": input_digest,
            "first_key": keys[0] if keys else None,
            "last_key": keys[-1] if keys else None,
            "files": files,
            "skipped": skipped,
        }
        self.skipped[index] = skipped
        if manifest:
            self.write_manifest(complete=False)

    def write_manifest(self, complete: bool, n_chunks: int | None = None) -> dict[str, Any]:
        """Rewrite ``manifest.json``; ``complete`` only when every expected chunk is committed."""
        chunks = [self.chunks[i] for i in sorted(self.chunks)]
        if n_chunks is not None:
            chunks = [c for c in chunks if c["index"] < n_chunks]
        manifest = {
            "format": FORMAT,
            **self.meta,
            "n_images": sum(c["rows"] for c in chunks),
            "n_skipped": sum(len(c["skipped"]) for c in chunks),
            "chunks": chunks,
            "complete": complete,
        }
        if complete:
            manifest["n_chunks"] = len(chunks)
        atomic_write_json(self.dir / MANIFEST, manifest)
        return manifest


# -- reading ---------------------------------------------------------------------------------------


@dataclass
class ShardReader:
    """Reads one (model, shard) folder written by ``ShardWriter``; tensors are mmap'd, never unpickled."""

    dir: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, shard_dir: str | os.PathLike, require_complete: bool = True) -> ShardReader:
        """Open a shard folder, checking its manifest."""
        d = Path(shard_dir)
        m = d / MANIFEST
        if not m.exists():
            raise UsageError(f"{d}: no {MANIFEST} (not a vector shard folder, or its extraction never finished a chunk)")
        manifest = read_json(m)
        if manifest.get("format") != FORMAT:
            raise UsageError(f"{m}: unknown format {manifest.get('format')!r} (expected {FORMAT})")
        if require_complete and not manifest.get("complete"):
            raise UsageError(f"{d}: extraction incomplete (manifest complete=false); rerun it with --skip_existing")
        check_manifest(d, manifest)
        return cls(d, manifest)

    @property
    def shard(self) -> str:
        return self.manifest.get("shard", self.dir.name)

    def chunks(self, kind: str) -> Iterator[dict[str, Any]]:
        """Yield each chunk dict of ``kind`` in order (``keys`` and mmap'd tensors), verified; finite
        values are checked in every tensor (``tokens``/``pooled`` check only what they return)."""
        for path, chunk in self._verified(kind):
            check_finite(path, chunk)
            yield chunk

    def _verified(self, kind: str) -> Iterator[tuple[Path, dict[str, Any]]]:
        for c in self.manifest["chunks"]:
            if c["rows"] == 0:  # every input of the chunk was unreadable
                continue
            yield self.dir / c["files"][kind]["name"], verified_chunk(self.dir, c, kind)

    def keys(self, kind: str = "pre") -> list[str]:
        """Stored keys in row order."""
        return [k for _, chunk in self._verified(kind) for k in chunk["keys"]]

    def tokens(self, kind: str) -> tuple[list[str], list[Tensor]]:
        """All keys and per-image token matrices of ``kind`` (mmap'd views; NaN/inf refused, by row)."""
        keys, vecs = [], []
        for path, chunk in self._verified(kind):
            if "vecs" not in chunk:
                raise UsageError(f"{self.dir}: {kind} tokens were not saved (--save pooled); rerun with --save both")
            check_finite(path, {k: v for k, v in chunk.items() if k in ("keys", "vecs", "lengths")})
            keys += chunk["keys"]
            vecs += unpack(chunk)
        return keys, vecs

    def pooled(self, kind: str, pool: str = "mean") -> tuple[list[str], Tensor]:
        """Keys and one vector per image: the stored mean, or ``mean|max|first|cls`` computed from tokens.

        ``cls`` is refused (UsageError) unless the manifest says the first stored ``kind`` token is a CLS
        token (``"cls_token": {kind: true}``); no stage-1 adapter stores one (CLS is dropped as the model
        does), so ``first`` names the first stored token honestly. NaN/inf in the vectors returned is
        refused, naming the chunk file and rows.
        """
        if pool == "cls" and not (self.manifest.get("cls_token") or {}).get(kind, False):
            raise UsageError(f"--pool cls: the {kind} tokens in {self.dir} have no CLS token (the manifest does not "
                             "mark one; stored tokens are the patch grid); --pool first takes the first stored token")
        keys, parts = [], []
        for path, chunk in self._verified(kind):
            keys += chunk["keys"]
            if pool == "mean" and "pooled" in chunk:
                parts.append(chunk["pooled"].float())
            elif "vecs" in chunk and chunk["vecs"].dim() == 2 and "lengths" not in chunk:  # one vector per image
                parts.append(chunk["vecs"].float())
            elif "vecs" in chunk:
                parts.append(torch.stack([pool_tokens(v, pool) for v in unpack(chunk)]))
            else:
                raise UsageError(f"{self.dir}: only mean-pooled {kind} vectors are stored; --pool {pool} needs tokens")
            check_finite(path, {"keys": chunk["keys"], "pooled" if pool == "mean" else f"{pool}-pooled": parts[-1]})
        return keys, torch.cat(parts) if parts else torch.empty(0)


def verified_chunk(shard_dir: Path, entry: dict[str, Any], kind: str) -> dict[str, Any]:
    """Load the ``kind`` file of a manifest chunk, verified (``vlmc.store.verify``) and key-checked
    against another kind of the same chunk (pre and post hold the same keys in the same order)."""
    chunk = load_chunk(shard_dir, entry, kind)
    other = next((k for k in entry["files"] if k != kind), None)
    if other is not None:
        path = shard_dir / entry["files"][other]["name"]
        check_file(path, entry["files"][other], "size")
        check_same_keys(shard_dir / entry["files"][kind]["name"], chunk["keys"], path, safe_torch_load(path)["keys"])
    return chunk


def pool_tokens(x: Tensor, pool: str) -> Tensor:
    """Pool a ``[T, D]`` token matrix in float32: ``mean``, ``max``, ``first`` (the first stored token) or
    ``cls`` (the same row; callers check that it is a CLS token, see ``ShardReader.pooled``)."""
    if x.dim() != 2:
        raise ValueError(f"pool_tokens expects a [T, D] token matrix, got shape {tuple(x.shape)}")
    x = x.float()
    if pool == "mean":
        return x.mean(0)
    if pool == "max":
        return x.amax(0)
    if pool in ("first", "cls"):
        return x[0]
    raise UsageError(f"unknown pool {pool!r}; choose mean, max, first or cls")


def find_shard_dirs(path: str | os.PathLike) -> list[Path]:
    """Shard folders under ``path``: the folder itself if it has a manifest, else its children that do.

    Also accepts a chunk file (its folder is used). Sorted by name.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_file():
        p = p.parent
    if (p / MANIFEST).exists():
        return [p]
    dirs = sorted(d for d in p.iterdir() if (d / MANIFEST).exists())
    if not dirs:
        raise UsageError(f"{p}: no vector shards found (expected {MANIFEST} here or in its subfolders)")
    return dirs
