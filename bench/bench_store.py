"""Store write throughput (issue #14): the chunk writer against the disk, on the same bytes, in one run.

One stage-1 chunk (``--n`` images of fp16 tokens: ``pre`` ``[n, T, --d_pre]`` and ``post``
``[n, T, --d_post]``, packed by ``pack`` as stage 1 does) is written into ``--dir`` (default: a temp
folder beside the repository's ``data/``, i.e. the disk the store lives on) by each variant:

* ``raw``     the tensors' bytes with ``os.write`` + ``fsync``, one file per kind: the disk's rate;
* ``sha256``  hashing the same bytes, nothing written;
* ``serial``  the writer before issue #14: ``torch.save`` (zip CRC32 on) into a file object that
              hashes each buffer before writing it, kinds one after the other, + ``fsync``;
* ``ours``    ``ShardWriter.write_chunk`` (``vlmc.store.writer``): sha256 in parallel with the
              write, no CRC32, writeback started per 16 MB slice, + ``fsync``, temp + rename, manifest;
* ``other``   ours with the other file order of ``save_hashed_many``: the kinds' files written at the
              same time where ``ours`` writes them one after the other (``CONCURRENT_FILES`` false:
              fewer than 4 cores), else one after the other. The header line says which.

MB/s counts the chunk's tensor bytes (the files are ~0.1 % larger). Repeats are interleaved (the
order rotating) and the table gives medians; ``<variant>/raw`` are medians of the ratios paired
within a repeat (goal: ours/raw ≥ 0.9).

    python bench/bench_store.py                 # 64 images of 576 tokens, 1024 + 4096 channels: 377 MB
    python bench/bench_store.py --n 32 --repeats 7
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vlmc.store.vectors import ShardWriter, digest_keys, pack
from vlmc.store.writer import CONCURRENT_FILES, save_hashed_many
from vlmc.utils.cli import make_parser
from vlmc.utils.io import atomic_open

VARIANTS = ("raw", "sha256", "serial", "ours", "other")
REPO = Path(__file__).resolve().parents[1]


def tensor_views(chunk: dict[str, Any]) -> list[memoryview]:
    """Byte views of a chunk dict's tensors (the bytes every variant moves)."""
    return [memoryview(v.numpy()).cast("B") for v in chunk.values() if isinstance(v, torch.Tensor)]


def write_raw(path: Path, views: list[memoryview]) -> None:
    """``os.write`` every view into ``path``, then ``fsync``: the disk's sequential rate."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for mv in views:
            while mv:
                mv = mv[os.write(fd, mv):]
        os.fsync(fd)
    finally:
        os.close(fd)


def measure_disk(folder: str | os.PathLike, nbytes: int = 256 << 20, block: int = 8 << 20) -> float:
    """Raw sequential write + fsync MB/s of ``folder``'s disk: ``nbytes`` of random bytes in ``block`` writes.

    For benchmarks that compare a writer against the disk it writes to (the file is removed after).
    """
    data = memoryview(os.urandom(block))
    path = Path(folder) / f".disk-probe-{os.getpid()}"
    t = time.perf_counter()
    write_raw(path, [data] * max(1, nbytes // block))
    seconds = time.perf_counter() - t
    path.unlink()
    return max(1, nbytes // block) * block / seconds / 1e6


class _SerialHashingWriter:
    """The pre-issue-#14 file object: every buffer hashed, then written, in the calling thread."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def write(self, b: Any) -> int:
        self.sha.update(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def save_serial(chunks: dict[str, dict[str, Any]], folder: Path) -> None:
    """The old write path: ``torch.save`` with the zip CRC32, hashed in line, one kind after the other."""
    for kind, chunk in chunks.items():
        with atomic_open(folder / f"{kind}_vectors_00000.pt", "wb") as f:
            w = _SerialHashingWriter(f)
            torch.save(chunk, w)
        w.sha.hexdigest()


def make_chunks(n: int, tokens: int, d_pre: int, d_post: int) -> dict[str, dict[str, Any]]:
    """A packed fp16 chunk per kind, as stage 1 writes it (random values)."""
    g = torch.Generator().manual_seed(0)
    keys = [f"{i:09d}" for i in range(n)]
    return {kind: pack(list(torch.randn(n, tokens, d, generator=g, dtype=torch.float32)), keys, torch.float16, "both")
            for kind, d in (("pre", d_pre), ("post", d_post))}


def run(args: Any) -> dict[str, Any]:
    """Medians of MB/s per variant and of the paired ratios against ``raw``."""
    chunks = make_chunks(args.n, args.tokens, args.d_pre, args.d_post)
    views = {k: tensor_views(c) for k, c in chunks.items()}
    nbytes = sum(mv.nbytes for vs in views.values() for mv in vs)
    base = Path(args.dir) if args.dir else REPO / "data"
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-store-", dir=base))
    keys = chunks["pre"]["keys"]
    meta = {"model": "bench", "source": "bench", "store_dtype": "fp16", "save": "both", "save_every": args.n,
            "shard": "00000", "kinds": ["pre", "post"]}

    def ours() -> None:
        w = ShardWriter(tmp, meta, resume=False)
        w.write_chunk(0, digest_keys(keys), keys, chunks, skipped=[])

    runs: dict[str, Callable[[], None]] = {
        "raw": lambda: [write_raw(tmp / f"{k}.raw", vs) for k, vs in views.items()],
        "sha256": lambda: [hashlib.sha256(mv).hexdigest() for vs in views.values() for mv in vs],
        "serial": lambda: save_serial(chunks, tmp),
        "ours": ours,
        "other": lambda: save_hashed_many([(c, tmp / f"{k}.pt") for k, c in chunks.items()],
                                          concurrent=not CONCURRENT_FILES),
    }
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        for r in range(args.repeats + 1):  # the first round warms up (page cache, thread pools)
            for v in VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]:
                for p in tmp.iterdir():
                    p.unlink()
                t = time.perf_counter()
                runs[v]()
                if r:
                    times[v].append(time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    row: dict[str, Any] = {"MB": nbytes / 1e6}
    row.update({f"{v} MB/s": nbytes / statistics.median(ts) / 1e6 for v, ts in times.items()})
    for v in ("ours", "serial", "other"):
        row[f"{v}/raw"] = statistics.median(tr / tv for tr, tv in zip(times["raw"], times[v], strict=True))
    return row


def main(argv: list[str] | None = None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--n", type=int, default=64, help="images in the chunk")
    p.add_argument("--tokens", type=int, default=576, help="tokens per image (both kinds)")
    p.add_argument("--d_pre", type=int, default=1024, help="pre channels")
    p.add_argument("--d_post", type=int, default=4096, help="post channels")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed repetitions (after one warm-up round); medians")
    p.add_argument("--dir", default=None, help="folder on the disk to measure (default: the repository's data/)")
    args = p.parse_args(argv)
    row = run(args)
    print(f"chunk: {args.n} images x {args.tokens} tokens, pre {args.d_pre} + post {args.d_post} channels, fp16; "
          f"{args.repeats} repeats (medians); cpus {os.cpu_count()}; ours writes the files "
          f"{'at once, other one by one' if CONCURRENT_FILES else 'one by one, other at once'}")
    print("| " + " | ".join(row) + " |")
    print("|" + "---|" * len(row))
    print("| " + " | ".join(f"{v:.2f}" if k.endswith("/raw") else f"{v:.0f}" for k, v in row.items()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
