"""Geometry figures from stage 3 (extract_knn): neighbourhood overlap, spectra, effective rank.

Reads ``<knn_dir>/<model>/overlap_top<k>_<metric>.json`` and ``per_image.csv`` (see vlmc.plot.data) and
writes to ``<out_dir>/knn/``:

    single_dataset_topk_all.png   KNOR(pre, post) vs k, one line per model
    triway_knor_lines.png         per model: KNOR vs k for pre-post and <ref>-pre / <ref>-post
    triway_knor_bars_k<k>.png     the same pairs at one k, bars per model (error bars: ±1 std over images)
    three_way_counts_k<k>.png     share of the k neighbours in ref∩pre∩post, ref∩pre only, ... (per ref)

Every KNOR figure draws the chance level E[KNOR@k] = k/(N−1) (the JSON's chance_knor when given) as a
dotted grey line. k ≥ N − 1 is left out (the neighbourhood is then the whole set and KNOR = 1 for any
embedding); the bar charts use one k (``--k``; see its help).
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
import pandas as pd
from matplotlib.patches import Patch

from vlmc.plot.common import (
    CHANCE_STYLE,
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
from vlmc.plot.data import (
    THREE_WAY,
    KnnRun,
    add_stage_args,
    chance_knor,
    erank_column,
    knor_table,
    load_knn,
    n_images,
    stage_dir,
)
from vlmc.plot.figcheck import REFERENCE_GID
from vlmc.utils.cli import UsageError, entry_point, make_parser

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


def meaningful(run: KnnRun) -> pd.DataFrame:
    """The run's KNOR table without the k ≥ N − 1 rows (there every neighbourhood is the whole set: KNOR = 1)."""
    t = knor_table(run)
    n = n_images(run)
    return t[t["k"] < n - 1].reset_index(drop=True) if n else t


def draw_chance(ax, ks, values, first: bool, **style) -> None:
    """The chance level E[KNOR@k] = k / (N − 1) as a reference line (label "chance …", read back by tests)."""
    ax.plot(ks, values, gid=REFERENCE_GID, label="chance k/(N−1)" if first else "_chance k/(N−1)",
            **{**CHANCE_STYLE, **style})


def plot_pre_post(runs: dict[str, KnnRun], out, args) -> None:
    fig, (ax,) = panel_grid(1, 6.5, 4.5)
    chance: dict[tuple, list[float]] = {}  # one chance curve per distinct (ks, N): drawn once, after the models
    for m, run in runs.items():
        t = meaningful(run)
        t = t[t["pair"] == "pre_post"]
        if len(t):
            ax.plot(t["k"], t["mean"], marker="o", color=model_color(m), label=model_label(m))
            ks = tuple(int(k) for k in t["k"])
            chance.setdefault((ks, n_images(run)), [chance_knor(run, k) for k in ks])
    for i, ((ks, _), values) in enumerate(chance.items()):
        draw_chance(ax, ks, values, i == 0)
    ks = sorted({int(k) for r in runs.values() for k in meaningful(r)["k"]})
    ax.set_xticks(ks)
    ax.set(xlabel="k (neighbours)", ylabel="KNOR@k (fraction of the k neighbours shared)", ylim=(0, 1.02),
           title="Pre- vs post-connector neighbourhood overlap")
    ax.legend(loc="best")
    save_figure(fig, out, "single_dataset_topk_all", args.pdf, args.dpi)


def plot_triway_lines(runs: dict[str, KnnRun], out, args) -> None:
    fig, axes = panel_grid(len(runs), 4.4, 3.8)
    for ax, (m, run) in zip(axes, runs.items(), strict=True):
        t = meaningful(run)
        for pair, g in t.groupby("pair", sort=True):
            ax.plot(g["k"], g["mean"], label=pair_label(pair), **pair_style(pair))
        ks = sorted(int(k) for k in t["k"].unique())
        draw_chance(ax, ks, [chance_knor(run, k) for k in ks], True)
        ax.set_xticks(ks)
        ax.set(title=f"{model_label(m)} (N = {n_images(run)})", xlabel="k (neighbours)",
               ylabel="KNOR@k (fraction of k)", ylim=(0, 1.02))
        ax.legend(loc="best")
    fig.suptitle("KNOR across k: reference ↔ pre, reference ↔ post, pre ↔ post (dotted: chance)")
    save_figure(fig, out, "triway_knor_lines", args.pdf, args.dpi)


