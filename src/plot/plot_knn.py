"""Geometry figures from stage 3 (extract_knn): neighbourhood overlap, spectra, effective rank.

Reads ``<knn_dir>/<model>/overlap_top<k>_<metric>.json`` and ``per_image.csv`` (see vlmc.plot.data) and
writes to ``<out_dir>/knn/``:

    single_dataset_topk_all.png   KNOR(pre, post) vs k, one line per model (dotted: chance_knor, else k/(N-1))
    triway_knor_lines.png         per model: KNOR vs k for pre-post and <ref>-pre / <ref>-post
    triway_knor_bars_k<k>.png     the same pairs at one k, bars per model (error bars: ±1 std over images)
    three_way_counts_k<k>.png     share of the k neighbours in ref∩pre∩post, ref∩pre only, ... (per ref)
    spectra_<model>.png           mean singular values and cumulative energy fraction, pre vs post
    energy_spectrum_all.png       cumulative energy of every model, pre (dashed) vs post (solid)
    effective_rank_summary.png    per-image effective rank (raw, normalised) and top-1 energy, pre vs post

KNOR@k = mean_i |N_k^A(i) ∩ N_k^B(i)| / k over the N images. A figure whose inputs are absent is
skipped with a warning.

Example:
    python src/plot/plot_knn.py --in_dir sample --out_dir figures --k 100
"""

from __future__ import annotations

import logging
import sys

import numpy as np
from matplotlib.patches import Patch

from vlmc.plot.common import (
    PRE_POST_COLORS,
    add_io_args,
    model_color,
    model_label,
    model_slug,
    panel_grid,
    pick_models,
    require_dir,
    save_figure,
)
from vlmc.plot.data import THREE_WAY, KnnRun, add_stage_args, knor_table, load_knn, stage_dir
from vlmc.utils.cli import entry_point, make_parser

log = logging.getLogger("vlmc.plot.knn")


def pair_label(pair: str) -> str:
    """``pre_post`` → ``pre ↔ post``; ``clip_pre`` → ``clip ↔ pre``."""
    a, b = ("pre", "post") if pair == "pre_post" else pair.rsplit("_", 1)
    return f"{a} ↔ {b}"


def pair_style(pair: str) -> dict:
    """pre↔post black dotted; <ref>↔pre blue solid; <ref>↔post orange dashed."""
    if pair == "pre_post":
        return {"color": "black", "ls": ":", "marker": "^"}
    side = pair.rsplit("_", 1)[-1]
    return {"color": PRE_POST_COLORS.get(side, "gray"), "ls": "-" if side == "pre" else "--",
            "marker": "o" if side == "pre" else "s"}


def plot_pre_post(runs: dict[str, KnnRun], out, args) -> None:
    fig, (ax,) = panel_grid(1, 6.5, 4.5)
    for m, run in runs.items():
        t = knor_table(run)
        t = t[t["pair"] == "pre_post"]
        if len(t):
            ax.plot(t["k"], t["mean"], marker="o", color=model_color(m), label=model_label(m))
            chance = run.summary.chance if run.summary else {}
            n = run.summary.n_images if run.summary else None
            base = [chance.get(int(k), k / (n - 1) if n and n > 1 else np.nan) for k in t["k"]]
            ax.plot(t["k"], base, ls=":", color=model_color(m), alpha=0.6)
    ks = sorted({int(k) for r in runs.values() for k in knor_table(r)["k"]})
    ax.set_xticks(ks)
    ax.set(xlabel="k (neighbours)", ylabel="KNOR@k (fraction of k shared)", ylim=(0, 1.02),
           title="Pre- vs post-connector neighbourhood overlap (dotted: chance level)")
    ax.legend()
    save_figure(fig, out, "single_dataset_topk_all", args.pdf, args.dpi)


def plot_triway_lines(runs: dict[str, KnnRun], out, args) -> None:
    fig, axes = panel_grid(len(runs), 4.2, 3.8)
    for ax, (m, run) in zip(axes, runs.items(), strict=True):
        t = knor_table(run)
        for pair, g in t.groupby("pair", sort=True):
            ax.plot(g["k"], g["mean"], label=pair_label(pair), **pair_style(pair))
        ax.set_xticks(sorted(t["k"].unique()))
        ax.set(title=model_label(m), xlabel="k (neighbours)", ylabel="KNOR@k (fraction of k)", ylim=(0, 1.02))
        ax.legend()
    fig.suptitle("KNOR across k: reference ↔ pre, reference ↔ post, pre ↔ post")
    save_figure(fig, out, "triway_knor_lines", args.pdf, args.dpi)


