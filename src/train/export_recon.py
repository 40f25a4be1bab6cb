"""Stage 5: export reconstructed vectors in the stage-1 layout, so later stages read them as another model.

For every image of the chosen split (``--split test``, the default: the images the reconstructor was
neither fitted nor selected on, i.e. its split's test images, or every image of a store other than its
training one, id collisions evaluated or refused, see ``--image_root``; ``val``: the selection images;
``all``: every image of the store) writes, per shard:

    <out_base>/<model>_recon/<shard>/pre_vectors_<NNNNN>.pt   Ê_pre = reconstructor(E_post), de-standardised
    <out_base>/<model>_recon/<shard>/post_vectors_<NNNNN>.pt  Ê_post = connector(Ê_pre), the model's REAL connector
    <out_base>/<model>_recon/<shard>/manifest.json            stage-1 manifest + a "recon" section

Chunk ``NNNNN`` holds the selected images of source chunk ``NNNNN`` (same boundaries), so
``--skip_existing`` resumes chunk by chunk. The VLM comes from the stage-1 manifest's ``family`` and
``source`` (override with ``--model-path``); ``--no_reproj`` skips it and stores the original E_post
as ``post`` instead (manifest ``post_source: original``).

Examples:
    python src/train/export_recon.py --model_dir data/output/recon/llava_mlp --embed_model llava
    python src/train/export_recon.py --model_dir OUT --split all --device cuda --skip_existing
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from vlmc.models.attention import add_attn_arg, check_attn_implementation
from vlmc.models.base import VLM
from vlmc.models.load import VLM_SOURCE_HELP
from vlmc.store.batches import make_loader
from vlmc.store.reader import Sample
from vlmc.store.recon_run import (
    ReconRun,
    check_held_out,
    load_connector_vlm,
    open_run,
    reconstruct,
    reproject,
    resolve_model_dir,
)
from vlmc.store.vectors import ShardWriter, digest_keys, pack
from vlmc.store.verify import set_read_level
from vlmc.utils import cli
from vlmc.utils.cli import (
    DTYPES,
    UsageError,
    ensure_writable_dir,
    entry_point,
    make_parser,
    parse_csv_list,
    parse_dtype,
    resolve_device,
)
from vlmc.utils.stop import EXIT_PREEMPTED, StopFlag, StopRequested

log = logging.getLogger("vlmc.export_recon")


# -- export -----------------------------------------------------------------------------------------


def build_parser():
    """The stage-5 argument parser."""
    p = make_parser(__doc__)
    p.add_argument("--model_dir", default=None, help="the train_recon --out_dir (best_model.pt, normalization.safetensors, "
                   "split.json); default: the one run of --embed_model under data/output/recon/<model>_<type> or the "
                   "original pipeline's data/output/out/out_<model>[_mlp]_norm")
    p.add_argument("--vec_dir", default=None, help="stage-1 store (default: the shard folders recorded at training time)")
    cli.add_model_arg(p, "--embed_model", default=None, help="model name (default: the checkpoint's)")
    cli.add_out_dir_arg(p, "--out_base", default="data/vector_recon", help="output base; files go to <out_base>/<out_name>/<shard>/")
    p.add_argument("--out_name", default=None, help="model folder name (default: <model>_recon)")
    p.add_argument("--model-path", "--model_path", dest="model_path", default=None,
                   help=f"VLM weights for the connector: {VLM_SOURCE_HELP}. Default: the stage-1 manifest's source at its recorded commit")
    p.add_argument("--shards", default=None, help="comma list of shards of the store to export (default: the store's)")
    p.add_argument("--split", default="test", choices=["test", "val", "train", "all"],
                   help="test: images neither fitted nor selected on (held out); val: the selection split; train; all")
    p.add_argument("--image_root", default=None,
                   help="images of this store (<root>/<shard>/<key>.<ext>): with a split.json that records content hashes "
                        "(train_recon --image_root), an id collision with a train/val image is evaluated when its file "
                        "differs and refused when it is the same image; without, every collision is refused with a count")
    p.add_argument("--batch_size", type=cli.positive_int, default=32, help="images per forward pass")
    p.add_argument("--num_workers", type=cli.nonneg_int, default=2, help="DataLoader workers")
    p.add_argument("--device", type=cli.device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="VLM compute dtype: auto (the stage-1 run's), fp32, bf16, fp16")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the reconstructor")
    add_attn_arg(p)
    p.add_argument("--store_dtype", default=None, help="dtype of the stored vectors (default: the source store's)")
    p.add_argument("--no_reproj", action="store_true", help="do not load the VLM; store the original E_post as post")
    cli.add_resume_arg(p, "--skip_existing", help="keep chunks an earlier export committed")
    return p


def export_shard(run: ReconRun, shard: str, samples: list[Sample], out_dir: Path, vlm: VLM | None, args, bar,
                 stop: StopFlag | None = None) -> int:
    """Export one shard's selected samples chunk by chunk; returns how many images were written."""
    writer = ShardWriter(out_dir, shard_meta(run, shard, vlm, args), resume=args.skip_existing)
    by_chunk: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        by_chunk[s.chunk].append(s)
    written = 0
    for ci in sorted(by_chunk):
        group = by_chunk[ci]
        keys = [s.key for s in group]
        if writer.is_done(ci, digest_keys(keys)):
            bar.update(len(group))
            continue
        if stop:
            raise StopRequested()
        pre, post = export_chunk(run, group, vlm, args, bar)
        data = {"pre": pack(pre, keys, DTYPES[args.store_dtype], "both"), "post": pack(post, keys, DTYPES[args.store_dtype], "both")}
        data["pre"]["grids"] = torch.tensor([s.pre_grid for s in group])
        data["post"]["grids"] = torch.tensor([s.post_grid for s in group])
        writer.meta.update(shape_entries(pre, post, group))
        writer.write_chunk(ci, digest_keys(keys), keys, data, skipped=[])
        written += len(group)
    writer.write_manifest(complete=True)
    return written


