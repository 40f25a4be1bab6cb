"""Shared styling, statistics and output helpers of every plot / summary CLI (src/plot/).

* The look of every figure (fonts, colours per family, human column labels) lives in vlmc.plot.style and
  is re-exported here; :func:`save_figure` refuses blank / constant panels and reports cut or overlapping
  text (vlmc.plot.figcheck).
* Standard flags (:func:`add_io_args`): ``--in_dir`` (default ``sample``), ``--out_dir`` (``figures``),
  ``--results_dir`` (``results``, tables), ``--pdf``, ``--dpi``, ``--models``.
* Atomic outputs: :func:`save_figure` (PNG, plus PDF with ``--pdf``) and :func:`write_table` (CSV plus
  a booktabs LaTeX table) write a temp file beside the target and rename it (``vlmc.utils.io``).
* Statistics used by several figures and tables: :func:`bootstrap_ci`, :func:`describe`,
  :func:`correlations`, :func:`ls_fit`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from vlmc.metrics.bootstrap import bootstrap_ci as metrics_bootstrap_ci
from vlmc.plot.figcheck import data_problems, layout_problems
from vlmc.plot.style import (  # noqa: F401  (re-exported: the plot CLIs import them from here)
    CHANCE_STYLE,
    GROUP_LABELS,
    GROUP_MARKERS,
    GROUP_ORDER,
    PRE_POST_COLORS,
    axis_label,
    label,
    model_color,
    model_label,
    sort_models,
    wrap,
)
from vlmc.utils import cli
from vlmc.utils.cli import UsageError, ensure_writable_dir, parse_csv_list
from vlmc.utils.io import atomic_open, atomic_write_text

log = logging.getLogger("vlmc.plot")

BOOT_N = 1000
BOOT_SEED = 0
ROUND_DECIMALS = 4  # rank statistics and correlations run on values rounded to this many decimals
TABLE_FLOAT_FORMAT = "%.6g"  # results/*.csv: 6 significant digits, so float noise never changes a byte


class FigureError(UsageError):
    """A figure that would mislead (a blank or constant panel): refused instead of written."""


# -- models -----------------------------------------------------------------------------------------


def model_slug(model: str) -> str:
    """File-name form used by the original pipeline's figures (``qwen2.5vl`` → ``qwen25vl``)."""
    return re.sub(r"[^A-Za-z0-9_]+", "", model)


# -- CLI --------------------------------------------------------------------------------------------


def add_io_args(p, figures: bool = True, tables: bool = False) -> None:
    """The flags every plot CLI shares."""
    p.add_argument("--in_dir", default="sample", help="stage outputs to read (layout: src/plot/data.py)")
    if figures:
        cli.add_out_dir_arg(p, default="figures", help="where figures are written")
        p.add_argument("--pdf", action="store_true", help="also write each figure as PDF")
        p.add_argument("--dpi", type=int, default=120, help="PNG resolution (dots per inch)")
    if tables:
        p.add_argument("--results_dir", default="results", help="where tables (CSV + LaTeX) are written")
    cli.add_model_arg(p, "--models", multiple=True, default="", help="comma list of models to include; empty = every model found")


def pick_models(found: Iterable[str], wanted: str) -> list[str]:
    """``found`` filtered by a ``--models`` comma list (ordered); a requested model absent is an error."""
    found = sort_models(found)
    want = parse_csv_list(wanted)
    if not want:
        return found
    missing = [m for m in want if m not in found]
    if missing:
        raise UsageError(f"--models: no data for {', '.join(missing)} (found: {', '.join(found) or 'none'})")
    return [m for m in found if m in want]


