"""Check vector stores against their manifests: ``python -m vlmc.store verify <dir> [<dir> ...]``.

Each argument is a shard folder, a model folder (``data/vector/llava``) or a base folder
(``data/vector``): every shard folder found below it (up to two levels) is checked. Every chunk file's
size and sha256 against the manifest, its content (keys, rows, first/last key, per-row tensors),
chunk continuity and counts, pre/post key agreement and finite values. One line per problem on
stderr; exit 0 when every shard is sound, 2 otherwise.

Examples:
    python -m vlmc.store verify data/vector
    python -m vlmc.store verify data/vector/llava/00000 --size_only
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from vlmc.store.vectors import MANIFEST
from vlmc.store.verify import iter_problems
from vlmc.utils.cli import UsageError, entry_point, make_parser


def build_parser():
    """The ``vlmc.store`` argument parser."""
    p = make_parser(__doc__)
    p.prog = "python -m vlmc.store"
    p.add_argument("command", choices=["verify"], help="what to do (only 'verify' so far)")
    p.add_argument("paths", nargs="+", help="shard, model or base folders of vector stores")
    p.add_argument("--size_only", action="store_true", help="check sizes and content but skip the sha256 of each file")
    p.add_argument("--no_finite", action="store_true", help="skip the NaN/inf check of every stored value")
    return p


def shard_dirs_below(path: str | Path) -> list[Path]:
    """Shard folders (those with a manifest) at ``path`` or up to two levels below it, sorted."""
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{p}: not a folder")
    found = [d.parent for pattern in (MANIFEST, f"*/{MANIFEST}", f"*/*/{MANIFEST}") for d in p.glob(pattern)]
    if not found:
        raise UsageError(f"{p}: no {MANIFEST} here or up to two levels below")
    return sorted(set(found))


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dirs = [d for path in args.paths for d in shard_dirs_below(path)]
    bad = 0
    for d in tqdm(dirs, desc="verify", unit="shard", file=sys.stderr, disable=None):
        problems = list(iter_problems(d, "size" if args.size_only else "hash", finite=not args.no_finite))
        for line in problems:
            print(f"FAIL {line}", file=sys.stderr)
        bad += bool(problems)
        if not problems:
            print(f"ok   {d}")
    print(f"{len(dirs) - bad} of {len(dirs)} shard folder(s) sound", file=sys.stderr)
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
