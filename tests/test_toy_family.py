"""Adding a model family is one file: a toy family written into a temporary folder on ``$VLMC_FAMILY_PATH``.

The toy (``toyllava``) is a LLaVA-architecture VLM (transformers' ``LlavaForConditionalGeneration``) at
its own tiny dimensions under a new name, registered by its file alone. With zero edits anywhere else,
discovery finds it and the generic per-family suite (every test of tests/test_models.py parametrised
over ``families()``) runs over it. A family file that fails to import is an error naming the file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import vlmc.models.families as families_pkg
from vlmc.models.base import families
from vlmc.models.families import FAMILY_PATH_ENV, FamilyImportError, discover

TESTS = Path(__file__).resolve().parent

TOY_NAME = "toyllava"
TOY_FILE = '''"""Toy family: a LLaVA-architecture VLM under a new name, at its own tiny dimensions."""

from pathlib import Path

from vlmc.models.base import TinyDims, register
from vlmc.models.families.llava import LlavaAdapter, llava_15_7b

# 48 px, 12 px patches: a 4x4 patch grid, smaller than llava's tiny variant
TOY_DIMS = TinyDims(image=48, patch=12, vision_hidden=48, vision_layers=2, text_hidden=64, text_layers=2)


@register
class ToyLlavaAdapter(LlavaAdapter):
    name = "toyllava"
    default_id = "example/toy-llava"
    real_configs = {"toy-llava-7b": llava_15_7b}
    real_shapes = {"toy-llava-7b": ((576, 1024), (576, 4096))}
    label, color, display_rank = "Toy LLaVA", "#000000", None

    def build_tiny(self, out_dir: Path, seed: int = 0) -> None:
        self._build(out_dir, seed, TOY_DIMS, testbed=False)
'''


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A fresh folder on ``$VLMC_FAMILY_PATH``; discovery state restored afterwards."""
    folder = tmp_path / "families"
    folder.mkdir()
    monkeypatch.setenv(FAMILY_PATH_ENV, str(folder))
    saved = list(families_pkg.__path__)
    yield folder
    families_pkg.__path__[:] = saved
    families_pkg._discovered = None


def test_generic_suite_runs_over_a_family_added_by_one_file(tmp_path):
    folder = tmp_path / "families"
    folder.mkdir()
    (folder / f"{TOY_NAME}.py").write_text(TOY_FILE)
    env = {**os.environ, FAMILY_PATH_ENV: str(folder), "VLMC_CACHE": str(tmp_path / "cache")}
    listed = subprocess.run([sys.executable, "-m", "vlmc.models", "list"], env=env, capture_output=True, text=True)
    assert listed.returncode == 0 and TOY_NAME in listed.stdout.split(), listed.stderr[-2000:]
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "test_models.py"),
         "-k", f"{TOY_NAME} or registry", "-m", "not slurm and not slow", "-rfEs"],
        env=env, capture_output=True, text=True, cwd=TESTS.parent, timeout=900,
    )  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    passed = int(out.rsplit(" passed", 1)[0].split()[-1])
    assert passed >= 12 and " skipped" not in out and " failed" not in out, out[-2000:]


def test_a_broken_family_file_fails_loudly_naming_it(plugin_dir):
    broken = plugin_dir / "broken_family.py"
    broken.write_text("import vlmc_no_such_dependency  # a family whose dependency is missing\n")
    with pytest.raises(FamilyImportError, match=str(broken)):
        discover()
    with pytest.raises(FamilyImportError, match="broken_family"):
        families()  # every registry question fails the same way, not a family silently missing
    env = {**os.environ, FAMILY_PATH_ENV: str(plugin_dir)}
    r = subprocess.run([sys.executable, "-m", "vlmc.models", "list"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]  # a stage prints one line naming the file, no traceback
    assert str(broken) in r.stderr and "Traceback" not in r.stderr


def test_a_module_defined_twice_is_refused(plugin_dir):
    (plugin_dir / "llava.py").write_text("raise AssertionError('never imported')\n")
    with pytest.raises(FamilyImportError, match="defined twice"):
        discover()


def test_a_family_path_that_is_no_folder_is_refused(plugin_dir, monkeypatch):
    monkeypatch.setenv(FAMILY_PATH_ENV, str(plugin_dir / "missing"))
    with pytest.raises(FamilyImportError, match="not a folder"):
        discover()


def test_discovery_finds_the_builtin_families():
    assert {"llava", "idefics2", "qwen"} <= set(discover())
    assert {"llava", "idefics2", "qwen2.5vl", "qwen3.5", "qwen3vl"} <= set(families())
