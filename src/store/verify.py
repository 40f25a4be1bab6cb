"""Checks that a vector store is what its manifest says: on every read, every resume, and on demand.

What is checked (docs/formats.md, "Verification", is the contract):

- **manifest**: chunk indices unique and increasing; a ``complete`` manifest lists every chunk
  ``0 .. n_chunks-1`` without a gap; ``n_images`` / ``n_skipped`` equal the sums over the chunks.
- **chunk files**: size always; sha256 against the manifest on every resume, in stages where it costs
  < 5 % of their time (stage 4), and with ``--verify`` / ``VLMC_VERIFY=hash`` (``bench/bench_verify.py``
  measures it); a file that is not a safe ``.pt`` is refused.
- **chunk content**: ``keys`` are strings, as many as the manifest's ``rows``, the first and last equal to
  its ``first_key``/``last_key``; every tensor has one row (or ``lengths`` entry) per key.
- **pre/post agreement**: every kind of one chunk holds the same keys in the same order.
- **finite values** (``check_finite``): named by file and row.

Every failure is a ``UsageError`` naming the file and what differs (exit 2 through ``entry_point``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlmc.utils.cli import UsageError
from vlmc.utils.io import UnreadableFile, safe_torch_load, sha256_file

log = logging.getLogger(__name__)

VERIFY_ENV = "VLMC_VERIFY"
_HASHED: set[tuple] = set()  # files whose sha256 matched in this process: (path, size, mtime_ns, inode, sha256)
LEVELS = ("size", "hash")


_STAGE_LEVEL = ["size"]  # what this process's stage chose (set_read_level); a resume always hashes

VERIFY_HELP = ("also check each chunk's sha256 against the manifest (size, keys, rows, pre/post keys and finite "
               "values are always checked); off by default where the hash costs more than 5 %% of the stage's time "
               "(bench/bench_verify.py)")


def set_read_level(level: str) -> None:
    """The check a stage applies to every chunk it reads: ``hash`` (size + sha256) or ``size``.

    A stage picks ``hash`` where hashing costs < 5 % of its time (stage 4, stage 3 with token spectra:
    ~1-2 %), else ``size`` unless its ``--verify`` asks for the hash (bench/bench_verify.py measures both). ``$VLMC_VERIFY`` overrides.
    """
    if level not in LEVELS:
        raise UsageError(f"unknown verification level {level!r}; choose one of {', '.join(LEVELS)}")
    _STAGE_LEVEL[0] = level


def default_level() -> str:
    """``$VLMC_VERIFY`` (``hash`` or ``size``) when set, else the level the stage chose (``set_read_level``)."""
    level = os.environ.get(VERIFY_ENV, "").strip() or _STAGE_LEVEL[0]
    if level not in LEVELS:
        raise UsageError(f"${VERIFY_ENV}={level!r}: choose one of {', '.join(LEVELS)}")
    return level


# -- manifest ----------------------------------------------------------------------------------------


def check_manifest(shard_dir: Path, manifest: dict[str, Any]) -> None:
    """Chunk continuity and counts of a manifest; a ``UsageError`` naming the manifest otherwise."""
    where = shard_dir / "manifest.json"
    chunks = manifest.get("chunks")
    if not isinstance(chunks, list):
        raise UsageError(f"{where}: no chunk list")
    try:
        indices = [int(c["index"]) for c in chunks]
        rows = sum(int(c["rows"]) for c in chunks)
        skipped = sum(len(c.get("skipped", [])) for c in chunks)
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{where}: malformed chunk entry ({e!r})") from None
    if indices != sorted(set(indices)):
        raise UsageError(f"{where}: chunk indices not unique and increasing: {indices}")
    # writers of a subset of chunks (export_recon, connector exports) leave gaps in the indices; the recorded
    # count still catches a removed entry
    if manifest.get("complete") and "n_chunks" in manifest:
        n = manifest["n_chunks"]
        if len(indices) != n:
            missing = sorted(set(range(max(n, max(indices, default=-1) + 1))) - set(indices))
            raise UsageError(f"{where}: complete manifest lacks chunk(s) {missing[:10]} (entries removed?)")
    for field, value in (("n_images", rows), ("n_skipped", skipped)):
        if field in manifest and manifest[field] != value:
            raise UsageError(f"{where}: {field}={manifest[field]} but its chunks add up to {value}")


# -- one chunk file ----------------------------------------------------------------------------------


def check_file(path: Path, entry: dict[str, Any], level: str) -> None:
    """Size (always) and sha256 (``level == "hash"``) of a chunk file against its manifest entry."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise UsageError(f"{path}: missing (the manifest lists it)") from None
    if "bytes" in entry and size != entry["bytes"]:
        raise UsageError(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
    if level == "hash" and "sha256" in entry:
        st = path.stat()
        stamp = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, entry["sha256"])
        if stamp in _HASHED:  # this process already hashed this very file (same size, mtime, inode)
            return
        digest = sha256_file(path)
        if digest == entry["sha256"]:
            _HASHED.add(stamp)
        if digest != entry["sha256"]:
            raise UsageError(f"{path}: sha256 {digest[:12]}… differs from the manifest's {entry['sha256'][:12]}… (corrupted)")


