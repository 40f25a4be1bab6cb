"""The package layering of src/ (which ``vlmc`` package may import which), and a docstring atop every module.

Every module under src/ is parsed with ``ast``; every ``vlmc.*`` import it makes (at the top, inside a
function, relative or absolute) is an edge between two packages of ``vlmc``. ``ALLOWED`` is the whole
graph: an edge not in it fails the test. The point is that ``train/`` and ``eval/`` never import each
other: what both need lives below them, in ``store/``, ``models/``, ``metrics/``, ``utils/`` (or the
image sets in ``data/`` and the stage-1 runner in ``extract/``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "vlmc"

# package -> the packages it may import (its own modules and the root ``vlmc`` are always allowed).
# Layers, bottom up: utils; metrics, data, models; store (reads vectors, split, stats, reconstructor
# runs); extract (stages 1-3); train, eval (never each other); plot (reads files, imports no stage).
ALLOWED: dict[str, frozenset[str]] = {
    "utils": frozenset(),
    "metrics": frozenset({"utils"}),
    "data": frozenset({"utils"}),
    "models": frozenset({"utils", "data"}),  # the testbed scenes' pixel statistics (data.scenes)
    "store": frozenset({"utils", "data", "models"}),
    "extract": frozenset({"utils", "metrics", "data", "models", "store"}),
    "train": frozenset({"utils", "metrics", "data", "models", "store", "extract"}),
    "eval": frozenset({"utils", "metrics", "data", "models", "store", "extract"}),
    "plot": frozenset({"utils", "metrics", "data", "models"}),  # labels, colours, order: on the adapters
}


def module_name(path: Path) -> str:
    """``src/train/data.py`` → ``vlmc.train.data``; a package's ``__init__.py`` → the package."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([ROOT, *parts])


def vlmc_imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, imported module)`` of every ``vlmc`` import in ``source``, relative ones resolved.

    ``from vlmc.a import b`` yields ``vlmc.a.b`` (b may be a module or a name in ``vlmc.a``; only the
    package ``vlmc.a`` matters here), ``from vlmc import a`` yields ``vlmc.a``.
    """
    here = module.split(".") if is_package else module.split(".")[:-1]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here[: len(here) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out += [(node.lineno, f"{base}.{a.name}" if base else a.name) for a in node.names]
    return [(line, name) for line, name in out if name == ROOT or name.startswith(ROOT + ".")]


def package_of(module: str) -> str | None:
    """``vlmc.train.data`` → ``train``; the root package (``vlmc``, ``vlmc.__version__``) → None."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in ALLOWED:
        return None
    return parts[1]


def forbidden_edges(source: str, module: str, is_package: bool = False) -> list[str]:
    """``"<module>:<line> imports <target>"`` for each import of ``source`` that ``ALLOWED`` does not permit."""
    src_pkg = package_of(module)
    bad = []
    for line, target in vlmc_imports(source, module, is_package):
        dst = package_of(target)
        if dst is None or src_pkg is None or dst == src_pkg:
            continue
        if dst not in ALLOWED[src_pkg]:
            bad.append(f"{module}:{line} imports {target} ({src_pkg} -> {dst})")
    return bad


def modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_package_is_in_the_table():
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(ALLOWED), "a package of src/ is missing from ALLOWED (or ALLOWED names a gone one)"


def test_no_forbidden_import_anywhere_in_src():
    bad = [e for f in modules() for e in forbidden_edges(f.read_text(), module_name(f), f.name == "__init__.py")]
    assert not bad, "imports against the layering (tests/test_layers.py ALLOWED):\n" + "\n".join(bad)


def test_train_and_eval_never_import_each_other():
    assert "eval" not in ALLOWED["train"] and "train" not in ALLOWED["eval"]


@pytest.mark.parametrize(
    ("module", "source", "forbidden"),
    [
        ("vlmc.eval.x", "from vlmc.train.data import Store\n", True),
        ("vlmc.eval.x", "import vlmc.train.export_recon\n", True),
        ("vlmc.eval.x", "from vlmc import train\n", True),
        ("vlmc.eval.x", "def f():\n    from vlmc.train import train_recon\n", True),  # inside a function
        ("vlmc.eval.x", "from ..train import export_recon\n", True),  # relative
        ("vlmc.train.x", "from vlmc.eval.captions_io import done_ids\n", True),
        ("vlmc.models.x", "from vlmc.store.reader import Store\n", True),  # a lower layer importing a higher one
        ("vlmc.plot.x", "from vlmc.extract import geometry\n", True),
        ("vlmc.eval.x", "from vlmc.store.reader import open_store\nfrom vlmc.utils.rows import read_table\n", False),
        ("vlmc.train.x", "from vlmc.models.reconstructors import ReconSpec\nfrom . import loader\n", False),
        ("vlmc.extract.x", "from vlmc import __version__\n", False),
        ("vlmc.eval.x", "import torch\nfrom trainer import x\n", False),  # not vlmc
    ],
)
def test_the_check_catches_a_forbidden_edge(module, source, forbidden):
    assert bool(forbidden_edges(source, module)) == forbidden


def test_relative_import_from_a_package_init_resolves_to_that_package():
    assert vlmc_imports("from .reader import Store\n", "vlmc.store", is_package=True) == [(1, "vlmc.store.reader.Store")]
    assert forbidden_edges("from ..train import loop\n", "vlmc.eval", is_package=True)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_every_module_opens_with_a_docstring(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and doc.strip(), f"{path.relative_to(SRC)}: no module docstring saying what it is for"
