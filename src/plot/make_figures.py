"""Regenerate every figure and table from one stage-output tree, in one process (one torch import).

Runs, for the stage folders present under ``--in_dir`` (vlmc.plot.data describes the layout):

    knn_out/                      plot_knn
    captions/ with drop columns   plot_caption_recon, plot_caption_recon_pre (the latter needs recon_eval/)
    knn_out/ with effective ranks plot_erank_vs_clip (and CLIPScores from captions/ or perturb_out/)
    perturb_out(_scored)/         plot_perturb --perturb <each mode found> --mode drop|score
    recon_eval/*/loss_maps.pt     plot_recon_maps
    any of them                   compute_summary

A step whose inputs are absent is skipped (logged); a step that fails is reported and the exit status
is 1 after all steps ran. Steps run in ``--jobs`` forked worker processes (modules are imported once,
before the fork). ``make figures`` calls this through scripts/figures.sh.

Example:
    python src/plot/make_figures.py --in_dir sample --out_dir figures --results_dir results
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import time
import traceback
from pathlib import Path

import scipy.stats  # noqa: F401  (imported once here, before the workers fork)

from vlmc.plot import (
    compute_summary,
    plot_caption_recon,
    plot_caption_recon_pre,
    plot_erank_vs_clip,
    plot_knn,
    plot_perturb,
    plot_recon_maps,
)
from vlmc.plot.common import require_dir
from vlmc.plot.data import SUBDIRS, find_stage_dir, perturb_modes
from vlmc.utils import cli
from vlmc.utils.cli import UsageError, entry_point, make_parser

log = logging.getLogger("vlmc.plot.make_figures")


def has_column(files, prefixes: tuple[str, ...]) -> bool:
    """Whether any CSV in ``files`` has a header column starting with one of ``prefixes``."""
    for f in files:
        with open(f, encoding="utf-8") as fh:
            if any(c.strip().startswith(prefixes) for c in fh.readline().split(",")):
                return True
    return False


def plan(in_dir: Path, out: list[str], res: list[str]) -> list[tuple[str, str, list[str]]]:
    """(name, module name, argv) of every step whose inputs exist, the slowest first."""
    dirs = {s: find_stage_dir(in_dir, s) for s in SUBDIRS}
    have = {s: d.is_dir() for s, d in dirs.items()}
    caps = sorted(dirs["captions"].rglob("captions_*.csv")) if have["captions"] else []
    pims = sorted(dirs["knn"].glob("*/per_image.csv")) if have["knn"] else []
    base = ["--in_dir", str(in_dir)]
    steps = []
    if have["knn"]:
        steps.append(("plot_knn", plot_knn, base + out))
    if has_column(caps, ("clipscore_drop", "bertscore_drop")):  # captions of reconstructions, scored
        steps.append(("plot_caption_recon", plot_caption_recon, base + out + res))
        if have["recon"]:
            steps.append(("plot_caption_recon_pre", plot_caption_recon_pre, base + out + res))
    root_knn = in_dir / "knn_root"  # pipeline EVAL_ROOT: knn_out is the evaluation set, knn_root the captioned images
    if root_knn.is_dir():
        pims = sorted(root_knn.glob("*/per_image.csv"))
    if has_column(pims, ("post_effective_rank", "post_erank")) and (caps or have["perturb"]):  # extract_knn --svd_per_image_csv
        steps.append(("plot_erank_vs_clip", plot_erank_vs_clip, base + out + res
                      + (["--knn_dir", str(root_knn)] if root_knn.is_dir() else [])))
    if have["perturb"]:
        for mode in perturb_modes(dirs["perturb"]):
            for kind in ("drop", "score"):
                steps.append((f"plot_perturb {mode} {kind}", plot_perturb,
                              base + out + ["--perturb", mode, "--mode", kind]))
    if have["recon"] and any(dirs["recon"].glob("*/loss_maps.pt")):
        steps.append(("plot_recon_maps", plot_recon_maps, base + out))
    if any(have[s] for s in ("knn", "recon", "captions", "perturb")):
        steps.append(("compute_summary", compute_summary, base + res))
    slow = ("plot_caption_recon", "plot_caption_recon_pre", "plot_knn", "plot_recon_maps")
    steps.sort(key=lambda st: slow.index(st[0]) if st[0] in slow else len(slow))  # stable: others keep order
    return [(name, module.__name__, argv) for name, module, argv in steps]


def run_step(step) -> tuple[str, int, float, float]:
    """Run one step; a crash (a bug, not a user error) is logged with its traceback and counted as failed."""
    name, module, argv = step
    t, cpu = time.perf_counter(), time.process_time()
    try:
        rc = sys.modules[module].main(argv)  # imported at the top, before any fork
    except Exception:  # keep the other steps going; the traceback says what broke
        log.error("%s crashed:\n%s", name, traceback.format_exc())
        rc = 1
    return name, rc, time.perf_counter() - t, time.process_time() - cpu


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--in_dir", default="sample", help="stage outputs to read")
    cli.add_out_dir_arg(p, default="figures", help="where figures are written")
    p.add_argument("--results_dir", default="results", help="where tables are written")
    p.add_argument("--pdf", action="store_true", help="also write every figure as PDF")
    p.add_argument("--dpi", type=int, default=None, help="PNG resolution (default: each CLI's)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (1 = run in this process)")
    return p


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.jobs < 1:
        raise UsageError("--jobs must be >= 1")
    in_dir = require_dir(args.in_dir, "--in_dir")
    out = ["--out_dir", args.out_dir] + (["--pdf"] if args.pdf else []) + (["--dpi", str(args.dpi)] if args.dpi else [])
    steps = plan(in_dir, out, ["--results_dir", args.results_dir])
    if not steps:
        names = ", ".join("|".join(v) for k, v in SUBDIRS.items() if k != "images")
        raise UsageError(f"{in_dir}: none of the stage folders {names}")
    for s in ("knn", "recon", "captions", "perturb"):
        if not find_stage_dir(in_dir, s).is_dir():
            log.warning("%s: no %s folder; figures needing it are skipped", in_dir, "|".join(SUBDIRS[s]))
    t0 = time.perf_counter()
    if args.jobs == 1 or len(steps) == 1:
        results = [run_step(s) for s in steps]
    else:
        with multiprocessing.get_context("fork").Pool(min(args.jobs, len(steps))) as pool:
            results = list(pool.imap_unordered(run_step, steps))
    failed = []
    for name, rc, wall, cpu in results:
        log.info("%s: %s in %.1f s (%.1f s CPU)", name, "ok" if rc == 0 else f"FAILED (exit {rc})", wall, cpu)
        if rc != 0:
            failed.append(name)
    log.info("%d step(s) in %.1f s; %s", len(steps), time.perf_counter() - t0,
             f"failed: {', '.join(failed)}" if failed else "all ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
