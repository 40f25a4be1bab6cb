"""The figure check (vlmc.plot.figcheck) and what every figure must show.

* The checker itself: it finds overlapping text, text cut by the canvas, blank and constant panels, and
  passes a clean figure.
* Chance levels: every KNOR figure carries a line at k/(N−1), read back from the figure's own data.
* ``make figures`` on the committed sample/: every figure passes the strict check, the figure set is
  exactly the committed one, and every results/ table is reproduced byte for byte (slow).
"""

from __future__ import annotations

import filecmp
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

try:
    from fixtures_plot import make_plot_tree
except ImportError:
    from tests.fixtures_plot import make_plot_tree

from vlmc.plot import common, make_figures, plot_knn
from vlmc.plot.common import FigureError, check_figure
from vlmc.plot.figcheck import data_problems, layout_problems

REPO = Path(__file__).resolve().parents[1]


def _fig(n=1):
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3), squeeze=False, layout="constrained")
    return fig, list(axes.ravel())


def test_clean_figure_passes():
    fig, (ax,) = _fig()
    ax.plot([1, 2, 3], [0.1, 0.5, 0.2], label="a")
    ax.axhline(0.3, gid="reference")
    ax.set(title="t", xlabel="x", ylabel="y")
    ax.legend()
    assert data_problems(fig) == [] and layout_problems(fig) == []
    plt.close(fig)


def test_constant_and_blank_panels_found():
    fig, (a, b, c) = _fig(3)
    a.bar([0, 1, 2], [1.0, 1.0, 1.0])  # the old k = N - 1 bar chart: every bar 1.0
    a.axhline(0.5, gid="reference")  # reference lines do not count as data
    b.set_title("empty")
    c.scatter([1, 2], [3, 4])
    problems = data_problems(fig)
    assert len(problems) == 2 and "constant" in problems[0] and "= 1" in problems[0], problems
    assert "'empty': blank" in problems[1]
    with pytest.raises(FigureError, match="constant"):
        check_figure(fig, "bad")
    plt.close(fig)


def test_overlapping_and_cut_text_found():
    fig, (ax,) = _fig()
    ax.plot([0, 1], [0, 1])
    ax.text(0.5, 0.5, "first label here", transform=ax.transAxes)
    ax.text(0.52, 0.51, "second label here", transform=ax.transAxes)
    fig.text(0.9, 0.5, "this text runs past the right edge of the canvas")
    problems = layout_problems(fig)
    assert any("overlaps" in p and "first label" in p and "second label" in p for p in problems), problems
    assert any("cut by the canvas" in p and "figure text" in p for p in problems), problems
    plt.close(fig)


def test_layout_problem_is_an_error_only_in_strict_mode(monkeypatch):
    fig, (ax,) = _fig()
    ax.plot([0, 1], [0, 1])
    ax.set_ylabel("a y label far too long to fit beside a panel this small, so it is cut at both ends " * 2)
    monkeypatch.setenv("VLMC_FIGURE_CHECK", "warn")
    check_figure(fig, "warned")
    monkeypatch.setenv("VLMC_FIGURE_CHECK", "strict")
    with pytest.raises(FigureError, match="cut by the canvas"):
        check_figure(fig, "refused")
    plt.close(fig)


KNOR_FIGURES = re.compile(r"^(single_dataset_topk_all|triway_knor_lines|triway_knor_bars_k\d+|three_way_counts_k\d+)$")


def test_every_knor_figure_draws_chance(tmp_path, monkeypatch):
    """Chance k/(N−1) read back from the lines of every KNOR figure (N = 24 in the fixture tree)."""
    tree = make_plot_tree(tmp_path / "stages")
    seen: dict[str, list] = {}

    def grab(fig, name):
        if KNOR_FIGURES.match(name):
            seen[name] = [(ln.get_xdata(), ln.get_ydata()) for ax in fig.axes for ln in ax.lines
                          if "chance" in str(ln.get_label())]

    monkeypatch.setattr(common, "SAVE_HOOKS", [grab])
    monkeypatch.setenv("VLMC_FIGURE_CHECK", "off")
    assert plot_knn.main(["--in_dir", str(tree), "--out_dir", str(tmp_path / "f"), "--dpi", "40"]) == 0
    n = 24
    assert set(seen) == {"single_dataset_topk_all", "triway_knor_lines", "triway_knor_bars_k5", "three_way_counts_k5"}
    for name, lines in seen.items():
        assert lines, f"{name}: no chance line"
        for x, y in lines:
            if name.startswith(("triway_knor_bars", "three_way")):  # one k: a level across each model's bars
                k = int(name.rsplit("_k", 1)[1])
                np.testing.assert_allclose(y, k / (n - 1))
            else:  # a curve over k
                np.testing.assert_allclose(y, np.asarray(x, float) / (n - 1))
                assert max(x) < n - 1  # k >= N - 1 (KNOR = 1 by construction) is left out


def test_bar_k_refuses_trivial_k(tmp_path, capsys):
    tree = make_plot_tree(tmp_path / "stages")
    assert plot_knn.main(["--in_dir", str(tree), "--out_dir", str(tmp_path / "f"), "--k", "23"]) == 2
    assert "1 by construction" in capsys.readouterr().err


@pytest.mark.slow
def test_make_figures_reproduces_committed_figures_and_results(tmp_path, monkeypatch):
    """`make figures` from sample/: strict figure checks pass, same figure set, results/ byte for byte."""
    monkeypatch.setenv("VLMC_FIGURE_CHECK", "strict")
    figs, res = tmp_path / "figures", tmp_path / "results"
    assert make_figures.main(["--in_dir", str(REPO / "sample"), "--out_dir", str(figs), "--results_dir", str(res)]) == 0
    made = sorted(p.relative_to(figs).as_posix() for p in figs.rglob("*.png"))
    committed = sorted(p.relative_to(REPO / "figures").as_posix() for p in (REPO / "figures").rglob("*.png"))
    assert made == committed
    tables = sorted(p.name for p in (REPO / "results").iterdir())
    assert sorted(p.name for p in res.iterdir()) == tables
    _, mismatch, errors = filecmp.cmpfiles(REPO / "results", res, tables, shallow=False)
    assert not mismatch and not errors, f"results/ not reproduced byte for byte: {mismatch + errors}"
