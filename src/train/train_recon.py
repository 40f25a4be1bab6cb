"""Stage 4: train a reconstructor E_post → Ê_pre (how much of E_pre is recoverable from E_post).

Reads a stage-1 store (``--vec_dir``, or ``--pre_dir``/``--post_dir``) and writes to ``--out_dir``:

    best_model.pt              {state_dict, meta} of the best validation epoch (a true copy, never the last)
    last.pt                    everything needed to resume (model, optimizer, scheduler, scaler, RNG, counters)
    normalization.safetensors  per-channel float64 mean/std of E_pre and E_post, TRAINING split only;
                               written once, never rewritten by --resume or --eval_only
    split.json                 {"train": [[shard, key], ...], "val": [...], "test": [...]} (+ "sha256" of the train
                               and val image files with --image_root): fit on train, select on val, report test
    history.csv                epoch, train_loss, val_loss, lr, seconds
    config.json                the run's arguments, model spec and store facts

Losses are MSE on standardised tensors (val_loss is always in the standardised space, also with
--no-normalize). The LR schedule (linear warmup + cosine) counts optimizer steps. SIGUSR1/SIGTERM
save last.pt at the next optimizer step and exit with status 75 (EX_TEMPFAIL) so a wrapper
requeues; rerun with --resume (a --resume on an empty --out_dir starts a fresh run).

Examples:
    python src/train/train_recon.py --vec_dir data/vector --embed_model llava --model_type linear
    python src/train/train_recon.py --vec_dir data/vector/llava --model_type mlp --amp --device cuda --resume
    python src/train/train_recon.py --vec_dir data/vector/llava --out_dir OUT --eval_only
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from vlmc.store.verify import set_read_level
from vlmc.train.data import (
    SPLIT_FILE,
    STATS_FILE,
    Sample,
    Standardizer,
    Store,
    apply_split,
    compute_stats,
    content_hashes,
    index_samples,
    load_split,
    load_stats,
    make_loader,
    make_split,
    open_store,
    plan_batches,
    save_split,
    save_stats,
)
from vlmc.train.loader import LOADERS, make_fast_loader, resolve_loader
from vlmc.train.reconstructors import (
    BEST,
    MODEL_TYPES,
    RIDGE_GRID,
    ReconSpec,
    build_reconstructor,
    checkpoint,
    describe,
    fit_linear,
    load_reconstructor,
    make_spec,
)
from vlmc.train.resume import repair_best
from vlmc.utils import cli, tracking
from vlmc.utils.cli import (
    UsageError,
    ensure_writable_dir,
    entry_point,
    make_parser,
    parse_csv_list,
    parse_dtype,
    resolve_device,
)
from vlmc.utils.io import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    read_json,
    safe_torch_load,
    sha256_file,
)
from vlmc.utils.stop import EXIT_PREEMPTED, StopFlag, StopRequested
from vlmc.utils.tracking import Tracker, add_tracking_args

log = logging.getLogger("vlmc.train_recon")

LAST = "last.pt"
HISTORY = "history.csv"
CONFIG = "config.json"
EVAL_ONLY = "eval_only.json"
HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "lr", "seconds")
RUN_FILES = (BEST, LAST, STATS_FILE, SPLIT_FILE, HISTORY, CONFIG, EVAL_ONLY)
SPEC_FLAGS = ("hidden_size", "num_layers", "num_heads", "dropout", "skip", "ridge", "linear_iters")
DATA_FLAGS = ("limit", "train_split", "val_split", "train_shards", "val_shards", "test_shards", "seed", "shards",
              "normalize")


def build_parser():
    """The stage-4 argument parser."""
    p = make_parser(__doc__)
    g = p.add_argument_group("data")
    g.add_argument("--vec_dir", default="data/vector", help="stage-1 store: base folder (+ --model), model folder or one shard")
    g.add_argument("--pre_dir", default=None, help="E_pre shards (instead of --vec_dir; paired with --post_dir by shard name)")
    g.add_argument("--post_dir", default=None, help="E_post shards matching --pre_dir")
    cli.add_model_arg(g, "--embed_model", default=None, help="model name (a subfolder of --vec_dir); default: the manifest's")
    g.add_argument("--shards", default=None, help="comma list of shards to use (default: all)")
    g.add_argument("--limit", type=cli.nonneg_int, default=0, help="use at most this many images (store order); 0 = all")
    g.add_argument("--train_split", type=cli.split_fraction, default=0.8, help="fraction of images fitted on (seeded random split by image)")
    g.add_argument("--val_split", type=cli.split_fraction, default=0.1,
                   help="fraction of images that select (ridge strength, best epoch, early stop); the rest is the "
                        "test part, never seen by fit or selection, which stages 5-7 report (--val_split "
                        "1-train_split: no test part, evaluate on another store)")
    g.add_argument("--train_shards", default=None, help="comma list: train on these shards (overrides the fractions)")
    g.add_argument("--val_shards", default=None, help="comma list: select on these shards (default: the shards not named for train or test)")
    g.add_argument("--test_shards", default=None, help="comma list: test shards, never seen by fit or selection (default: none)")
    g.add_argument("--image_root", default=None,
                   help="images of this store (<root>/<shard>/<key>.<ext>): split.json records the sha256 of every "
                        "train and val image file, so stages 5-7 can tell leaked content from a mere id collision "
                        "(default: none; ids only)")
    g.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True, help="standardise E_pre/E_post with train-split stats")
    g.add_argument("--num_workers", type=cli.nonneg_int, default=2, help="DataLoader workers gathering mmap'd batches (--loader workers)")
    g.add_argument("--loader", default="auto", choices=LOADERS,
                   help="training/validation batches: device (the split held in device memory), prefetch (a "
                   "background thread gathers the next batches into pinned memory), workers (DataLoader with "
                   "--num_workers); auto: device on a GPU when the split fits in half its free memory, else "
                   "prefetch; workers on the CPU")
    m = p.add_argument_group("model")
    cli.add_recon_type_arg(m, "--model_type", default="mlp", choices=MODEL_TYPES, help="reconstructor")
    m.add_argument("--hidden_size", type=cli.positive_int, default=None, help="hidden width (default: mlp 2048; transformer 512, or its data's widest side rounded up to 128 when narrower)")
    m.add_argument("--num_layers", type=cli.positive_int, default=None, help="mlp linear layers / transformer blocks (default: mlp 2; transformer 2 for 1:1, 4 otherwise)")
    m.add_argument("--num_heads", type=cli.positive_int, default=None, help="attention heads (default 8)")
    m.add_argument("--dropout", type=cli.dropout_rate, default=None, help="dropout (default: mlp 0, transformer 0.1)")
    m.add_argument("--skip", action=argparse.BooleanOptionalAction, default=True, help="mlp/transformer: add a trainable linear path")
    m.add_argument("--init_linear", action=argparse.BooleanOptionalAction, default=True,
                   help="mlp/transformer: start the linear path at the closed-form ridge fit (one extra data pass)")
    m.add_argument("--ridge", default=",".join(f"{r:g}" for r in RIDGE_GRID),
                   help="linear fit: ridge strength(s) relative to the mean Gram diagonal; with several, the one with "
                   "the lowest val MSE is kept (exact, from sufficient statistics)")
    m.add_argument("--linear_iters", type=cli.positive_int, default=3, help="linear with correspondence none: alternating least-squares rounds")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch_size", type=cli.positive_int, default=8, help="images per micro-batch")
    o.add_argument("--epochs", type=cli.positive_int, default=20, help="maximum epochs")
    o.add_argument("--lr", type=cli.positive_float, default=3e-4, help="peak learning rate (AdamW)")
    o.add_argument("--weight_decay", type=cli.nonneg_float, default=0.01, help="AdamW weight decay (matrices only)")
    o.add_argument("--warmup_steps", type=cli.nonneg_int, default=100, help="linear warmup, in optimizer steps")
    o.add_argument("--accumulation_steps", type=cli.positive_int, default=1, help="micro-batches per optimizer step")
    o.add_argument("--grad_clip", type=cli.nonneg_float, default=1.0, help="max gradient norm; 0 = off")
    o.add_argument("--patience", type=cli.nonneg_int, default=5, help="stop after this many epochs without improvement; 0 = never")
    o.add_argument("--min_delta", type=cli.nonneg_float, default=0.0, help="an improvement must lower val_loss by more than this")
    o.add_argument("--amp", action="store_true", help="autocast the forward pass (--amp_dtype)")
    o.add_argument("--amp_dtype", default="bf16", choices=["bf16", "fp16"], help="autocast dtype (fp16 uses a GradScaler)")
    o.add_argument("--seed", type=int, default=0, help="seed of the split, init, data order and dropout")
    o.add_argument("--save_every_steps", type=cli.nonneg_int, default=0, help="also save last.pt every N optimizer steps; 0 = per epoch")
    r = p.add_argument_group("run")
    cli.add_out_dir_arg(r, default=None, help="output folder (default data/output/recon/<model>_<recon_type>)")
    cli.add_resume_arg(r, help="continue the run in --out_dir from last.pt (or start it)")
    r.add_argument("--overwrite", action="store_true", help="delete an earlier run's files in --out_dir and start afresh")
    r.add_argument("--eval_only", action="store_true", help="evaluate best_model.pt on the saved val split; writes eval_only.json")
    r.add_argument("--device", type=cli.device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--run_name", default=None, help="W&B run name (default: the out_dir name)")
    add_tracking_args(p)
    return p


def check_args(args) -> None:
    """Reject impossible numbers before anything is read."""
    for flag in ("batch_size", "epochs", "accumulation_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1")
    for flag in ("limit", "warmup_steps", "patience", "num_workers", "save_every_steps"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must be >= 0")
    if args.lr <= 0:
        raise UsageError("--lr must be > 0")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other")


# -- schedule -------------------------------------------------------------------------------------


def lr_factor(step: int, warmup: int, total: int) -> float:
    """LR multiplier before optimizer step ``step`` (0-based): linear warmup, then cosine to 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_per_epoch(n_batches: int, accumulation: int) -> int:
    """Optimizer steps in an epoch of ``n_batches`` micro-batches (a partial last group still steps)."""
    return math.ceil(n_batches / accumulation)


