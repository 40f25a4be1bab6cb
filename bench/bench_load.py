"""Vision-only loading vs loading the whole VLM: weights resident, bytes read, seconds.

Two tables:

* real dimensions (``config:<name>``, built on ``meta``: no memory, exact): the bf16 GB of the whole
  model and of its vision side (the adapter's ``vision_prefixes``: vision tower + connector), i.e.
  what stage 1 keeps resident with and without vision-only loading;
* a checkpoint folder (``--source``, default the trained testbed where present, else ``tiny``):
  seconds to ``load_vlm`` the whole model vs vision-only (median of ``--repeats``, interleaved), the
  bytes vision-only loading read from the safetensors file(s) vs the file size.

    python bench/bench_load.py
    python bench/bench_load.py --models llava --source tiny --repeats 5
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from vlmc.models import partial
from vlmc.models.base import families, get_adapter
from vlmc.models.load import default_testbed_dir, load_vlm, resolve_source
from vlmc.utils.cli import entry_point, make_parser, parse_csv_list


def real_dims(name: str) -> list[tuple[str, float, float]]:
    """``(config name, whole-model GB, vision-side GB)`` in bf16 for each of the family's real configs."""
    ad = get_adapter(name)
    rows = []
    for cfg in ad.real_configs:
        config, _ = ad.config_and_processor(cfg)
        model = partial.build_skeleton(ad.model_cls, config, torch.bfloat16)
        named = dict(model.named_parameters())
        total = sum(p.numel() for p in named.values()) * 2 / 1e9
        vision = sum(p.numel() for n, p in named.items() if partial.on_vision_side(n, ad.vision_prefixes)) * 2 / 1e9
        rows.append((cfg, total, vision))
    return rows


def checkpoint_row(name: str, source: str, repeats: int) -> dict[str, float | str]:
    """Load seconds (whole vs vision-only) and bytes read from one checkpoint folder."""
    ad = get_adapter(name)
    folder = Path(resolve_source(ad, source))
    size = sum(f.stat().st_size for f in partial.checkpoint_files(folder))
    times: dict[bool, list[float]] = {False: [], True: []}
    load_vlm(name, source)  # warm the page cache and imports
    for _ in range(repeats):
        for vision_only in (False, True):
            t = time.perf_counter()
            load_vlm(name, source, vision_only=vision_only)
            times[vision_only].append(time.perf_counter() - t)
    _, _, report = partial.load_vision_only(ad, str(folder), torch.float32, torch.device("cpu"))
    full_s, vo_s = statistics.median(times[False]), statistics.median(times[True])
    return {"model": name, "source": source, "file MB": size / 1e6, "read MB": report.bytes_read / 1e6,
            "read / file": report.bytes_read / size, "whole s": full_s, "vision-only s": vo_s,
            "speed-up": full_s / vo_s}  # fmt: skip


@entry_point
def main(argv: list[str] | None = None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--models", default="all", help="'all' or a comma list of families")
    p.add_argument("--source", default="auto", help="checkpoint for the load table: auto (testbed if trained, else tiny), tiny, testbed or a folder")
    p.add_argument("--repeats", type=int, default=3, help="timed loads per variant (median reported)")
    args = p.parse_args(argv)
    names = families() if args.models == "all" else parse_csv_list(args.models)
    print("| model | config | whole model bf16 GB | vision tower + connector bf16 GB | share |")
    print("|---|---|---|---|---|")
    for n in names:
        for cfg, total, vision in real_dims(n):
            print(f"| {n} | config:{cfg} | {total:.2f} | {vision:.2f} | {vision / total:.3f} |")
    print()
    rows = []
    for n in names:
        source = args.source
        if source == "auto":
            source = "testbed" if (default_testbed_dir() / n / "config.json").is_file() else "tiny"
        rows.append(checkpoint_row(n, source, args.repeats))
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
