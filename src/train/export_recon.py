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
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from vlmc.models.attention import add_attn_arg, check_attn_implementation
from vlmc.models.base import VLM
from vlmc.models.load import VLM_SOURCE_HELP
from vlmc.store.vectors import ShardWriter, digest_keys, pack
from vlmc.store.verify import set_read_level
from vlmc.train.data import (
    SPLIT_FILE,
    STATS_FILE,
    Sample,
    Standardizer,
    Store,
    apply_split,
    content_hashes,
    index_samples,
    load_split,
    load_stats,
    make_loader,
    open_store,
)
from vlmc.train.reconstructors import ReconSpec, load_reconstructor
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
from vlmc.utils.io import read_json, sha256_file
from vlmc.utils.stop import EXIT_PREEMPTED, StopFlag, StopRequested

log = logging.getLogger("vlmc.export_recon")


# -- a trained run, reopened (shared with eval_recon) ----------------------------------------------


@dataclass
class ReconRun:
    """A trained reconstructor with its stats, split and the store it was trained on."""

    model: nn.Module
    spec: ReconSpec
    meta: dict[str, Any]
    std: Standardizer
    split: dict[str, list[list[str]]]
    store: Store
    samples: list[Sample]
    model_dir: Path

    evaluable_collisions: frozenset[tuple[str, str]] = frozenset()  # see check_held_out

    def part(self, name: str) -> list[Sample]:
        """``test`` (held out), ``val`` (the selection split), ``train`` or ``all`` samples, in store order.

        Held out (``test``) means neither trained nor selected on: the split's test images, and every
        image of another store whose id is not a train/val id — or whose id is one but whose content
        (file sha256) differs (``check_held_out``).
        """
        if name == "all":
            return list(self.samples)
        if name in ("train", "val"):
            return apply_split(self.samples, self.split, name)
        return [s for s in self.samples if self.held_out(s)]

    def held_out(self, sample: Sample) -> bool:
        """Whether the reconstructor was neither fitted nor selected on this image."""
        return sample.id not in self.seen_ids or sample.id in self.evaluable_collisions

    def part_of(self, sample: Sample) -> str:
        """``test`` (held out), ``val`` or ``train``: the role this image played for the reconstructor."""
        if self.held_out(sample):
            return "test"
        return "train" if sample.id in self.train_ids else "val"

    @cached_property
    def seen_ids(self) -> frozenset[tuple[str, str]]:
        """Ids the reconstructor was fitted (train) or selected (val) on."""
        return frozenset(tuple(x) for x in self.split["train"] + self.split["val"])

    @cached_property
    def train_ids(self) -> frozenset[tuple[str, str]]:
        """Ids the reconstructor was fitted on."""
        return frozenset(tuple(x) for x in self.split["train"])

    def training_shards(self) -> set[str]:
        """Shards read now whose folders the reconstructor was trained on (their train/val ids are its own)."""
        dirs = {x["pre"] for x in (self.meta.get("store") or {}).get("shard_dirs") or []}
        return {s.shard for s in self.store.shards if str(s.pre.dir.resolve()) in dirs}

    def is_training_store(self) -> bool:
        """Whether the store read now is the one the reconstructor was trained on (same shard folders)."""
        return len(self.training_shards()) == len(self.store.shards) > 0


