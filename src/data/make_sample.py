"""Build the committed sample image set (``sample/images``): two shards of scenes and one of real photos.

Layout written (deterministic: the same command gives byte-identical files with the same library versions)::

    <out>/00000/000010000.png + .txt ... 000010023   scenes, seed 0
    <out>/00001/000010012.png + .txt ... 000010035   scenes, seed 1: keys 000010012-000010023 repeat
                                                      shard 00000's keys with different images, so the
                                                      sample exercises "(shard, key) is the identity"
    <out>/photos/<name>.jpg|png + .txt                real photos bundled with installed packages
    <out>/README.md                                   provenance and licences

The set is built in a temporary folder beside ``<out>`` and swapped in at the end, so an interrupted run
leaves the old set intact.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from vlmc.utils import cli
from vlmc.data.images import CAPTION_SUFFIX, IMAGE_EXTENSIONS
from vlmc.data.photos import DEFAULT_JPEG_QUALITY, DEFAULT_MAX_SIDE, available_photos, export_photos
from vlmc.data.scenes import write_scenes
from vlmc.utils.cli import UsageError, entry_point, make_parser
from vlmc.utils.io import atomic_write_text

DEFAULT_OUT = Path("sample/images")
FIRST_INDEX = 10_000
PHOTO_SHARD = "photos"
_ALLOWED = {*IMAGE_EXTENSIONS, CAPTION_SUFFIX, ".md"}


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """Refuse to replace anything but an earlier sample set (only images, captions, README)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    if not overwrite:
        raise UsageError(f"{out} is not empty; pass --overwrite to rebuild it")
    for path in out.rglob("*"):
        depth = len(path.relative_to(out).parts)
        if path.is_file() and (path.suffix.lower() not in _ALLOWED or depth > 2):
            raise UsageError(
                f"{out} holds {path.relative_to(out)}, which is not part of a sample set; not replacing it"
            )


def _readme(n_per_shard: int, overlap: int, size: int) -> str:
    lines = [
        "# Sample images",
        "",
        "Built by `python src/data/make_sample.py` (do not edit by hand). Layout `<shard>/<key>.<ext>` with",
        "`<key>.txt` holding one reference caption.",
        "",
        f"- `00000/`: {n_per_shard} synthetic scenes, seed 0, {size}x{size} PNG, keys from {FIRST_INDEX:09d}.",
        f"- `00001/`: {n_per_shard} synthetic scenes, seed 1; its first {overlap} keys repeat keys of `00000`",
        "  with different images: an image is identified by (shard, key), never by key alone.",
        f"- `{PHOTO_SHARD}/`: real photos bundled with scikit-image, scikit-learn and matplotlib",
        f"  (longer side <= {DEFAULT_MAX_SIDE}, JPEG quality {DEFAULT_JPEG_QUALITY}; PNG where the image has alpha).",
        "",
        "| key | licence | origin |",
        "|---|---|---|",
    ]
    lines += [f"| {p.key} | {p.licence} | {p.origin} |" for p in available_photos()]
    return "\n".join(lines) + "\n"


def build_sample(tmp: Path, n_per_shard: int, overlap: int, size: int) -> None:
    """Write the whole sample set into the empty folder ``tmp``."""
    if not 0 <= overlap <= n_per_shard:
        raise UsageError(f"--overlap must be between 0 and --n-per-shard ({n_per_shard}), got {overlap}")
    write_scenes(tmp / "00000", n_per_shard, seed=0, size=size, first_index=FIRST_INDEX)
    write_scenes(
        tmp / "00001", n_per_shard, seed=1, size=size, first_index=FIRST_INDEX + n_per_shard - overlap
    )
    if not export_photos(tmp / PHOTO_SHARD):
        raise UsageError("no bundled photo found (are scikit-image, scikit-learn and matplotlib installed?)")
    atomic_write_text(tmp / "README.md", _readme(n_per_shard, overlap, size))


def _make_readable(root: Path) -> None:
    """Folders 0755, files 0644 (temp-file writers create them private)."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` (old set kept until the new one is in place)."""
    old = out.with_name(f".{out.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)


@entry_point
def main(argv: list[str] | None = None) -> int:
    """CLI: build the committed sample set."""
    parser = make_parser(__doc__.split("\n\n")[0])
    cli.add_out_dir_arg(parser, "--out", type=Path, default=DEFAULT_OUT, help="sample image root")
    parser.add_argument("--n-per-shard", type=cli.positive_int, default=24, help="synthetic scenes per scene shard")
    parser.add_argument("--overlap", type=cli.nonneg_int, default=12, help="keys shard 00001 shares with shard 00000")
    parser.add_argument("--size", type=cli.positive_int, default=224, help="scene image side in pixels")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing sample set")
    args = parser.parse_args(argv)
    out: Path = args.out
    _check_replaceable(out, args.overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        build_sample(tmp, args.n_per_shard, args.overlap, args.size)
        _make_readable(tmp)
        _swap_in(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    files = [p for p in out.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    print(f"wrote {len(files)} files ({total / 1e6:.2f} MB) under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
