"""Stage 7b: add CLIPScore and BERTScore columns to caption-comparison CSVs.

Input: every ``*.csv`` in ``--caption_dir`` (files without caption columns are skipped with a warning)
or the files given with ``--csv``; columns ``key, shard, image_path, caption_gt, caption_post_direct,
caption_recon`` and any ``reproj_*`` (passed through). The caption columns scored are every
``caption_<s>`` except ``caption_gt`` (or ``--caption_cols``). ``caption_gt`` is filled from the image's
``<stem>.txt`` when the column is absent. For each caption column ``caption_<s>``:

    clipcos_<s>, clipscore_<s>     image vs caption: raw cosine and 2.5 * max(cos, 0) (Hessel et al.)
    bertscore_f1_<s>               BERTScore F1, candidate caption_<s> vs reference caption_gt
    cliptext_cos_<s>               (--clip_text) CLIP text cosine of caption_<s> vs caption_gt

plus ``clipcos_gt, clipscore_gt`` (image vs its reference caption), and, with ``caption_post_direct``
present (the reference condition: captions decoded from the stored E_post), for every other ``<s>``:

    bertscore_f1_<s>_vs_post_direct   candidate caption_<s> vs reference caption_post_direct
    clipscore_drop, bertscore_drop    for <s> = recon:  score(post_direct) - score(recon)
    clipscore_drop_<s>, bertscore_drop_<s>   the same for any other caption column

Drops are positive when the altered condition (reconstructed) is worse. A sidecar ``<csv>.scores.json``
records the scoring setup. ``--skip_existing`` fills only empty score cells; writes are atomic.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from vlmc.eval import score_shell
from vlmc.eval.score_shell import GT, ColumnTable
from vlmc.eval.scoring import (
    DROP_HELP,
    AttrTask,
    BertTask,
    ClipTask,
    ClipTextTask,
    Scorers,
    Task,
    add_scoring_args,
)
from vlmc.utils import cli
from vlmc.utils.cli import UsageError, entry_point, make_parser, parse_csv_list
from vlmc.utils.rows import read_table

log = logging.getLogger(__name__)

REF = "caption_post_direct"


def caption_columns(df: pd.DataFrame, requested: list[str] | None = None) -> list[str]:
    """The caption columns to score: ``requested`` or every ``caption_*`` but ``caption_gt``."""
    if requested:
        return requested
    return [c for c in df.columns if c.startswith("caption_") and c != GT]


def suffix(col: str) -> str:
    """``caption_recon`` → ``recon``."""
    return col.removeprefix("caption_")


def build_tasks(cols: list[str]) -> tuple[list[Task], list[tuple[str, str, str]]]:
    """Score tasks and drop definitions for the caption columns ``cols`` (see the module docstring)."""
    tasks: list[Task] = [ClipTask("gt", GT)]
    drops: list[tuple[str, str, str]] = []
    for c in cols:
        s = suffix(c)
        tasks += [ClipTask(s, c), BertTask(f"bertscore_f1_{s}", c, GT), ClipTextTask(s, c, GT), AttrTask(s, c, GT)]
        if REF in cols and c != REF:
            tasks += [
                BertTask(f"bertscore_f1_{s}_vs_post_direct", c, REF),
                ClipTextTask(f"{s}_vs_post_direct", c, REF),
            ]
            tail = "" if s == "recon" else f"_{s}"
            drops += [
                ("clipscore_post_direct", f"clipscore_{s}", f"clipscore_drop{tail}"),
                ("bertscore_f1_post_direct", f"bertscore_f1_{s}", f"bertscore_drop{tail}"),
                ("attr_acc_post_direct", f"attr_acc_{s}", f"attr_acc_drop{tail}"),
            ]
    return tasks, drops


def column_table(requested: list[str] | None = None) -> ColumnTable:
    """Stage 7's columns: the caption columns found (or ``requested``), each scored and dropped against post_direct."""
    return ColumnTable(("key", "image_path"), lambda df: caption_columns(df, requested), build_tasks)


def score_file(
    src: Path, dst: Path, scorers: Scorers, requested: list[str] | None, skip_existing: bool, save_every: int
) -> int:
    """Score one caption CSV into ``dst``; returns the number of (row, task) pairs scored."""
    return score_shell.score_file(src, dst, scorers, column_table(requested), skip_existing, save_every)


def find_inputs(caption_dir: str | None, csvs: list[str] | None) -> list[Path]:
    """Caption CSVs in ``caption_dir`` that have caption columns, plus the files given with ``--csv``."""
    files = [Path(c) for c in csvs or []]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} does not exist")
    if caption_dir:
        d = Path(caption_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"--caption_dir {d} is not a folder")
        for f in sorted(d.glob("*.csv")):
            head = read_table(f).columns
            if "key" in head and any(c.startswith("caption_") and c != GT for c in head):
                files.append(f)
            else:
                log.warning("%s: no key / caption_* columns, not a caption CSV; skipped", f)
    if not files:
        raise UsageError("no caption CSVs to score (give --caption_dir with caption CSVs, or --csv)")
    return files


def build_parser():
    p = make_parser(__doc__ + f"\n{DROP_HELP}.")
    p.add_argument(
        "--caption_dir", default=None, help="folder of caption CSVs (every *.csv with caption_* columns)"
    )
    p.add_argument("--csv", nargs="+", default=None, help="score these CSV files")
    cli.add_out_dir_arg(p, default=None, help="where scored CSVs go; unset: rewrite the inputs in place")
    p.add_argument(
        "--caption_cols", default=None, help="comma list of caption columns (default: caption_* but gt)"
    )
    cli.add_resume_arg(p, "--skip_existing", help="score only rows/cells not scored yet")
    p.add_argument("--save_every", type=cli.positive_int, default=1000, help="rows per atomic checkpoint write")
    add_scoring_args(p)
    return p


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    files = find_inputs(args.caption_dir, args.csv)
    return score_shell.score_files(args, files, column_table(parse_csv_list(args.caption_cols) or None))


if __name__ == "__main__":
    raise SystemExit(main())
