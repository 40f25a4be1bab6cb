"""Stage-4 training throughput: --amp off vs on, and how much of a step waits for data from mmap'd shards.

Writes a synthetic stage-1 store (fp16 chunks, a GELU connector) to a temp dir, then runs the real
``vlmc.train.loop`` backward / optimizer-step code (on the reconstructor's task) for each (model type, amp, loader), the loaders being
``--loader`` of ``train_recon.py``: ``workers=N`` (DataLoader with N worker processes, one row per
``--workers`` value), ``prefetch`` (a background thread gathering into pinned memory on CUDA) and
``device`` (the split held in device memory):

* ``img/s``     training images per second (median step) (forward + backward + AdamW step, standardisation on device);
* ``wait %``    share of the step spent waiting for the next batch (``next(loader)`` + host→device copy);
                the goal is ≤ 10 % (≥ 90 % compute);
* ``vs RAM``    img/s relative to the same steps on batches already in memory on the device (the
                ceiling: no loader at all), measured in the same run.

    python bench/bench_train.py                       # CPU defaults: small LLaVA-like shapes
    python bench/bench_train.py --device cuda --grid 24 --d_pre 1024 --d_post 4096 --n 512 --batch_size 32 \
        --model_types mlp --workers 0 --loaders workers,prefetch,device
"""

from __future__ import annotations

import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vlmc.models.reconstructors import build_reconstructor, count_params, make_spec
from vlmc.store.normalization import Standardizer, compute_stats
from vlmc.store.reader import index_samples, open_store
from vlmc.train.loop import Loop
from vlmc.train.train_recon import ReconTask, StopFlag, batch_tensors, build_parser
from vlmc.utils.cli import make_parser, parse_csv_list, resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests/synthetic_store.py
from tests.synthetic_store import synthetic_connector, write_synthetic_store  # noqa: E402


def parse_args():
    p = make_parser(__doc__)
    p.add_argument("--n", type=int, default=256, help="images in the synthetic store")
    p.add_argument("--grid", type=int, default=12, help="pre grid side (tokens = grid²)")
    p.add_argument("--d_pre", type=int, default=128, help="E_pre channels")
    p.add_argument("--d_post", type=int, default=256, help="E_post channels")
    p.add_argument("--batch_size", type=int, default=16, help="images per step")
    p.add_argument("--steps", type=int, default=15, help="timed steps per configuration (after 3 warm-up steps); medians are reported")
    p.add_argument("--model_types", default="mlp,transformer", help="comma list")
    p.add_argument("--workers", default="0,2", help="comma list of DataLoader worker counts (loader 'workers')")
    p.add_argument("--loaders", default="workers,prefetch,device", help="comma list of --loader values to time")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--dir", default=None, help="where to write the store (default: a temp dir, removed after)")
    return p.parse_args()


def loader_configs(a) -> list[tuple[str, int]]:
    """(``--loader``, ``--num_workers``) per timed row: one per worker count for ``workers``, else one."""
    out = []
    for loader in parse_csv_list(a.loaders):
        if loader == "workers":
            out += [("workers", int(w)) for w in parse_csv_list(a.workers)]
        else:
            out.append((loader, 0))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_trainer(store_dir: Path, out: Path, model_type: str, amp: bool, loader: str, workers: int, bs: int, device,
                 samples, std):
    """A real training loop on ``samples`` (no validation; we only time the training step)."""
    argv = ["--vec_dir", str(store_dir), "--out_dir", str(out), "--model_type", model_type, "--batch_size", str(bs),
            "--num_workers", str(workers), "--epochs", "100", "--warmup_steps", "0", "--loader", loader]
    if model_type == "transformer":
        argv += ["--hidden_size", "128", "--num_heads", "4", "--num_layers", "2"]
    else:
        argv += ["--hidden_size", "512"]
    if amp:
        argv += ["--amp", "--amp_dtype", "bf16"]
    args = build_parser().parse_args(argv)
    s = samples[0]
    spec = make_spec(model_type, open_store(store_dir).correspondence, std.pre_mean.numel(), std.post_mean.numel(),
                     s.pre_grid, s.post_grid, hidden_size=args.hidden_size, num_heads=args.num_heads,
                     num_layers=args.num_layers)
    torch.manual_seed(0)
    model = build_reconstructor(spec).to(device)
    task = ReconTask(args, spec, model, samples, samples[:1], std, device, {})
    return Loop(args, task, out, StopFlag(), logging.getLogger("bench_train")), count_params(model)


