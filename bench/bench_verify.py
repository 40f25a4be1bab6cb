"""What store verification costs, as a ratio to the time of the stage that pays it (issue #17: goal ≤ 5 %).

* **resume** (stage 1 ``--skip_existing``): the full check of every committed chunk (size, sha256, load,
  keys/rows, pre/post keys: ``adoptable_chunks``), timed directly, over the time the stage took to write
  that store (tiny LLaVA on rendered scenes: a small model, so a pessimistic ratio).
* **read** (stages 3, 4, 6 on a synthetic store of ``--n`` images, ``--grid``² tokens of ``--d_pre`` /
  ``--d_post`` channels, fp16): the stage's wall time with ``VLMC_VERIFY=hash`` (size + sha256 + content +
  finite, the default) over ``VLMC_VERIFY=size`` (no hash), repeats interleaved, best of each; and the
  cost of hashing every file read, timed alone, over the stage's time.

    python bench/bench_verify.py
    python bench/bench_verify.py --n 512 --grid 24 --d_pre 1024 --d_post 1024 --repeats 3
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from vlmc.data.scenes import write_scenes
from vlmc.eval import eval_recon
from vlmc.extract import extract_knn, extract_vectors
from vlmc.store.verify import adoptable_chunks
from vlmc.train import train_recon
from vlmc.utils import cli
from vlmc.utils.io import read_json, sha256_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests/synthetic_store.py
from tests.synthetic_store import synthetic_connector, write_synthetic_store  # noqa: E402


def parse_args():
    p = cli.make_parser(__doc__)
    p.add_argument("--n", type=cli.positive_int, default=256, help="images in the synthetic read store")
    p.add_argument("--grid", type=cli.positive_int, default=16, help="pre grid side (tokens = grid²)")
    p.add_argument("--d_pre", type=cli.positive_int, default=512, help="E_pre channels")
    p.add_argument("--d_post", type=cli.positive_int, default=512, help="E_post channels")
    p.add_argument("--n_images", type=cli.positive_int, default=48, help="rendered images for the stage-1 resume case")
    p.add_argument("--repeats", type=cli.positive_int, default=3, help="interleaved repeats per variant (best is kept)")
    p.add_argument("--dir", default=None, help="work folder (default: a temp dir, removed after)")
    return p.parse_args()


def timed(fn) -> float:
    """Seconds ``fn()`` takes (its stdout/stderr swallowed); it must return 0."""
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = fn()
    assert rc == 0, f"stage failed ({rc})"
    return time.perf_counter() - t0


def hash_seconds(folder: Path) -> float:
    """Seconds to sha256 every chunk file under ``folder`` (page cache warm, as in the stages)."""
    t0 = time.perf_counter()
    for p in sorted(folder.rglob("*_vectors_*.pt")):
        sha256_file(p)
    return time.perf_counter() - t0


def resume_case(work: Path, n_images: int, repeats: int) -> tuple[float, float]:
    """(stage-1 seconds for the store, seconds to verify it for a resume)."""
    write_scenes(work / "img" / "00000", n=n_images, seed=0, size=64)
    argv = ["--root", str(work / "img"), "--models", "llava", "--model-path", "tiny", "--batch_size", "8",
            "--save_every", "16", "--num_workers", "0", "--device", "cpu"]
    stage = min(timed(lambda r=r: extract_vectors.main([*argv, "--out_dir", str(work / f"v{r}")])) for r in range(repeats))
    shard = work / "v0" / "llava" / "00000"
    manifest = read_json(shard / "manifest.json")
    verify = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        kept, _ = adoptable_chunks(shard, manifest)
        verify.append(time.perf_counter() - t0)
        assert len(kept) == len(manifest["chunks"])
    return stage, min(verify)


def read_cases(work: Path, args) -> dict[str, tuple[float, float, float]]:
    """Stage → (seconds with hash, seconds without, seconds of hashing alone)."""
    keys = [f"{i:09d}" for i in range(args.n)]
    vec = work / "store" / "synth"
    write_synthetic_store(vec, synthetic_connector("gelu", args.d_pre, args.d_post), "1:1", (args.grid, args.grid),
                          args.d_pre, {"00000": keys}, save_every=64, store_dtype=torch.float16)
    model = work / "recon"
    recon = ["--vec_dir", str(vec), "--out_dir", str(model), "--model_type", "mlp", "--hidden_size", "256", "--epochs", "1",
             "--batch_size", "16", "--num_workers", "0", "--device", "cpu"]
    stages = {
        "3 extract_knn": lambda: extract_knn.main(["--pre_pt", str(vec), "--post_pt", str(vec), "--out_dir",
                                                   str(work / "knn"), "--k", "10", "--device", "cpu"]),
        "3 extract_knn --svd_per_image_csv": lambda: extract_knn.main(
            ["--pre_pt", str(vec), "--post_pt", str(vec), "--out_dir", str(work / "knn2"), "--k", "10", "--device", "cpu",
             "--svd_per_image_csv"]),
        "4 train_recon mlp, 1 epoch": lambda: (shutil.rmtree(model, ignore_errors=True), train_recon.main(recon))[1],
        "6 eval_recon --no_reproj": lambda: eval_recon.main(["--model_dir", str(model), "--out_dir", str(work / "ev"),
                                                             "--no_reproj", "--num_workers", "0", "--device", "cpu"]),
    }
    best: dict[str, dict[str, float]] = {name: {"hash": float("inf"), "size": float("inf")} for name in stages}
    for r in range(args.repeats + 1):  # repeat 0 warms caches and imports
        for name, fn in stages.items():
            for level in (("hash", "size") if r % 2 else ("size", "hash")):
                os.environ["VLMC_VERIFY"] = level
                if name.startswith("6"):
                    shutil.rmtree(work / "ev", ignore_errors=True)
                t = timed(fn)
                if r:
                    best[name][level] = min(best[name][level], t)
    os.environ.pop("VLMC_VERIFY", None)
    h = min(hash_seconds(vec) for _ in range(args.repeats))
    return {name: (b["hash"], b["size"], h) for name, b in best.items()}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_verify_"))
    try:
        stage, verify = resume_case(work / "resume", args.n_images, args.repeats)
        print(f"stage-1 resume ({args.n_images} images, tiny llava): extraction {stage:.2f} s, verifying every chunk "
              f"{verify * 1000:.1f} ms = {100 * verify / stage:.2f} % of the stage")
        size_mb = sum(p.stat().st_size for p in (work / "resume").rglob("v0/**/*.pt")) / 2**20
        print(f"  store {size_mb:.1f} MiB")
        cases = read_cases(work / "read", args)
        mb = sum(p.stat().st_size for p in (work / "read" / "store").rglob("*.pt")) / 2**20
        print(f"read ({args.n} images, {args.grid}x{args.grid} tokens, d_pre {args.d_pre}, d_post {args.d_post}, fp16,"
              f" {mb:.0f} MiB; best of {args.repeats}):")
        print("| stage | s, VLMC_VERIFY=hash | s, VLMC_VERIFY=size | hash/size | sha256 of the store alone / stage (size) |")
        print("|---|---|---|---|---|")
        for name, (th, ts, h) in cases.items():
            print(f"| {name} | {th:.2f} | {ts:.2f} | {th / ts:.3f} | {100 * h / ts:.1f} % |")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
