"""The store's write path: chunk files written, hashed and fsynced at the disk's speed.

Three things made ``torch.save`` + sha256 run at ~0.5x the disk (issue #14): the zip CRC32 that
``torch.save`` computes over every byte (single-threaded, ~3x slower than the disk), the sha256 pass
run after (or serially with) the write, and the device→host copy done synchronously in the loop.
Here:

* ``save_hashed`` runs ``torch.save`` into a file object whose ``write`` hands each large buffer (a
  tensor's storage, passed by ``torch.save`` as a zero-copy ``memoryview``) to a hash thread and to
  ``os.write`` at the same time; it returns only when both are done with the buffer, so no byte is
  copied and no buffer outlives its call. The zip CRC32 is not computed (``torch.load`` never checks
  it; the manifest's sha256 covers every byte): every store file is saved in a pool thread whose
  (thread-local) torch setting says so, whichever thread asks. The file is otherwise exactly
  ``torch.save``'s to a file object: read it with ``torch.load(..., weights_only=True, mmap=True)``.
* ``save_hashed_many`` writes the files of one chunk (``pre``, ``post``, modules), one after the other,
  or at once where there are cores for several sha256 streams (``CONCURRENT_FILES``).
* Each large buffer is written in 16 MB slices, and the kernel is asked to start writing each slice
  to the disk at once (``sync_file_range``), so the disk works while the rest is hashed and written
  and the final ``fsync`` finds little left to do.
* ``vlmc.store.host.to_host`` moves one batch's outputs to the host without making the loop wait.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from vlmc.utils.io import atomic_open, sha256_file

HASH_MIN_BYTES = 1 << 16  # smaller buffers (zip headers, the pickle) are hashed inline: a hand-off costs more
WRITEBACK_BYTES = 16 << 20  # large buffers are written in slices of this size, each handed to the disk at once
_HASHERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="vlmc-sha256")
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages in the range, don't wait


def _libc_sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux; not in Python's ``os``), or ``None`` where it does not exist."""
    try:
        f = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    f.restype = ctypes.c_int
    return f


_SYNC_FILE_RANGE = _libc_sync_file_range()


class ParallelHashWriter:
    """A binary file object over ``fd`` that hashes (sha256) each buffer while ``os.write`` writes it.

    Args:
        fd: an open file descriptor, positioned at the start of an empty file.
        hash_min: buffers of at least this many bytes are hashed in a pool thread in parallel with the
            write; smaller ones inline.
    """

    def __init__(self, fd: int, hash_min: int = HASH_MIN_BYTES) -> None:
        self.fd = fd
        self.sha = hashlib.sha256()
        self.hash_min = hash_min
        self.bytes = 0
        self.sequential = True  # False once anything seeks: the hash is then recomputed from the file

    def write(self, b: Any) -> int:
        """Write and hash all of ``b`` (bytes-like); returns its length."""
        mv = memoryview(b).cast("B")
        if mv.nbytes >= self.hash_min:
            hashed = _HASHERS.submit(self.sha.update, mv)  # hashlib releases the GIL on large buffers
            try:
                for start in range(0, mv.nbytes, WRITEBACK_BYTES):
                    part = mv[start : start + WRITEBACK_BYTES]
                    _write_all(self.fd, part)
                    self._start_writeback(self.bytes + start, part.nbytes)
            finally:
                hashed.result()  # b stays untouched until both are done with it
        else:
            self.sha.update(mv)
            _write_all(self.fd, mv)
        self.bytes += mv.nbytes
        return mv.nbytes

    def _start_writeback(self, offset: int, nbytes: int) -> None:
        """Ask the kernel to start writing ``[offset, offset + nbytes)`` to the disk now, without waiting.

        The disk then works while the rest is hashed and written, and the final fsync finds little
        left to do (the kernel would otherwise start only past its dirty-page threshold). Linux only.
        """
        if _SYNC_FILE_RANGE is not None and self.sequential:
            _SYNC_FILE_RANGE(self.fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)

    def flush(self) -> None:
        """Nothing is buffered here."""

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.sequential = False
        return os.lseek(self.fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_CUR)


def _write_all(fd: int, mv: memoryview) -> None:
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def _crc32_setting_is_per_thread() -> bool:
    """Whether torch's ``compute_crc32`` setting is thread-local (a ``ContextVar`` in recent torch).

    Probed once by setting it in a short-lived thread; where it turns out to be process-wide (older
    torch), the probe's change is undone and the store keeps computing the CRC (slower, same result).
    """
    before = torch.serialization.get_crc32_options()
    probe = threading.Thread(target=torch.serialization.set_crc32_options, args=(not before,))
    probe.start()
    probe.join()
    if torch.serialization.get_crc32_options() != before:
        torch.serialization.set_crc32_options(before)
        return False
    return True


def _no_zip_crc32() -> None:
    """Pool-thread initializer: this thread's ``torch.save`` skips the zip CRC32 (where that is per thread)."""
    if CRC32_PER_THREAD:
        torch.serialization.set_crc32_options(False)


CRC32_PER_THREAD = _crc32_setting_is_per_thread()
# Every store file is saved in one of these threads, so its bytes never depend on the calling thread.
_FILES = ThreadPoolExecutor(max_workers=8, thread_name_prefix="vlmc-save", initializer=_no_zip_crc32)


def _save_hashed_here(obj: Any, path: Path) -> tuple[int, str]:
    with atomic_open(path, "wb") as f:
        w = ParallelHashWriter(f.fileno())
        torch.save(obj, w)
    return w.bytes, (w.sha.hexdigest() if w.sequential else sha256_file(path))


def save_hashed(obj: Any, path: str | os.PathLike) -> tuple[int, str]:
    """``torch.save(obj)`` to ``path`` atomically (temp + fsync + rename); returns (bytes, sha256).

    The sha256 is of the bytes written, computed while writing (the file is never re-read).
    """
    return _FILES.submit(_save_hashed_here, obj, Path(path)).result()


# Save a chunk's files at the same time when there are cores for their sha256 streams: one stream
# (~1 GB/s) is slower than a fast disk (1.3 GB/s on the H200 machine of issue #14). On 2 cores it was
# slower than one file after the other (bench/bench_store.py's concurrent column, README).
CONCURRENT_FILES = (os.cpu_count() or 1) >= 4


def save_hashed_many(items: Sequence[tuple[Any, Path]], concurrent: bool | None = None) -> list[tuple[int, str]]:
    """``save_hashed`` of every ``(obj, path)``; results in order.

    Args:
        items: what to save where.
        concurrent: save the files at the same time (one sha256 stream each) or one after the other;
            default ``CONCURRENT_FILES``.

    Every file is finished (written or failed) before the first error is re-raised.
    """
    if not (CONCURRENT_FILES if concurrent is None else concurrent):
        return [save_hashed(obj, p) for obj, p in items]
    futures = [_FILES.submit(_save_hashed_here, obj, Path(p)) for obj, p in items]
    done = [_result_or_error(f) for f in futures]
    for r in done:
        if isinstance(r, BaseException):
            raise r
    return done


def _result_or_error(f) -> Any:
    try:
        return f.result()
    except BaseException as e:  # noqa: BLE001 - re-raised by the caller after every file is done
        return e
