"""Weights & Biases logging for the long stages (stage 1 throughput, kNN, training, captions): one switch.

``--wandb {off,offline,online}`` (default: ``$VLMC_WANDB``, else ``off``; ``--wandb`` alone = ``offline``).
Offline runs are written under the stage's output folder (``<out_dir>/wandb``, or ``--wandb_dir``), never
into the git tree, and can be uploaded later with ``wandb sync <dir>/wandb/offline-run-*``. With ``offline``
a ``WANDB_MODE`` set by the user wins (e.g. ``WANDB_MODE=disabled``). Off by default because starting a
W&B run costs ~8 s per stage on a busy 2-core machine (import 4.3 s + init 3.4 s, measured here with
wandb 0.31), which every test and demo stage would pay.

A W&B failure (no package, no login for ``online``) is one warning; the stage itself goes on.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from vlmc.utils.cli import UsageError

log = logging.getLogger(__name__)

MODES = ("off", "offline", "online")
ENV = "VLMC_WANDB"
PROJECT = "vlm-connectors"


def add_tracking_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--wandb``, ``--wandb_project`` and ``--wandb_dir`` (one group, same text in every stage)."""
    g = parser.add_argument_group("tracking (Weights & Biases)")
    g.add_argument(
        "--wandb", nargs="?", const="offline", default=os.environ.get(ENV) or "off", choices=MODES,
        help=f"log this stage to W&B: off, offline (written locally; WANDB_MODE wins if set) or online; "
        f"'--wandb' alone = offline; env {ENV} sets the default for every stage",
    )  # fmt: skip
    g.add_argument("--wandb_project", default=PROJECT, help="W&B project")
    g.add_argument("--wandb_dir", default=None, help="where W&B writes its files (unset: <out_dir>/wandb)")


class Tracker:
    """A W&B run, or a no-op when tracking is off; use as a context manager."""

    def __init__(self, run: Any = None) -> None:
        self.run = run

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log ``metrics`` (at ``step``)."""
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, **values: Any) -> None:
        """Set run-summary values (end-of-stage numbers)."""
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        """Close the run and wait until W&B has written it to disk (idempotent).

        ``run.finish()`` only asks the W&B service to close the run; its offline file is flushed later, at
        the service's teardown, which the interpreter's exit hook does not reliably reach when the stage used
        worker processes. Tearing down here makes the run complete on disk when the stage returns.
        """
        if self.run is not None:
            import wandb

            self.run.finish()
            self.run = None
            wandb.teardown()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


def start(args: argparse.Namespace, out_dir: str | os.PathLike, name: str, config: dict[str, Any] | None = None,
          job_type: str | None = None) -> Tracker:
    """Start a run from parsed :func:`add_tracking_args` flags; resumable (its id lives in ``wandb_id.txt``).

    Args:
        args: parsed flags (``wandb``, ``wandb_project``, ``wandb_dir``).
        out_dir: the stage's output folder (the default W&B folder lives under it).
        name: the run name.
        config: recorded as the run's config (default: every flag).
        job_type: the stage (``extract``, ``knn``, ``train``, ``captions``).
    """
    mode = getattr(args, "wandb", "off") or "off"
    if mode not in MODES:
        raise UsageError(f"--wandb {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "off":
        return Tracker()
    if mode == "offline":
        mode = os.environ.get("WANDB_MODE") or "offline"
    base = Path(getattr(args, "wandb_dir", None) or Path(out_dir) / "wandb")
    try:
        import wandb
    except ImportError:
        log.warning("--wandb %s: the wandb package is not installed; not logging", mode)
        return Tracker()
    base.mkdir(parents=True, exist_ok=True)
    id_file = base / f"wandb_id_{job_type or 'run'}.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
    id_file.write_text(run_id + "\n")
    cfg = config if config is not None else {k: v for k, v in vars(args).items() if not k.startswith("_")}
    try:
        run = wandb.init(project=getattr(args, "wandb_project", PROJECT), name=name, id=run_id, resume="allow",
                         dir=str(base), config=cfg, mode=mode, job_type=job_type)
    except Exception as e:  # noqa: BLE001  (tracking must never stop a stage)
        log.warning("W&B run not started (%s: %s); not logging", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return Tracker()
    log.info("W&B %s run %s in %s", mode, run_id, base)
    return Tracker(run)


def flat_numbers(obj: Any, prefix: str = "") -> dict[str, float]:
    """Every number in a nested dict, keyed by its ``a/b/c`` path (for a run summary)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_numbers(v, f"{prefix}{k}/"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix.rstrip("/")] = float(obj)
    return out


def column_means(csv_path: str | os.PathLike) -> dict[str, float]:
    """Mean of every score / drop column of a stage's CSV (``clip*``, ``bertscore*``, ``attr_acc*``)."""
    import pandas as pd

    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    cols = [c for c in df.columns if c.startswith(("clip", "bertscore", "attr_acc", "reproj"))]
    return {f"mean/{c}": float(pd.to_numeric(df[c], errors="coerce").mean()) for c in cols}