def plot_triway_bars(runs: dict[str, KnnRun], k: int, out, args) -> None:
    tables = {m: knor_table(r) for m, r in runs.items()}
    pairs = sorted({p for t in tables.values() for p in t["pair"]}, key=lambda p: (p == "pre_post", p.rsplit("_", 1)[0], p.endswith("_post")))
    fig, (ax,) = panel_grid(1, max(6.0, 1.8 * len(runs)), 4.5)
    width = 0.8 / max(len(pairs), 1)
    for j, pair in enumerate(pairs):
        vals = [t[(t["pair"] == pair) & (t["k"] == k)] for t in tables.values()]
        mean = [v["mean"].iloc[0] if len(v) else np.nan for v in vals]
        std = [v["std"].iloc[0] if len(v) else np.nan for v in vals]
        x = np.arange(len(runs)) + (j - (len(pairs) - 1) / 2) * width
        ax.bar(x, mean, width, yerr=std, capsize=2, label=pair_label(pair), color=pair_style(pair)["color"],
               alpha=0.85, hatch="//" if pair.endswith("_post") else None, edgecolor="white")
    ax.set_xticks(np.arange(len(runs)), [model_label(m) for m in runs])
    ax.set(ylabel=f"KNOR@{k} (fraction of k; ±1 std over images)", ylim=(0, 1.05),
           title=f"Neighbourhood overlap at k = {k}: reference vs pre / post connector")
    ax.legend(ncol=min(len(pairs), 3))
    save_figure(fig, out, f"triway_knor_bars_k{k}", args.pdf, args.dpi)


def plot_three_way(runs: dict[str, KnnRun], k: int, out, args) -> None:
    rows = [(m, r) for m, run in runs.items() if run.summary is not None
            for _, r in run.summary.three_way[run.summary.three_way["k"] == k].iterrows()]
    if not rows:
        log.warning("no three-way counts at k=%d in the overlap JSONs; three_way_counts figure skipped", k)
        return
    fig, (ax,) = panel_grid(1, max(6.0, 1.4 * len(rows)), 4.5)
    colors = {"all3": "#4d4d4d", "ref_pre_only": PRE_POST_COLORS["pre"], "ref_post_only": PRE_POST_COLORS["post"],
              "pre_post_only": "#8fbc8f"}
    names = {"all3": "ref ∩ pre ∩ post", "ref_pre_only": "ref ∩ pre only", "ref_post_only": "ref ∩ post only",
             "pre_post_only": "pre ∩ post only"}
    bottom = np.zeros(len(rows))
    for c in THREE_WAY:
        v = np.array([r[c] / k for _, r in rows], dtype=float)
        ax.bar(range(len(rows)), v, bottom=bottom, color=colors[c], label=names[c])
        bottom += np.nan_to_num(v)
    ax.set_xticks(range(len(rows)), [f"{model_label(m)}\n({r['ref']})" for m, r in rows])
    ax.set(ylabel=f"mean share of the k = {k} neighbours", ylim=(0, 1.05),
           title=f"Three-way neighbourhood agreement at k = {k} (reference, pre, post)")
    ax.legend()
    save_figure(fig, out, f"three_way_counts_k{k}", args.pdf, args.dpi)


def plot_spectra(m: str, run: KnnRun, topn: int, out, args) -> None:
    spec = run.summary.spectra if run.summary else {}
    if not spec:
        log.warning("%s: no mean spectra in the overlap JSON; spectra figure skipped", m)
        return
    fig, axes = panel_grid(2, 4.4, 3.6)
    for side, kinds in sorted(spec.items(), key=lambda kv: kv[0] != "pre"):
        style = {"color": PRE_POST_COLORS[side], "label": side, "lw": 1.6}
        if "singular" in kinds:
            sv, ylabel = kinds["singular"][:topn], r"mean singular value $s_i$"
        else:  # only energy fractions p_i = s_i²/Σs²: show s_i / ‖X_c‖_F = sqrt(p_i)
            sv, ylabel = np.sqrt(kinds.get("energy", np.zeros(0)))[:topn], r"$s_i\,/\,\|X_c\|_F$"
        sv = np.where(sv > 1e-6 * np.max(sv, initial=0), sv, np.nan)  # numerically zero (centring) → not drawn
        axes[0].plot(np.arange(1, len(sv) + 1), sv, **style)
        axes[0].set(ylabel=ylabel)
        if "energy" in kinds:
            axes[1].plot(np.arange(1, len(kinds["energy"]) + 1), np.cumsum(kinds["energy"]), **style)
    axes[0].set(yscale="log", xlabel="component index i", title="Singular-value spectrum")
    axes[1].set(xlabel="number of components i", ylim=(0, 1.02), title="Cumulative energy",
                ylabel="cumulative energy fraction (first i components)")
    for f in (0.8, 0.9):
        axes[1].axhline(f, color="gray", lw=0.8, ls=":")
    for ax in axes:
        ax.legend()
    fig.suptitle(f"{model_label(m)}: token-centred spectrum per image, mean over images")
    save_figure(fig, out, f"spectra_{model_slug(m)}", args.pdf, args.dpi)


