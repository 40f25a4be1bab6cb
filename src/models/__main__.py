"""``python -m vlmc.models list``: the registered model families, for shell scripts and users.

``list`` prints every family ``families()`` finds (the built-in ones and those on ``$VLMC_FAMILY_PATH``),
space-separated on one line, in registry (alphabetical) order, or with ``--display-order`` in the order
figures and tables show them; ``--long`` prints one per line: name, label, default HF id, ``config:`` names
(tab-separated).
"""

from __future__ import annotations

import sys

from vlmc.models.base import display_order, families, get_adapter
from vlmc.utils.cli import entry_point, make_parser


def build_parser():
    """The ``list`` command's parser."""
    p = make_parser(__doc__.splitlines()[0])
    p.add_argument("command", choices=["list"], help="what to do")
    p.add_argument("--long", action="store_true", help="one family per line: name, label, default id, configs")
    p.add_argument("--display-order", action="store_true", help="in figure order (display_rank), not alphabetical")
    return p


@entry_point
def main(argv: list[str] | None = None) -> int:
    """Print the registered families."""
    args = build_parser().parse_args(argv)
    names = display_order(families()) if args.display_order else families()
    if not args.long:
        print(*names)
        return 0
    for name in names:
        a = get_adapter(name)
        configs = ",".join(f"config:{c}" for c in sorted(a.real_configs)) or "-"
        print(f"{name}\t{a.display_label}\t{a.default_id}\t{configs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