# -- run folder -----------------------------------------------------------------------------------


def prepare_out_dir(args) -> Path:
    """Create the folder; refuse to mix a fresh run into an earlier one unless --resume/--overwrite."""
    out = ensure_writable_dir(args.out_dir)
    present = [f for f in RUN_FILES if (out / f).exists()]
    if args.eval_only:
        if not (out / BEST).exists():
            raise UsageError(f"{out}: no {BEST} to evaluate")
    elif present and not args.resume:
        if not args.overwrite:
            raise UsageError(f"{out} already holds a run ({', '.join(present)}); pass --resume, --overwrite or another --out_dir")
        for f in present:
            (out / f).unlink()
    return out


def store_args(args) -> dict[str, Any]:
    return {"vec_dir": args.vec_dir, "pre_dir": args.pre_dir, "post_dir": args.post_dir, "embed_model": args.embed_model}


def check_config(out: Path, args, spec: ReconSpec | None) -> None:
    """On resume: the saved config must match this run's data and model flags."""
    cfg_path = out / CONFIG
    if not cfg_path.exists():
        return
    cfg = read_json(cfg_path)
    diffs = [f"--{k} {cfg['args'].get(k)!r} → {getattr(args, k)!r}" for k in (*DATA_FLAGS, "model_type")
             if k in cfg["args"] and cfg["args"][k] != getattr(args, k)]
    if spec is not None and cfg.get("spec"):
        old = cfg["spec"]
        diffs += [f"{k} {old.get(k)!r} → {v!r}" for k, v in spec.to_dict().items() if k in SPEC_FLAGS and old.get(k) != v]
    if diffs:
        raise UsageError(f"{out} was trained with different settings ({'; '.join(diffs)}); use another --out_dir")


