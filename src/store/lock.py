"""One writer per output folder: an advisory ``fcntl`` lock, and cleanup of a killed writer's temp files.

``FolderLock(dir)`` takes a POSIX record lock (``fcntl.lockf``, which also works over NFSv4) on
``<dir>/.vlmc.lock`` for as long as the ``with`` block runs, and writes ``host pid`` into the file. A
second writer fails at once with a ``UsageError`` naming that holder (exit 2). The kernel drops the
lock when its process dies (even by SIGKILL), so a lock file left by a dead process is simply taken
over. Forked children (DataLoader workers) do not inherit a POSIX lock, so they cannot keep it alive.

Once the lock is held, the temp files a killed writer left behind (``atomic_open``'s ``.<name>.*.tmp``)
are removed: no other process can be writing them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import Any

from vlmc.utils.cli import UsageError

log = logging.getLogger(__name__)

LOCK_NAME = ".vlmc.lock"


def _holder() -> str:
    return f"host {socket.gethostname()} pid {os.getpid()}"


class FolderLock:
    """Hold the advisory write lock of ``folder`` inside a ``with`` block (re-entrant per process).

    Args:
        folder: the output folder (created if missing).
        cleanup: remove leftover temp files once the lock is held.
    """

    _held: dict[Path, int] = {}  # folder -> nesting depth within this process

    def __init__(self, folder: str | os.PathLike, cleanup: bool = True) -> None:
        self.folder = Path(folder)
        self.cleanup = cleanup
        self.fd: int | None = None

    def __enter__(self) -> FolderLock:
        key = self.folder.resolve()
        if key in self._held:
            self._held[key] += 1
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = _read(path) or "an unknown process"
            raise UsageError(f"{self.folder}: another run is writing here ({holder}); wait for it to end or "
                             "choose another output folder") from None
        previous = _read_fd(fd)
        if previous and previous != _holder():
            log.info("%s: taking over the lock of a finished run (%s)", self.folder, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (_holder() + "\n").encode(), 0)
        self.fd = fd
        self._held[key] = 1
        if self.cleanup:
            remove_temp_files(self.folder)
        return self

    def __exit__(self, *exc: Any) -> None:
        key = self.folder.resolve()
        self._held[key] -= 1
        if self._held[key] or self.fd is None:
            return
        del self._held[key]
        with contextlib.suppress(OSError):
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _read(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(encoding="utf-8", errors="replace").strip()
    return ""


def _read_fd(fd: int) -> str:
    return os.pread(fd, 256, 0).decode("utf-8", "replace").strip()


def is_temp_file(name: str) -> bool:
    """Whether ``name`` is a temp file of ``vlmc.utils.io.atomic_open`` (``.<target>.<random>.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp") and name.count(".") >= 3


def remove_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files a killed writer left in ``folder`` (call only while holding its lock)."""
    removed = []
    with os.scandir(folder) as it:
        for entry in it:
            if is_temp_file(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    if removed:
        log.info("%s: removed %d temp file(s) of a killed run", folder, len(removed))
    return removed
