"""``last.pt`` / ``best_model.pt`` consistency shared by the trainers (train_recon, train_connector).

At the end of an epoch ``last.pt`` is written FIRST: it is the commit point and records the best
epoch so far (``best_epoch``, ``best_val`` and what ``best_model.pt``'s meta needs). ``best_model.pt``
follows. A kill between the two leaves a ``best_model.pt`` one best behind; ``repair_best`` on resume
rewrites it from the restored weights, which are exactly that epoch's (``last.pt`` was written at
its end). So no kill window can change the result: a rerun epoch is never mistaken for "no
improvement", and ``best_model.pt`` always matches the history.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmc.utils.cli import UsageError
from vlmc.utils.io import safe_torch_load

log = logging.getLogger(__name__)


def best_epoch_on_disk(best_path: Path) -> int | None:
    """The ``meta.epoch`` of ``best_model.pt`` (None when the file does not exist)."""
    if not best_path.exists():
        return None
    return int(safe_torch_load(best_path)["meta"]["epoch"])


def repair_best(best_path: Path, state: dict[str, Any], write_best: Callable[[], None]) -> None:
    """Make ``best_model.pt`` agree with the restored ``last.pt`` state, or refuse naming both files.

    Args:
        best_path: ``<out>/best_model.pt``.
        state: the trainer state just restored from ``last.pt``.
        write_best: writes ``best_model.pt`` from the current (restored) weights for ``state["best_epoch"]``.

    Raises:
        UsageError: the files disagree in a way no kill of this program can produce (edited by hand,
            or from another run).
    """
    want = int(state.get("best_epoch", 0))
    if not want:
        return
    have = best_epoch_on_disk(best_path)
    if have == want:
        return
    if want == state["epoch"] and state["batch"] == 0:
        log.info("%s: rewriting epoch %d's best weights (the last run stopped before writing them)", best_path, want)
        write_best()
        return
    raise UsageError(f"{best_path}: holds epoch {have}, but {best_path.parent / 'last.pt'} records best epoch {want}; "
                     "remove the folder's run files to start again, or choose another --out_dir")