def time_loader(trainer: Loop, steps: int, device) -> tuple[float, float]:
    """Median (step seconds, data-wait seconds) over ``steps`` optimizer steps after 3 warm-up steps.

    Medians, not sums: this machine is shared, and one descheduled step must not decide the table.
    """
    task = trainer.task
    task.model.train()
    task.sampler.set_epoch(1)
    it = iter(task.loader)
    waits, totals = [], []
    for i in range(steps + 3):
        sync(device)
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(task.loader)
            batch = next(it)
        x, y, pg, qg = batch_tensors(batch, task.train, task.std, device)
        sync(device)
        t1 = time.perf_counter()
        _step(trainer, x, y, pg, qg)
        sync(device)
        t2 = time.perf_counter()
        if i >= 3:
            waits.append(t1 - t0)
            totals.append(t2 - t0)
    return statistics.median(totals), statistics.median(waits)


def _step(trainer: Loop, x, y, pg, qg) -> None:
    with trainer.task.amp():
        yhat = trainer.task.model(x, pg, qg)
    trainer.backward(torch.nn.functional.mse_loss(yhat.float(), y))
    trainer.optimizer_step()


def time_in_memory(trainer: Loop, steps: int, device) -> float:
    """Median step seconds on one batch already on the device (the no-loader ceiling)."""
    task = trainer.task
    batch = next(iter(task.loader))
    x, y, pg, qg = batch_tensors(batch, task.train, task.std, device)
    for _ in range(3):
        _step(trainer, x, y, pg, qg)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        _step(trainer, x, y, pg, qg)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    a = parse_args()
    device = resolve_device(a.device)
    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        store_dir = root / "vec"
        t0 = time.perf_counter()
        write_synthetic_store(store_dir, synthetic_connector("gelu", a.d_pre, a.d_post), "1:1", (a.grid, a.grid), a.d_pre,
                              {"00000": [f"{i:09d}" for i in range(a.n)]}, save_every=64, store_dtype=torch.float16)
        samples = index_samples(open_store(store_dir))
        std = Standardizer(compute_stats(samples, device), device)
        print(f"store: {a.n} images, pre {a.grid * a.grid}x{a.d_pre}, post {a.grid * a.grid}x{a.d_post}, fp16, "
              f"{sum(p.stat().st_size for p in store_dir.rglob('*.pt')) / 1e6:.1f} MB, written in "
              f"{time.perf_counter() - t0:.1f} s; device {device}, torch threads {torch.get_num_threads()}, "
              f"batch {a.batch_size}, {a.steps} timed steps")
        header = (f"{'model':<12}{'params':>9}{'amp':>6}{'loader':>11}{'img/s':>9}{'step ms':>9}{'wait %':>8}"
                  f"{'RAM img/s':>11}{'vs RAM':>8}")
        print(header)
        print("-" * len(header))
        for mt in parse_csv_list(a.model_types):
            for amp in (False, True):
                for loader, w in loader_configs(a):
                    tr, n_params = make_trainer(store_dir, root / f"o_{mt}_{amp}_{loader}_{w}", mt, amp, loader, w,
                                                a.batch_size, device, samples, std)
                    total, wait = time_loader(tr, a.steps, device)
                    ram = time_in_memory(tr, a.steps, device)
                    ips, ram_ips = a.batch_size / total, a.batch_size / ram
                    name = f"workers={w}" if loader == "workers" else loader
                    print(f"{mt:<12}{n_params / 1e6:>8.2f}M{('bf16' if amp else 'off'):>6}{name:>11}{ips:>9.1f}"
                          f"{1000 * total:>9.1f}{100 * wait / total:>7.1f}%{ram_ips:>11.1f}{ips / ram_ips:>8.2f}",
                          flush=True)
                    del tr
    finally:
        if not a.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
