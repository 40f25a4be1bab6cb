"""Small helpers every entry point uses: one-line errors, device and dtype parsing, logging."""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from vlmc.utils.io import UnreadableFile
from vlmc.utils.stop import EXIT_PREEMPTED, StoppedEarly, StopRequested, stop_at_once

log = logging.getLogger("vlmc")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UsageError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def entry_point(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a CLI ``main`` so user errors print one clear line and exit 2 instead of a traceback.

    ``UsageError``, missing files, permission problems, unreadable files (``UnreadableFile``: corrupt,
    truncated, refused by a safe load, invalid JSON) and other OS errors (a full disk: errno 28) are
    user errors, printed as one line naming the file; anything else is a bug and keeps its traceback.
    ``StopRequested`` (a checkpointed stop, see ``vlmc.utils.stop``) exits 75.
    """

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        setup_logging()
        try:
            with stop_at_once():  # pre-emption while a model loads exits 75 too
                return int(main(argv) or 0)
        except (UsageError, UnreadableFile, OSError) as e:
            prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "vlmc"
            print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        except (StopRequested, StoppedEarly) as e:
            log.warning("%s", e)
            return EXIT_PREEMPTED
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


def _one_line(e: BaseException) -> str:
    """An error as one line; an ``OSError`` as ``<file>: <reason>`` (``[Errno 28] ...`` spelt out)."""
    if isinstance(e, OSError) and not isinstance(e, UnreadableFile) and e.strerror:
        names = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        text = f"{names}: {e.strerror}" if names else e.strerror
        if e.errno == errno.ENOSPC:
            text += " (free some space or choose another output folder, then rerun to resume)"
        return text
    if isinstance(e, UsageError):
        return str(e)
    return " ".join(str(e).split("\n")[0].split()) or type(e).__name__


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


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose parse errors are ``UsageError``: one line and exit 2 via ``entry_point``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Raise instead of printing the usage block and exiting."""
        raise UsageError(f"{message} (see --help)")


def make_parser(description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` whose ``--help`` shows defaults and whose errors are one line (exit 2)."""
    return OneLineErrorParser(description=description, formatter_class=HelpFormatter)


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


# -- argparse ``type=`` validators: a bad value is rejected at parse time (exit 2, one line) ---------


def _number(kind: type, text: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type=``: an integer ``>= low``."""

    def parse(text: str) -> int:
        value = _number(int, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def float_in(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type=``: a finite float in ``[low, high]`` (``low_open``/``high_open``: exclusive ends)."""
    lo, hi = ("(" if low_open else "["), (")" if high_open or high == math.inf else "]")

    def parse(text: str) -> float:
        value = _number(float, text)
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"must be in {lo}{low:g}, {high:g}{hi}, got {value:g}")
        return value

    parse.__name__ = f"number in {lo}{low:g}, {high:g}{hi}"
    return parse


positive_float = float_in(0.0, low_open=True)
nonneg_float = float_in(0.0)
probability = float_in(0.0, 1.0)
dropout_rate = float_in(0.0, 1.0, high_open=True)


def device_name(text: str) -> str:
    """An argparse ``type=``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    t = text.strip()
    if t in ("auto", "cpu", "cuda", "mps") or (t.startswith("cuda:") and t[5:].isdigit()):
        return t
    raise argparse.ArgumentTypeError(f"{text!r}: choose auto, cpu, cuda, cuda:N or mps")


split_fraction = float_in(0.0, 1.0, low_open=True, high_open=True)


# -- one flag vocabulary across stages: the new name first, today's names kept as aliases ------------
# Each helper keeps the attribute (``dest``) of the first old name, so a CLI's code reads what it read before;
# ``--help`` shows ``--model MODEL, --embed_model MODEL``.


def add_renamed_flag(parser, new: str, *old_names: str, dest: str | None = None, **kwargs) -> argparse.Action:
    """Add flag ``new`` with ``old_names`` as aliases that keep working.

    Args:
        parser: the parser or argument group.
        new: the flag's name in the shared vocabulary (e.g. ``--model``).
        *old_names: earlier spellings, shown in ``--help`` beside ``new``.
        dest: the attribute name; default: the first old name's (``new``'s when there is none).
        **kwargs: passed to ``add_argument``; ``metavar`` defaults to ``new`` in capitals for valued flags.

    Returns:
        The argparse action.
    """
    if kwargs.get("action") not in ("store_true", "store_false"):
        kwargs.setdefault("metavar", new.lstrip("-").upper())
    dest = dest or (old_names[0] if old_names else new).lstrip("-").replace("-", "_")
    return parser.add_argument(new, *old_names, dest=dest, **kwargs)


def add_model_arg(parser, *old_names: str, multiple: bool = False, **kwargs) -> argparse.Action:
    """``--model``: the model family (``multiple``: ``all`` or a comma list of families); see ``add_renamed_flag``."""
    kwargs.setdefault("metavar", "MODELS" if multiple else "MODEL")
    return add_renamed_flag(parser, "--model", *old_names, **kwargs)


def add_out_dir_arg(parser, *old_names: str, **kwargs) -> argparse.Action:
    """``--out_dir``: the output folder (old names e.g. ``--out``, ``--out_base``); see ``add_renamed_flag``."""
    return add_renamed_flag(parser, "--out_dir", *old_names, **kwargs)


def add_resume_arg(parser, *old_names: str, **kwargs) -> argparse.Action:
    """The switch ``--resume`` (keep what an earlier run committed, do the rest; old name e.g. ``--skip_existing``)."""
    return add_renamed_flag(parser, "--resume", *old_names, action="store_true", **kwargs)


def add_recon_type_arg(parser, *old_names: str, **kwargs) -> argparse.Action:
    """``--recon_type``: the reconstructor architecture (was ``--model_type`` in train_recon)."""
    return add_renamed_flag(parser, "--recon_type", *old_names, **kwargs)


def add_ref_type_arg(parser, *old_names: str, **kwargs) -> argparse.Action:
    """``--ref_type``: the reference backbone's model type, its pooling rule (was ``--model_type`` in extract_clip)."""
    return add_renamed_flag(parser, "--ref_type", *old_names, **kwargs)
