"""Stage 8b: add CLIPScore and BERTScore columns to perturbation caption CSVs.

Input: ``<perturb_dir>/perturb_<model>_<mode>_<level>.csv`` with columns ``key, shard, image_path,
caption_original, caption_perturbed, mode, level, seed`` (written by ``eval_perturb.py``), or the
files given with ``--csv``. Output: the same rows plus

    caption_gt                 the image's ``<stem>.txt`` caption ("" if none; kept if already present)
    clipcos_original           cos(image, caption_original), raw
    clipscore_original         2.5 * max(clipcos_original, 0)        (Hessel et al. CLIPScore)
    clipcos_perturbed, clipscore_perturbed
    clipscore_drop             clipscore_original - clipscore_perturbed   (positive = perturbed is worse)
    bertscore_f1               BERTScore F1, candidate caption_perturbed vs reference caption_original
    bertscore_f1_original_gt   caption_original vs caption_gt (nan without a gt caption)
    bertscore_f1_perturbed_gt  caption_perturbed vs caption_gt
    bertscore_drop_gt          bertscore_f1_original_gt - bertscore_f1_perturbed_gt
    clipcos_gt, clipscore_gt   image vs caption_gt (the reference ceiling)
    cliptext_cos               (--clip_text) CLIP text cosine of caption_perturbed vs caption_original

and a sidecar ``<csv>.scores.json`` recording the CLIP and BERTScore setup. ``--skip_existing`` scores
only the cells still empty (rows are matched by (shard, key) and their caption texts); every write is
atomic and rows stay unique by (shard, key).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from vlmc.eval import score_shell
from vlmc.eval.score_shell import ColumnTable
from vlmc.eval.scoring import (
    DROP_HELP,
    AttrTask,
    BertTask,
    ClipTask,
    ClipTextTask,
    Scorers,
    add_scoring_args,
)
from vlmc.utils import cli
from vlmc.utils.cli import UsageError, entry_point, make_parser

REQUIRED = ("key", "image_path", "caption_original", "caption_perturbed")
TASKS = (
    ClipTask("original", "caption_original"),
    ClipTask("perturbed", "caption_perturbed"),
    ClipTask("gt", "caption_gt"),
    BertTask("bertscore_f1", "caption_perturbed", "caption_original"),
    BertTask("bertscore_f1_original_gt", "caption_original", "caption_gt"),
    BertTask("bertscore_f1_perturbed_gt", "caption_perturbed", "caption_gt"),
    ClipTextTask("", "caption_perturbed", "caption_original"),
    AttrTask("original", "caption_original", "caption_gt"),
    AttrTask("perturbed", "caption_perturbed", "caption_gt"),
)
DROPS = (
    ("clipscore_original", "clipscore_perturbed", "clipscore_drop"),
    ("bertscore_f1_original_gt", "bertscore_f1_perturbed_gt", "bertscore_drop_gt"),
    ("attr_acc_original", "attr_acc_perturbed", "attr_acc_drop"),
)


TABLE = ColumnTable(REQUIRED, lambda df: ["caption_original", "caption_perturbed"], lambda cols: (TASKS, DROPS))


def load_perturb_csv(path: Path) -> pd.DataFrame:
    """Read a perturbation CSV as str, add ``shard`` if missing and ``caption_gt`` from ``.txt`` files."""
    return score_shell.load_table(path, TABLE)[0]


def score_file(src: Path, dst: Path, scorers: Scorers, skip_existing: bool, save_every: int) -> int:
    """Score one perturbation CSV into ``dst``; returns the number of (row, task) pairs scored."""
    return score_shell.score_file(src, dst, scorers, TABLE, skip_existing, save_every)


def find_inputs(perturb_dir: str | None, csvs: list[str] | None) -> list[Path]:
    """``perturb_*.csv`` in ``perturb_dir`` (sorted) plus the files given with ``--csv``."""
    files = [Path(c) for c in csvs or []]
    if perturb_dir:
        d = Path(perturb_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"--perturb_dir {d} is not a folder")
        found = sorted(d.glob("perturb_*.csv"))
        if not found:
            raise UsageError(f"no perturb_*.csv in {d}")
        files += found
    if not files:
        raise UsageError("give --perturb_dir or --csv")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} does not exist")
    return files


def build_parser():
    p = make_parser(__doc__ + f"\n{DROP_HELP}.")
    p.add_argument("--perturb_dir", default=None, help="folder of perturb_<model>_<mode>_<level>.csv files")
    p.add_argument(
        "--csv", nargs="+", default=None, help="score these CSV files (instead of / besides --perturb_dir)"
    )
    cli.add_out_dir_arg(p, default=None, help="where scored CSVs go; unset: rewrite the inputs in place")
    cli.add_resume_arg(p, "--skip_existing", help="score only rows/cells not scored yet")
    p.add_argument("--save_every", type=cli.positive_int, default=1000, help="rows per atomic checkpoint write")
    add_scoring_args(p)
    return p


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return score_shell.score_files(args, find_inputs(args.perturb_dir, args.csv), TABLE)


if __name__ == "__main__":
    raise SystemExit(main())