def require_dir(path: str | Path, what: str) -> Path:
    """``path`` as a Path; a one-line ``FileNotFoundError`` (exit 2) when it is not a folder."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} {p} is not a folder")
    return p


# -- outputs ----------------------------------------------------------------------------------------


SAVE_HOOKS: list = []  # callables (fig, name) run before each figure is written (tests read figures back)


def check_figure(fig, name: str) -> None:
    """Refuse ``fig`` when a panel is blank or constant (:class:`FigureError`); report cut or overlapping text.

    Layout problems are warnings, or a :class:`FigureError` when ``VLMC_FIGURE_CHECK=strict`` (the tests);
    ``VLMC_FIGURE_CHECK=off`` skips the layout check (it draws the figure once more).
    """
    bad = data_problems(fig)
    if bad:
        raise FigureError(f"figure {name}: {'; '.join(bad)}")
    mode = os.environ.get("VLMC_FIGURE_CHECK", "warn")
    if mode == "off":
        return
    layout = layout_problems(fig)
    if layout and mode == "strict":
        raise FigureError(f"figure {name}: {'; '.join(layout)}")
    for problem in layout:
        log.warning("figure %s: %s", name, problem)


def save_figure(fig, out_dir: str | Path, name: str, pdf: bool = False, dpi: int = 120) -> list[Path]:
    """Check ``fig`` (:func:`check_figure`), write it as ``<out_dir>/<name>.png`` (and ``.pdf``) atomically,
    then close it."""
    paths = []
    try:
        for hook in SAVE_HOOKS:
            hook(fig, name)
        check_figure(fig, name)
        out = ensure_writable_dir(out_dir)
        for ext in ("png", "pdf") if pdf else ("png",):
            path = out / f"{name}.{ext}"
            with atomic_open(path, "wb") as f:
                fig.savefig(f, format=ext, dpi=dpi)
            paths.append(path)
    finally:
        plt.close(fig)
    log.info("wrote %s", ", ".join(str(p) for p in paths))
    return paths


def _tex_escape(text: str) -> str:
    return re.sub(r"([_%&#$])", r"\\\1", str(text))


def _tex_cell(v, digits: int) -> str:
    if isinstance(v, float | np.floating):
        if math.isnan(v):
            return "--"
        a = abs(v)
        return f"{v:.2e}" if (a != 0 and (a < 10 ** -digits or a >= 1e5)) else f"{v:.{digits}f}"
    return _tex_escape(v)


def to_latex(df: pd.DataFrame, digits: int = 3) -> str:
    """A booktabs ``tabular`` of ``df`` (no index); floats to ``digits`` decimals, NaN as ``--``."""
    cols = list(df.columns)
    align = "".join("r" if pd.api.types.is_numeric_dtype(df[c]) else "l" for c in cols)
    lines = [rf"\begin{{tabular}}{{{align}}}", r"\toprule", " & ".join(_tex_escape(c) for c in cols) + r" \\",
             r"\midrule"]
    for row in df.itertuples(index=False):
        lines.append(" & ".join(_tex_cell(v, digits) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def write_table(df: pd.DataFrame, results_dir: str | Path, name: str, latex_cols: Sequence[str] | None = None,
                digits: int = 3) -> list[Path]:
    """``<results_dir>/<name>.csv`` (all columns, 6 significant digits: ``TABLE_FLOAT_FORMAT``) and ``<name>.tex`` (``latex_cols``,
    models by display name)."""
    out = ensure_writable_dir(results_dir)
    csv_path, tex_path = out / f"{name}.csv", out / f"{name}.tex"
    atomic_write_text(csv_path, df.to_csv(index=False, na_rep="nan", float_format=TABLE_FLOAT_FORMAT))
    tex = df[list(latex_cols)] if latex_cols else df
    if "model" in tex.columns:
        tex = tex.assign(model=tex["model"].map(model_label))
    atomic_write_text(tex_path, to_latex(tex, digits))
    log.info("wrote %s, %s", csv_path, tex_path)
    return [csv_path, tex_path]


# -- statistics -------------------------------------------------------------------------------------


def finite(values) -> np.ndarray:
    """float64 array of the finite entries of ``values`` (NaN / inf / non-numbers dropped)."""
    v = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=np.float64)
    return v[np.isfinite(v)]


def bootstrap_ci(values, n_boot: int = BOOT_N, seed: int = BOOT_SEED, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of the finite ``values``, reproducible from (values, n_boot, seed)
    alone: ``vlmc.metrics.bootstrap.bootstrap_ci`` (the algorithm is documented there). NaN, NaN when n = 0."""
    return metrics_bootstrap_ci(finite(values), n_boot, seed, level)


def describe(values, n_boot: int = BOOT_N, seed: int = BOOT_SEED) -> dict[str, float]:
    """n, mean, median, std (ddof=1), q25, q75, iqr (linear quantiles) and bootstrap 95% CI of the mean."""
    x = finite(values)
    if x.size == 0:
        nan = math.nan
        return {"n": 0, "mean": nan, "median": nan, "std": nan, "q25": nan, "q75": nan, "iqr": nan,
                "ci95_lo": nan, "ci95_hi": nan}
    q25, q75 = np.percentile(x, [25, 75])
    lo, hi = bootstrap_ci(x, n_boot, seed)
    return {"n": int(x.size), "mean": float(x.mean()), "median": float(np.median(x)),
            "std": float(x.std(ddof=1)) if x.size > 1 else math.nan, "q25": float(q25), "q75": float(q75),
            "iqr": float(q75 - q25), "ci95_lo": lo, "ci95_hi": hi}