def check_held_out(run: ReconRun, image_root: str | None) -> dict[str, int]:
    """No image of another store is silently dropped, and no leaked content is reported as held out.

    On another store, an image whose (shard, key) is a train/val id is a *collision*: with content
    hashes (``split.json`` ``sha256`` from ``train_recon --image_root`` and ``image_root`` here) it is
    evaluated when its file differs and refused when it is the same image; without them every collision
    is refused with a count. With hashes, any held-out image whose file equals a train/val image is
    refused too (leaked content under another id). Sets ``run.evaluable_collisions``.

    Returns:
        Counts: ``n_id_collisions`` (evaluated, content differs), ``n_content_checked``.

    Raises:
        UsageError: refused collisions or leaked content, with their count.
    """
    own = run.training_shards()  # a shard folder it trained from: its train/val ids are simply not held out
    colliding = [s for s in run.samples if s.id in run.seen_ids and s.shard not in own]
    known = run.split.get("sha256") or {}
    if not (known and image_root):
        if colliding:
            raise UsageError(f"{len(colliding)} image(s) of {run.store.model}'s store share (shard, key) ids with the "
                             f"reconstructor's train/val images, e.g. {colliding[0].id}; without content hashes they "
                             "cannot be told apart (train with --image_root and pass --image_root here)")
        return {"n_id_collisions": 0, "n_content_checked": 0}
    seen_content = set(known.values())
    candidates = colliding + [s for s in run.samples if s.id not in run.seen_ids]
    mine = content_hashes(image_root, [s.id for s in candidates])
    leaked = [s.id for s in candidates if mine[f"{s.shard}/{s.key}"] in seen_content]
    if leaked:
        raise UsageError(f"{len(leaked)} held-out image(s) have the same file content (sha256) as a train/val image, "
                         f"e.g. {leaked[0]}: they are not held out")
    run.evaluable_collisions = frozenset(s.id for s in colliding)
    if colliding:
        log.warning("%d image(s) share (shard, key) ids with train/val images but differ in content: evaluated",
                    len(colliding))
    return {"n_id_collisions": len(colliding), "n_content_checked": len(candidates)}


def open_run(
    model_dir: str | Path,
    device: torch.device,
    vec_dir: str | None = None,
    embed_model: str | None = None,
    shards: Sequence[str] | None = None,
) -> ReconRun:
    """Reopen a train_recon output folder (read-only: stats and split are never rewritten).

    The store defaults to the shard folders recorded at training time; ``vec_dir`` overrides it.
    """
    d = Path(model_dir)
    for f in (STATS_FILE, SPLIT_FILE):
        if not (d / f).exists():
            raise UsageError(f"{d}: no {f} (is this a train_recon --out_dir?)")
    model, spec, meta = load_reconstructor(d, device)
    stats_sha = meta.get("stats_sha256")
    if stats_sha and sha256_file(d / STATS_FILE) != stats_sha:
        raise UsageError(f"{d / STATS_FILE} changed since the model was trained (sha256 mismatch)")
    std = Standardizer(load_stats(d / STATS_FILE), device, meta.get("normalize", True))
    store = _open_training_store(meta, vec_dir, embed_model, shards)
    if (store.d_pre, store.d_post) != (spec.d_pre, spec.d_post):
        raise UsageError(f"{d} maps E_post of {spec.d_post} to E_pre of {spec.d_pre} channels; the store "
                         f"{store.model} has {store.d_post} and {store.d_pre} (a reconstructor of another model?)")
    return ReconRun(model, spec, meta, std, load_split(d / SPLIT_FILE), store, index_samples(store), d)


# where the original pipeline's train_recon runs lived (its export/eval scripts found them there by --embed_model)
SEED_RUN_DIRS = ("data/output/out/out_{m}_mlp_norm", "data/output/out/out_{m}_norm", "data/output/out/out_{m}")


def default_model_dirs(embed_model: str) -> list[Path]:
    """Run folders ``--model_dir`` defaults to for ``--embed_model``, in the order they are looked for.

    train_recon's own default ``data/output/recon/<model>_<model_type>`` for every model type, then the
    original pipeline's layout (``data/output/out/out_<model>_mlp_norm``, ``…_norm``, ``out_<model>``), relative to
    the working directory.
    """
    from vlmc.train.reconstructors import MODEL_TYPES

    ours = [Path(f"data/output/recon/{embed_model}_{t}") for t in MODEL_TYPES]
    return ours + [Path(d.format(m=embed_model)) for d in SEED_RUN_DIRS]