def export_chunk(run: ReconRun, group: list[Sample], vlm: VLM | None, args, bar) -> tuple[list[Tensor], list[Tensor]]:
    """(Ê_pre, Ê_post or original E_post) per sample of one chunk, in the chunk's order."""
    pre: list[Tensor | None] = [None] * len(group)
    post: list[Tensor | None] = [None] * len(group)
    loader, _ = make_loader(group, args.batch_size, False, 0, args.num_workers, pin=False)
    for batch in loader:
        idx = batch["index"].tolist()
        s0 = group[idx[0]]
        rec = reconstruct(run, batch["post"], s0.pre_grid, s0.post_grid, args.amp).cpu()
        outs = reproject(vlm, list(rec), [group[i].pre_grid for i in idx]) if vlm is not None else list(batch["post"])
        for j, i in enumerate(idx):
            pre[i], post[i] = rec[j], outs[j]
        bar.update(len(idx))
    return pre, post  # type: ignore[return-value]


def shape_entries(pre: list[Tensor], post: list[Tensor], group: list[Sample]) -> dict[str, Any]:
    """Manifest ``pre``/``post`` entries (tokens/grid ``None`` when images differ)."""

    def one(vecs: list[Tensor], grids: list) -> dict[str, Any]:
        same = len({tuple(v.shape) for v in vecs}) == 1
        return {"tokens": vecs[0].shape[0] if same else None, "dim": vecs[0].shape[1], "grid": list(grids[0]) if same else None}

    return {"pre": one(pre, [s.pre_grid for s in group]), "post": one(post, [s.post_grid for s in group])}


def shard_meta(run: ReconRun, shard: str, vlm: VLM | None, args) -> dict[str, Any]:
    """The export manifest: the source's fields, this model's name, and what reconstructed it."""
    m = run.store.manifest
    keep = ("family", "revision", "model_class", "compute_dtype", "pool", "correspondence", "prompt", "img_size")
    return {
        **{k: m.get(k) for k in keep},
        "model": args.out_name,
        "source": vlm.source if vlm is not None else m.get("source"),
        "shard": shard,
        "store_dtype": args.store_dtype,
        "save": "both",
        "save_every": run.store.save_every,
        "kinds": ["pre", "post"],
        "post_source": "original" if vlm is None else "reprojected",
        "recon": {
            "from_model": run.store.model,
            "model_dir": str(run.model_dir.resolve()),
            "model_type": run.spec.model_type,
            "best_epoch": run.meta.get("epoch"),
            "val_loss": run.meta.get("val_loss"),
            "split": args.split,
            "stats_sha256": run.meta.get("stats_sha256"),
        },
    }


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_read_level("size")  # as stage 6 (where the hash costs > 5 %); not measured for export itself
    if args.batch_size < 1 or args.num_workers < 0:
        raise UsageError("--batch_size must be >= 1 and --num_workers >= 0")
    device = resolve_device(args.device)
    run = open_run(resolve_model_dir(args.model_dir, args.embed_model), device, args.vec_dir, args.embed_model,
                   parse_csv_list(args.shards) or None)
    args.out_name = args.out_name or f"{run.store.model}_recon"
    args.store_dtype = args.store_dtype or run.store.store_dtype
    parse_dtype(args.store_dtype)
    check_held_out(run, args.image_root)
    samples = run.part(args.split)
    attn = check_attn_implementation(args.attn_implementation)
    vlm = None if args.no_reproj else load_connector_vlm(run, args.model_path, args.dtype, device, attn)
    out = ensure_writable_dir(Path(args.out_base) / args.out_name)
    by_shard: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_shard[s.shard].append(s)
    with StopFlag() as stop, tqdm(total=len(samples), desc=f"export {args.out_name}", unit="img", file=sys.stderr, disable=None) as bar:
        for shard in sorted(by_shard):
            try:
                n = export_shard(run, shard, by_shard[shard], out / shard, vlm, args, bar, stop)
            except StopRequested:
                log.warning("stopped by signal; rerun with --skip_existing to continue (exit %d)", EXIT_PREEMPTED)
                return EXIT_PREEMPTED
            log.info("%s/%s: %d written, %d kept from an earlier run", args.out_name, shard, n, len(by_shard[shard]) - n)
    log.info("exported %d %s images → %s", len(samples), args.split, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
