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
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from vlmc.models.reconstructors import (
    BEST,
    MODEL_TYPES,
    RIDGE_GRID,
    ReconSpec,
    build_reconstructor,
    checkpoint,
    describe,
    load_reconstructor,
    make_spec,
)
from vlmc.store.batches import make_loader, plan_batches
from vlmc.store.normalization import STATS_FILE, Standardizer, compute_stats, load_stats, save_stats
from vlmc.store.reader import Sample, Store, index_samples, open_store
from vlmc.store.split import SPLIT_FILE, apply_split, content_hashes, load_split, make_split, save_split
from vlmc.store.verify import set_read_level
from vlmc.train.linear_fit import fit_linear
from vlmc.train.loader import LOADERS, make_fast_loader, resolve_loader
from vlmc.train.loop import (
    CONFIG,
    HISTORY,
    LAST,
    Loop,
    Task,
    add_optim_args,
    amp_context,
    check_optim_args,
    flag_diffs,
    prepare_out_dir,
    refuse_other_settings,
    run_preemptible,
)
from vlmc.utils import cli
from vlmc.utils.cli import (
    UsageError,
    entry_point,
    make_parser,
    parse_csv_list,
    parse_dtype,
    resolve_device,
)
from vlmc.utils.io import (
    atomic_torch_save,
    atomic_write_json,
    read_json,
    sha256_file,
)
from vlmc.utils.rows import write_rows
from vlmc.utils.stop import StopFlag, StopRequested
from vlmc.utils.tracking import add_tracking_args

log = logging.getLogger("vlmc.train_recon")

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
    add_optim_args(p, epochs=20, lr=3e-4, warmup_steps=100, patience=5)
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
    check_optim_args(args, at_least_0=("limit", "num_workers"))


# -- run folder -----------------------------------------------------------------------------------


def store_args(args) -> dict[str, Any]:
    return {"vec_dir": args.vec_dir, "pre_dir": args.pre_dir, "post_dir": args.post_dir, "embed_model": args.embed_model}


def check_config(out: Path, args, spec: ReconSpec | None) -> None:
    """On resume: the saved config must match this run's data and model flags."""
    cfg_path = out / CONFIG
    if not cfg_path.exists():
        return
    cfg = read_json(cfg_path)
    diffs = flag_diffs(cfg["args"], args, (*DATA_FLAGS, "model_type"))
    if spec is not None and cfg.get("spec"):
        old = cfg["spec"]
        diffs += [f"{k} {old.get(k)!r} → {v!r}" for k, v in spec.to_dict().items() if k in SPEC_FLAGS and old.get(k) != v]
    refuse_other_settings(out, diffs)


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


# -- evaluation -----------------------------------------------------------------------------------


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


class ReconTask(Task):
    """The reconstructor's part of the loop (vlmc.train.loop): batches of standardised (E_post, E_pre), MSE."""

    history_fields = HISTORY_FIELDS
    counters = {"train_sse": 0.0, "train_n": 0}

    def __init__(self, args, spec: ReconSpec, model: nn.Module, train: Sequence[Sample], val: Sequence[Sample],
                 std: Standardizer, device: torch.device, meta: dict[str, Any]) -> None:
        self.args, self.spec, self.model, self.train, self.val = args, spec, model, train, val
        self.std, self.device, self.meta, self.lr = std, device, meta, args.lr
        amp_dtype = parse_dtype(args.amp_dtype)
        self.amp = lambda: amp_context(device, args.amp, amp_dtype)
        mode = resolve_loader(args.loader, [*train, *val], device)
        if mode == "workers":
            self.loader, self.sampler = make_loader(train, args.batch_size, True, args.seed, args.num_workers,
                                                    pin=device.type == "cuda")
            self.val_loader, _ = make_loader(val, args.batch_size, False, 0, args.num_workers, pin=device.type == "cuda")
        else:  # same batches, same order (vlmc.train.loader)
            self.loader, self.sampler = make_fast_loader(mode, train, args.batch_size, True, args.seed, device)
            self.val_loader, _ = make_fast_loader(mode, val, args.batch_size, False, 0, device)
        self.n_batches = len(plan_batches(train, args.batch_size))
        self.sse = torch.zeros((), dtype=torch.float64, device=device)  # the epoch's SSE since the last flush

    def loss(self, batch: dict[str, Any], state: dict[str, Any]) -> Tensor:
        """MSE of one micro-batch in the model space."""
        x, y, pg, qg = batch_tensors(batch, self.train, self.std, self.device)
        with self.amp():
            yhat = self.model(x, pg, qg)
        loss = F.mse_loss(yhat.float(), y)
        state["train_n"] += y.numel()
        self.sse += loss.detach().double() * y.numel()
        return loss

    def flush(self, state: dict[str, Any]) -> None:
        """Add the device-side SSE to ``state["train_sse"]``."""
        state["train_sse"] += float(self.sse)
        self.sse.zero_()

    def train_metrics(self, state: dict[str, Any]) -> dict[str, float]:
        """The epoch's training MSE."""
        return {"train_loss": state["train_sse"] / max(state["train_n"], 1)}

    def validate(self) -> dict[str, float]:
        """Validation MSE in the standardised space."""
        return {"val_loss": evaluate_loss(self.model, self.val, self.std, self.device, self.args.batch_size,
                                          self.amp(), loader=self.val_loader)}

    def describe(self, metrics: Mapping[str, float]) -> str:
        """``train … val …`` of the epoch log line."""
        return f"train {metrics['train_loss']:.5f} val {metrics['val_loss']:.5f}"

    def best_checkpoint(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """``best_model.pt``: the current weights as the best epoch's."""
        return checkpoint(self.model, self.spec, epoch=state["best_epoch"], train_loss=state["best_train"],
                          val_loss=state["best_val"], **self.meta)


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
    write_rows(out / HISTORY, [{"epoch": 1, "train_loss": f"{train_loss:.6g}", "val_loss": f"{val_loss:.6g}",
                                   "lr": "0", "seconds": f"{time.time() - t0:.2f}"}], HISTORY_FIELDS)
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
    return run_preemptible(lambda stop: run(args, stop), log)


def run(args, stop: StopFlag) -> int:
    """Open the store, split, stats; then train, or evaluate with --eval_only."""
    device = resolve_device(args.device)
    store = open_store(args.vec_dir if args.pre_dir is None else None, args.pre_dir, args.post_dir,
                       args.embed_model, parse_csv_list(args.shards) or None)
    args.out_dir = args.out_dir or f"data/output/recon/{store.model}_{args.model_type}"
    out = prepare_out_dir(args, RUN_FILES)
    if args.resume:
        check_config(out, args, None)
    samples = index_samples(store, args.limit)
    split = load_or_make_split(out, args, samples)
    train, val = apply_split(samples, split, "train"), apply_split(samples, split, "val")
    stats = load_or_make_stats(out, train, device, args, stop)
    if args.eval_only:
        return eval_only(out, val, lambda on: Standardizer(stats, device, on), device, args)
    return _train(args, store, samples, split, train, val, stats, out, device, stop)


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
    task = ReconTask(args, spec, model, train, val, std, device, meta)
    return Loop(args, task, out, stop, log).run()


if __name__ == "__main__":
    sys.exit(main())