def load_or_make_split(out: Path, args, samples: Sequence[Sample]) -> dict[str, list[list[str]]]:
    """``split.json`` if the run has one (never recomputed), else a new one, saved."""
    path = out / SPLIT_FILE
    if path.exists():
        return load_split(path)
    if args.eval_only:
        raise UsageError(f"{out}: no {SPLIT_FILE}")
    split = make_split(samples, args.train_split, args.seed, parse_csv_list(args.train_shards),
                       parse_csv_list(args.val_shards), args.val_split, parse_csv_list(args.test_shards))
    if args.image_root:
        split["sha256"] = content_hashes(args.image_root, split["train"] + split["val"])
    save_split(path, split)
    log.info("split: %d train, %d val (selection), %d test images → %s", len(split["train"]), len(split["val"]),
             len(split["test"]), path)
    return split


def load_or_make_stats(out: Path, train: Sequence[Sample], device: torch.device, args, stop: StopFlag):
    """``normalization.safetensors`` if present (never rewritten), else computed on the train split and saved."""
    path = out / STATS_FILE
    if path.exists():
        return load_stats(path)
    if args.eval_only:
        raise UsageError(f"{out}: no {STATS_FILE}")
    t0 = time.time()
    stats = compute_stats(train, device, max(args.batch_size, 32), args.num_workers, should_stop=lambda: bool(stop))
    save_stats(path, stats)
    log.info("normalisation stats from %s train images in %.1f s → %s", stats.meta["n_images"], time.time() - t0, path)
    return stats


