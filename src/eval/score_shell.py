"""The scoring shell both score CLIs share: read a caption CSV, carry earlier scores, score it by a column table.

A :class:`ColumnTable` is all that differs between ``score_captions.py`` (caption columns found in
the file, drops against ``caption_post_direct``) and ``score_perturb.py`` (fixed original/perturbed
columns): which columns an input needs, which caption columns are scored and which score tasks and
drops follow from them. :func:`score_file` and :func:`score_files` do the rest once.
"""

from __future__ import annotations

import logging
from argparse import Namespace
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from vlmc.eval.scoring import Scorers, Task, build_scorers, gt_caption_for, score_table
from vlmc.utils.cli import ensure_writable_dir
from vlmc.utils.rows import carry_scores, dedupe_rows, ensure_shard, read_table, require_columns
from vlmc.utils.stop import EXIT_PREEMPTED, StopFlag, StopRequested

log = logging.getLogger(__name__)

GT = "caption_gt"
Drop = tuple[str, str, str]  # (reference column, altered column, drop column)


@dataclass(frozen=True)
class ColumnTable:
    """What one kind of caption CSV is scored with.

    Attributes:
        required: columns every input must have.
        captions: the caption columns scored in a table (they must exist; rows carry earlier scores only
            when these texts, the image path and ``caption_gt`` are unchanged).
        tasks: score tasks and drops for those caption columns.
    """

    required: tuple[str, ...]
    captions: Callable[[pd.DataFrame], list[str]]
    tasks: Callable[[list[str]], tuple[Sequence[Task], Sequence[Drop]]]


def load_table(path: Path, table: ColumnTable) -> tuple[pd.DataFrame, list[str]]:
    """Read a caption CSV as str (``shard`` added if missing, ``caption_gt`` from ``.txt`` files); its caption columns."""
    df = read_table(path)
    require_columns(df, table.required, path)
    cols = table.captions(df)
    require_columns(df, cols, path)
    df = dedupe_rows(ensure_shard(df, path), path)
    if GT not in df.columns:
        df[GT] = [gt_caption_for(p) for p in df["image_path"]]
    return df, cols


def score_file(src: Path, dst: Path, scorers: Scorers, table: ColumnTable, skip_existing: bool, save_every: int) -> int:
    """Score one caption CSV into ``dst``; returns the number of (row, task) pairs scored.

    Args:
        src: the input CSV.
        dst: the output CSV (may be ``src``).
        scorers: loaded scorers.
        table: what the input is scored with.
        skip_existing: fill only empty score cells (from ``dst`` when it is another file, for unchanged texts).
        save_every: rows per atomic checkpoint write.
    """
    df, cols = load_table(src, table)
    tasks, drops = table.tasks(cols)
    if skip_existing and dst != src and dst.exists():
        df = carry_scores(df, read_table(dst), [c for t in tasks for c in t.columns], ["image_path", GT, *cols])
    n = score_table(df, dst, tasks, scorers, drops, skip_existing, save_every, {"input": str(src)})
    log.info("%s: %d rows, captions %s, %d (row, score) pairs computed -> %s", src.name, len(df), cols, n, dst)
    return n


def score_files(args: Namespace, files: Sequence[Path], table: ColumnTable) -> int:
    """A score CLI's run: every input file scored into ``--out_dir`` (or in place); returns the exit code.

    A stop request (Slurm's USR1, forwarded by scripts/common.sh run_requeueable) ends with
    ``EXIT_PREEMPTED`` after the current checkpoint write.
    """
    out_dir = ensure_writable_dir(args.out_dir) if args.out_dir else None
    scorers = build_scorers(args)
    total = 0
    with StopFlag():
        for src in files:
            dst = out_dir / src.name if out_dir else src
            try:
                total += score_file(src, dst, scorers, table, args.skip_existing, args.save_every)
            except StopRequested as e:
                log.warning("%s; rerun with --skip_existing to resume", e)
                return EXIT_PREEMPTED
    log.info("scored %d (row, score) pairs in %d file(s)", total, len(files))
    return 0