def paired(x, y) -> tuple[np.ndarray, np.ndarray]:
    """The rows where both ``x`` and ``y`` are finite numbers."""
    a = pd.to_numeric(pd.Series(x).reset_index(drop=True), errors="coerce").to_numpy(np.float64)
    b = pd.to_numeric(pd.Series(y).reset_index(drop=True), errors="coerce").to_numpy(np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    return a[ok], b[ok]


def ls_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares line ``y = slope·x + intercept``; NaN when x is constant or n < 2."""
    if x.size < 2 or np.ptp(x) == 0:
        return math.nan, math.nan
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def correlations(x, y) -> dict[str, float]:
    """n, Pearson r and p, Spearman ρ and p (scipy, two-sided), least-squares slope and intercept.

    Computed on the values rounded to ``ROUND_DECIMALS`` decimals, so float noise far below the data's
    resolution (BERTScore's fp32 sums, drops of ±1e-7 around 0) cannot reorder ranks or change a digit of
    the tables. NaN (no warning) when fewer than 3 finite pairs or either side is constant.
    """
    from scipy import stats

    a, b = (np.round(v, ROUND_DECIMALS) + 0.0 for v in paired(x, y))  # + 0.0: no -0.0
    out = {"n": int(a.size), "pearson_r": math.nan, "pearson_p": math.nan, "spearman_rho": math.nan,
           "spearman_p": math.nan, "slope": math.nan, "intercept": math.nan}
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return out
    r = stats.pearsonr(a, b)
    s = stats.spearmanr(a, b)
    out.update(pearson_r=float(r.statistic), pearson_p=float(r.pvalue), spearman_rho=float(s.statistic),
               spearman_p=float(s.pvalue))
    out["slope"], out["intercept"] = ls_fit(a, b)
    return out


# -- drawing ----------------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return "–" if not np.isfinite(v) else f"{v:.2f}"


def scatter_fit(ax, x, y, color: str, groups=None) -> dict[str, dict[str, float]]:
    """Scatter of the finite (x, y) pairs, one marker per image group, with each group's least-squares line
    and statistics (n, Pearson r, Spearman ρ) in a legend placed where it hides the fewest points.

    ``groups``: a label per row (``scenes`` / ``photos``, vlmc.plot.data.image_groups) or None (one group,
    ``all``). Returns ``{group: correlations(...)}``.
    """
    frame = pd.DataFrame({"x": pd.to_numeric(pd.Series(list(x)), errors="coerce"),
                          "y": pd.to_numeric(pd.Series(list(y)), errors="coerce"),
                          "g": list(groups) if groups is not None else ["all"] * len(list(x))})
    frame = frame[np.isfinite(frame["x"]) & np.isfinite(frame["y"])]
    present = [g for g in (*GROUP_ORDER, "all") if g in set(frame["g"])]
    present += sorted(set(frame["g"]) - set(present))
    out = {}
    for g in present:
        sub = frame[frame["g"] == g]
        st = correlations(sub["x"], sub["y"])
        out[g] = st
        name = GROUP_LABELS.get(g, "images" if g == "all" else g)
        text = f"{name}, n = {st['n']}: r = {_fmt(st['pearson_r'])}, ρ = {_fmt(st['spearman_rho'])}"
        ax.scatter(sub["x"], sub["y"], s=14, alpha=0.75 if len(sub) < 300 else 0.3, color=color,
                   marker=GROUP_MARKERS.get(g, "o"), edgecolors="none" if g != "photos" else "black",
                   linewidths=0.4, label=text, rasterized=True)
        if np.isfinite(st["slope"]):
            xs = np.linspace(sub["x"].min(), sub["x"].max(), 50)
            ax.plot(xs, st["slope"] * xs + st["intercept"], color="black", lw=1.0,
                    ls="-" if g != "photos" else "--")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.06 * (len(present) + 1) * (hi - lo))  # headroom: the legend finds an empty band
    ax.legend(loc="best", fontsize=6.5, handletextpad=0.3, borderaxespad=0.3)
    return out


def panel_grid(n: int, width: float = 4.2, height: float = 3.6, ncols: int | None = None):
    """A figure with ``n`` axes (row-major; by default 2 per row for 4 panels, else up to 3); unused axes hidden."""
    ncols = ncols or (2 if n == 4 else min(n, 3))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False,
                             layout="constrained")
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]