def spec_from_args(args, store: Store, samples: Sequence[Sample]) -> ReconSpec:
    """The model spec: store shapes (the most common grid) + flags / per-correspondence defaults."""
    shapes: dict[tuple, int] = {}
    for s in samples:
        shapes[s.shape] = shapes.get(s.shape, 0) + 1
    pre_grid, post_grid = max(shapes, key=shapes.get)
    return make_spec(
        args.model_type, store.correspondence, store.d_pre, store.d_post, pre_grid, post_grid,
        hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
        dropout=args.dropout, skip=args.skip, ridge=parse_ridge(args.ridge), linear_iters=args.linear_iters,
    )


def parse_ridge(text: str) -> list[float]:
    """``--ridge 1e-4,1e-2`` → ``[1e-4, 0.01]`` (each >= 0)."""
    try:
        values = [float(x) for x in parse_csv_list(text)]
    except ValueError:
        raise UsageError(f"--ridge {text!r}: expected comma-separated numbers") from None
    if not values or any(v < 0 for v in values):
        raise UsageError("--ridge needs at least one value, all >= 0")
    return values


def write_config(out: Path, args, spec: ReconSpec, store: Store) -> None:
    """``config.json``: written on a fresh start (resume compares against it)."""
    if (out / CONFIG).exists():
        return
    atomic_write_json(out / CONFIG, {
        "args": vars(args), "spec": spec.to_dict(), "store": store_facts(store),
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
    })


def store_facts(store: Store) -> dict[str, Any]:
    """Manifest facts copied into checkpoints (export/eval need them)."""
    return {
        "model": store.model, "family": store.family, "source": store.source,
        "correspondence": str(store.correspondence), "d_pre": store.d_pre, "d_post": store.d_post,
        "store_dtype": store.store_dtype, "save_every": store.save_every,
        "shard_dirs": [{"shard": s.shard, "pre": str(s.pre.dir.resolve()), "post": str(s.post.dir.resolve())} for s in store.shards],
    }


# -- history --------------------------------------------------------------------------------------


def read_history(path: Path) -> list[dict[str, str]]:
    """Rows of ``history.csv`` (strings)."""
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_history(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rewrite ``history.csv`` atomically (one header, one row per epoch)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in HISTORY_FIELDS})
    atomic_write_text(path, buf.getvalue())


# -- evaluation -----------------------------------------------------------------------------------


def amp_context(device: torch.device, enabled: bool, dtype: torch.dtype) -> AbstractContextManager:
    """Autocast on ``device`` when enabled."""
    return torch.autocast(device_type=device.type, dtype=dtype) if enabled else nullcontext()


