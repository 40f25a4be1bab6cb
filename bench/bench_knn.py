"""Benchmark exact self-kNN against the float32 GEMM floor and baselines, in one run on the same data.

Timed (each ``--repeats`` times, round-robin so machine load hits all alike; the minimum is reported):

* ``floor``   one blocked float32 ``X @ X.T`` (same block rows as the backends), nothing else;
* ``default`` ``vlmc.metrics.knn.knn(X, k)`` with ``backend="auto"``;
* ``torch``   the pure-torch backend;
* ``faiss``   the faiss IndexFlat backend;
* ``sklearn`` ``NearestNeighbors(algorithm="brute")`` asking k+1;
* ``naive``   chunked (1024 rows) torch ``matmul`` + ``topk(k+1)`` on full distance rows;
* ``torch256`` the torch backend with fixed 256 MiB tiles (the CPU default), against ``torch``'s
  automatic budget (on CUDA: from free device memory, ``auto_block_mb``).

``--device cuda`` runs X, the GEMM floor and the torch backends on the GPU (default methods there:
floor, default, torch, torch256, naive; faiss / sklearn are not needed), reads the clock after
``torch.cuda.synchronize()`` and reports each method's peak device memory. ``--block-mb 0`` (default)
is the automatic budget of ``vlmc.metrics.knn.auto_block_mb`` for the device.

``--peak-mem`` instead measures the peak RSS of a fresh subprocess that builds an
[``--peak-n``, ``--d``] float32 matrix and runs one backend on ``--peak-queries`` query rows against
all rows (the working set does not grow with the number of queries: tiles are reused; the [N, k]
outputs of a full run are added to the report), or with ``--peak-queries 0`` on all rows.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from vlmc.metrics.knn import _faiss, auto_block_mb, block_rows, knn, resolve_backend
from vlmc.utils.cli import UsageError, entry_point, make_parser, resolve_device
from vlmc.utils.io import atomic_write_json

METHODS = ("floor", "default", "torch", "faiss", "sklearn", "naive")
CUDA_METHODS = ("floor", "default", "torch", "torch256", "naive")


def gemm_floor(X: torch.Tensor, block_mb: float) -> None:
    """One blocked float32 ``X @ X.T`` (all N^2 entries, query blocks of ``block_mb`` MiB of output)."""
    n = X.shape[0]
    B = block_rows(n, block_mb)
    buf = torch.empty(min(B, n), n, device=X.device)
    for s in range(0, n, B):
        q = X[s : s + B]
        torch.mm(q, X.T, out=buf[: q.shape[0]])


def naive_knn(X: torch.Tensor, k: int, metric: str, chunk: int = 1024) -> np.ndarray:
    """Chunked matmul + topk(k+1) over full rows, self dropped afterwards (baseline)."""
    Xw = torch.nn.functional.normalize(X, dim=1) if metric == "cosine" else X
    sq = (Xw * Xw).sum(1)
    out = []
    for s in range(0, X.shape[0], chunk):
        q = Xw[s : s + chunk]
        d = sq[s : s + chunk, None] + sq[None, :] - 2 * (q @ Xw.T)
        out.append(d.topk(k + 1, dim=1, largest=False).indices[:, 1:])
    return torch.cat(out).cpu().numpy()


def sklearn_knn(X: np.ndarray, k: int, metric: str, threads: int) -> np.ndarray:
    """scikit-learn brute-force kNN (k+1, self dropped by position)."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", n_jobs=threads,
                          metric="euclidean" if metric == "l2" else "cosine").fit(X)
    return nn.kneighbors(X, return_distance=False)[:, 1:]


def time_once(fn: Callable[[], object], device: torch.device | None = None) -> tuple[float, float, object]:
    """Wall seconds, process CPU seconds (all threads) of one call, and its result (CUDA: synchronised)."""
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - t, time.process_time() - c, out


