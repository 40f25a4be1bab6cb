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


# -- one flag vocabulary: new name first, old names as aliases filling the same attribute -------------------------

STAGE_FLAGS = [  # (module, new flag, old aliases, attribute the code reads)
    ("vlmc.extract.extract_vectors", "--model", ("--models",), "models"),
    ("vlmc.extract.extract_vectors", "--resume", ("--skip_existing",), "skip_existing"),
    ("vlmc.extract.extract_clip", "--ref_type", ("--model_type",), "model_type"),
    ("vlmc.extract.extract_clip", "--resume", ("--skip_existing",), "skip_existing"),
    ("vlmc.train.train_recon", "--model", ("--embed_model",), "embed_model"),
    ("vlmc.train.train_recon", "--recon_type", ("--model_type",), "model_type"),
    ("vlmc.train.export_recon", "--model", ("--embed_model",), "embed_model"),
    ("vlmc.train.export_recon", "--out_dir", ("--out_base",), "out_base"),
    ("vlmc.train.export_recon", "--resume", ("--skip_existing",), "skip_existing"),
    ("vlmc.train.train_connector", "--model", ("--embed_model",), "embed_model"),
    ("vlmc.eval.eval_recon", "--model", ("--embed_model",), "embed_model"),
    ("vlmc.eval.eval_captions", "--model", ("--embed_model",), "embed_model"),
    ("vlmc.eval.eval_perturb", "--model", ("--model_name",), "model_name"),
    ("vlmc.eval.score_captions", "--resume", ("--skip_existing",), "skip_existing"),
    ("vlmc.eval.score_perturb", "--resume", ("--skip_existing",), "skip_existing"),
    ("vlmc.plot.plot_knn", "--model", ("--models",), "models"),
]


@pytest.mark.parametrize(("module", "new", "old", "dest"), STAGE_FLAGS, ids=lambda v: v if isinstance(v, str) else None)
def test_new_flag_names_and_their_aliases_fill_one_attribute(module, new, old, dest):
    import importlib

    option = {a.dest: a for a in importlib.import_module(module).build_parser()._actions}[dest]
    assert option.option_strings == [new, *old]


def test_vocabulary_helpers_parse_new_and_old_names_alike():
    from vlmc.utils import cli

    p = make_parser("demo")
    cli.add_model_arg(p, "--embed_model", default=None, help="family")
    cli.add_out_dir_arg(p, "--out", default="x", help="output folder")
    cli.add_resume_arg(p, "--skip_existing", help="keep what an earlier run committed")
    cli.add_recon_type_arg(p, "--model_type", default="mlp", choices=["linear", "mlp"], help="reconstructor")
    new = p.parse_args(["--model", "llava", "--out_dir", "o", "--resume", "--recon_type", "linear"])
    old = p.parse_args(["--embed_model", "llava", "--out", "o", "--skip_existing", "--model_type", "linear"])
    assert vars(new) == vars(old) == {"embed_model": "llava", "out": "o", "skip_existing": True, "model_type": "linear"}
    text = " ".join(p.format_help().split())
    assert "--model MODEL, --embed_model MODEL family" in text and "--resume, --skip_existing keep" in text
    assert "--out_dir OUT_DIR, --out OUT_DIR output folder (default: x)" in text


def test_one_default_perturbation_folder():
    from vlmc.eval.eval_perturb import build_parser

    assert build_parser().parse_args(["--mode", "mask", "--level", "0.1"]).out_dir == "data/output/perturb_out"