def plot_triway_bars(runs: dict[str, KnnRun], k: int, out, args) -> None:
    tables = {m: knor_table(r) for m, r in runs.items()}
    pairs = sorted({p for t in tables.values() for p in t["pair"]},
                   key=lambda p: (p == "pre_post", p.rsplit("_", 1)[0], p.endswith("_post")))
    fig, (ax,) = panel_grid(1, max(6.5, 1.8 * len(runs)), 4.5)
    width = 0.8 / max(len(pairs), 1)
    for j, pair in enumerate(pairs):
        vals = [t[(t["pair"] == pair) & (t["k"] == k)] for t in tables.values()]
        mean = [v["mean"].iloc[0] if len(v) else np.nan for v in vals]
        std = [v["std"].iloc[0] if len(v) else np.nan for v in vals]
        x = np.arange(len(runs)) + (j - (len(pairs) - 1) / 2) * width
        ax.bar(x, mean, width, yerr=std, capsize=2, label=pair_label(pair), color=pair_style(pair)["color"],
               alpha=0.85, hatch="//" if pair.endswith("_post") else None, edgecolor="white")
    for i, run in enumerate(runs.values()):  # chance across each model's group of bars
        draw_chance(ax, [i - 0.45, i + 0.45], [chance_knor(run, k)] * 2, i == 0, lw=1.6)
    ax.set_xticks(np.arange(len(runs)), [model_label(m) for m in runs])
    ax.set(ylabel=f"KNOR@{k} (±1 std over images)", ylim=(0, 1.05),
           title=f"Neighbourhood overlap at k = {k}: reference vs pre / post connector")
    ax.legend(ncol=min(len(pairs) + 1, 4), loc="upper center", fontsize=7)
    ax.set_ylim(0, 1.2)
    save_figure(fig, out, f"triway_knor_bars_k{k}", args.pdf, args.dpi)


def plot_three_way(runs: dict[str, KnnRun], k: int, out, args) -> None:
    rows = [(m, r) for m, run in runs.items() if run.summary is not None
            for _, r in run.summary.three_way[run.summary.three_way["k"] == k].iterrows()]
    if not rows:
        log.warning("no three-way counts at k=%d in the overlap JSONs; three_way_counts figure skipped", k)
        return
    fig, (ax,) = panel_grid(1, max(6.5, 1.4 * len(rows)), 4.5)
    colors = {"all3": "#4d4d4d", "ref_pre_only": PRE_POST_COLORS["pre"], "ref_post_only": PRE_POST_COLORS["post"],
              "pre_post_only": "#8fbc8f"}
    names = {"all3": "ref ∩ pre ∩ post", "ref_pre_only": "ref ∩ pre only", "ref_post_only": "ref ∩ post only",
             "pre_post_only": "pre ∩ post only"}
    bottom = np.zeros(len(rows))
    for c in THREE_WAY:
        v = np.array([r[c] / k for _, r in rows], dtype=float)
        ax.bar(range(len(rows)), v, bottom=bottom, color=colors[c], label=names[c])
        bottom += np.nan_to_num(v)
    for i, (m, _) in enumerate(rows):  # a pair's KNOR at chance would put k/(N−1) of the k in its two segments
        draw_chance(ax, [i - 0.45, i + 0.45], [chance_knor(runs[m], k)] * 2, i == 0, lw=1.6)
    ax.set_xticks(range(len(rows)), [f"{model_label(m)}\n({r['ref']})" for m, r in rows])
    ax.set(ylabel=f"mean share of the k = {k} neighbours", ylim=(0, 1.25),
           title=f"Three-way neighbourhood agreement at k = {k} (reference, pre, post)")
    ax.legend(ncol=3, loc="upper center", fontsize=7)
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
                ylabel="energy fraction of the first i")
    for f in (0.8, 0.9):
        axes[1].axhline(f, color="gray", lw=0.8, ls=":")
    for ax in axes:
        ax.legend()
    fig.suptitle(f"{model_label(m)}: token-centred spectrum, mean over images")
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
    have = {m: r.per_image for m, r in runs.items() if r.per_image is not None}
    cols = {c for d in have.values() for c in d.columns}

    def column(stat: str, side: str) -> str:
        if stat in ("raw", "norm"):
            return erank_column(cols, side, stat == "norm") or f"{side}_erank_{stat}"
        return f"{side}_{stat}"

    stats = [("raw", "Effective rank", "effective rank exp(H(p))"),
             ("norm", "Normalised effective rank", "effective rank / min(T−1, D)"),
             ("top1_energy_ratio", "Top-1 energy", r"top-1 energy $s_1^2 / \sum_j s_j^2$")]
    stats = [st for st in stats if any(column(st[0], side) in cols for side in ("pre", "post"))]
    if not stats:
        log.warning("no per_image.csv with pre_/post_effective_rank; effective_rank_summary skipped")
        return
    fig, axes = panel_grid(len(stats), 4.6, 3.8)
    for ax, (s, title, label) in zip(axes, stats, strict=True):
        for i, (m, d) in enumerate(have.items()):
            for j, side in enumerate(("pre", "post")):
                col = column(s, side)
                if col in d.columns and d[col].notna().any():
                    bp = ax.boxplot([d[col].dropna()], positions=[i + (j - 0.5) * 0.38], widths=0.32,
                                    patch_artist=True, showfliers=False, medianprops={"color": "black"})
                    bp["boxes"][0].set(facecolor=PRE_POST_COLORS[side], alpha=0.75,
                                       edgecolor=model_color(m), linewidth=1.5)
        ax.set_xticks(range(len(have)), [model_label(m) for m in have])
        ax.set(ylabel=label, title=title)
    axes[0].legend(handles=[Patch(color=c, label=side) for side, c in PRE_POST_COLORS.items()])
    fig.suptitle("Per-image spectral statistics of E_pre vs E_post (boxes: quartiles, whiskers: 1.5 IQR)")
    save_figure(fig, out, "effective_rank_summary", args.pdf, args.dpi)


