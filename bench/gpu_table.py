"""One table from the JSON files ``bench/gpu.sh`` leaves in its results folder.

Reads ``extract_<family>.json`` (rows of ``bench/bench_extract.py --json``) and ``knn*.json``
(``bench/bench_knn.py --json``); prints one markdown table per benchmark, the stage-1 one first with
the stage's goals as columns (``ours/min(forward,disk)`` >= 0.9; peak <= weights + 4 GB). A family
whose run was cut short or failed shows as ``missing``.

    python bench/gpu_table.py RESULTS_DIR [--families llava,idefics2,...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from vlmc.utils.cli import UsageError, entry_point, make_parser, parse_csv_list

EXTRACT_COLUMNS = (
    ("model", "family"),
    ("forward_img_s", "forward img/s"),
    ("bare_img_s", "bare img/s"),
    ("ours_img_s", "ours img/s"),
    ("ours_workers_img_s", "ours (CPU preprocessing) img/s"),
    ("disk_mb_s", "disk MB/s"),
    ("disk_img_s", "disk img/s"),
    ("ours/min(forward,disk)", "ours / min(forward, disk)"),
    ("weights_gb", "weights GB"),
    ("ours_peak_gb", "peak GB (ours)"),
    ("peak_over_weights_gb", "peak - weights GB"),
)


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if key.endswith("_img_s") or key == "disk_mb_s":
            return f"{value:.0f}" if value >= 10 else f"{value:.2f}"
        return f"{value:.2f}"
    return str(value)


def extract_rows(folder: Path, families: list[str]) -> list[dict[str, Any]]:
    """One row per family (its last JSON row), ``missing`` where the run left nothing."""
    rows = []
    for fam in families:
        path = folder / f"extract_{fam}.json"
        try:
            row = json.loads(path.read_text())[-1]
        except (OSError, ValueError, IndexError):
            rows.append({"model": f"{fam} (missing)"})
            continue
        if "ours_peak_gb" in row and "weights_gb" in row:
            row["peak_over_weights_gb"] = row["ours_peak_gb"] - row["weights_gb"]
        rows.append(row)
    return rows


def extract_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of the stage-1 table."""
    lines = ["| " + " | ".join(h for _, h in EXTRACT_COLUMNS) + " |", "|" + "---|" * len(EXTRACT_COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(k, r.get(k)) for k, _ in EXTRACT_COLUMNS) + " |")
    return lines


def knn_table(folder: Path) -> list[str]:
    """Markdown lines of every ``knn*.json``: seconds per method, ratio to the GEMM floor, peak GiB."""
    lines = []
    for path in sorted(folder.glob("knn*.json")):
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        c, wall, peak = res["config"], res["seconds_min"], res.get("peak_device_gib", {})
        lines += [f"kNN N={c['n']} D={c['d']} k={c['k']} on {res.get('device')} (auto block {res.get('block_mb', 0):.0f} MiB)",
                  "| method | seconds | x floor | peak GiB |", "|---|---|---|---|"]  # fmt: skip
        for m, t in wall.items():
            ratio = f"{t / wall['floor']:.2f}" if wall.get("floor") else "-"
            lines.append(f"| {m} | {t:.2f} | {ratio} | {_fmt('peak', peak.get(m))} |")
    return lines


def _all_families() -> list[str]:
    from vlmc.models.base import display_order, families  # heavy (transformers): only when needed

    return display_order(families())


@entry_point
def main(argv: list[str] | None = None) -> int:
    p = make_parser(__doc__)
    p.add_argument("folder", help="results folder of bench/gpu.sh")
    p.add_argument("--families", default="", help="rows, in this order (empty: every registered family, figure order)")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        raise UsageError(f"no results folder {folder}")
    rows = extract_rows(folder, parse_csv_list(args.families) or _all_families())
    meta = next((r for r in rows if "device" in r), {})
    print(f"stage 1 ({meta.get('device', '?')}, {meta.get('dtype', '?')}, {meta.get('images', '?')} images, "
          f"preprocess={meta.get('preprocess', '?')}, vision_only={meta.get('vision_only', '?')})")
    print("\n".join(extract_table(rows)))
    knn = knn_table(folder)
    if knn:
        print()
        print("\n".join(knn))
    return 0


if __name__ == "__main__":
    sys.exit(main())