def row_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows whose neighbour sets are identical."""
    return float(np.mean((np.sort(a, 1) == np.sort(b, 1)).all(1)))


def run_timings(args) -> dict:
    """Time every requested method round-robin on one random matrix; return a results dict."""
    torch.set_num_threads(args.threads)
    faiss = _faiss()
    if faiss is not None:
        faiss.omp_set_num_threads(args.threads)
    dev = resolve_device(args.device)
    gen = torch.Generator(device=dev).manual_seed(args.seed)  # on the device: no host-side matrix to copy
    X = torch.randn(args.n, args.d, generator=gen, device=dev)
    Xnp = X.cpu().numpy() if dev.type == "cpu" else None
    block = args.block_mb or auto_block_mb(dev)
    auto = args.block_mb or None  # 0 → let knn() pick (the default path under test)

    def run(backend: str, mb: float | None) -> np.ndarray:
        return knn(X, args.k, metric=args.metric, backend=backend, device=dev, block_mb=mb).indices

    fns = {
        "floor": lambda: gemm_floor(X, block),
        "default": lambda: run("auto", auto),
        "torch": lambda: run("torch", auto),
        "torch256": lambda: run("torch", 256.0),
        "faiss": lambda: run("faiss", auto),
        "sklearn": lambda: sklearn_knn(Xnp, args.k, args.metric, args.threads),
        "naive": lambda: naive_knn(X, args.k, args.metric),
    }
    methods = [m for m in (args.methods or ",".join(CUDA_METHODS if dev.type == "cuda" else METHODS)).split(",") if m]
    if dev.type == "cuda" and "sklearn" in methods:
        raise UsageError("sklearn runs on the CPU only: drop it from --methods with --device cuda")
    times: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    peak: dict[str, float] = {}
    results: dict[str, object] = {}
    for r in range(args.repeats):
        for m in methods:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            dt, ct, out = time_once(fns[m], dev)
            if dev.type == "cuda":
                peak[m] = max(peak.get(m, 0.0), torch.cuda.max_memory_allocated(dev) / 2**30)
            times[m].append(dt)
            cpu[m].append(ct)
            results[m] = out
            print(f"  repeat {r + 1}/{args.repeats} {m:8s} {dt:8.2f} s wall {ct:8.2f} s cpu",
                  file=sys.stderr, flush=True)
    agree = {m: row_agreement(results["default"], results[m])
             for m in methods if m not in ("floor", "default") and "default" in results}
    return {"config": vars(args), "torch_threads": torch.get_num_threads(), "device": str(dev),
            "block_mb": block, "peak_device_gib": peak,
            "default_backend": resolve_backend("auto", dev),
            "seconds_min": {m: min(v) for m, v in times.items()},
            "cpu_seconds_min": {m: min(v) for m, v in cpu.items()},
            "seconds_all": times, "cpu_seconds_all": cpu, "rows_identical_to_default": agree}


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:8.2f}" if a is not None and b else "       -"


def print_table(res: dict) -> None:
    """Wall and CPU seconds, ratios to the GEMM floor, and the sklearn/default speed-up."""
    wall, cpu = res["seconds_min"], res["cpu_seconds_min"]
    c = res["config"]
    print(f"N={c['n']} D={c['d']} k={c['k']} metric={c['metric']} threads={res['torch_threads']} "
          f"device={res['device']} block={res['block_mb']:.0f} MiB "
          f"repeats={c['repeats']} default backend={res['default_backend']} (min over repeats)")
    print(f"{'method':10s} {'wall s':>8s} {'x floor':>8s} {'cpu s':>8s} {'x floor':>8s} {'rows = default':>15s}"
          f" {'peak GiB':>9s}")
    for m in wall:
        agree = res["rows_identical_to_default"].get(m)
        pk = res["peak_device_gib"].get(m)
        print(f"{m:10s} {wall[m]:8.2f} {_ratio(wall[m], wall.get('floor'))} {cpu[m]:8.2f} "
              f"{_ratio(cpu[m], cpu.get('floor'))} {'' if agree is None else f'{agree:15.4f}'}"
              f"{'' if pk is None else f' {pk:9.2f}'}")
    if "sklearn" in wall and "default" in wall:
        print(f"sklearn / default = {wall['sklearn'] / wall['default']:.2f}x wall, "
              f"{cpu['sklearn'] / cpu['default']:.2f}x cpu")


def peak_child(args) -> None:
    """Subprocess body: build the matrix, run one backend on a query subset, print RSS as JSON."""
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    X = torch.empty(args.peak_n, args.d)
    for s in range(0, args.peak_n, 8192):
        X[s : s + 8192] = torch.randn(min(8192, args.peak_n - s), args.d, generator=gen)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t = time.perf_counter()
    knn(X, args.k, metric=args.metric, backend=args._peak_child, block_mb=args.block_mb or None,
        query_idx=np.arange(args.peak_queries) if args.peak_queries > 0 else None)
    secs = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"backend": args._peak_child, "rss_after_data_gib": base, "peak_rss_gib": peak,
                      "seconds": secs}))


def run_peak(args) -> list[dict]:
    """Run ``peak_child`` in a fresh process per backend; collect its JSON line."""
    out = []
    for be in args.peak_backends.split(","):
        cmd = [sys.executable, __file__, "--_peak-child", be, "--d", str(args.d), "--k", str(args.k),
               "--metric", args.metric, "--peak-n", str(args.peak_n), "--peak-queries",
               str(args.peak_queries), "--threads", str(args.threads), "--block-mb", str(args.block_mb),
               "--seed", str(args.seed)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rec = json.loads(line)
        # outputs for all N queries (int64 indices + float32 distances) that a subset run did not hold
        rec["full_output_gib"] = 0.0 if args.peak_queries <= 0 else args.peak_n * args.k * 12 / 2**30
        print(f"{be:8s} N={args.peak_n} D={args.d} k={args.k}: data {rec['rss_after_data_gib']:.2f} GiB, "
              f"peak RSS {rec['peak_rss_gib']:.2f} GiB ({args.peak_queries or 'all'} queries in "
              f"{rec['seconds']:.1f} s); + {rec['full_output_gib']:.2f} GiB of outputs not held by a subset run")
        out.append(rec)
    return out


def build_parser():
    """CLI arguments; ``--help`` shows defaults."""
    p = make_parser(__doc__)
    p.add_argument("--n", type=int, default=20000, help="rows")
    p.add_argument("--d", type=int, default=1024, help="dimension")
    p.add_argument("--k", type=int, default=100, help="neighbours")
    p.add_argument("--metric", choices=("l2", "cosine"), default="l2")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per method (min reported)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch/faiss threads")
    p.add_argument("--block-mb", type=float, default=0.0,
                   help="score block size (MiB); 0: automatic (256 on CPU, from free memory on CUDA)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (X and the torch backends there)")
    p.add_argument("--methods", default=None,
                   help=f"comma list of {','.join(METHODS)},torch256 (default: all on cpu; {','.join(CUDA_METHODS)} on cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("--peak-mem", action="store_true", help="measure peak RSS instead of timing")
    p.add_argument("--peak-n", type=int, default=200_000, help="rows for --peak-mem")
    p.add_argument("--peak-queries", type=int, default=1024,
                   help="query rows run in --peak-mem (0: all rows, the symmetric full run)")
    p.add_argument("--peak-backends", default="torch,hybrid", help="backends for --peak-mem")
    p.add_argument("--_peak-child", help=argparse_suppress())
    return p


def argparse_suppress() -> str:
    """argparse's marker for an option hidden from --help."""
    import argparse

    return argparse.SUPPRESS


@entry_point
def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    if args._peak_child:
        peak_child(args)
        return 0
    if args.peak_mem:
        res = {"config": vars(args), "peak_mem": run_peak(args)}
    else:
        res = run_timings(args)
        print_table(res)
    if args.json:
        atomic_write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
