"""The one SGD trainer shared by the reconstructor and connector stages (train_recon, train_connector).

It owns checkpoints, exact resume (RNG included), amp, the LR schedule, early stopping, history, preemption
and W&B tracking. A CLI builds its model, data and loss as a :class:`Task` and hands it to :class:`Loop`; the
loop owns the run folder's training files:

    last.pt          everything to resume exactly (trained weights + the task's extras, optimizer, scheduler,
                     scaler, RNG, counters); written first at the end of an epoch: the commit point
    best_model.pt    the task's checkpoint of the best validation epoch (a copy, never the last)
    history.csv      one row per epoch: ``epoch``, the task's metrics (``%.6g``), ``lr``, ``seconds``

The schedule (linear warmup + cosine to 0) counts optimizer steps. SIGUSR1/SIGTERM (the ``StopFlag``) save
``last.pt`` at the next optimizer step and raise ``StopRequested``, which :func:`run_preemptible` turns into
exit status 75 (``EXIT_PREEMPTED``); rerun with ``--resume``.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from vlmc.train.resume import repair_best
from vlmc.utils import cli, tracking
from vlmc.utils.cli import UsageError, ensure_writable_dir, parse_dtype
from vlmc.utils.io import atomic_torch_save, safe_torch_load
from vlmc.utils.rows import read_rows, write_rows
from vlmc.utils.stop import EXIT_PREEMPTED, StopFlag, StopRequested
from vlmc.utils.tracking import Tracker

BEST = "best_model.pt"
LAST = "last.pt"
HISTORY = "history.csv"
CONFIG = "config.json"


# -- flags ----------------------------------------------------------------------------------------


def add_optim_args(parser: argparse.ArgumentParser, *, epochs: int, lr: float, warmup_steps: int, patience: int,
                   lr_help: str = "peak learning rate (AdamW)", grad_clip_help: str = "max gradient norm; 0 = off",
                   val_name: str = "val_loss", amp_help: str = "autocast the forward pass (--amp_dtype)",
                   seed_help: str = "seed of the split, init, data order and dropout") -> argparse._ArgumentGroup:
    """Add the ``optimisation`` flag group the loop reads (the stage's defaults differ, the names never).

    Args:
        parser: the stage's parser.
        epochs, lr, warmup_steps, patience: the stage's defaults of ``--epochs``, ``--lr``, ``--warmup_steps``
            and ``--patience``.
        lr_help, grad_clip_help, amp_help, seed_help: the stage's wording of those flags' help.
        val_name: what the stage selects on (in the ``--patience`` / ``--min_delta`` help).

    Returns:
        The group, for the stage's own optimisation flags.
    """
    o = parser.add_argument_group("optimisation")
    o.add_argument("--batch_size", type=cli.positive_int, default=8, help="images per micro-batch")
    o.add_argument("--epochs", type=cli.positive_int, default=epochs, help="maximum epochs")
    o.add_argument("--lr", type=cli.positive_float, default=lr, help=lr_help)
    o.add_argument("--weight_decay", type=cli.nonneg_float, default=0.01, help="AdamW weight decay (matrices only)")
    o.add_argument("--warmup_steps", type=cli.nonneg_int, default=warmup_steps, help="linear warmup, in optimizer steps")
    o.add_argument("--accumulation_steps", type=cli.positive_int, default=1, help="micro-batches per optimizer step")
    o.add_argument("--grad_clip", type=cli.nonneg_float, default=1.0, help=grad_clip_help)
    o.add_argument("--patience", type=cli.nonneg_int, default=patience,
                   help="stop after this many epochs without improvement; 0 = never")
    o.add_argument("--min_delta", type=cli.nonneg_float, default=0.0,
                   help=f"an improvement must lower {val_name} by more than this")
    o.add_argument("--amp", action="store_true", help=amp_help)
    o.add_argument("--amp_dtype", default="bf16", choices=["bf16", "fp16"], help="autocast dtype (fp16 uses a GradScaler)")
    o.add_argument("--seed", type=int, default=0, help=seed_help)
    o.add_argument("--save_every_steps", type=cli.nonneg_int, default=0,
                   help="also save last.pt every N optimizer steps; 0 = per epoch")
    return o


def check_optim_args(args: argparse.Namespace, at_least_1: Sequence[str] = (), at_least_0: Sequence[str] = ()) -> None:
    """Reject impossible numbers of the :func:`add_optim_args` flags (and the stage's ``at_least_*`` ones).

    Raises:
        UsageError: a count below its minimum, ``--lr`` <= 0, or ``--resume`` with ``--overwrite``.
    """
    for flag in ("batch_size", "epochs", "accumulation_steps", *at_least_1):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1")
    for flag in ("warmup_steps", "patience", "save_every_steps", *at_least_0):
        v = getattr(args, flag)
        if v is not None and v < 0:
            raise UsageError(f"--{flag} must be >= 0")
    if args.lr <= 0:
        raise UsageError("--lr must be > 0")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other")


def flag_diffs(saved: Mapping[str, Any], args: argparse.Namespace, flags: Iterable[str]) -> list[str]:
    """``--flag old → new`` for each of ``flags`` that the saved run's arguments (``config.json``) set otherwise."""
    return [f"--{k} {saved.get(k)!r} → {getattr(args, k)!r}" for k in flags if k in saved and saved[k] != getattr(args, k)]


def refuse_other_settings(out: Path, diffs: Sequence[str]) -> None:
    """On resume: refuse (``UsageError``) a run folder trained with other settings (``diffs``, if any)."""
    if diffs:
        raise UsageError(f"{out} was trained with different settings ({'; '.join(diffs)}); use another --out_dir")


def run_preemptible(run: Callable[[StopFlag], int], log: logging.Logger) -> int:
    """``run(stop)`` under a :class:`StopFlag`; a stop signal ends it with ``EXIT_PREEMPTED`` (rerun with --resume)."""
    with StopFlag() as stop:
        try:
            return run(stop)
        except (StopRequested, InterruptedError):
            log.warning("stopped by signal; rerun with --resume to continue (exit %d)", EXIT_PREEMPTED)
            return EXIT_PREEMPTED


# -- schedule, optimiser, amp, RNG ----------------------------------------------------------------


def lr_factor(step: int, warmup: int, total: int) -> float:
    """LR multiplier before optimizer step ``step`` (0-based): linear warmup, then cosine to 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_per_epoch(n_batches: int, accumulation: int) -> int:
    """Optimizer steps in an epoch of ``n_batches`` micro-batches (a partial last group still steps)."""
    return math.ceil(n_batches / accumulation)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not biases, norms, positions, means)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "pos" not in name and "mean" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def amp_context(device: torch.device, enabled: bool, dtype: torch.dtype) -> AbstractContextManager:
    """Autocast on ``device`` when enabled."""
    return torch.autocast(device_type=device.type, dtype=dtype) if enabled else nullcontext()


def rng_state() -> dict[str, Any]:
    """Torch (CPU, CUDA) and Python RNG states (weights_only-loadable)."""
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved."""
    torch.set_rng_state(st["torch"])
    random.setstate(_as_tuple(st["python"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


# -- run folder, history, tracking ----------------------------------------------------------------


def prepare_out_dir(args: argparse.Namespace, run_files: Sequence[str]) -> Path:
    """Create ``args.out_dir``; refuse to mix a fresh run into an earlier one unless --resume/--overwrite.

    Args:
        args: ``out_dir``, ``resume``, ``overwrite`` and (optional) ``eval_only`` flags.
        run_files: the names that make a folder "hold a run" (deleted by ``--overwrite``).
    """
    out = ensure_writable_dir(args.out_dir)
    present = [f for f in run_files if (out / f).exists()]
    if getattr(args, "eval_only", False):
        if not (out / BEST).exists():
            raise UsageError(f"{out}: no {BEST} to evaluate")
    elif present and not args.resume:
        if not args.overwrite:
            raise UsageError(f"{out} already holds a run ({', '.join(present)}); pass --resume, --overwrite or another --out_dir")
        for f in present:
            (out / f).unlink()
    return out


def start_wandb(args: argparse.Namespace, out: Path, spec: Any) -> Tracker | None:
    """A W&B run (:mod:`vlmc.utils.tracking`; resumable, under ``<out>/wandb``), or ``None`` when off."""
    t = tracking.start(args, out, args.run_name or out.name, {**vars(args), "spec": spec.to_dict()}, job_type="train")
    return t if t.run is not None else None


# -- the loop -------------------------------------------------------------------------------------


class Task:
    """What a stage gives the loop: the trained module, its batches, its loss and its checkpoint.

    Subclasses set the attributes in ``__init__`` and implement :meth:`loss`, :meth:`train_metrics`,
    :meth:`validate`, :meth:`describe` and :meth:`best_checkpoint`. Metric dicts hold ``train_loss`` /
    ``val_loss`` (the loop selects and early-stops on ``val_loss``) and any other column of ``history_fields``.

    Attributes:
        model: the trained module (``last.pt``'s ``model``; ``train()`` at each epoch start).
        spec: the model spec (``to_dict()`` goes into ``last.pt`` and the W&B config).
        device: where the loss is computed (the GradScaler's device).
        loader, sampler, n_batches: training batches, their ``set_epoch(epoch, start)`` sampler and count.
        lr: the optimiser's base learning rate (groups without their own ``lr``).
        history_fields: ``history.csv``'s columns.
        counters: per-epoch accumulators kept in the loop state (saved in ``last.pt``, reset each epoch).
        extra_state: further loop-state entries (e.g. ``best_*`` values that :meth:`best_extras` sets).
        loss_label, val_label: how the log names the training loss and the validation score.
        wandb_names: W&B key per metric, where it is not the metric's own name.
    """

    model: nn.Module
    spec: Any
    device: torch.device
    loader: Iterable[Any]
    sampler: Any
    n_batches: int
    lr: float
    history_fields: tuple[str, ...]
    counters: dict[str, Any] = {}
    extra_state: dict[str, Any] = {}
    loss_label = "loss"
    val_label = "val"
    wandb_names: dict[str, str] = {}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW parameter groups (default: the model's, decay on matrices only)."""
        return param_groups(self.model, weight_decay)

    def trained_params(self) -> Iterable[nn.Parameter]:
        """Parameters whose gradient norm ``--grad_clip`` bounds."""
        return self.model.parameters()

    def loss(self, batch: Any, state: dict[str, Any]) -> Tensor | None:
        """The micro-batch loss to backpropagate (``None``: nothing to learn from); updates ``state``'s counters."""
        raise NotImplementedError

    def flush(self, state: dict[str, Any]) -> None:
        """Move device-side accumulators into ``state`` (before a save and at the end of an epoch)."""

    def train_metrics(self, state: dict[str, Any]) -> dict[str, float]:
        """The epoch's training metrics from ``state``'s counters."""
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        """Validation metrics of the current weights."""
        raise NotImplementedError

    def describe(self, metrics: Mapping[str, float]) -> str:
        """The metrics part of the per-epoch log line."""
        raise NotImplementedError

    def best_extras(self, metrics: Mapping[str, float]) -> dict[str, Any]:
        """State entries recorded with a new best epoch besides ``best_val`` / ``best_train``."""
        return {}

    def best_checkpoint(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """``best_model.pt``'s content for the best epoch recorded in ``state`` (current weights)."""
        raise NotImplementedError

    def last_extras(self) -> dict[str, Any]:
        """Entries ``last.pt`` holds besides the loop's own."""
        return {}

    def restore_extras(self, ck: Mapping[str, Any]) -> None:
        """Load what :meth:`last_extras` saved."""

    def progress(self, state: Mapping[str, Any]) -> dict[str, str] | None:
        """Progress-bar postfix after a micro-batch (``None``: none)."""
        return None


class Loop:
    """The SGD loop over a :class:`Task` with checkpoints, early stopping, preemption and exact resume."""

    def __init__(self, args: argparse.Namespace, task: Task, out: Path, stop: StopFlag, log: logging.Logger) -> None:
        self.args, self.task, self.out, self.stop, self.log = args, task, out, stop, log
        self.n_batches = task.n_batches
        self.total_steps = steps_per_epoch(self.n_batches, args.accumulation_steps) * args.epochs
        self.opt = torch.optim.AdamW(task.param_groups(args.weight_decay), lr=task.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, args.warmup_steps, self.total_steps))
        amp_dtype = parse_dtype(args.amp_dtype)
        self.scaler = torch.amp.GradScaler(task.device.type, enabled=args.amp and amp_dtype == torch.float16)
        self.state: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "best_val": math.inf, "best_epoch": 0,
                                      "bad_epochs": 0, "best_train": math.nan, **task.extra_state,
                                      **task.counters, "epoch_seconds": 0.0, "finished": False}
        self.history: list[dict[str, Any]] = []
        self.wandb: Tracker | None = None
        self._grads = False

    # checkpoints
    def save_last(self) -> None:
        """``last.pt``: everything to continue exactly from the last optimizer step."""
        atomic_torch_save({
            "model": self.task.model.state_dict(), **self.task.last_extras(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(), "state": dict(self.state),
            "rng": rng_state(), "spec": self.task.spec.to_dict(),
        }, self.out / LAST)

    def save_best(self) -> None:
        """``best_model.pt``: a copy of the weights at the best epoch the state records (the current one)."""
        atomic_torch_save(self.task.best_checkpoint(self.state), self.out / BEST)

    def restore(self) -> bool:
        """Load ``last.pt`` if present (and repair ``best_model.pt`` behind it); returns whether it did."""
        path = self.out / LAST
        if not path.exists():
            return False
        ck = safe_torch_load(path, mmap=False)
        self.task.model.load_state_dict(ck["model"])
        self.task.restore_extras(ck)
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        self.state.update(ck["state"])
        set_rng_state(ck["rng"])
        repair_best(self.out / BEST, self.state, self.save_best)  # last.pt is the commit point (vlmc.train.resume)
        self.history = [r for r in read_rows(self.out / HISTORY) if int(r["epoch"]) <= self.state["epoch"]]
        self.log.info("resumed from %s: epoch %d, batch %d, step %d, best val %.5f", path, self.state["epoch"] + 1,
                      self.state["batch"], self.state["step"], self.state["best_val"])
        return True

    # loop
    def run(self) -> int:
        """Train until ``--epochs``, early stop, or a stop signal (→ ``StopRequested``); returns 0."""
        self.restore()
        st, label = self.state, self.task.val_label
        if st["finished"]:
            self.log.info("run already finished (best epoch %d, %s %.5f)", st["best_epoch"], label, st["best_val"])
            return 0
        self.wandb = start_wandb(self.args, self.out, self.task.spec)
        try:
            while st["epoch"] < self.args.epochs and not st["finished"]:
                self._epoch()
        finally:
            if self.wandb is not None:
                self.wandb.finish()
        self.log.info("done: best epoch %d, %s %.6g → %s", st["best_epoch"], label, st["best_val"], self.out / BEST)
        return 0

    def _epoch(self) -> None:
        st, args, task = self.state, self.args, self.task
        epoch = st["epoch"] + 1
        train = self._train_epoch(epoch)  # adds its own time to st["epoch_seconds"]
        t0 = time.time()
        metrics = {**train, **task.validate()}
        seconds = st["epoch_seconds"] + time.time() - t0
        lr = self.opt.param_groups[0]["lr"]
        improved = metrics["val_loss"] < st["best_val"] - args.min_delta
        if improved:
            st.update(best_val=metrics["val_loss"], best_epoch=epoch, bad_epochs=0, best_train=metrics["train_loss"],
                      **task.best_extras(metrics))
        else:
            st["bad_epochs"] += 1
        self._log_history(epoch, metrics, lr, seconds)
        stop_early = bool(args.patience) and st["bad_epochs"] >= args.patience
        st.update(epoch=epoch, batch=0, **task.counters, epoch_seconds=0.0, finished=stop_early or epoch >= args.epochs)
        self.save_last()  # first: the commit point, then the best copy (a kill between is repaired on resume)
        if improved:
            self.save_best()
        self.log.info("epoch %d: %s lr %.3g %.1fs%s", epoch, task.describe(metrics), lr, seconds,
                      " (best)" if improved else "")
        if self.wandb is not None:
            names, fields = task.wandb_names, task.history_fields
            self.wandb.log({"epoch": epoch, **{names.get(k, k): metrics[k] for k in fields if k in metrics}, "lr": lr},
                           step=st["step"])
        if stop_early:
            self.log.info("early stop: no %s improvement > %g for %d epochs", task.val_label, args.min_delta,
                          args.patience)
        if self.stop and not st["finished"]:
            raise StopRequested()

    def _log_history(self, epoch: int, metrics: Mapping[str, float], lr: float, seconds: float) -> None:
        fields = self.task.history_fields
        self.history.append({"epoch": epoch, **{k: f"{metrics[k]:.6g}" for k in fields if k in metrics},
                             "lr": f"{lr:.6g}", "seconds": f"{seconds:.2f}"})
        write_rows(self.out / HISTORY, self.history, fields)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        st, args, task = self.state, self.args, self.task
        task.model.train()
        task.sampler.set_epoch(epoch, start=st["batch"])
        t0 = time.time()
        bar = tqdm(task.loader, desc=f"epoch {epoch}", initial=st["batch"], total=self.n_batches, unit="batch",
                   file=sys.stderr, disable=None, leave=False)
        try:
            for batch in bar:
                self._micro_step(batch)
                postfix = task.progress(st)
                if postfix:
                    bar.set_postfix(postfix, refresh=False)
                if self._at_boundary():
                    self.optimizer_step()
                    if self.stop or (args.save_every_steps and st["step"] % args.save_every_steps == 0):
                        task.flush(st)
                        st["epoch_seconds"] += time.time() - t0
                        t0 = time.time()
                        self.save_last()
                        if self.stop:
                            raise StopRequested()
        except RuntimeError:  # DataLoader workers killed by the same SIGTERM: keep the last saved last.pt
            if not self.stop:
                raise
            raise StopRequested() from None
        finally:
            bar.close()
        task.flush(st)
        st["epoch_seconds"] += time.time() - t0
        metrics = task.train_metrics(st)
        loss = metrics["train_loss"]
        if not math.isfinite(loss):
            raise UsageError(f"training diverged at epoch {epoch} ({task.loss_label} {loss}); lower --lr or use "
                             "--amp_dtype bf16")
        return metrics

    def _micro_step(self, batch: Any) -> None:
        st, accum = self.state, self.args.accumulation_steps
        group_start = (st["batch"] // accum) * accum
        group = min(accum, self.n_batches - group_start)
        st["batch"] += 1
        loss = self.task.loss(batch, st)
        if loss is not None:
            self.backward(loss / group)

    def _at_boundary(self) -> bool:
        b = self.state["batch"]
        return b % self.args.accumulation_steps == 0 or b == self.n_batches

    def backward(self, loss: Tensor) -> None:
        """Backpropagate ``loss`` (through the GradScaler) into the next optimizer step."""
        self.scaler.scale(loss).backward()
        self._grads = True

    def optimizer_step(self) -> None:
        """Clip, step (when any micro-batch gave gradients), zero the gradients, advance the schedule."""
        if self._grads:
            if self.args.grad_clip:
                self.scaler.unscale_(self.opt)
                nn.utils.clip_grad_norm_(self.task.trained_params(), self.args.grad_clip)
            self.scaler.step(self.opt)
            self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self._grads = False
        self.sched.step()
        self.state["step"] += 1