def batch_tensors(batch: dict[str, Any], samples: Sequence[Sample], std: Standardizer, device: torch.device):
    """(model input, target in model space, pre_grid, post_grid) of a loader batch, on ``device``."""
    s = samples[int(batch["index"][0])]
    post = batch["post"].to(device, non_blocking=True)
    pre = batch["pre"].to(device, non_blocking=True)
    return std.post_in(post), std.pre_in(pre), s.pre_grid, s.post_grid


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    samples: Sequence[Sample],
    std: Standardizer,
    device: torch.device,
    batch_size: int,
    amp: AbstractContextManager | None = None,
    num_workers: int = 0,
    loader: Iterable[dict[str, Any]] | None = None,
) -> float:
    """MSE over every element of ``samples`` in the standardised E_pre space (``loader``: reuse one over them)."""
    if loader is None:
        loader, _ = make_loader(samples, batch_size, False, 0, num_workers, pin=device.type == "cuda")
    model.eval()
    sse = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for batch in loader:
        x, y, pg, qg = batch_tensors(batch, samples, std, device)
        with amp or nullcontext():
            yhat = model(x, pg, qg)
        if not std.enabled:  # the model works in the original space; score in the standardised one
            yhat, y = std.pre_metric(yhat), std.pre_metric(y)
        sse += F.mse_loss(yhat.float(), y, reduction="sum").double()
        n += y.numel()
    return float(sse) / max(n, 1)


# -- training -------------------------------------------------------------------------------------


