"""Turn a (family, source) pair into a loaded ``VLM`` (the grammar: :mod:`vlmc.models.sources`)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from vlmc.models import partial
from vlmc.models.base import VLM, FamilyAdapter, get_adapter, tiny_cache_dir
from vlmc.models.sources import CONFIG_PREFIX, Named, Source, resolve, source_help
from vlmc.utils.cli import UsageError

log = logging.getLogger(__name__)

TINY = "tiny"
TESTBED = "testbed"
# The calibrated testbed (src/train/train_testbed.py): trained VLMs of these families plus a CLIP.
# (qwen3vl can build_testbed too; it is not trained: the testbed is these four.)
TESTBED_FAMILIES = ("llava", "idefics2", "qwen2.5vl", "qwen3.5")
TESTBED_CLIP = "clip"


def default_testbed_dir() -> Path:
    """Where the trained testbed lives: ``$VLMC_TESTBED`` or the repository's ``sample/models``."""
    env = os.environ.get("VLMC_TESTBED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "sample" / "models"


def testbed_path(name: str) -> Path:
    """The trained testbed folder of ``name`` (a family or ``clip``); a ``UsageError`` if it is missing."""
    path = default_testbed_dir() / name
    if not (path / "config.json").is_file():
        known = ", ".join((*TESTBED_FAMILIES, TESTBED_CLIP))
        raise UsageError(
            f"no trained testbed model {name!r} at {path} (testbed models: {known}; "
            "train with python src/train/train_testbed.py)"
        )
    return path


def tiny_path(adapter: FamilyAdapter, seed: int = 0) -> Path:
    """Folder of the family's offline tiny variant, built on first use (atomically: safe for array jobs)."""
    version = getattr(adapter, "tiny_version", 1)
    path = tiny_cache_dir() / f"tiny-{adapter.name}-v{version}-s{seed}"
    if not (path / "config.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            adapter.build_tiny(tmp, seed=seed)
            try:
                os.rename(tmp, path)
            except OSError:  # another process won the race; theirs is identical
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("built tiny %s at %s", adapter.name, path)
    return path


def vlm_names(adapter: FamilyAdapter) -> dict[str, Named]:
    """The short names a VLM source may be: ``tiny`` (random, built offline) and ``testbed`` (trained)."""
    names = {
        TINY: Named(lambda: str(tiny_path(adapter)), random_weights=True),
        TESTBED: Named(lambda: str(testbed_path(adapter.name))),
    }
    if "/" not in adapter.default_id:  # a family whose default is no HF id loads that name itself
        names[adapter.default_id] = Named(lambda: adapter.default_id)
    return names


VLM_SOURCE_HELP = source_help((TINY, TESTBED), config=True)


def resolve_vlm_source(adapter: FamilyAdapter, source: str | None, revision: str | None = None,
                       flag: str = "--model-path") -> Source:
    """``source`` under the shared grammar (:mod:`vlmc.models.sources`); ``None`` → the family's HF id."""
    spec = source or adapter.default_id
    resolved = resolve(spec, flag, vlm_names(adapter), revision=revision, config=True,
                       placeholders=("config:<name>",))
    if resolved.kind == "config" and resolved.name not in adapter.real_configs:
        known = ", ".join(CONFIG_PREFIX + n for n in sorted(adapter.real_configs)) or "none"
        raise UsageError(f"{flag} {spec!r}: {adapter.name} has no such config; known: {known}")
    return resolved


def resolve_source(adapter: FamilyAdapter, source: str | None, revision: str | None = None) -> str:
    """The concrete source string: a folder, ``config:<name>``, or ``org/name@commit`` for an HF id
    (resolving it again loads exactly the same weights). ``None`` → the family's default HF id."""
    return resolve_vlm_source(adapter, source, revision).canonical


def load_vlm(
    family: str,
    source: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    vision_only: bool = False,
    attn_implementation: str | None = None,
    revision: str | None = None,
) -> VLM:
    """Load a family's model and processor from ``source``.

    Args:
        family: registry name, e.g. ``llava``.
        source: HF id, local folder, ``tiny``, ``testbed`` or ``config:<name>`` (random weights at real
            dimensions; ``device="meta"`` builds without memory). ``None`` → the default HF id.
        dtype: parameter dtype.
        device: where to put the model.
        vision_only: build and load only the vision tower + connector (the LM stays on ``meta``; see
            ``vlmc.models.partial``) when the source is a local folder or ``config:``.
        attn_implementation: passed to ``from_pretrained`` / ``_from_config`` (``None``: default).
        revision: branch, tag or commit of an HF id (``--revision``).

    Returns:
        The loaded ``VLM`` in eval mode.
    """
    adapter = get_adapter(family)
    device = torch.device(device)
    src = resolve_vlm_source(adapter, source, revision)
    # an HF id is a local snapshot folder by now: vision-only loading applies to it as to any folder
    location = src.spec if src.kind == "config" else str(src.path)
    vision_only = vision_only and partial.supported(adapter, location, device)
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}  # adapters may predate it
    if vision_only:
        model, processor, _ = partial.load_vision_only(adapter, location, dtype, device, attn_implementation)
    elif src.kind == "config":
        model, processor = adapter.build_from_config(str(src.name), dtype, device, **attn)
    else:
        model, processor = adapter.load_pretrained(str(src.path), dtype, device, **attn)
    name = src.spec if src.kind == "config" else (src.repo_id if src.kind == "hub" else str(src.path))
    model.eval()
    return VLM(adapter=adapter, model=model, processor=processor, source=name, device=device, dtype=dtype,
               revision=src.commit, vision_only=vision_only)  # fmt: skip
