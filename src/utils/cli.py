"""Small helpers every entry point uses: one-line errors, device and dtype parsing, logging."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from vlmc.utils.stop import EXIT_PREEMPTED, StopRequested

log = logging.getLogger("vlmc")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UsageError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def entry_point(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a CLI ``main`` so user errors print one clear line and exit 2 instead of a traceback.

    ``UsageError``, missing files and permission problems are user errors; anything else is a bug
    and keeps its traceback. ``StopRequested`` (a checkpointed stop, see ``vlmc.utils.stop``) exits 75.
    """

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        setup_logging()
        try:
            return int(main(argv) or 0)
        except (UsageError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
            prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "vlmc"
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        except StopRequested as e:
            log.warning("%s", e)
            return EXIT_PREEMPTED
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


def setup_logging() -> None:
    """Log INFO to stderr, once; ``VLMC_LOGLEVEL`` overrides the level."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=os.environ.get("VLMC_LOGLEVEL", "INFO"),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is not news


class _LineWriter:
    """A tqdm ``file`` for logs: each refresh becomes one line (tqdm's carriage returns dropped)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable=None, *, interval: float = 10.0, **kwargs):
    """A tqdm bar on stderr that is never silent: live on a terminal; in a log (stderr not a TTY) one line
    every ``interval`` seconds (and at the end). ``kwargs`` go to tqdm (``total``, ``desc``, ``unit``, ``disable``)."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    kwargs.setdefault("file", sys.stderr if tty else _LineWriter(sys.stderr))
    if not tty:
        kwargs.setdefault("mininterval", interval)
        kwargs.setdefault("ascii", True)
    return tqdm(iterable, **kwargs)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each default once in ``--help`` and keeps the description's line breaks.

    ``(default: X)`` is appended unless the help already states its default (it contains ``default``), the
    flag is required, the default is None or ``""`` (the help says what leaving it out means) or the flag is
    a switch (``store_true`` / ``store_false``: off unless given).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or "default" in text.lower() or action.required or action.default in (None, "")
                or action.default is argparse.SUPPRESS or isinstance(action.default, bool)):
            return text
        return super()._get_help_string(action)


def make_parser(description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` whose ``--help`` shows defaults."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; ``cuda`` without a GPU is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def parse_dtype(name: str) -> torch.dtype:
    """``fp32|fp16|bf16`` → torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on CUDA, fp32 elsewhere; otherwise ``parse_dtype(name)``."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return parse_dtype(name)


def parse_csv_list(text: str | None) -> list[str]:
    """``"a, b,,c"`` → ``["a", "b", "c"]``."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check it is writable; a clear ``UsageError`` otherwise."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output directory {p}: {e.strerror or e}") from None
    if not os.access(p, os.W_OK):
        raise UsageError(f"output directory {p} is not writable")
    return p