class Trainer:
    """The SGD loop for mlp/transformer with checkpoints, early stopping and preemption."""

    def __init__(self, args, spec: ReconSpec, model: nn.Module, train: Sequence[Sample], val: Sequence[Sample],
                 std: Standardizer, out: Path, device: torch.device, meta: dict[str, Any], stop: StopFlag) -> None:
        self.args, self.spec, self.model, self.train, self.val = args, spec, model, train, val
        self.std, self.out, self.device, self.meta, self.stop = std, out, device, meta, stop
        self.amp_dtype = parse_dtype(args.amp_dtype)
        self.amp = lambda: amp_context(device, args.amp, self.amp_dtype)
        mode = resolve_loader(args.loader, [*train, *val], device)
        if mode == "workers":
            self.loader, self.sampler = make_loader(train, args.batch_size, True, args.seed, args.num_workers,
                                                    pin=device.type == "cuda")
            self.val_loader, _ = make_loader(val, args.batch_size, False, 0, args.num_workers, pin=device.type == "cuda")
        else:  # same batches, same order (vlmc.train.loader)
            self.loader, self.sampler = make_fast_loader(mode, train, args.batch_size, True, args.seed, device)
            self.val_loader, _ = make_fast_loader(mode, val, args.batch_size, False, 0, device)
        self.n_batches = len(plan_batches(train, args.batch_size))
        self.total_steps = steps_per_epoch(self.n_batches, args.accumulation_steps) * args.epochs
        self.opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, args.warmup_steps, self.total_steps))
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.amp and self.amp_dtype == torch.float16)
        self.state = {"epoch": 0, "batch": 0, "step": 0, "best_val": math.inf, "best_epoch": 0, "bad_epochs": 0,
                      "best_train": math.nan, "train_sse": 0.0, "train_n": 0, "epoch_seconds": 0.0, "finished": False}
        self.history: list[dict[str, Any]] = []
        self.wandb = None

    # checkpoints
    def save_last(self) -> None:
        """``last.pt``: everything to continue exactly from the last optimizer step."""
        atomic_torch_save({
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
            "state": dict(self.state), "rng": rng_state(), "spec": self.spec.to_dict(),
        }, self.out / LAST)

    def restore(self) -> bool:
        """Load ``last.pt`` if present; returns whether it did."""
        path = self.out / LAST
        if not path.exists():
            return False
        ck = safe_torch_load(path, mmap=False)
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        self.state.update(ck["state"])
        set_rng_state(ck["rng"])
        st = self.state  # last.pt is the commit point; best_model.pt follows it (vlmc.train.resume)
        repair_best(self.out / BEST, st, lambda: self.save_best(st["best_epoch"], st["best_train"], st["best_val"]))
        self.history = [r for r in read_history(self.out / HISTORY) if int(r["epoch"]) <= self.state["epoch"]]
        log.info("resumed from %s: epoch %d, batch %d, step %d, best val %.5f", path, self.state["epoch"] + 1,
                 self.state["batch"], self.state["step"], self.state["best_val"])
        return True

    def save_best(self, epoch: int, train_loss: float, val_loss: float) -> None:
        """``best_model.pt``: a copy of the weights at this (best) epoch."""
        ck = checkpoint(self.model, self.spec, epoch=epoch, train_loss=train_loss, val_loss=val_loss, **self.meta)
        atomic_torch_save(ck, self.out / BEST)

    # loop
    def run(self) -> int:
        """Train until ``--epochs``, early stop, or a stop signal (→ ``StopRequested``)."""
        self.restore()
        if self.state["finished"]:
            log.info("run already finished (best epoch %d, val %.5f)", self.state["best_epoch"], self.state["best_val"])
            return 0
        self.wandb = start_wandb(self.args, self.out, self.spec)
        try:
            while self.state["epoch"] < self.args.epochs and not self.state["finished"]:
                self._epoch()
        finally:
            if self.wandb is not None:
                self.wandb.finish()
        log.info("done: best epoch %d, val_loss %.6f → %s", self.state["best_epoch"], self.state["best_val"], self.out / BEST)
        return 0

    def _epoch(self) -> None:
        st, args = self.state, self.args
        epoch = st["epoch"] + 1
        train_loss = self._train_epoch(epoch)  # adds its own time to st["epoch_seconds"]
        t0 = time.time()
        val_loss = evaluate_loss(self.model, self.val, self.std, self.device, args.batch_size, self.amp(),
                                 loader=self.val_loader)
        seconds = st["epoch_seconds"] + time.time() - t0
        lr = self.opt.param_groups[0]["lr"]
        improved = val_loss < st["best_val"] - args.min_delta
        if improved:
            st.update(best_val=val_loss, best_epoch=epoch, bad_epochs=0, best_train=train_loss)
        else:
            st["bad_epochs"] += 1
        self.history.append({"epoch": epoch, "train_loss": f"{train_loss:.6g}", "val_loss": f"{val_loss:.6g}",
                             "lr": f"{lr:.6g}", "seconds": f"{seconds:.2f}"})
        write_history(self.out / HISTORY, self.history)
        stop_early = bool(args.patience) and st["bad_epochs"] >= args.patience
        st.update(epoch=epoch, batch=0, train_sse=0.0, train_n=0, epoch_seconds=0.0,
                  finished=stop_early or epoch >= args.epochs)
        self.save_last()  # first: the commit point, then the best copy (a kill between is repaired on resume)
        if improved:
            self.save_best(epoch, train_loss, val_loss)
        log.info("epoch %d: train %.5f val %.5f lr %.3g %.1fs%s", epoch, train_loss, val_loss, lr, seconds,
                 " (best)" if improved else "")
        if self.wandb is not None:
            self.wandb.log({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": lr}, step=st["step"])
        if stop_early:
            log.info("early stop: no improvement > %g for %d epochs", args.min_delta, args.patience)
        if self.stop and not st["finished"]:
            raise StopRequested()

    def _train_epoch(self, epoch: int) -> float:
        st, args = self.state, self.args
        self.model.train()
        self.sampler.set_epoch(epoch, start=st["batch"])
        t0, sse = time.time(), torch.zeros((), dtype=torch.float64, device=self.device)
        bar = tqdm(self.loader, desc=f"epoch {epoch}", initial=st["batch"], total=self.n_batches,
                   unit="batch", file=sys.stderr, disable=None, leave=False)
        try:
            for batch in bar:
                sse += self._micro_step(batch)
                if self._at_boundary():
                    self._optimizer_step()
                    if self.stop or (args.save_every_steps and st["step"] % args.save_every_steps == 0):
                        st["train_sse"] += float(sse)
                        sse.zero_()
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
        st["train_sse"] += float(sse)
        st["epoch_seconds"] += time.time() - t0
        loss = st["train_sse"] / max(st["train_n"], 1)
        if not math.isfinite(loss):
            raise UsageError(f"training diverged at epoch {epoch} (loss {loss}); lower --lr or use --amp_dtype bf16")
        return loss

    def _micro_step(self, batch: dict[str, Any]) -> Tensor:
        st, accum = self.state, self.args.accumulation_steps
        group_start = (st["batch"] // accum) * accum
        group = min(accum, self.n_batches - group_start)
        x, y, pg, qg = batch_tensors(batch, self.train, self.std, self.device)
        with self.amp():
            yhat = self.model(x, pg, qg)
        loss = F.mse_loss(yhat.float(), y)
        self.scaler.scale(loss / group).backward()
        st["batch"] += 1
        st["train_n"] += y.numel()
        return loss.detach().double() * y.numel()

    def _at_boundary(self) -> bool:
        b = self.state["batch"]
        return b % self.args.accumulation_steps == 0 or b == self.n_batches

    def _optimizer_step(self) -> None:
        if self.args.grad_clip:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.state["step"] += 1


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not biases, norms, positions, means)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "pos" not in name and "mean" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


def start_wandb(args, out: Path, spec: ReconSpec) -> Tracker | None:
    """A W&B run (:mod:`vlmc.utils.tracking`; resumable, under ``<out>/wandb``), or ``None`` when off."""
    t = tracking.start(args, out, args.run_name or out.name, {**vars(args), "spec": spec.to_dict()}, job_type="train")
    return t if t.run is not None else None


# -- linear ---------------------------------------------------------------------------------------


def run_linear(args, spec: ReconSpec, model: nn.Module, train: Sequence[Sample], val: Sequence[Sample],
               std: Standardizer, out: Path, device: torch.device, meta: dict[str, Any], stop: StopFlag) -> int:
    """Closed-form ridge fit (one pass over the training set; none: ALS passes), one history row."""
    if args.resume and (out / BEST).exists():
        log.info("linear reconstructor already fitted: %s", out / BEST)
        return 0
    t0 = time.time()
    meta["linear_fit"] = fit_linear(model, _batches_of(train, std, device, args, stop), device, log.info,
                                    val_batches=_batches_of(val, std, device, args, stop))
    train_loss = evaluate_loss(model, train, std, device, args.batch_size, num_workers=args.num_workers)
    val_loss = evaluate_loss(model, val, std, device, args.batch_size, num_workers=args.num_workers)
    atomic_torch_save(checkpoint(model, spec, epoch=1, train_loss=train_loss, val_loss=val_loss, **meta), out / BEST)
    write_history(out / HISTORY, [{"epoch": 1, "train_loss": f"{train_loss:.6g}", "val_loss": f"{val_loss:.6g}",
                                   "lr": "0", "seconds": f"{time.time() - t0:.2f}"}])
    log.info("linear: train %.5f val %.5f (%.1fs) → %s", train_loss, val_loss, time.time() - t0, out / BEST)
    return 0


def _batches_of(samples, std, device, args, stop) -> Callable[[], Iterator[tuple[Tensor, Tensor, Any, Any]]]:
    """A re-iterable source of standardised batches (one call per pass of the linear fit)."""
    return lambda: _standardised_batches(samples, std, device, args, stop)


def _standardised_batches(samples, std, device, args, stop) -> Iterator[tuple[Tensor, Tensor, Any, Any]]:
    loader, _ = make_loader(samples, max(args.batch_size, 32), False, 0, args.num_workers, pin=device.type == "cuda")
    for batch in tqdm(loader, desc="linear fit pass", unit="batch", file=sys.stderr, disable=None, leave=False):
        if stop:
            raise StopRequested()
        yield batch_tensors(batch, samples, std, device)


# -- main -----------------------------------------------------------------------------------------


@torch.no_grad()
def mean_baseline_loss(samples: Sequence[Sample], std: Standardizer, device: torch.device, batch_size: int) -> float:
    """Val MSE of predicting the train mean (0 in the standardised space): the fraction-of-variance yardstick."""
    loader, _ = make_loader(samples, batch_size, False, 0, 0, pin=False)
    sse, n = 0.0, 0
    for batch in loader:
        z = std.pre_metric(batch["pre"].to(device))
        sse += float((z.double() ** 2).sum())
        n += z.numel()
    return sse / max(n, 1)


def run_meta(args, store: Store, split: dict, out: Path) -> dict[str, Any]:
    """Facts recorded in ``best_model.pt``'s meta besides the spec."""
    return {"normalize": args.normalize, "embed_model": store.model, "store": store_facts(store),
            "n_train": len(split["train"]), "n_val": len(split["val"]),
            "stats_sha256": sha256_file(out / STATS_FILE), "seed": args.seed}


def eval_only(out: Path, val: Sequence[Sample], std_of: Callable[[bool], Standardizer], device, args) -> int:
    """Score best_model.pt on the saved val split; writes ``eval_only.json`` (stats untouched)."""
    model, spec, meta = load_reconstructor(out, device)
    std = std_of(meta.get("normalize", True))
    amp = amp_context(device, args.amp, parse_dtype(args.amp_dtype))
    val_loss = evaluate_loss(model, val, std, device, args.batch_size, amp, args.num_workers)
    result = {"val_loss": val_loss, "n_val": len(val), "best_epoch": meta.get("epoch"),
              "best_val_loss_at_training": meta.get("val_loss"), "model_type": spec.model_type}
    atomic_write_json(out / EVAL_ONLY, result)
    print(f"val_loss {val_loss:.6f} on {len(val)} held-out images (best epoch {meta.get('epoch')})")
    return 0


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_read_level("hash")  # every chunk's sha256: ~1 % of a training run (bench/bench_verify.py)
    check_args(args)
    with StopFlag() as stop:
        return run(args, stop)


def run(args, stop: StopFlag) -> int:
    """Open the store, split, stats; then train, or evaluate with --eval_only."""
    device = resolve_device(args.device)
    store = open_store(args.vec_dir if args.pre_dir is None else None, args.pre_dir, args.post_dir,
                       args.embed_model, parse_csv_list(args.shards) or None)
    args.out_dir = args.out_dir or f"data/output/recon/{store.model}_{args.model_type}"
    out = prepare_out_dir(args)
    if args.resume:
        check_config(out, args, None)
    samples = index_samples(store, args.limit)
    split = load_or_make_split(out, args, samples)
    train, val = apply_split(samples, split, "train"), apply_split(samples, split, "val")
    try:
        stats = load_or_make_stats(out, train, device, args, stop)
        if args.eval_only:
            return eval_only(out, val, lambda on: Standardizer(stats, device, on), device, args)
        return _train(args, store, samples, split, train, val, stats, out, device, stop)
    except (StopRequested, InterruptedError):
        log.warning("stopped by signal; rerun with --resume to continue (exit %d)", EXIT_PREEMPTED)
        return EXIT_PREEMPTED


def _train(args, store, samples, split, train, val, stats, out, device, stop) -> int:
    spec = spec_from_args(args, store, samples)
    check_config(out, args, spec)
    write_config(out, args, spec, store)
    torch.manual_seed(args.seed)
    model = build_reconstructor(spec).to(device)
    log.info("%s; %d train / %d val images; device %s", describe(spec, model), len(train), len(val), device)
    std = Standardizer(stats, device, args.normalize)
    meta = run_meta(args, store, split, out)
    meta["mean_baseline_val_loss"] = mean_baseline_loss(val, std, device, max(args.batch_size, 32))
    log.info("val loss of predicting the train mean: %.5f", meta["mean_baseline_val_loss"])
    if spec.model_type == "linear":
        return run_linear(args, spec, model, train, val, std, out, device, meta, stop)
    if args.init_linear and spec.skip and not (out / LAST).exists():
        log.info("initialising the linear path with the closed-form ridge fit")
        meta["linear_init"] = fit_linear(model, _batches_of(train, std, device, args, stop), device, log.info,
                                         val_batches=_batches_of(val, std, device, args, stop))
    return Trainer(args, spec, model, train, val, std, out, device, meta, stop).run()


if __name__ == "__main__":
    sys.exit(main())
