"""``--attn_implementation``: which attention kernels a VLM is built with (every stage that loads one).

transformers picks ``sdpa`` by default. ``eager`` is the reference implementation; ``flash_attention_2``
/ ``flash_attention_3`` need the ``flash_attn`` package (and a GPU); ``flex_attention`` needs torch's
flex attention. Some families run their vision attention differently per implementation (Qwen2.5-VL's
windowed attention loops over windows under ``sdpa``), so the choice matters for speed.
"""

from __future__ import annotations

import argparse

from vlmc.utils.cli import UsageError

KNOWN = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def installed() -> dict[str, bool]:
    """Each known implementation → whether this environment can run it."""
    from transformers import utils

    def probe(name: str) -> bool:
        check = getattr(utils, name, None)  # older transformers lack some probes: not available then
        return bool(check()) if check is not None else False

    return {
        "sdpa": True,
        "eager": True,
        "flash_attention_2": probe("is_flash_attn_2_available"),
        "flash_attention_3": probe("is_flash_attn_3_available"),
        "flex_attention": probe("is_torch_flex_attn_available"),
    }


def check_attn_implementation(name: str | None) -> str | None:
    """``None``/``auto`` → ``None`` (transformers' default); a known, installed name → itself.

    Raises:
        UsageError: unknown name, or a known one this environment lacks (one line, exit 2).
    """
    if name in (None, "", "auto"):
        return None
    have = installed()
    if name not in have:
        raise UsageError(f"unknown --attn_implementation {name!r}; choose auto or one of {', '.join(KNOWN)}")
    if not have[name]:
        usable = ", ".join(k for k, ok in have.items() if ok)
        raise UsageError(f"--attn_implementation {name} is not installed here; usable: {usable}")
    return name


def add_attn_arg(p: argparse.ArgumentParser) -> None:
    """Add ``--attn_implementation`` (default ``auto``: transformers' own choice, sdpa)."""
    p.add_argument(
        "--attn_implementation",
        "--attn-implementation",
        dest="attn_implementation",
        default="auto",
        help=f"attention kernels of the VLM: auto (transformers' default, sdpa) or one of {', '.join(KNOWN)} "
        "(flash_attention_* only where flash_attn is installed)",
    )
