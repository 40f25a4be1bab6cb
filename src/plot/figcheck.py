"""Checks a figure must pass before it is written (no blank panel, no clipped or overlapping text).

No blank or constant panel, no text cut by the canvas, no two text boxes on top of each other.

:func:`data_problems` needs no drawing: for every visible panel (colour bars excepted) it gathers the
y-values of what is plotted in data coordinates — lines (except reference lines: ``gid="reference"`` or
drawn in axes coordinates, such as ``axhline``), scatter / violin / band collections, bar tops, image
pixels — and reports a panel with none (blank) or with all of them equal (constant).

:func:`layout_problems` draws the figure once and compares the window extents of every visible text:
the suptitle and figure texts, each panel's titles, axis labels, tick labels (those in view), texts and
legend (a legend counts as one box). A box reaching more than ``tol`` pixels past the canvas is *cut*;
two boxes sharing more than ``tol`` pixels in both directions *overlap*.

:func:`figure_problems` is both. ``save_figure`` (vlmc.plot.common) refuses a figure with a data problem
and reports layout problems (an error when ``VLMC_FIGURE_CHECK=strict``, as the test suite sets it).
"""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle
from matplotlib.transforms import Bbox

REFERENCE_GID = "reference"  # lines that mark a level (chance, zero, unperturbed), not data


def panel_name(ax: Axes, i: int) -> str:
    """A panel's title, else its y label, else its position."""
    name = ax.get_title() or ax.get_ylabel()
    return repr(name.replace("\n", " ")) if name else f"#{i + 1}"


def _is_data(artist, ax: Axes) -> bool:
    transform = artist.get_data_transform() if hasattr(artist, "get_data_transform") else artist.get_transform()
    return artist.get_visible() and artist.get_gid() != REFERENCE_GID and transform == ax.transData


def panel_values(ax: Axes) -> np.ndarray:
    """The finite y-values (or pixel values) of everything plotted as data in ``ax``."""
    vals: list[np.ndarray] = []
    for line in ax.lines:
        if _is_data(line, ax):
            vals.append(np.asarray(line.get_ydata(), dtype=float).ravel())
    for coll in ax.collections:
        if not (coll.get_visible() and coll.get_gid() != REFERENCE_GID):
            continue
        if isinstance(coll, PathCollection):  # a scatter: one offset (in data coordinates) per point
            if coll.get_offset_transform() == ax.transData:
                vals.append(np.asarray(coll.get_offsets(), dtype=float).reshape(-1, 2)[:, 1])
        elif coll.get_transform() == ax.transData:  # bands, violins, error bars: their outlines
            vals += [np.asarray(p.vertices, dtype=float)[:, 1] for p in coll.get_paths()]
    for patch in ax.patches:
        if isinstance(patch, Rectangle) and _is_data(patch, ax):
            vals.append(np.array([patch.get_y() + patch.get_height()]))
    for im in ax.images:
        if isinstance(im, AxesImage) and im.get_visible():
            vals.append(np.ma.filled(np.ma.asarray(im.get_array(), dtype=float), np.nan).ravel())
    if not vals:
        return np.zeros(0)
    v = np.concatenate(vals)
    return v[np.isfinite(v)]


def data_problems(fig: Figure) -> list[str]:
    """``panel …: blank`` / ``panel …: constant (every plotted value = v)`` for each such panel."""
    out = []
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible() or getattr(ax, "_colorbar", None) is not None:
            continue
        v = panel_values(ax)
        if v.size == 0:
            out.append(f"panel {panel_name(ax, i)}: blank (nothing plotted)")
        elif np.ptp(v) <= 1e-12 * max(1.0, float(np.abs(v).max())):
            out.append(f"panel {panel_name(ax, i)}: constant (every plotted value = {v[0]:.4g})")
    return out


def _ticklabels(axis, ax: Axes) -> list:
    lo, hi = sorted(axis.get_view_interval())
    span = (hi - lo) or 1.0
    out = []
    for tick in axis.get_major_ticks():
        loc = tick.get_loc()
        if loc is None or not (lo - 1e-9 * span <= loc <= hi + 1e-9 * span):
            continue
        for lab in (tick.label1, tick.label2):
            if lab.get_visible() and lab.get_text():
                out.append(lab)
    return out


def text_boxes(fig: Figure, renderer) -> list[tuple[str, Bbox]]:
    """(description, window extent) of every visible, non-empty text box of ``fig``."""
    items: list[tuple[str, object]] = []
    if fig._suptitle is not None:
        items.append(("suptitle", fig._suptitle))
    items += [("figure text", t) for t in fig.texts if t is not fig._suptitle]
    items += [("figure legend", lg) for lg in fig.legends]
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        name = f"panel {panel_name(ax, i)}"
        items += [(f"{name} title", t) for t in (ax.title, ax._left_title, ax._right_title)]
        items += [(f"{name} text {t.get_text()[:20]!r}", t) for t in ax.texts]
        if ax.get_legend() is not None:
            items.append((f"{name} legend", ax.get_legend()))
        if ax.axison:
            items += [(f"{name} x label", ax.xaxis.label), (f"{name} y label", ax.yaxis.label)]
            items += [(f"{name} x tick {t.get_text()!r}", t) for t in _ticklabels(ax.xaxis, ax)]
            items += [(f"{name} y tick {t.get_text()!r}", t) for t in _ticklabels(ax.yaxis, ax)]
    boxes = []
    for desc, art in items:
        if not art.get_visible() or (hasattr(art, "get_text") and not art.get_text().strip()):
            continue
        boxes.append((desc, art.get_window_extent(renderer)))
    return boxes


def layout_problems(fig: Figure, tol: float = 1.0) -> list[str]:
    """Texts cut by the canvas and pairs of overlapping text boxes (draws the figure once)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = text_boxes(fig, renderer)
    canvas = fig.bbox
    out = []
    for desc, b in boxes:
        if b.x0 < canvas.x0 - tol or b.y0 < canvas.y0 - tol or b.x1 > canvas.x1 + tol or b.y1 > canvas.y1 + tol:
            out.append(f"{desc}: cut by the canvas")
    for i, (da, a) in enumerate(boxes):
        for db, b in boxes[i + 1:]:
            w = min(a.x1, b.x1) - max(a.x0, b.x0)
            h = min(a.y1, b.y1) - max(a.y0, b.y0)
            if w > tol and h > tol:
                out.append(f"{da} overlaps {db}")
    return out


def figure_problems(fig: Figure) -> list[str]:
    """:func:`data_problems` followed by :func:`layout_problems`."""
    return data_problems(fig) + layout_problems(fig)
