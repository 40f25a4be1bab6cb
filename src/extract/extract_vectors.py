"""Stage 1: extract E_pre (connector input) and E_post (connector output) for every image.

Runs only the vision tower and the connector of each model (never the language model unless
--caption asks for a caption or --modules for a language-model module too) and writes, per model and shard:

    <out_dir>/<model>/<shard>/pre_vectors_<NNNNN>.pt   {"keys", "vecs" [N,T,D], "pooled" [N,D]}
    <out_dir>/<model>/<shard>/post_vectors_<NNNNN>.pt
    <out_dir>/<model>/<shard>/manifest.json            (written after every chunk; complete=true at the end)

Token order is canonical: row-major over the patch grid (Qwen's window permutation undone, CLS
dropped as the model drops it). See docs/formats.md.

Examples:
    python src/extract/extract_vectors.py --root sample/images --models llava --model-path tiny
    python src/extract/extract_vectors.py --root data/images --models all --device cuda --dtype bf16
    python src/extract/extract_vectors.py --models llava --model-path tiny --list-modules
    python src/extract/extract_vectors.py --models qwen2.5vl --model-path tiny \
        --modules 'model.visual.blocks.*.mlp' 'model.language_model.layers.*.mlp'
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from vlmc.data.images import discover_images
from vlmc.extract.runner import RunConfig, add_run_args, check_run_args, run_shards
from vlmc.extract.vectors import VLMEncoder, resolve_preprocess_on
from vlmc.models.attention import add_attn_arg, check_attn_implementation
from vlmc.models.base import VLM, families, get_adapter, list_modules, match_modules
from vlmc.models.load import VLM_SOURCE_HELP, load_vlm
from vlmc.models.partial import on_vision_side
from vlmc.utils import cli, tracking
from vlmc.utils.cli import (
    UsageError,
    ensure_writable_dir,
    entry_point,
    make_parser,
    parse_csv_list,
    resolve_device,
    resolve_dtype,
)
from vlmc.utils.tracking import add_tracking_args

log = logging.getLogger("vlmc.extract_vectors")


def build_parser():
    """The stage-1 argument parser."""
    p = make_parser(__doc__)
    p.add_argument("--root", default="sample/images", help="image folder: <root>/<shard>/<key>.<ext> (a flat folder is one shard)")
    cli.add_out_dir_arg(p, default="data/vector", help="output folder; files go to <out_dir>/<model>/<shard>/")
    cli.add_model_arg(p, "--models", multiple=True, default="all", help=f"'all' or a comma list of: {', '.join(families())}")
    p.add_argument(
        "--model-path",
        "--model_path",
        dest="model_path",
        default=None,
        help=f"weights: {VLM_SOURCE_HELP}. One value for every model, or per model as "
        "'llava=PATH,qwen2.5vl=tiny'. Default: each family's published HF id",
    )
    p.add_argument("--revision", default=None, help="branch, tag or commit of the HF ids (one for every model, or "
                   "per model as 'llava=REV,...'); the manifest records the resolved commit. Unset: the repository's main")
    add_run_args(p, batch_size=8)
    p.add_argument("--img_size", type=cli.positive_int, default=None, help="resize images to this square size (default: the model processor's own size)")
    p.add_argument("--prompt", default=None, help="caption instruction used with --caption (default: the family's)")
    p.add_argument("--save", default="both", choices=["tokens", "pooled", "both"], help="store token matrices, their mean, or both")
    p.add_argument("--caption", action="store_true", help="also generate a caption per image (runs the LM; stored in post chunks)")
    p.add_argument("--max_new_tokens", type=cli.positive_int, default=32, help="caption length limit with --caption")
    p.add_argument("--modules", nargs="+", default=[], metavar="GLOB",
                   help="also store, per image, the output of every module matching these Unix globs (fnmatch over "
                   "--list-modules names; '*' spans dots): vision tower / connector modules as the tower computes them "
                   "(canonical token order), language-model modules at the image-token positions of a forward of the "
                   "captioning prompt (--prompt). A matched module that cannot be captured per image stops the run "
                   "before any image is read")
    p.add_argument(
        "--full_model",
        action="store_true",
        help="load the whole VLM even when only its vision tower + connector run (default: vision-only loading "
        "from a local folder or config:, unless --caption or --modules name language-model modules)",
    )
    add_attn_arg(p)
    p.add_argument(
        "--preprocess",
        default="auto",
        choices=["auto", "workers", "device"],
        help="where the model's image processor runs: workers (DataLoader workers, CPU), device (workers only "
        "decode to uint8; the processor runs batched on --device, bit-identical), auto (device on cuda, workers on cpu)",
    )
    p.add_argument("--list-modules", "--list_modules", dest="list_modules", action="store_true", help="print every module name of each model and exit")
    add_tracking_args(p)
    return p


def parse_model_paths(text: str | None, models: list[str], flag: str = "--model-path") -> dict[str, str | None]:
    """``--model-path`` (or ``--revision``) → value per model: one shared value, or ``name=value`` pairs."""
    if not text:
        return dict.fromkeys(models)
    if "=" not in text:
        return dict.fromkeys(models, text)
    pairs = dict(item.split("=", 1) for item in parse_csv_list(text))
    unknown = set(pairs) - set(models)
    if unknown:
        raise UsageError(f"{flag} names models not in --models: {', '.join(sorted(unknown))}")
    return {m: pairs.get(m) for m in models}


def select_models(text: str) -> list[str]:
    """``--models`` → family names (validated)."""
    names = families() if text == "all" else parse_csv_list(text)
    if not names:
        raise UsageError("--models is empty")
    for n in names:
        get_adapter(n)
    return names


def load_for_extraction(
    family: str,
    source: str | None,
    dtype: torch.dtype,
    device: torch.device,
    args: argparse.Namespace,
    revision: str | None = None,
) -> VLM:
    """The model stage 1 needs: vision tower + connector only, unless captions or LM ``--modules`` need the LM."""
    attn = check_attn_implementation(args.attn_implementation)
    vision_only = not (args.caption or args.full_model)
    vlm = load_vlm(family, source, dtype, device, vision_only=vision_only, attn_implementation=attn,
                   revision=revision)
    if vlm.vision_only and args.modules:
        names = match_modules(vlm.model, args.modules)
        if any(not on_vision_side(n, vlm.adapter.vision_prefixes) for n in names):
            log.info("%s: --modules capture language-model modules; loading the whole model", family)
            vlm = load_vlm(family, source, dtype, device, attn_implementation=attn, revision=revision)
    return vlm


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_run_args(args)
    models = select_models(args.models)
    sources = parse_model_paths(args.model_path, models)
    revisions = parse_model_paths(args.revision, models, "--revision")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    check_attn_implementation(args.attn_implementation)
    if args.list_modules:
        for m in models:
            vlm = load_vlm(m, sources[m], dtype, "meta" if (sources[m] or "").startswith("config:") else device,
                           revisions[m])
            for name, cls in list_modules(vlm.model):
                print(f"{m}\t{name}\t{cls}")
        return 0
    records = discover_images(args.root, shards=parse_csv_list(args.shards) or None, max_items=args.max_items or None)
    out_dir = ensure_writable_dir(args.out_dir)
    cfg = RunConfig(
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        save_every=args.save_every,
        skip_existing=args.skip_existing,
        store_dtype=args.store_dtype,
        save=args.save,
    )
    with tracking.start(args, out_dir, f"extract-{'-'.join(models)}", job_type="extract") as tracker:
        for m in models:
            vlm = load_for_extraction(m, sources[m], dtype, device, args, revisions[m])
            encoder = VLMEncoder(vlm, args.img_size, args.modules, args.caption, args.prompt, args.max_new_tokens,
                                 preprocess_on=resolve_preprocess_on(args.preprocess, device))  # fmt: skip
            t0 = time.perf_counter()
            results = run_shards(encoder, records, out_dir / m, cfg, desc=m)
            seconds, written = time.perf_counter() - t0, sum(r.written for r in results)
            tracker.log({f"{m}/images_written": written, f"{m}/seconds": seconds,
                         f"{m}/images_per_s": written / max(seconds, 1e-9)})
    return 0

if __name__ == "__main__":
    sys.exit(main())
