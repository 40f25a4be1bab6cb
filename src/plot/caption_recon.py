"""Caption drops vs reconstruction quality: the shared body of plot_caption_recon(_pre).py.

Data: the scored caption CSVs (stage 7, ``captions_<model>.csv``) joined on ``(model, shard, key)`` with
the held-out reconstruction metrics of stage 6 (``recon_eval/<model>/per_sample.csv``). The join is
inner: only images the reconstructor never trained on are used. Without a recon_eval folder, the
``reproj_mse`` / ``reproj_cosine`` columns eval_captions writes (or the seed's ``reproj_*_recon``) are used,
restricted to ``split == val`` when there is a split column.

Caption metrics (score_captions.py; drop = reference − altered, positive = the reconstructed caption is worse):
    clipscore_drop                      CLIPScore(post_direct) − CLIPScore(recon), CLIPScore = 2.5·max(cos, 0)
    bertscore_drop                      BERTScore-F1(post_direct vs gt) − BERTScore-F1(recon vs gt)
    bertscore_f1_recon_vs_post_direct   BERTScore-F1 of the recon caption against the post_direct caption
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from vlmc.plot.common import (
    add_io_args,
    correlations,
    model_color,
    model_label,
    panel_grid,
    pick_models,
    require_dir,
    save_figure,
    scatter_fit,
    write_table,
)
from vlmc.plot.data import RECON_METRICS, add_stage_args, read_captions, read_recon, stage_dir
from vlmc.utils.cli import UsageError, make_parser

log = logging.getLogger("vlmc.plot.caption_recon")

Y_METRICS = {
    "clipscore_drop": "ΔCLIPScore (post_direct − recon; 0–2.5 scale)",
    "bertscore_drop": "ΔBERTScore-F1 vs gt (post_direct − recon)",
    "bertscore_f1_recon_vs_post_direct": "BERTScore-F1, recon vs post_direct caption",
}
X_METRICS = {
    "reproj_cosine": "cosine(connector(Ê_pre), E_post), mean over tokens",
    "reproj_mse": "MSE(connector(Ê_pre), E_post), standardised units",
    "cosine_pre": "cosine(Ê_pre, E_pre), mean over tokens",
    "mse_pre": "MSE(Ê_pre, E_pre), standardised units",
}
SPACES = {"reproj": ("reproj_cosine", "reproj_mse"), "pre": ("cosine_pre", "mse_pre")}


def build_parser(doc: str):
    p = make_parser(doc)
    add_io_args(p, tables=True)
    add_stage_args(p, "captions", "recon")
    p.add_argument("--all_pairs", action="store_true",
                   help="scatter every (x, y) pair, not only the drops (the tables always have all pairs)")
    return p


def load_joined(args) -> pd.DataFrame:
    """Caption rows with their reconstruction metrics (inner join on model, shard, key)."""
    caps = read_captions(require_dir(stage_dir(args, "captions"), "captions folder"))
    recon_dir = stage_dir(args, "recon")
    if not recon_dir.is_dir():
        log.warning("%s not found: using the reproj_* columns of the caption CSVs", recon_dir)
        for m in RECON_METRICS:  # the seed's CSVs call them reproj_<metric>_recon
            if m not in caps.columns and f"{m}_recon" in caps.columns:
                caps[m] = caps[f"{m}_recon"]
        if "split" in caps.columns:  # eval_captions --split all: keep the reconstructor's held-out images
            caps = caps[caps["split"].isin(["test", ""] if (caps["split"] == "test").any() else ["val", ""])]  # "val": before the test part
        return caps
    recon = read_recon(recon_dir)
    keep = ["model", "shard", "key", *[m for m in RECON_METRICS if m in recon.columns]]
    caps = caps.drop(columns=[c for c in keep[3:] if c in caps.columns])
    joined = caps.merge(recon[keep], on=["model", "shard", "key"], how="inner", validate="many_to_one")
    for m, n_cap in caps.groupby("model").size().items():
        n = int((joined["model"] == m).sum())
        if n < n_cap:
            log.info("%s: %d of %d captioned images have held-out reconstruction metrics", m, n, n_cap)
    if joined.empty:
        raise UsageError("no captioned image has reconstruction metrics (no (model, shard, key) in common)")
    return joined


def plot_pair(df: pd.DataFrame, models: list[str], x: str, y: str, out, args) -> None:
    fig, axes = panel_grid(len(models), 4.0, 3.6, ncols=min(len(models), 4))
    for ax, m in zip(axes, models, strict=True):
        sub = df[df["model"] == m]
        scatter_fit(ax, sub[x], sub[y], model_color(m))
        if y.endswith("drop"):
            ax.axhline(0, color="gray", lw=0.8, ls="--")
        ax.set(title=model_label(m), xlabel=X_METRICS[x], ylabel=Y_METRICS[y])
    fig.suptitle(f"{Y_METRICS[y]} vs {x} (held-out images; line: least squares)")
    save_figure(fig, out, f"scatter_{x}_vs_{y}", args.pdf, args.dpi)


def plot_distributions(df: pd.DataFrame, models: list[str], cols: list[str], labels: dict, name: str, title: str,
                       out, args) -> None:
    cols = [c for c in cols if c in df.columns and df[c].notna().any()]
    if not cols:
        return
    fig, axes = panel_grid(len(cols), max(4.0, 1.3 * len(models)), 3.8)
    for ax, c in zip(axes, cols, strict=True):
        data = [(i, df.loc[df["model"] == m, c].dropna().to_numpy()) for i, m in enumerate(models)]
        data = [(i, v) for i, v in data if v.size > 1]
        if data:
            parts = ax.violinplot([v for _, v in data], positions=[i for i, _ in data], showmedians=True)
            for body, (i, _) in zip(parts["bodies"], data, strict=True):
                body.set(facecolor=model_color(models[i]), alpha=0.6)
        if c.endswith("drop"):
            ax.axhline(0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(models)), [model_label(m) for m in models])
        ax.set(ylabel=labels[c], title=c)
    fig.suptitle(title)
    save_figure(fig, out, name, args.pdf, args.dpi)


def corr_table(df: pd.DataFrame, models: list[str], xs, ys) -> pd.DataFrame:
    rows = []
    for m in models:
        sub = df[df["model"] == m]
        for x in xs:
            for y in ys:
                if x in sub.columns and y in sub.columns:
                    rows.append({"model": m, "x": x, "y": y, **correlations(sub[x], sub[y])})
    return pd.DataFrame(rows)


def run(args, space: str, fig_subdir: str, table_name: str) -> int:
    """Figures into ``<out_dir>/<fig_subdir>/``, correlations into ``<results_dir>/<table_name>.csv/.tex``."""
    df = load_joined(args)
    models = pick_models(df["model"].unique(), args.models)
    xs = [x for x in SPACES[space] if x in df.columns and df[x].notna().any()]
    ys = [y for y in Y_METRICS if y in df.columns and df[y].notna().any()]
    if not xs or not ys:
        raise UsageError(f"need one of {', '.join(SPACES[space])} (stage 6) and one of {', '.join(Y_METRICS)} "
                         f"(stage 7) with values; found x={xs or 'none'}, y={ys or 'none'}")
    out = f"{args.out_dir}/{fig_subdir}"
    for x in xs:
        for y in (ys if args.all_pairs else [y for y in ys if y.endswith("drop")] or ys):
            plot_pair(df, models, x, y, out, args)
    plot_distributions(df, models, ["clipscore_drop", "bertscore_drop"], Y_METRICS, "drops_by_model",
                       "Caption drops per model (positive = reconstructed caption worse)", out, args)
    plot_distributions(df, models, xs, X_METRICS, "recon_quality_by_model",
                       "Held-out reconstruction quality per model", out, args)
    table = corr_table(df, models, xs, ys)
    write_table(table, args.results_dir, table_name,
                ["model", "x", "y", "n", "pearson_r", "pearson_p", "spearman_rho", "spearman_p"])
    with np.printoptions(precision=3):
        log.info("correlations:\n%s", table.drop(columns=["slope", "intercept"]).to_string(index=False))
    return 0
