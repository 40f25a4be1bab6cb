"""Caption scores under controlled perturbations of E_post, as curves over the perturbation level.

Reads the scored ``perturb_<model>_<perturb>_<level>.csv`` (stage 8, score_perturb.py) and plots, per
model, the mean over images at each level with a bootstrap 95% confidence band (percentile bootstrap of
the mean, ``--n_boot`` resamples, fixed ``--seed``):

    --mode drop    clipscore_drop = CLIPScore(original) − CLIPScore(perturbed), and
                   bertscore_drop_gt = BERTScore-F1(original vs gt) − BERTScore-F1(perturbed vs gt)
                   (positive = the perturbed caption is worse)
    --mode score   clipscore_perturbed (solid) with the unperturbed clipscore_original as one dashed level
                   per model (no band, so the levels stay apart), and
                   bertscore_f1 (BERTScore-F1 of the perturbed caption against the original one)

A panel whose column is absent or all NaN (e.g. no reference captions) is left out with a warning.
Writes ``<out_dir>/<perturb>_<mode>.png``.

Example:
    python src/plot/plot_perturb.py --perturb lowrank --mode drop
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import pandas as pd

from vlmc.plot.common import (
    BOOT_N,
    BOOT_SEED,
    add_io_args,
    bootstrap_ci,
    label,
    model_color,
    model_label,
    panel_grid,
    pick_models,
    require_dir,
    save_figure,
    wrap,
)
from vlmc.plot.data import add_stage_args, read_perturb, stage_dir
from vlmc.plot.figcheck import REFERENCE_GID
from vlmc.utils.cli import UsageError, entry_point, make_parser

log = logging.getLogger("vlmc.plot.perturb")

LEVEL_LABEL = {
    "mask": "token drop probability p",
    "lowrank": "retained fraction of min(T, D) (rank when > 1)",
    "orthogonal": "blend α toward a random rotation X·Q",
    "noise": "signal-to-noise ratio (dB; lower = more noise)",
}
PANELS = {  # (column, axis label, column of the unperturbed reference drawn as a dashed level)
    "drop": [("clipscore_drop", "CLIPScore drop, unperturbed − perturbed (0–2.5 scale)", None),
             ("bertscore_drop_gt", "BERTScore-F1 drop vs reference, unperturbed − perturbed", None),
             ("attr_acc_drop", "attribute-accuracy drop, unperturbed − perturbed (scenes)", None)],
    "score": [("clipscore_perturbed", "CLIPScore (0–2.5)", "clipscore_original"),
              ("bertscore_f1", "BERTScore F1, perturbed vs unperturbed caption", None),
              ("attr_acc_perturbed", "attribute accuracy (0–1, scenes)", "attr_acc_original")],
}


def curve(df: pd.DataFrame, col: str, n_boot: int, seed: int) -> pd.DataFrame:
    """``level, n, mean, lo, hi`` of ``col`` per level (finite values only)."""
    rows = []
    for level, g in df.groupby("level", sort=True):
        v = g[col].to_numpy(np.float64)
        v = v[np.isfinite(v)]
        if v.size:
            lo, hi = bootstrap_ci(v, n_boot, seed)
            rows.append({"level": level, "n": v.size, "mean": v.mean(), "lo": lo, "hi": hi})
    return pd.DataFrame(rows, columns=["level", "n", "mean", "lo", "hi"])


def draw(ax, c: pd.DataFrame, color: str, label: str | None) -> None:
    """The mean per level (markers) and its bootstrap 95% band."""
    ax.plot(c["level"], c["mean"], marker="o", ms=4, color=color, label=label)
    ax.fill_between(c["level"], c["lo"], c["hi"], color=color, alpha=0.15, lw=0)


def build_parser():
    p = make_parser(__doc__)
    add_io_args(p)
    add_stage_args(p, "perturb")
    p.add_argument("--perturb", choices=tuple(LEVEL_LABEL), default="lowrank", help="perturbation family")
    p.add_argument("--mode", choices=tuple(PANELS), default="drop", help="plot drops or raw scores")
    p.add_argument("--n_boot", type=int, default=BOOT_N, help="bootstrap resamples per (model, level)")
    p.add_argument("--seed", type=int, default=BOOT_SEED, help="bootstrap seed")
    p.add_argument("--min_rows", type=int, default=1, help="leave out (model, level) cells with fewer rows")
    return p


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n_boot < 1:
        raise UsageError("--n_boot must be >= 1")
    df = read_perturb(require_dir(stage_dir(args, "perturb"), "perturb folder"), args.perturb)
    bad = ~np.isfinite(df["level"])
    if bad.any():
        log.warning("%d rows with a non-finite level (e.g. SNR = inf) left out", int(bad.sum()))
        df = df[~bad]
    sizes = df.groupby(["model", "level"])["key"].transform("size")
    if (sizes < args.min_rows).any():
        log.warning("cells with < %d rows left out: %s", args.min_rows,
                    sorted({(m, lv) for m, lv in df.loc[sizes < args.min_rows, ["model", "level"]].itertuples(index=False)}))
        df = df[sizes >= args.min_rows]
    models = pick_models(df["model"].unique(), args.models)
    panels = [p for p in PANELS[args.mode] if p[0] in df.columns and df[p[0]].notna().any()]
    for col, *_ in PANELS[args.mode]:
        if all(col != p[0] for p in panels):
            log.warning("no values in column %s; its panel is left out", col)
    if not panels or not models:
        raise UsageError(f"nothing to plot for --perturb {args.perturb} --mode {args.mode}")
    fig, axes = panel_grid(len(panels), 5.2, 4.0)
    levels = np.sort(df["level"].unique())
    for ax, (col, ylabel, ref) in zip(axes, panels, strict=True):
        for m in models:
            sub = df[df["model"] == m]
            draw(ax, curve(sub, col, args.n_boot, args.seed), model_color(m), model_label(m))
            if ref and ref in sub.columns and sub[ref].notna().any():  # one level per model, no band: readable
                ax.axhline(float(sub[ref].mean()), color=model_color(m), lw=1.0, ls="--", alpha=0.8,
                           gid=REFERENCE_GID)
        if args.mode == "drop":
            ax.axhline(0, color="gray", lw=0.8, ls="--", gid=REFERENCE_GID)
        if levels.min() > 0 and levels.max() / levels.min() > 20:
            ax.set_xscale("log")
        title = label(col) + (" (dashed: unperturbed)" if ref and ref in df.columns else "")
        ax.set(xlabel=wrap(LEVEL_LABEL[args.perturb], 40), ylabel=wrap(ylabel, 36), title=title)
        ax.legend(loc="best")
    fig.suptitle(f"{args.perturb.capitalize()} perturbation of E_post: mean over images, bootstrap 95% band")
    save_figure(fig, args.out_dir, f"{args.perturb}_{args.mode}", args.pdf, args.dpi)
    return 0


if __name__ == "__main__":
    sys.exit(main())