def plot_energy_all(runs: dict[str, KnnRun], out, args) -> None:
    fig, (ax,) = panel_grid(1, 6.5, 4.5)
    drawn = False
    for m, run in runs.items():
        for side, ls in (("pre", "--"), ("post", "-")):
            e = (run.summary.spectra.get(side, {}) if run.summary else {}).get("energy")
            if e is not None:
                ax.plot(np.arange(1, len(e) + 1), np.cumsum(e), ls=ls, color=model_color(m),
                        label=f"{model_label(m)} {side}")
                drawn = True
    if not drawn:
        log.warning("no energy spectra in any overlap JSON; energy_spectrum_all skipped")
        return
    ax.set(xscale="log", xlabel="number of components", ylabel="cumulative energy fraction", ylim=(0, 1.02),
           title="Cumulative energy of the token spectrum: pre (dashed) vs post (solid)")
    ax.legend(ncol=2)
    save_figure(fig, out, "energy_spectrum_all", args.pdf, args.dpi)


def plot_erank(runs: dict[str, KnnRun], out, args) -> None:
    stats = [("effective_rank", "Effective rank", "effective rank exp(H(p))"),
             ("effective_rank_norm_min_t1_d", "Normalised effective rank", "effective rank / min(T−1, D)"),
             ("top1_energy_ratio", "Top-1 energy", r"top-1 energy fraction $s_1^2 / \sum_j s_j^2$")]
    have = {m: r.per_image for m, r in runs.items() if r.per_image is not None}
    stats = [st for st in stats
             if any(f"{side}_{st[0]}" in d.columns for side in ("pre", "post") for d in have.values())]
    if not stats:
        log.warning("no per_image.csv with pre_/post_effective_rank; effective_rank_summary skipped")
        return
    fig, axes = panel_grid(len(stats), 4.6, 3.8)
    for ax, (s, title, label) in zip(axes, stats, strict=True):
        for i, (m, d) in enumerate(have.items()):
            for j, side in enumerate(("pre", "post")):
                col = f"{side}_{s}"
                if col in d.columns and d[col].notna().any():
                    bp = ax.boxplot([d[col].dropna()], positions=[i + (j - 0.5) * 0.38], widths=0.32,
                                    patch_artist=True, showfliers=False, medianprops={"color": "black"})
                    bp["boxes"][0].set(facecolor=PRE_POST_COLORS[side], alpha=0.75,
                                       edgecolor=model_color(m), linewidth=1.5)
        ax.set_xticks(range(len(have)), [model_label(m) for m in have])
        ax.set(ylabel=label, title=title)
    axes[0].legend(handles=[Patch(color=c, label=side) for side, c in PRE_POST_COLORS.items()])
    fig.suptitle("Per-image spectral statistics of E_pre vs E_post (boxes: quartiles, whiskers 1.5 IQR)")
    save_figure(fig, out, "effective_rank_summary", args.pdf, args.dpi)


def common_k(runs: dict[str, KnnRun], wanted: int | None) -> int | None:
    ks = [set(knor_table(r)["k"].astype(int)) for r in runs.values()]
    ks = [s for s in ks if s]
    if not ks:
        return None
    shared = set.intersection(*ks)
    if wanted is not None:
        if wanted not in shared:
            log.warning("--k %d not available for every model (shared: %s)", wanted, sorted(shared))
        return wanted
    return max(shared) if shared else max(max(s) for s in ks)


def build_parser():
    p = make_parser(__doc__)
    add_io_args(p)
    add_stage_args(p, "knn")
    p.add_argument("--metric", default="l2", choices=("l2", "cosine"), help="which overlap_top<k>_<metric>.json")
    p.add_argument("--k", type=int, default=None, help="k of the bar charts (default: largest k all models share)")
    p.add_argument("--topn", type=int, default=100, help="spectral components shown in the spectra panels")
    return p


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    knn_dir = require_dir(stage_dir(args, "knn"), "knn folder")
    found = load_knn(knn_dir, args.metric)
    runs = {m: found[m] for m in pick_models(found, args.models)}
    out = f"{args.out_dir}/knn"
    k = common_k(runs, args.k)
    if k is None:
        log.warning("no KNOR values (JSON per_k or per_image <pair>_knor<k>); KNOR figures skipped")
    else:
        plot_pre_post(runs, out, args)
        plot_triway_lines(runs, out, args)
        plot_triway_bars(runs, k, out, args)
        plot_three_way(runs, k, out, args)
    for m, run in runs.items():
        plot_spectra(m, run, args.topn, out, args)
    plot_energy_all(runs, out, args)
    plot_erank(runs, out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
