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

from vlmc.eval.captions_io import carry_scores, dedupe_rows, ensure_shard, read_table, require_columns
from vlmc.eval.scoring import (
    DROP_HELP,
    AttrTask,
    BertTask,
    ClipTask,
    ClipTextTask,
    Scorers,
    Task,
    add_scoring_args,
    build_scorers,
    gt_caption_for,
    score_table,
)
from vlmc.utils import cli
from vlmc.utils.cli import UsageError, ensure_writable_dir, entry_point, make_parser, parse_csv_list
from vlmc.utils.stop import EXIT_PREEMPTED, StopFlag, StopRequested

log = logging.getLogger(__name__)

GT = "caption_gt"
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


def load_caption_csv(path: Path, requested: list[str] | None) -> tuple[pd.DataFrame, list[str]]:
    """Read a caption CSV as str; add ``shard`` if missing and ``caption_gt`` from ``.txt`` files."""
    df = read_table(path)
    require_columns(df, ("key", "image_path"), path)
    cols = caption_columns(df, requested)
    require_columns(df, cols, path)
    df = dedupe_rows(ensure_shard(df, path), path)
    if GT not in df.columns:
        df[GT] = [gt_caption_for(p) for p in df["image_path"]]
    return df, cols


def score_file(
    src: Path, dst: Path, scorers: Scorers, requested: list[str] | None, skip_existing: bool, save_every: int
) -> int:
    """Score one caption CSV into ``dst``; returns the number of (row, task) pairs scored."""
    df, cols = load_caption_csv(src, requested)
    tasks, drops = build_tasks(cols)
    if skip_existing and dst != src and dst.exists():
        score_cols = [c for t in tasks for c in t.columns]
        df = carry_scores(df, read_table(dst), score_cols, ["image_path", GT, *cols])
    n = score_table(df, dst, tasks, scorers, drops, skip_existing, save_every, {"input": str(src)})
    log.info(
        "%s: %d rows, captions %s, %d (row, score) pairs computed -> %s", src.name, len(df), cols, n, dst
    )
    return n


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
    out_dir = ensure_writable_dir(args.out_dir) if args.out_dir else None
    requested = parse_csv_list(args.caption_cols) or None
    scorers = build_scorers(args)
    total = 0
    with StopFlag():  # Slurm's --signal=B:USR1, forwarded by scripts/common.sh run_requeueable
        for src in files:
            dst = out_dir / src.name if out_dir else src
            try:
                total += score_file(src, dst, scorers, requested, args.skip_existing, args.save_every)
            except StopRequested as e:
                log.warning("%s; rerun with --skip_existing to resume", e)
                return EXIT_PREEMPTED
    log.info("scored %d (row, score) pairs in %d file(s)", total, len(files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
