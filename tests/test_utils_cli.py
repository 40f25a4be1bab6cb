"""vlmc.utils.cli: --help states each default once (none doubled, none on required flags, switches or None
defaults); progress bars that also report into logs."""

from __future__ import annotations

import re

import pytest

from vlmc.utils.cli import make_parser


def help_text() -> str:
    p = make_parser("demo")
    p.add_argument("--shards", default=None, help="comma list of shards (default: all)")
    p.add_argument("--root", required=True, default=None, help="image folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--k", default="10,50", help="neighbourhood sizes")
    p.add_argument("--models", default="", help="comma list; empty = every model")
    p.add_argument("--pdf", action="store_true", help="also write PDFs")
    p.add_argument("--ref", default=None, help="reference; None = no reference")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (%(default)s)")
    return " ".join(p.format_help().split())


def test_each_default_once():
    text = help_text()
    assert "(default: all)" in text and "(default: all) (default" not in text
    assert "(default: 10,50)" in text
    assert "learning rate (0.001)" in text and "(0.001) (default" not in text
    for flag in ("--root ROOT", "--out OUT", "--pdf", "--ref REF", "--models MODELS"):
        part = text.split(flag, 1)[1].split(" --", 1)[0]
        assert "(default:" not in part, (flag, part)
    assert "(default: None)" not in text and "(default: )" not in text and "(default: False)" not in text


@pytest.mark.parametrize("module", ["vlmc.extract.extract_knn", "vlmc.eval.eval_captions", "vlmc.plot.plot_knn"])
def test_stage_help_has_no_doubled_or_none_defaults(module):
    import importlib

    text = " ".join(importlib.import_module(module).build_parser().format_help().split())
    assert not re.search(r"\(default: [^)]*\)\s*\(default:", text), text
    assert "(default: None)" not in text


def test_progress_bar_writes_lines_into_a_log(capsys):
    """stderr not a terminal (a log): the bar still reports, one line per refresh, no carriage returns."""
    from vlmc.utils.cli import progress_bar

    for _ in progress_bar(range(3), desc="captions x", unit="img", interval=0):
        pass
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln]
    assert "\r" not in err and lines[-1].startswith("captions x: 100%") and "3/3" in lines[-1], err