def check_chunk(path: Path, chunk: Any, entry: dict[str, Any]) -> None:
    """A loaded chunk against its manifest entry: keys, row counts, first/last key, per-row tensors."""
    if not isinstance(chunk, dict) or not isinstance(chunk.get("keys"), list):
        raise UsageError(f"{path}: not a vector chunk (no 'keys' list)")
    keys = chunk["keys"]
    if not all(isinstance(k, str) for k in keys):
        raise UsageError(f"{path}: keys are not all strings")
    n = len(keys)
    if n != entry["rows"]:
        raise UsageError(f"{path}: {n} rows, the manifest says {entry['rows']}")
    if n and (keys[0] != entry.get("first_key", keys[0]) or keys[-1] != entry.get("last_key", keys[-1])):
        raise UsageError(f"{path}: keys {keys[0]!r}..{keys[-1]!r}, the manifest says "
                         f"{entry.get('first_key')!r}..{entry.get('last_key')!r} (reordered or replaced)")
    for name, value in chunk.items():
        if not isinstance(value, Tensor) or name == "lengths":
            continue
        expect = int(chunk["lengths"].sum()) if name == "vecs" and "lengths" in chunk else n
        if value.dim() == 0 or value.shape[0] != expect:
            raise UsageError(f"{path}: {name!r} has {tuple(value.shape)[:1] or 'no'} rows, expected {expect}")
    if "lengths" in chunk and chunk["lengths"].shape != (n,):
        raise UsageError(f"{path}: 'lengths' has {tuple(chunk['lengths'].shape)} entries, expected {n}")


def load_chunk(shard_dir: Path, entry: dict[str, Any], kind: str, level: str | None = None) -> dict[str, Any]:
    """Verify and load the ``kind`` file of manifest chunk ``entry`` (mmap'd, ``weights_only``)."""
    files = entry.get("files", {})
    if kind not in files:
        raise UsageError(f"{shard_dir}: chunk {entry.get('index')} has no {kind!r} vectors")
    path = shard_dir / files[kind]["name"]
    check_file(path, files[kind], level or default_level())
    chunk = safe_torch_load(path)
    check_chunk(path, chunk, entry)
    return chunk


def check_same_keys(a_path: Path, a_keys: Sequence[str], b_path: Path, b_keys: Sequence[str]) -> None:
    """Two chunks of one store (pre and post) must hold the same keys in the same order."""
    if list(a_keys) != list(b_keys):
        first = next((i for i, (x, y) in enumerate(zip(a_keys, b_keys, strict=False)) if x != y), min(len(a_keys), len(b_keys)))
        raise UsageError(f"{a_path} and {b_path} hold different keys (first difference at row {first})")


def check_finite(path: str | os.PathLike, chunk: dict[str, Any]) -> None:
    """Every floating tensor of a chunk is finite; otherwise name the file and the (first) rows."""
    for name, value in chunk.items():
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.numel() == 0:
            continue
        lo, hi = torch.aminmax(value.reshape(-1))
        if bool(torch.isfinite(lo) & torch.isfinite(hi)):
            continue
        bad = ~torch.isfinite(value.reshape(value.shape[0], -1)).all(1)
        rows = bad.nonzero().flatten().tolist()
        if name == "vecs" and "lengths" in chunk:  # flat tokens: map token rows to images
            ends = torch.cumsum(chunk["lengths"], 0)
            rows = sorted({int(torch.searchsorted(ends, r, right=True)) for r in rows})
        keys = chunk.get("keys", [])
        named = ", ".join(f"{r} ({keys[r]!r})" if r < len(keys) else str(r) for r in rows[:5])
        more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
        raise UsageError(f"{path}: {name!r} has NaN/inf values in row(s) {named}{more}")


# -- resume ------------------------------------------------------------------------------------------


def adoptable_chunks(
    shard_dir: Path, manifest: dict[str, Any]
) -> tuple[dict[int, dict[str, Any]], dict[int, list[dict[str, str]]]]:
    """The chunks of an earlier run's manifest that a resumed run may keep, each fully verified.

    A chunk is kept only when every file has the manifest's size and sha256, loads safely and matches
    the entry (rows, first/last key) and its kinds hold the same keys; any other chunk is logged and
    left out, so the resumed run writes it again.

    Returns:
        index → manifest entry, and index → its skipped records.
    """
    chunks: dict[int, dict[str, Any]] = {}
    skipped: dict[int, list[dict[str, str]]] = {}
    for entry in manifest.get("chunks", []):
        try:
            seen: list[tuple[Path, list[str]]] = []
            for kind, f in entry["files"].items():
                seen.append((shard_dir / f["name"], load_chunk(shard_dir, entry, kind, "hash")["keys"]))
                check_same_keys(*seen[0], *seen[-1])
        except (UsageError, UnreadableFile, KeyError, TypeError) as e:
            log.warning("redoing chunk %s: %s", entry.get("index"), e)
            continue
        chunks[entry["index"]] = entry
        skipped[entry["index"]] = entry.get("skipped", [])
    return chunks, skipped


# -- a whole store -----------------------------------------------------------------------------------


def iter_problems(shard_dir: Path, level: str = "hash", finite: bool = True) -> Iterator[str]:
    """Every problem of one shard folder, as one line each (nothing yielded = the shard is sound)."""
    from vlmc.utils.io import read_json

    try:
        manifest = read_json(shard_dir / "manifest.json")
        check_manifest(shard_dir, manifest)
    except (UsageError, UnreadableFile, OSError) as e:
        yield str(e)
        return
    if not manifest.get("complete"):
        yield f"{shard_dir}: extraction incomplete (manifest complete=false)"
    for entry in manifest["chunks"]:
        keys: dict[str, tuple[Path, list[str]]] = {}
        for kind in entry.get("files", {}):
            try:
                chunk = load_chunk(shard_dir, entry, kind, level)
                if finite:
                    check_finite(shard_dir / entry["files"][kind]["name"], chunk)
                keys[kind] = (shard_dir / entry["files"][kind]["name"], chunk["keys"])
            except (UsageError, UnreadableFile) as e:
                yield str(e)
        ref = next(iter(keys.values()), None)
        for other in list(keys.values())[1:]:
            try:
                check_same_keys(ref[0], ref[1], other[0], other[1])
            except UsageError as e:
                yield str(e)