def choose_k(runs: dict[str, KnnRun], wanted: int | None) -> int | None:
    """The k of the bar charts: ``wanted``, else the largest k every model has with k ≤ N/20, else the
    smallest k every model has below N − 1 (logged). None (figures skipped) when no k is below N − 1.

    At k ≥ N − 1 every neighbourhood is the whole set (KNOR = 1 for every pair), so such a k is refused.
    """
    n = min(n_images(r) or 0 for r in runs.values())
    shared = set.intersection(*[set(knor_table(r)["k"].astype(int)) for r in runs.values()])
    if wanted is not None:
        if wanted >= n - 1:
            raise UsageError(f"--k {wanted}: KNOR at k >= N - 1 = {n - 1} is 1 by construction (N = {n} images)")
        if wanted not in shared:
            raise UsageError(f"--k {wanted} not available for every model (shared: {sorted(shared)})")
        return wanted
    usable = sorted(k for k in shared if k < n - 1)
    if not usable:
        log.warning("no k below N - 1 = %d shared by every model (shared: %s); KNOR bar charts skipped", n - 1,
                    sorted(shared))
        return None
    small = [k for k in usable if k <= n / 20]
    if small:
        return small[-1]
    log.info("no shared k <= N/20 = %.3g (N = %d); bar charts at the smallest, k = %d (chance %.3f)", n / 20, n,
             usable[0], usable[0] / (n - 1))
    return usable[0]


def build_parser():
    p = make_parser(__doc__)
    add_io_args(p)
    add_stage_args(p, "knn")
    p.add_argument("--metric", default="l2", choices=("l2", "cosine"), help="which overlap_top<k>_<metric>.json")
    p.add_argument("--k", type=int, default=None,
                   help="k of the bar charts; default: the largest k every model has with k <= N/20, else the "
                        "smallest below N - 1 (k >= N - 1 is refused: KNOR = 1 there)")
    p.add_argument("--topn", type=int, default=100, help="spectral components shown in the spectra panels")
    return p


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    knn_dir = require_dir(stage_dir(args, "knn"), "knn folder")
    found = load_knn(knn_dir, args.metric)
    runs = {m: found[m] for m in pick_models(found, args.models)}
    out = f"{args.out_dir}/knn"
    if not any(len(meaningful(r)) for r in runs.values()):
        log.warning("no KNOR values at k < N - 1 (JSON per_k or per_image <pair>_knor<k>); KNOR figures skipped")
    else:
        plot_pre_post(runs, out, args)
        plot_triway_lines(runs, out, args)
        k = choose_k(runs, args.k)
        if k is not None:
            plot_triway_bars(runs, k, out, args)
            plot_three_way(runs, k, out, args)
    for m, run in runs.items():
        plot_spectra(m, run, args.topn, out, args)
    plot_energy_all(runs, out, args)
    plot_erank(runs, out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
