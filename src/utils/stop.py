"""Clean, resumable stops: Slurm's ``--signal=B:USR1@120`` (forwarded by scripts/common.sh) or SIGTERM.

A long stage runs inside ``with StopFlag() as stop:`` and checks ``stop`` (or ``stop_requested()``) at
chunk / optimizer-step boundaries; when set it writes what it has and exits ``EXIT_PREEMPTED`` (75),
which the wrapper turns into ``scontrol requeue``. The rerun resumes (``--skip_existing``/``--resume``).
"""

from __future__ import annotations

import logging
import os
import signal
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
