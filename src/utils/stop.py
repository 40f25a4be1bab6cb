"""Clean, resumable stops: Slurm's ``--signal=B:USR1@120`` (forwarded by scripts/common.sh) or SIGTERM.

A long stage runs inside ``with StopFlag() as stop:`` and checks ``stop`` (or ``stop_requested()``) at
chunk / optimizer-step boundaries; when set it writes what it has and exits ``EXIT_PREEMPTED`` (75),
which the wrapper turns into ``scontrol requeue``. The rerun resumes (``--skip_existing``/``--resume``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
_ACTIVE: list[StopFlag] = []


class StopRequested(Exception):
    """Raised at a safe point after a stop was requested; everything before it is written."""


class StopFlag:
    """True once SIGUSR1/SIGTERM arrived or the wrapper's ``$VLMC_STOP_FILE`` exists."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.stop_file = os.environ.get("VLMC_STOP_FILE")

    def __enter__(self) -> StopFlag:
        """Install the handlers (the previous ones come back on exit)."""
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGUSR1, signal.SIGTERM)}
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.remove(self)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        log.warning("received %s: finishing the current unit of work, then exiting %d", signal.Signals(signum).name, EXIT_PREEMPTED)

    def __bool__(self) -> bool:
        return self.signum is not None or bool(self.stop_file and os.path.exists(self.stop_file))


def stop_requested() -> bool:
    """Whether any active ``StopFlag`` is set."""
    return any(bool(f) for f in _ACTIVE)


class StoppedEarly(BaseException):
    """A stop signal before any checkpoint loop: a ``BaseException``, so no ``except Exception`` hides it."""


def _stop_now(signum: int, _frame: Any) -> None:
    raise StoppedEarly(f"received {signal.Signals(signum).name} before the stage could checkpoint; "
                        "nothing half-written is kept, rerun to resume")


@contextlib.contextmanager
def stop_at_once() -> Iterator[None]:
    """Until a ``StopFlag`` takes over, SIGUSR1/SIGTERM raise ``StoppedEarly`` where the program is.

    ``entry_point`` runs every stage inside this, so a pre-emption that arrives while a model loads (or
    in any stage that has no checkpoint loop) exits 75 instead of 138/143. Writes are atomic, so
    stopping anywhere leaves only whole files. Outside the main thread it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _stop_now) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
