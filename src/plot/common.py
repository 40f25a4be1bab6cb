"""Shared styling, statistics and output helpers of every plot / summary CLI (src/plot/).

* One colour per model everywhere (:func:`model_color`), display names (:func:`model_label`), a
  fixed model order (:func:`sort_models`).
* Standard flags (:func:`add_io_args`): ``--in_dir`` (default ``sample``), ``--out_dir`` (``figures``),
  ``--results_dir`` (``results``, tables), ``--pdf``, ``--dpi``, ``--models``.
* Atomic outputs: :func:`save_figure` (PNG, plus PDF with ``--pdf``) and :func:`write_table` (CSV plus
  a booktabs LaTeX table) write a temp file beside the target and rename it (``vlmc.utils.io``).
* Statistics used by several figures and tables: :func:`bootstrap_ci`, :func:`describe`,
  :func:`correlations`, :func:`ls_fit`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display, same output everywhere

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from vlmc.metrics.bootstrap import bootstrap_ci as metrics_bootstrap_ci  # noqa: E402
from vlmc.utils.cli import UsageError, ensure_writable_dir, parse_csv_list  # noqa: E402
from vlmc.utils.io import atomic_open, atomic_write_text  # noqa: E402

log = logging.getLogger("vlmc.plot")

MODEL_ORDER = ("llava", "idefics2", "qwen2.5vl", "qwen3.5", "qwen3vl")
MODEL_LABELS = {"llava": "LLaVA", "idefics2": "Idefics2", "qwen2.5vl": "Qwen2.5-VL", "qwen3.5": "Qwen3.5",
                "qwen3vl": "Qwen3-VL"}
MODEL_COLORS = {"llava": "#1f77b4", "idefics2": "#ff7f0e", "qwen2.5vl": "#2ca02c", "qwen3.5": "#d62728",
                "qwen3vl": "#9467bd"}
_SPARE_COLORS = ("#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#843c39")
PRE_POST_COLORS = {"pre": "#4c72b0", "post": "#dd8452"}
BOOT_N = 1000
BOOT_SEED = 0

plt.rcParams.update({"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3, "axes.titlesize": 11,
                     "axes.labelsize": 10, "legend.fontsize": 8})


# -- models -----------------------------------------------------------------------------------------


def model_color(model: str) -> str:
    """The model's colour: fixed for known families, else a stable pick from a spare palette."""
    if model in MODEL_COLORS:
        return MODEL_COLORS[model]
    h = int(hashlib.sha256(model.encode()).hexdigest(), 16)
    return _SPARE_COLORS[h % len(_SPARE_COLORS)]


def model_label(model: str) -> str:
    """Display name (``qwen2.5vl`` → ``Qwen2.5-VL``); unknown names are shown as they are."""
    return MODEL_LABELS.get(model, model)


def model_slug(model: str) -> str:
    """File-name form used by the seed's figures (``qwen2.5vl`` → ``qwen25vl``)."""
    return re.sub(r"[^A-Za-z0-9_]+", "", model)


def sort_models(models: Iterable[str]) -> list[str]:
    """Known families in their usual order, then the rest alphabetically."""
    rank = {m: i for i, m in enumerate(MODEL_ORDER)}
    return sorted(set(models), key=lambda m: (rank.get(m, len(rank)), m))


# -- CLI --------------------------------------------------------------------------------------------


def add_io_args(p, figures: bool = True, tables: bool = False) -> None:
    """The flags every plot CLI shares."""
    p.add_argument("--in_dir", default="sample", help="stage outputs to read (layout: src/plot/data.py)")
    if figures:
        p.add_argument("--out_dir", default="figures", help="where figures are written")
        p.add_argument("--pdf", action="store_true", help="also write each figure as PDF")
        p.add_argument("--dpi", type=int, default=120, help="PNG resolution (dots per inch)")
    if tables:
        p.add_argument("--results_dir", default="results", help="where tables (CSV + LaTeX) are written")
    p.add_argument("--models", default="", help="comma list of models to include; empty = every model found")


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


def save_figure(fig, out_dir: str | Path, name: str, pdf: bool = False, dpi: int = 120) -> list[Path]:
    """Write ``fig`` as ``<out_dir>/<name>.png`` (and ``.pdf``) atomically, then close it."""
    out = ensure_writable_dir(out_dir)
    paths = []
    try:
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
    """``<results_dir>/<name>.csv`` (all columns, full precision) and ``<name>.tex`` (``latex_cols``,
    models by display name)."""
    out = ensure_writable_dir(results_dir)
    csv_path, tex_path = out / f"{name}.csv", out / f"{name}.tex"
    atomic_write_text(csv_path, df.to_csv(index=False, na_rep="nan"))
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

    NaN (no warning) when fewer than 3 finite pairs or either side is constant.
    """
    from scipy import stats

    a, b = paired(x, y)
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


def scatter_fit(ax, x, y, color: str, label: str | None = None) -> dict[str, float]:
    """Scatter of the finite (x, y) pairs, their least-squares line and an r / ρ / n box; returns the stats."""
    a, b = paired(x, y)
    st = correlations(a, b)
    ax.scatter(a, b, s=10, alpha=0.7 if a.size < 300 else 0.3, color=color, edgecolors="none", label=label,
               rasterized=True)
    if np.isfinite(st["slope"]):
        xs = np.linspace(a.min(), a.max(), 50)
        ax.plot(xs, st["slope"] * xs + st["intercept"], color="black", lw=1.2, label="least-squares fit")
    ax.text(0.03, 0.97, f"r = {st['pearson_r']:.3f} (p = {st['pearson_p']:.2g})\n"
            f"ρ = {st['spearman_rho']:.3f} (p = {st['spearman_p']:.2g})\nn = {st['n']}",
            transform=ax.transAxes, va="top", fontsize=8, bbox={"boxstyle": "round", "fc": "white", "alpha": 0.8})
    return st


def panel_grid(n: int, width: float = 4.2, height: float = 3.6, ncols: int | None = None):
    """A figure with ``n`` axes (row-major, up to 3 per row by default); unused axes hidden."""
    ncols = ncols or min(n, 3)
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False,
                             layout="constrained")
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]
