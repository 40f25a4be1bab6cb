"""Caption drops vs reconstruction quality: the shared body of plot_caption_recon(_pre).py.

Data: the scored caption CSVs (stage 7, ``captions_<model>.csv``) joined on ``(model, shard, key)`` with
the held-out reconstruction metrics of stage 6 (``recon_eval/<model>/per_sample.csv``). The join is
inner: only images the reconstructor never trained on are used. Without a recon_eval folder, the
``reproj_mse`` / ``reproj_cosine`` columns eval_captions writes (or the original pipeline's ``reproj_*_recon``) are used,
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
from matplotlib.patches import Patch

from vlmc.plot.common import (
    GROUP_LABELS,
    GROUP_ORDER,
    add_io_args,
    correlations,
    label,
    model_color,
    model_label,
    panel_grid,
    pick_models,
    require_dir,
    save_figure,
    scatter_fit,
    wrap,
    write_table,
)
from vlmc.plot.data import RECON_METRICS, add_stage_args, image_groups, read_captions, read_recon, stage_dir
from vlmc.plot.figcheck import REFERENCE_GID
from vlmc.utils.cli import UsageError, make_parser

log = logging.getLogger("vlmc.plot.caption_recon")

Y_METRICS = {  # axis labels (vlmc.plot.style gives the short titles)
    "clipscore_drop": "CLIPScore drop, own − reconstructed caption (0–2.5 scale)",
    "bertscore_drop": "BERTScore-F1 drop vs reference, own − reconstructed caption",
    "bertscore_f1_recon_vs_post_direct": "BERTScore F1, reconstructed vs own caption",
}
X_METRICS = {
    "reproj_cosine": "cos(connector(Ê_pre), E_post), mean over tokens",
    "reproj_mse": "MSE(connector(Ê_pre), E_post), standardised",
    "cosine_pre": "cos(Ê_pre, E_pre), mean over tokens",
    "mse_pre": "MSE(Ê_pre, E_pre), standardised",
}
SPACES = {"reproj": ("reproj_cosine", "reproj_mse"), "pre": ("cosine_pre", "mse_pre")}


def build_parser(doc: str):
    p = make_parser(doc)
    add_io_args(p, tables=True)
    add_stage_args(p, "captions", "recon", "images")
    p.add_argument("--all_pairs", action="store_true",
                   help="scatter every (x, y) pair, not only the drops (the tables always have all pairs)")
    return p


def load_joined(args) -> pd.DataFrame:
    """Caption rows with their reconstruction metrics (inner join on model, shard, key)."""
    caps = read_captions(require_dir(stage_dir(args, "captions"), "captions folder"))
    recon_dir = stage_dir(args, "recon")
    if not recon_dir.is_dir():
        log.warning("%s not found: using the reproj_* columns of the caption CSVs", recon_dir)
        for m in RECON_METRICS:  # the original pipeline's CSVs call them reproj_<metric>_recon
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
    fig, axes = panel_grid(len(models), 4.6, 3.8)
    for ax, m in zip(axes, models, strict=True):
        sub = df[df["model"] == m]
        scatter_fit(ax, sub[x], sub[y], model_color(m), sub["group"])
        if y.endswith("drop"):
            ax.axhline(0, color="gray", lw=0.8, ls="--", gid=REFERENCE_GID)
        ax.set(title=model_label(m), xlabel=wrap(X_METRICS[x], 40), ylabel=wrap(Y_METRICS[y], 34))
    fig.suptitle(wrap(f"{label(y)} vs {label(x).lower()} (held-out images; markers: image group, "
                      "lines: least squares per group)", 100))
    save_figure(fig, out, f"scatter_{x}_vs_{y}", args.pdf, args.dpi)


def plot_distributions(df: pd.DataFrame, models: list[str], cols: list[str], labels: dict, name: str, title: str,
                       out, args) -> None:
    cols = [c for c in cols if c in df.columns and df[c].notna().any()]
    if not cols:
        return
    groups = [g for g in (*GROUP_ORDER, "all") if (df["group"] == g).any()]
    width = 0.8 / len(groups)
    fig, axes = panel_grid(len(cols), max(4.2, 1.3 * len(models)), 3.8)
    for ax, c in zip(axes, cols, strict=True):
        for j, g in enumerate(groups):
            data = [(i + (j - (len(groups) - 1) / 2) * width, df.loc[(df["model"] == m) & (df["group"] == g), c])
                    for i, m in enumerate(models)]
            data = [(x, v.dropna().to_numpy(), models[i]) for i, (x, v) in enumerate(data) if v.notna().sum() > 1]
            if not data:
                continue
            parts = ax.violinplot([v for _, v, _ in data], positions=[x for x, _, _ in data], widths=width * 0.9,
                                  showmedians=True)
            for key in ("cbars", "cmins", "cmaxes", "cmedians"):
                if key in parts:
                    parts[key].set(color="black", linewidth=0.8)
            for body, (_, _, m) in zip(parts["bodies"], data, strict=True):
                body.set(facecolor=model_color(m), alpha=0.6 if g != "photos" else 0.3,
                         hatch="///" if g == "photos" else None, edgecolor="black" if g == "photos" else None)
        if c.endswith("drop"):
            ax.axhline(0, color="gray", lw=0.8, ls="--", gid=REFERENCE_GID)
        ax.set_xticks(range(len(models)), [model_label(m) for m in models])
        ax.set(ylabel=wrap(labels[c], 34), title=label(c))
    if len(groups) > 1:
        axes[0].legend(handles=[Patch(facecolor="lightgray", hatch="///" if g == "photos" else None,
                                      edgecolor="black", label=GROUP_LABELS[g]) for g in groups], loc="best")
    fig.suptitle(title + ("; plain: synthetic scenes, hatched: photos" if len(groups) > 1 else ""))
    save_figure(fig, out, name, args.pdf, args.dpi)


def corr_table(df: pd.DataFrame, models: list[str], xs, ys) -> pd.DataFrame:
    """One row per model, image group (``all``, then ``scenes`` / ``photos`` when both are present), x and y."""
    rows = []
    for m in models:
        sub = df[df["model"] == m]
        groups = [("all", sub)] + ([(g, sub[sub["group"] == g]) for g in GROUP_ORDER if (sub["group"] == g).any()]
                                   if sub["group"].nunique() > 1 else [])
        for g, part in groups:
            for x in xs:
                for y in ys:
                    if x in part.columns and y in part.columns:
                        rows.append({"model": m, "group": g, "x": x, "y": y, **correlations(part[x], part[y])})
    return pd.DataFrame(rows)


def run(args, space: str, fig_subdir: str, table_name: str) -> int:
    """Figures into ``<out_dir>/<fig_subdir>/``, correlations into ``<results_dir>/<table_name>.csv/.tex``."""
    df = load_joined(args)
    groups = image_groups(df, stage_dir(args, "images"))
    df["group"] = groups.to_numpy() if groups is not None else "all"
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
                ["model", "group", "x", "y", "n", "pearson_r", "pearson_p", "spearman_rho", "spearman_p"])
    with np.printoptions(precision=3):
        log.info("correlations:\n%s", table.drop(columns=["slope", "intercept"]).to_string(index=False))
    return 0
