"""Stage 2: reference image embeddings (CLIP / SigLIP / DINOv2 / any HF vision model / open_clip), one per image.

Writes, per shard (the same images and keys as stage 1, so kNN neighbourhoods can be compared):

    <out_dir>/<shard>/ref_vectors_<NNNNN>.pt   {"keys": list[str] (N), "vecs": Tensor[N, D]}
    <out_dir>/<shard>/manifest.json            (backend, model, model_type, pool, pool_definition, dim, chunks,
                                                skipped images; written after every chunk, complete=true at the end)

One reference model per --out_dir (e.g. data/clip_ref/clip-l14, data/clip_ref/dinov2-base).
--model_id (default openai/clip-vit-large-patch14, the original pipeline's reference, through the Hugging Face cache):
tiny-clip (= tiny) | tiny-dino | tiny-dino-reg (offline, seeded random weights built into $VLMC_CACHE),
    testbed-clip (= testbed: the CLIP trained on synthetic scenes, sample/models/clip),
an HF id (org/name[@revision]; --revision pins a commit, recorded in the manifest) or local folder (CLIPModel, CLIPVisionModel[WithProjection], SiglipModel, SiglipVisionModel,
Dinov2Model, Dinov2WithRegistersModel, DINOv3ViTModel, or any AutoModel vision encoder + its
AutoImageProcessor), or open_clip:<name>:<pretrained> (or open_clip:<name> with --pretrained TAG|FILE) (<name> may also be
hf-hub:org/repo or local-dir:/path, which carry their own weights).
--ref_type auto detects the type from config.model_type / the open_clip: prefix; images are preprocessed
by the model's own processor / open_clip transform (resize + centre crop at its native size).

Examples:
    python src/extract/extract_clip.py --root sample/images --model_id tiny-clip
    python src/extract/extract_clip.py --root data/images --model_id openai/clip-vit-large-patch14 --out_dir data/clip_ref/clip-l14
    python src/extract/extract_clip.py --model_id facebook/dinov2-base --pool mean --out_dir data/clip_ref/dinov2-base
    python src/extract/extract_clip.py --model_id open_clip:ViT-B-32 --pretrained laion2b_s34b_b79k --out_dir data/clip_ref/oc-b32
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from vlmc.data.images import discover_images
from vlmc.extract.reference import (
    DEFAULT_REFERENCE,
    MODEL_TYPES,
    POOL_DOC,
    POOLS,
    REFERENCE_SOURCE_HELP,
    load_reference,
)
from vlmc.extract.runner import RunConfig, add_run_args, check_run_args, group_by_shard, run_shards
from vlmc.store.vectors import MANIFEST
from vlmc.utils import cli
from vlmc.utils.cli import (
    UsageError,
    ensure_writable_dir,
    entry_point,
    make_parser,
    parse_csv_list,
    parse_dtype,
    resolve_device,
    resolve_dtype,
)
from vlmc.utils.io import read_json

log = logging.getLogger("vlmc.extract_clip")

# Manifest fields that must match for --skip_existing to keep an earlier run's chunks (the store
# itself already compares model, source, store_dtype, save and save_every).
RESUME_FIELDS = ("backend", "model_type", "pool", "pretrained")


def build_parser():
    """The stage-2 argument parser."""
    p = make_parser(f"{__doc__}\n{POOL_DOC}")
    p.add_argument("--root", default="sample/images", help="image folder: <root>/<shard>/<key>.<ext> (a flat folder is one shard)")
    cli.add_out_dir_arg(p, default="data/clip_ref", help="output folder; files go to <out_dir>/<shard>/")
    p.add_argument("--model_id", default=DEFAULT_REFERENCE, help=REFERENCE_SOURCE_HELP)
    p.add_argument("--revision", default=None, help="branch, tag or commit of an HF id (unset: main); the manifest "
                   "records the resolved commit")
    cli.add_ref_type_arg(p, "--model_type", default="auto", help=f"one of {', '.join(MODEL_TYPES)}: which pooling rule applies (auto: from the config)")
    p.add_argument("--pretrained", default=None, help="open_clip only: pretrained tag (e.g. laion2b_s34b_b79k) or checkpoint file")
    p.add_argument("--pool", default="cls", help=f"one of {', '.join(POOLS)}; exact tensors per backend above")
    add_run_args(p, batch_size=32)
    return p


def check_args(args) -> None:
    """Reject impossible values before any model is loaded."""
    check_run_args(args)
    if args.model_type not in MODEL_TYPES:
        raise UsageError(f"unknown --ref_type {args.model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    if args.pool not in POOLS:
        raise UsageError(f"unknown --pool {args.pool!r}; choose one of {', '.join(POOLS)}")
    parse_dtype(args.store_dtype)
    if args.dtype != "auto":
        parse_dtype(args.dtype)


def check_resume(shard_dir: Path, meta: dict, fields: tuple[str, ...] = RESUME_FIELDS) -> None:
    """With --skip_existing: refuse to mix chunks of a different model / backend / pooling into one shard."""
    m = shard_dir / MANIFEST
    if not m.exists():
        return
    old = read_json(m)
    for field in fields:
        if field in old and old.get(field) != meta.get(field):
            raise UsageError(
                f"{shard_dir}: existing output has {field}={old.get(field)!r}, this run {meta.get(field)!r}; "
                "rerun without --skip_existing to overwrite, or choose another --out_dir"
            )


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    records = discover_images(args.root, shards=parse_csv_list(args.shards) or None, max_items=args.max_items or None)
    out_dir = ensure_writable_dir(args.out_dir)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    by_shard = group_by_shard(records)
    if args.skip_existing:  # cheap fields first, so a mismatch fails before any model is loaded
        for shard in by_shard:
            check_resume(out_dir / shard, {"model": args.model_id, "pool": args.pool}, ("model", "pool"))
    encoder = load_reference(args.model_id, args.model_type, args.pool, device, dtype, args.pretrained, args.revision)
    if args.skip_existing:
        for shard in by_shard:
            check_resume(out_dir / shard, encoder.meta())
    cfg = RunConfig(
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        save_every=args.save_every,
        skip_existing=args.skip_existing,
        store_dtype=args.store_dtype,
        save="tokens",  # one [D] vector per image: stored as "vecs" [N, D]
    )
    run_shards(encoder, records, out_dir, cfg, desc=f"reference {args.model_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
