"""Family discovery: every module of this package, and of the folders on ``$VLMC_FAMILY_PATH``, is a family.

Adding a family is one file: a module that defines a ``FamilyAdapter`` subclass decorated with
``@vlmc.models.base.register``. Put it here (``src/models/families/<name>.py``) or in any folder
listed on ``VLMC_FAMILY_PATH`` (``os.pathsep``-separated, like ``PYTHONPATH``): :func:`discover`
imports every module it finds there as ``vlmc.models.families.<module>``, so a plugin file imports
the shared toolbox as the built-in families do (``from vlmc.models.families.common import HFAdapter``).

A family file that fails to import is an error naming the file (:class:`FamilyImportError`), never a
family silently missing. Modules whose name starts with ``_`` are skipped (private helpers); helper
modules that register nothing (``common``) are imported harmlessly.
"""

from __future__ import annotations

import os
import pkgutil
from importlib import import_module
from pathlib import Path

from vlmc.utils.cli import UsageError

FAMILY_PATH_ENV = "VLMC_FAMILY_PATH"
_discovered: tuple[list[str], list[str]] | None = None  # (plugin folders, module names) of the last discovery


class FamilyImportError(UsageError, ImportError):
    """A family module failed to import (its file is named in the message; a stage prints it as one line)."""


def plugin_dirs() -> list[str]:
    """The folders listed on ``$VLMC_FAMILY_PATH`` (empty entries skipped), resolved."""
    raw = os.environ.get(FAMILY_PATH_ENV, "")
    return [str(Path(d).expanduser().resolve()) for d in raw.split(os.pathsep) if d]


def discover() -> list[str]:
    """Import every family module (built-in, then ``$VLMC_FAMILY_PATH``); returns their module names.

    Idempotent and cheap on repeat calls (imported modules are cached; a folder added to the variable
    later is picked up by the next call).

    Raises:
        FamilyImportError: a module failed to import, two folders hold a module of the same name, or
            ``$VLMC_FAMILY_PATH`` lists something that is not a folder.
    """
    global _discovered
    dirs = plugin_dirs()
    if _discovered is not None and _discovered[0] == dirs:
        return _discovered[1]
    for d in dirs:
        if not Path(d).is_dir():
            raise FamilyImportError(f"${FAMILY_PATH_ENV} lists {d}, which is not a folder")
        if d not in __path__:
            __path__.append(d)
    seen: dict[str, str] = {}
    for folder in __path__:
        for info in pkgutil.iter_modules([folder]):
            if info.name.startswith("_"):
                continue
            file = _module_file(folder, info)
            if info.name in seen:
                raise FamilyImportError(f"family module {info.name!r} is defined twice: {seen[info.name]} and {file}")
            seen[info.name] = file
            _import(info.name, file)
    _discovered = (dirs, sorted(seen))
    return _discovered[1]


def _module_file(folder: str, info: pkgutil.ModuleInfo) -> str:
    base = Path(folder) / info.name
    return str(base / "__init__.py") if info.ispkg else f"{base}.py"


def _import(name: str, file: str) -> None:
    try:
        import_module(f"{__name__}.{name}")
    except Exception as e:
        raise FamilyImportError(f"family module {file} failed to import: {type(e).__name__}: {e}") from e