def resolve_model_dir(model_dir: str | None, embed_model: str | None) -> str:
    """``--model_dir``, or the one existing default run folder of ``--embed_model`` (the original pipeline's call).

    Raises:
        UsageError: neither flag given, no default folder exists, or several do (ambiguous).
    """
    if model_dir:
        return model_dir
    if not embed_model:
        raise UsageError("pass --model_dir (the train_recon --out_dir) or --embed_model to find its default run folder")
    found = [d for d in default_model_dirs(embed_model) if (d / STATS_FILE).exists()]
    if len(found) != 1:
        tried = ", ".join(str(d) for d in default_model_dirs(embed_model))
        what = f"several runs of {embed_model} ({', '.join(map(str, found))})" if found else f"no run of {embed_model} in {tried}"
        raise UsageError(f"{what}: pass --model_dir")
    log.info("--model_dir not given: using %s", found[0])
    return str(found[0])


def _open_training_store(meta: dict[str, Any], vec_dir: str | None, embed_model: str | None, shards) -> Store:
    name = embed_model or meta.get("embed_model")
    if vec_dir:
        return open_store(vec_dir, embed_model=name, shards=shards)
    dirs = (meta.get("store") or {}).get("shard_dirs") or []
    if not dirs:
        raise UsageError("the checkpoint records no store; pass --vec_dir")
    pre, post = {x["pre"] for x in dirs}, {x["post"] for x in dirs}
    pre_root, post_root = Path(next(iter(pre))).parent, Path(next(iter(post))).parent
    if pre == post:
        return open_store(pre_root, embed_model=name, shards=shards or [x["shard"] for x in dirs])
    return open_store(None, pre_root, post_root, name, shards or [x["shard"] for x in dirs])


@torch.no_grad()
def reconstruct(run: ReconRun, post: Tensor, pre_grid, post_grid, amp: bool) -> Tensor:
    """Ê_pre in the ORIGINAL space (float32) for a same-shape batch of E_post ``[B, T, D]`` (any dtype)."""
    device = run.std.pre_mean.device
    ctx = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp else nullcontext()
    with ctx:
        y = run.model(run.std.post_in(post.to(device)), pre_grid, post_grid)
    return run.std.pre_out(y.float())


def load_connector_vlm(
    run: ReconRun, model_path: str | None, dtype_name: str, device: torch.device, attn_implementation: str | None = None
) -> VLM:
    """The VLM whose connector re-projects Ê_pre: the manifest's family + source unless overridden.

    Only the vision tower + connector are loaded (``vision_only``): the language model never runs here.
    """
    from vlmc.models.load import load_vlm
    from vlmc.models.sources import pinned

    family = run.store.family
    if not family:
        raise UsageError("the store's manifest names no model family; pass --no_reproj")
    m = run.store.manifest
    source = model_path or pinned(run.store.source, m.get("revision"))  # the commit stage 1 loaded
    if dtype_name == "auto":
        dtype = getattr(torch, str(m.get("compute_dtype") or "float32"), torch.float32)
    else:
        dtype = parse_dtype(dtype_name)
    log.info("loading %s connector from %s (%s)", family, source, dtype)
    return load_vlm(family, source, dtype, device, vision_only=True, attn_implementation=attn_implementation)


@torch.no_grad()
def reproject(vlm: VLM, pre: Sequence[Tensor], grids: Sequence[tuple[int, int]]) -> list[Tensor]:
    """connector(Ê_pre) per image, float32 on the CPU."""
    with torch.inference_mode():
        out = vlm.adapter.apply_connector(vlm, list(pre), list(grids))
    return [o.float().cpu() for o in out]


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


def read_export_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """The manifest of an exported shard (for tests and later stages)."""
    return read_json(Path(shard_dir) / "manifest.json")


if __name__ == "__main__":
    sys.exit(main())
