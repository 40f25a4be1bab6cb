"""Summary tables (CSV + LaTeX) of every stage output found under ``--in_dir``.

Writes to ``--results_dir`` (each only when its stage folder exists):

    knn_summary_per_model.csv/.tex   one row per model (stage 3): metric, protocol, n_images; KNOR mean at every k for
                                     every pair (pre_post, <ref>_pre, <ref>_post: ``<pair>_knor<k>_mean``,
                                     with ``_median``/``_std`` in the CSV); means over images of every
                                     numeric per_image.csv column (``<col>_mean``); the JSON's global
                                     scalars (CKA, Procrustes, distance correlations; dots → ``_``)
    knn_knor_per_k.csv/.tex          long form: model, pair, k, mean, median, std, ci95_lo, ci95_hi (bootstrap
                                     over images), chance (KNOR of random neighbourhoods: k/(N−1), or the
                                     JSON's chance_knor); the wide table has <pair>_knor<k>_ci95_lo/_hi,
                                     knor<k>_chance and <col>_ci95_lo/_hi beside every <col>_mean
    recon_summary.csv/.tex           stage 6, per model and metric (mse_pre, cosine_pre, reproj_*)
    caption_summary.csv/.tex         stage 7, per model and column (clipscore_drop*, bertscore_drop*, attr_acc*,
                                     clipscore_post_direct, clipscore_recon, bertscore_f1_recon_vs_post_direct)
    testbed_summary.csv/.tex         one row per model, from the tables above: attr_acc and CLIPScore of the
                                     model's own and reconstructed captions (recon_keeps = ratio), both per
                                     perturbation level, pre→post KNOR@10 (+ knor10_chance), raw effective
                                     ranks (pre_erank, post_erank) and normalised ones (pre_erank_norm_min_t1_d,
                                     post_…: divided by min(T−1, D)); every value with _ci95_lo / _ci95_hi
    paired_tests.csv/.tex            family vs family on the images both scored: section, column, mode, level,
                                     model_a, model_b, n, mean_a, mean_b, diff (a − b), diff_ci95_lo/hi
                                     (bootstrap over the shared images), p_perm (two-sided sign-flip
                                     permutation test; vlmc.metrics.bootstrap.paired_test)
    perturb_summary.csv/.tex         stage 8, per model, mode, level and column (clipscore_drop,
                                     bertscore_drop_gt, bertscore_f1, clipscore_original, clipscore_perturbed,
                                     attr_acc_original, attr_acc_perturbed, attr_acc_drop; attr_acc: scenes only)

Statistics of a column (finite values only): n, mean, median, std (ddof=1), q25, q75, iqr (linear
quantiles), ci95_lo/ci95_hi = percentile bootstrap 95% CI of the mean (``--n_boot`` resamples from a fresh
``numpy.random.default_rng(--seed)`` per row; see vlmc.plot.common.bootstrap_ci).
Drops are reference − altered: positive = worse.

Example:
    python src/plot/compute_summary.py --in_dir sample --results_dir results
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlmc.metrics.bootstrap import paired_test
from vlmc.plot.common import (
    BOOT_N,
    BOOT_SEED,
    add_io_args,
    bootstrap_ci,
    describe,
    pick_models,
    require_dir,
    sort_models,
    write_table,
)
from vlmc.plot.data import (
    SUBDIRS,
    add_stage_args,
    knor_table,
    load_knn,
    read_captions,
    read_perturb,
    read_recon,
    stage_dir,
)
from vlmc.utils.cli import UsageError, entry_point, make_parser

log = logging.getLogger("vlmc.plot.summary")

STATS_TEX = ["n", "mean", "ci95_lo", "ci95_hi", "median", "iqr"]
CAPTION_COLS = ("clipscore_post_direct", "clipscore_recon", "bertscore_f1_recon_vs_post_direct")
PERTURB_COLS = ("clipscore_drop", "bertscore_drop_gt", "bertscore_f1", "clipscore_original", "clipscore_perturbed",
                "attr_acc_original", "attr_acc_perturbed", "attr_acc_drop")


def knn_summary(args, models_wanted: str) -> None:
    runs = load_knn(require_dir(stage_dir(args, "knn"), "knn folder"), args.metric)
    wide, long = [], []
    for m in pick_models(runs, models_wanted):
        run = runs[m]
        row = {"model": m, "metric": args.metric, "protocol": run.summary.protocol if run.summary else "",
               "n_images": run.summary.n_images if run.summary and run.summary.n_images else
               (len(run.per_image) if run.per_image is not None else np.nan)}
        for r in knor_table(run).itertuples(index=False):
            k = int(r.k)
            extra = knor_extras(run, r.pair, k, row["n_images"], args)
            long.append({"model": m, "pair": r.pair, "k": k, "mean": r.mean, "median": r.median, "std": r.std, **extra})
            for s in ("mean", "median", "std", "ci95_lo", "ci95_hi"):
                row[f"{r.pair}_knor{k}_{s}"] = r._asdict().get(s, extra.get(s))
            row[f"knor{k}_chance"] = extra["chance"]
        if run.per_image is not None:
            for c in run.per_image.select_dtypes("number").columns:
                if not re.search(r"_knor\d+$", c):  # KNOR is summarised above
                    row[f"{c}_mean"] = float(run.per_image[c].mean())
                    row[f"{c}_ci95_lo"], row[f"{c}_ci95_hi"] = bootstrap_ci(run.per_image[c], args.n_boot, args.seed)
        for name, v in (run.summary.scalars if run.summary else {}).items():
            row[name.replace(".", "_")] = v
        wide.append(row)
    wide = pd.DataFrame(wide)
    kmax = max((r["k"] for r in long), default=0)  # LaTeX: pre_post at every k, references at the largest k
    tex = [c for c in wide.columns if c in ("model", "n_images") or re.fullmatch(r"pre_post_knor\d+_mean", c)
           or re.fullmatch(rf".+_(pre|post)_knor{kmax}_mean", c) or re.fullmatch(r"knor\d+_chance", c)
           or c in ("pre_effective_rank_mean", "post_effective_rank_mean")]
    write_table(wide, args.results_dir, "knn_summary_per_model", tex)
    write_table(pd.DataFrame(long, columns=["model", "pair", "k", "mean", "median", "std", "ci95_lo", "ci95_hi",
                                            "chance"]), args.results_dir, "knn_knor_per_k")


def knor_extras(run, pair: str, k: int, n_images, args) -> dict[str, float]:
    """Bootstrap 95 % interval of a KNOR mean over images (from per_image.csv's ``<pair>_knor<k>``) and its
    chance level (the JSON's ``chance_knor``, else k/(N−1)); NaN where the data are missing."""
    col = f"{pair}_knor{k}"
    pim = run.per_image
    lo, hi = bootstrap_ci(pim[col], args.n_boot, args.seed) if pim is not None and col in pim else (np.nan, np.nan)
    chance = run.summary.chance.get(k) if run.summary else None
    if chance is None:
        chance = k / (n_images - 1) if n_images and n_images > 1 else np.nan
    return {"ci95_lo": lo, "ci95_hi": hi, "chance": float(chance)}


def grouped_stats(df: pd.DataFrame, by: list[str], cols, args) -> pd.DataFrame:
    """One row per group and column: ``by..., column, n, mean, ...``."""
    rows = []
    for key, g in df.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        for c in cols:
            if c in g.columns and g[c].notna().any():  # a column this group never had is left out
                rows.append({**dict(zip(by, key, strict=True)), "column": c, **describe(g[c], args.n_boot, args.seed)})
    return pd.DataFrame(rows)


def recon_summary(args, models_wanted: str) -> None:
    df = read_recon(require_dir(stage_dir(args, "recon"), "recon folder"))
    df = df[df["model"].isin(pick_models(df["model"].unique(), models_wanted))]
    cols = [c for c in ("mse_pre", "cosine_pre", "reproj_mse", "reproj_cosine") if c in df and df[c].notna().any()]
    write_table(grouped_stats(df, ["model"], cols, args), args.results_dir, "recon_summary",
                ["model", "column", *STATS_TEX])


def caption_summary(args, models_wanted: str) -> None:
    df = read_captions(require_dir(stage_dir(args, "captions"), "captions folder"))
    df = df[df["model"].isin(pick_models(df["model"].unique(), models_wanted))]
    drops = [c for c in df.columns if c.startswith(("clipscore_drop", "bertscore_drop", "attr_acc"))]
    write_table(grouped_stats(df, ["model"], [*drops, *CAPTION_COLS], args), args.results_dir, "caption_summary",
                ["model", "column", *STATS_TEX])


def perturb_summary(args, models_wanted: str) -> None:
    df = read_perturb(require_dir(stage_dir(args, "perturb"), "perturb folder"))
    df = df[df["model"].isin(pick_models(df["model"].unique(), models_wanted))]
    write_table(grouped_stats(df, ["model", "mode", "level"], PERTURB_COLS, args), args.results_dir,
                "perturb_summary", ["model", "mode", "level", "column", *STATS_TEX])


PAIRED_COLUMNS = {
    "knn": r"pre_post_knor\d+|(pre|post)_effective_rank(_norm_min_t1_d)?",
    "captions": r"attr_acc_post_direct|attr_acc_recon|clipscore_post_direct|clipscore_recon|bertscore_f1_recon_vs_post_direct",
    "perturb": r"attr_acc_perturbed|clipscore_perturbed|attr_acc_drop|clipscore_drop",
}
PAIRED_FIELDS = ["section", "column", "mode", "level", "model_a", "model_b", "n", "mean_a", "mean_b", "diff",
                 "diff_ci95_lo", "diff_ci95_hi", "p_perm"]


def paired_rows(section: str, df: pd.DataFrame, args, by: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Family-vs-family paired tests on the images both families scored (joined on ``shard, key``).

    For every column matching ``PAIRED_COLUMNS[section]``, every group of ``by`` and every pair of models
    (in model order): ``vlmc.metrics.bootstrap.paired_test`` of a − b (bootstrap interval of the mean
    difference over the shared images, sign-flip permutation p-value; seeded with ``--seed``)."""
    rows = []
    cols = [c for c in df.columns if re.fullmatch(PAIRED_COLUMNS[section], c) and df[c].notna().any()]
    groups = df.groupby(list(by), sort=True) if by else [((), df)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        where = dict(zip(by, key, strict=True))
        models = sort_models(g["model"].unique())
        for c in cols:
            wide = g.pivot_table(index=["shard", "key"], columns="model", values=c, aggfunc="first")
            for i, a in enumerate(models):
                for b in models[i + 1:]:
                    if a in wide and b in wide:
                        t = paired_test(wide[a].to_numpy(), wide[b].to_numpy(), args.n_boot, args.seed)
                        level = where.get("level")
                        rows.append({"section": section, "column": c, "mode": where.get("mode", ""),
                                     "level": "" if level is None else f"{float(level):g}", "model_a": a,
                                     "model_b": b, **t})
    return rows


def paired_summary(args, models_wanted: str, present: list[str]) -> None:
    """``paired_tests.csv/.tex``: every family-vs-family difference with its interval and p-value."""
    rows: list[dict[str, Any]] = []
    if "knn" in present:
        runs = load_knn(stage_dir(args, "knn"), args.metric)
        frames = [r.per_image.assign(model=m) for m in pick_models(runs, models_wanted)
                  if (r := runs[m]).per_image is not None]
        if frames:
            rows += paired_rows("knn", pd.concat(frames, ignore_index=True), args)
    for section, reader, by in (("captions", read_captions, ()), ("perturb", read_perturb, ("mode", "level"))):
        if section in present:
            df = reader(stage_dir(args, section))
            rows += paired_rows(section, df[df["model"].isin(pick_models(df["model"].unique(), models_wanted))],
                                args, by)
    if rows:
        write_table(pd.DataFrame(rows, columns=PAIRED_FIELDS), args.results_dir, "paired_tests",
                    ["column", "mode", "level", "model_a", "model_b", "n", "diff", "diff_ci95_lo", "diff_ci95_hi",
                     "p_perm"])


SECTIONS = {"knn": knn_summary, "recon": recon_summary, "captions": caption_summary, "perturb": perturb_summary}


def build_parser():
    p = make_parser(__doc__)
    add_io_args(p, figures=False, tables=True)
    add_stage_args(p, *SECTIONS)
    p.add_argument("--metric", default="l2", choices=("l2", "cosine"), help="which overlap_top<k>_<metric>.json")
    p.add_argument("--n_boot", type=int, default=BOOT_N, help="bootstrap resamples for the 95%% CI of the mean")
    p.add_argument("--seed", type=int, default=BOOT_SEED, help="bootstrap seed")
    return p


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n_boot < 1:
        raise UsageError("--n_boot must be >= 1")
    require_dir(args.in_dir, "--in_dir")
    present = [s for s in SECTIONS if stage_dir(args, s).is_dir()]
    if not present:
        raise UsageError(f"{args.in_dir}: none of the stage folders {', '.join(SECTIONS)} (see --help)")
    for s in SECTIONS:
        if s in present:
            SECTIONS[s](args, args.models)
        else:
            log.warning("no %s folder under %s: %s summary skipped", "|".join(SUBDIRS[s]), args.in_dir, s)
    paired_summary(args, args.models, present)
    testbed_summary(Path(args.results_dir))
    return 0


def _means(path: Path, by: list[str]) -> pd.DataFrame:
    """``<by..., column> → mean, ci95_lo, ci95_hi`` of a summary CSV written above (empty when it is absent)."""
    cols = [*by, "column", "mean", "ci95_lo", "ci95_hi"]
    if not path.exists():
        return pd.DataFrame(columns=cols)
    df = pd.read_csv(path, dtype={"model": str, "mode": str})
    return df.reindex(columns=cols)


# testbed_summary geometry columns: knn_summary_per_model column stem -> name (raw and normalised erank)
TESTBED_GEOMETRY = {"pre_post_knor10": "pre_post_knor10", "pre_effective_rank": "pre_erank",
                    "post_effective_rank": "post_erank", "pre_effective_rank_norm_min_t1_d": "pre_erank_norm_min_t1_d",
                    "post_effective_rank_norm_min_t1_d": "post_erank_norm_min_t1_d"}


def _with_ci(row: dict[str, Any], name: str, hit: pd.DataFrame | pd.Series | None) -> None:
    """``row[name]``, ``row[name_ci95_lo]``, ``row[name_ci95_hi]`` from one summary row (NaN when absent)."""
    for s in ("mean", "ci95_lo", "ci95_hi"):
        v = np.nan if hit is None or s not in hit else hit[s]
        row[name if s == "mean" else f"{name}_{s}"] = float(v)


def testbed_summary(results_dir: Path) -> None:
    """``testbed_summary.csv/.tex``: one row per model of what the calibrated testbed should show.

    From the tables above: attribute accuracy and CLIPScore of the model's own captions (stage 7
    ``post_direct``), of captions through a trained reconstructor (``recon``) and their ratio; both
    scores at every perturbation level (stage 8); pre→post KNOR@10 with its chance level, raw and
    normalised effective ranks (stage 3; ``_norm_min_t1_d`` = divided by min(T−1, D)). Every score has
    its bootstrap 95 % interval over images (``<name>_ci95_lo``/``_hi``). Scene-only scores are means
    over the synthetic scenes; the rest over every image.
    """
    caps = _means(results_dir / "caption_summary.csv", ["model"])
    pert = _means(results_dir / "perturb_summary.csv", ["model", "mode", "level"])
    knn_path = results_dir / "knn_summary_per_model.csv"
    knn = pd.read_csv(knn_path, dtype={"model": str}).set_index("model") if knn_path.exists() else pd.DataFrame()
    rows = []
    for model in sorted(set(caps["model"]) | set(pert["model"]) | set(knn.index)):
        row: dict[str, Any] = {"model": model}
        for col, name in (("attr_acc_post_direct", "attr_acc"), ("attr_acc_recon", "attr_acc_recon"),
                          ("clipscore_post_direct", "clipscore"), ("clipscore_recon", "clipscore_recon")):
            hit = caps[(caps["model"] == model) & (caps["column"] == col)]
            _with_ci(row, name, hit.iloc[0] if len(hit) else None)
        row["recon_keeps"] = row["attr_acc_recon"] / row["attr_acc"] if row["attr_acc"] else np.nan
        for r in pert[(pert["model"] == model) & pert["column"].isin(["attr_acc_perturbed", "clipscore_perturbed"])
                      ].iterrows():
            r = r[1]
            _with_ci(row, f"{r['mode']}{r['level']:g}_{r['column'].removesuffix('_perturbed')}", r)
        k_row = knn.loc[model] if model in knn.index else None
        for stem, name in TESTBED_GEOMETRY.items():
            hit = None if k_row is None else {s: k_row.get(f"{stem}_{s}", np.nan) for s in ("mean", "ci95_lo", "ci95_hi")}
            _with_ci(row, name, hit)
        row["knor10_chance"] = float(k_row.get("knor10_chance", np.nan)) if k_row is not None else np.nan
        rows.append(row)
    if rows:
        df = pd.DataFrame(rows)
        tex = [c for c in df.columns if not c.endswith("_clipscore") and c != "clipscore_recon" and "_ci95_" not in c]
        write_table(df, results_dir, "testbed_summary", tex)


if __name__ == "__main__":
    sys.exit(main())
