"""Per-image effective rank of E_post (or E_pre) vs the CLIPScore of the image's caption.

x: ``<space>_effective_rank`` (or ``..._norm_min_t1_d``) from stage 3's ``per_image.csv``;
y: CLIPScore = 2.5·max(cos(image, caption), 0) of the caption decoded from the unaltered E_post:
``clipscore_post_direct`` of the scored caption CSVs (stage 7) or, with ``--clip_source perturb`` (or when
there are no caption CSVs), ``clipscore_original`` of the scored perturbation CSVs (stage 8; averaged
over the files, where it is the same caption). Rows are joined on (shard, key).

Writes ``<out_dir>/erank_vs_clip/erank_vs_clip_all.png`` (all models side by side; with ``--per_model``
also ``erank_vs_clip_<model>.png``) and ``<results_dir>/erank_vs_clip_correlations.csv`` / ``.tex``
(one row per model and image group: ``all``, ``scenes``, ``photos``).

Synthetic testbed scenes and photos are different populations (photo CLIPScores sit near 0 under the
testbed CLIP), so every panel marks them apart (circles: scenes, triangles: photos; a scene is an image
whose reference caption ``caption_gt`` / ``<key>.txt`` states a whole testbed scene) and gives r and ρ per
group in a legend placed where it hides the fewest points; pooled, a correlation mostly measures the
split between the groups.

Example:
    python src/plot/plot_erank_vs_clip.py --in_dir sample --space post
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pandas as pd

from vlmc.plot.common import (
    add_io_args,
    correlations,
    model_color,
    model_label,
    model_slug,
    panel_grid,
    pick_models,
    require_dir,
    save_figure,
    scatter_fit,
    wrap,
    write_table,
)
from vlmc.plot.data import (
    add_stage_args,
    erank_column,
    image_groups,
    load_knn,
    read_captions,
    read_perturb,
    stage_dir,
)
from vlmc.utils.cli import UsageError, entry_point, make_parser

log = logging.getLogger("vlmc.plot.erank")


def clip_scores(args) -> tuple[pd.DataFrame, str]:
    """``model, shard, key, clipscore`` and a label saying where the scores came from."""
    cap_dir, pert_dir = stage_dir(args, "captions"), stage_dir(args, "perturb")
    source = args.clip_source
    if source == "auto":
        source = "captions" if cap_dir.is_dir() else "perturb"
    if source == "captions":
        df = read_captions(require_dir(cap_dir, "captions folder"))
        if "clipscore_post_direct" not in df.columns:
            raise UsageError(f"{cap_dir}: caption CSVs have no clipscore_post_direct column")
        df = df.rename(columns={"clipscore_post_direct": "clipscore"})
        label = "CLIPScore of the own caption (post_direct)"
    else:
        df = read_perturb(require_dir(pert_dir, "perturb folder"))
        extra = {"caption_gt": "first"} if "caption_gt" in df.columns else {}
        df = df.groupby(["model", "shard", "key"], as_index=False).agg(clipscore_original=("clipscore_original", "mean"),
                                                                      **{c: (c, f) for c, f in extra.items()})
        df = df.rename(columns={"clipscore_original": "clipscore"})
        label = "CLIPScore of the unperturbed caption"
    keep = ["model", "shard", "key", "clipscore"] + (["caption_gt"] if "caption_gt" in df.columns else [])
    return df[keep], label


def build_parser():
    p = make_parser(__doc__)
    add_io_args(p, tables=True)
    p.add_argument("--knn_dir", default=None, help="stage folder; None = <in_dir>/knn_root (the captioned images' "
                   "geometry) if it exists, else the first of <in_dir>/knn_out|knn that exists")
    add_stage_args(p, "captions", "perturb", "images")
    p.add_argument("--space", choices=("post", "pre"), default="post", help="effective rank of E_post or E_pre")
    p.add_argument("--normalized", action="store_true", help="use effective rank / min(T-1, D)")
    p.add_argument("--clip_source", choices=("auto", "captions", "perturb"), default="auto",
                   help="where CLIPScore comes from (auto: captions when its folder exists)")
    p.add_argument("--per_model", action="store_true", help="also write one figure per model")
    p.add_argument("--metric", default="l2", choices=("l2", "cosine"), help="overlap JSON read with per_image.csv")
    return p


def geometry_dir(args) -> Path:
    """``--knn_dir``; else ``<in_dir>/knn_root`` when it exists (a pipeline run with ``EVAL_ROOT`` computes the
    geometry on the evaluation set in ``knn_out`` and the captioned images' own in ``knn_root``: only the latter
    shares images with the CLIPScores); else the knn folder."""
    root = Path(args.in_dir) / "knn_root"
    return root if not args.knn_dir and root.is_dir() else stage_dir(args, "knn")


def joined(args) -> tuple[pd.DataFrame, str, str]:
    """``model, shard, key, erank, clipscore[, group]`` rows, the erank column's name and the CLIPScore label."""
    runs = load_knn(require_dir(geometry_dir(args), "knn folder"), args.metric)
    clip, ylabel = clip_scores(args)
    frames, col = [], None
    for m, run in runs.items():
        c = erank_column(run.per_image.columns, args.space, args.normalized) if run.per_image is not None else None
        if c is None:
            log.warning("%s: no %s effective rank in per_image.csv; skipped", m, args.space)
            continue
        col = col or c
        frames.append(run.per_image[["shard", "key", c]].rename(columns={c: "erank"}).assign(model=m))
    if not frames:
        raise UsageError(f"no per_image.csv with a {args.space} effective rank"
                         f"{' (normalised)' if args.normalized else ''} column")
    df = pd.concat(frames).merge(clip, on=["model", "shard", "key"], how="inner")
    groups = image_groups(df, stage_dir(args, "images"))
    df["group"] = groups.to_numpy() if groups is not None else "all"
    return df, col, ylabel


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    df, col, ylabel = joined(args)
    models = pick_models(df["model"].unique(), args.models) if len(df) else []
    if not models:
        raise UsageError("no image has both an effective rank and a CLIPScore (no (model, shard, key) in common)")
    side = "E_pre" if args.space == "pre" else "E_post"
    xlabel = f"{side} effective rank" + (" / min(T−1, D)" if args.normalized else "")
    out = f"{args.out_dir}/erank_vs_clip"
    rows = []
    fig_all, axes = panel_grid(len(models), 4.6, 3.8)
    for ax_all, m in zip(axes, models, strict=True):
        sub = df[df["model"] == m]
        fig, (ax,) = panel_grid(1, 5.5, 4.5) if args.per_model else (None, (None,))
        for a in (ax, ax_all) if ax else (ax_all,):
            stats = scatter_fit(a, sub["erank"], sub["clipscore"], model_color(m), sub["group"])
            a.set(title=model_label(m), xlabel=xlabel, ylabel=wrap(f"{ylabel} (0–2.5)", 34))
        if fig is not None:
            save_figure(fig, out, f"erank_vs_clip_{model_slug(m)}", args.pdf, args.dpi)
        rows += [{"model": m, "group": "all", "x": col, "y": "clipscore",
                  **correlations(sub["erank"], sub["clipscore"])}]
        rows += [{"model": m, "group": g, "x": col, "y": "clipscore", **st} for g, st in stats.items() if g != "all"]
    fig_all.suptitle(wrap(f"Per-image {xlabel} vs {ylabel}; markers: image group, lines: least squares per group",
                          100))
    save_figure(fig_all, out, "erank_vs_clip_all", args.pdf, args.dpi)
    write_table(pd.DataFrame(rows), args.results_dir, "erank_vs_clip_correlations",
                ["model", "group", "x", "n", "pearson_r", "pearson_p", "spearman_rho", "spearman_p"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
