"""Geometry figures from stage 3 (extract_knn): neighbourhood overlap, spectra, effective rank.

Reads ``<knn_dir>/<model>/overlap_top<k>_<metric>.json`` and ``per_image.csv`` (see vlmc.plot.data) and
writes to ``<out_dir>/knn/``:

    single_dataset_topk_all.png   KNOR(pre, post) vs k, one line per model (dotted: random k/(N-1))
    triway_knor_lines.png         per model: KNOR vs k for pre-post and <ref>-pre / <ref>-post
    triway_knor_bars_k<k>.png     the same pairs at one k, bars per model (error bars: ±1 std over images)
    three_way_counts_k<k>.png     shares of the k neighbours common to ref∩pre∩post, ref∩pre only, ...
    spectra_<model>.png           mean singular values, energy fractions and cumulative energy, pre vs post
    energy_spectrum_all.png       cumulative energy of every model, pre (dashed) vs post (solid)
    effective_rank_summary.png    per-image effective rank (raw, normalised) and top-1 energy, pre vs post

KNOR@k = mean_i |N_k^A(i) ∩ N_k^B(i)| / k. A figure whose inputs are absent is skipped with a warning.

Example:
    python src/plot/plot_knn.py --in_dir sample --out_dir figures --k 100
"""

from __future__ import annotations

import logging
import sys

import numpy as np

from vlmc.plot.common import (PRE_POST_COLORS, add_io_args, model_color, model_label, model_slug, panel_grid,
                              pick_models, save_figure)
from vlmc.plot.data import KnnRun, add_stage_args, knor_table, load_knn, require_dir, stage_dir
from vlmc.utils.cli import entry_point, make_parser

log = logging.getLogger("vlmc.plot.knn")
PAIR_STYLE = {"pre": ("-", "o"), "post": ("--", "s")}


def pair_label(pair: str) -> str:
    """``pre_post`` → ``pre ↔ post``, ``clip_pre`` → ``clip ↔ pre``."""
    return "pre ↔ post" if pair == "pre_post" else pair.replace("_", " ↔ ", 1)[::-1].replace("_", " ", 0)[::-1]


def pair_style(pair: str) -> dict:
    if pair == "pre_post":
        return {"color": "black", "ls": ":", "marker": "^"}
    side = pair.rsplit("_", 1)[-1]
    ls, marker = PAIR_STYLE.get(side, ("-.", "D"))
    return {"color": PRE_POST_COLORS.get(side, "gray"), "ls": ls, "marker": marker}


def plot_pre_post_lines(runs: dict[str, KnnRun], args) -> None:
    fig, ax = panel_grid(1, 6.0, 4.2)[0], panel_grid.__self__ if False else None  # placeholder, replaced below
