"""Stage 6: score a trained reconstructor on its HELD-OUT images, per sample.

For every held-out image: neither fitted nor selected on (the test images of its ``split.json``; with
``--vec_dir`` naming another store, e.g. a held-out image set, every image of that store, where an id
that collides with a train/val id is evaluated or refused with a count, never dropped; see
``--image_root``). The val images chose the ridge strength / best epoch and are never reported:

    mse_pre        MSE(Ê_pre, E_pre) in the standardised space (train-split stats), mean over tokens × channels
    cosine_pre     cosine(Ê_pre, E_pre) per token in the original space, mean over tokens
    reproj_mse     MSE(connector(Ê_pre), E_post) in the standardised E_post space (needs the VLM's connector)
    reproj_cosine  cosine(connector(Ê_pre), E_post) per token, original space, mean over tokens

Writes to ``--out_dir`` (default ``data/output/recon_eval/<model>``):

    per_sample.csv             shard, key, model, recon_type, mse_pre, cosine_pre, reproj_mse, reproj_cosine
    per_shard/<shard>.csv      the same rows, one file per shard (the resume unit)
    loss_maps/<shard>.pt       {"keys", "shards", "grids" [N,2], "maps" [N,h,w]}: per-patch mse_pre on the pre grid
    loss_maps.pt               all shards together (NaN-padded when grids differ)
    summary.json               means, split ("test"), n, n_id_collisions (evaluated: same id, other content),
                               n_content_checked (held-out files hashed), and whether reprojection ran

``--resume`` keeps the rows already written (keyed by (shard, key) strings; no duplicates).
``--no_reproj`` skips the connector (reproj_* left empty, noted in summary.json). Nothing in the
model folder is written (normalization.safetensors stays byte-identical).

Examples:
    python src/eval/eval_recon.py --model_dir data/output/recon/llava_mlp --embed_model llava
    python src/eval/eval_recon.py --model_dir OUT --no_reproj --limit 100
"""

from __future__ import annotations

import logging
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

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
from vlmc.store.verify import VERIFY_HELP, set_read_level
from vlmc.utils import cli
from vlmc.utils.cli import (
    UsageError,
    ensure_writable_dir,
    entry_point,
    make_parser,
    parse_csv_list,
    resolve_device,
)
from vlmc.utils.io import atomic_torch_save, atomic_write_json, safe_torch_load
from vlmc.utils.rows import read_rows, write_rows
from vlmc.utils.stop import EXIT_PREEMPTED, StopFlag, StopRequested

log = logging.getLogger("vlmc.eval_recon")

FIELDS = ("shard", "key", "model", "recon_type", "mse_pre", "cosine_pre", "reproj_mse", "reproj_cosine")
METRICS = ("mse_pre", "cosine_pre", "reproj_mse", "reproj_cosine")


def build_parser():
    """The stage-6 argument parser."""
    p = make_parser(__doc__)
    p.add_argument("--model_dir", default=None, help="the train_recon --out_dir; default: the one run of --model under "
                   "data/output/recon/<model>_<type> or the original pipeline's data/output/out/out_<model>[_mlp]_norm")
    cli.add_model_arg(p, "--embed_model", default=None, help="model name (default: the checkpoint's)")
    p.add_argument("--vec_dir", default=None, help="stage-1 store (default: the shard folders recorded at training time)")
    p.add_argument("--shards", default=None, help="comma list of shards of the store to score (held-out images only; "
                   "default: the store's). Shards beside the training store's folder count too (the original pipeline's call)")
    cli.add_out_dir_arg(p, default=None, help="output folder (default data/output/recon_eval/<model>)")
    p.add_argument("--batch_size", type=cli.positive_int, default=32, help="images per forward pass")
    p.add_argument("--limit", type=cli.nonneg_int, default=0, help="score at most this many held-out images (store order); 0 = all")
    cli.add_resume_arg(p, help="keep rows an earlier run wrote; score only the rest")
    p.add_argument("--save_every", type=cli.positive_int, default=256, help="rewrite a shard's outputs after this many new images")
    p.add_argument("--no_reproj", action="store_true", help="skip connector(Ê_pre) (no VLM needed)")
    p.add_argument("--model-path", "--model_path", dest="model_path", default=None,
                   help=f"VLM weights for the connector: {VLM_SOURCE_HELP}. Default: the stage-1 manifest's source at its recorded commit")
    p.add_argument("--dtype", default="auto", help="VLM compute dtype: auto (the stage-1 run's), fp32, bf16, fp16")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the reconstructor")
    p.add_argument("--num_workers", type=cli.nonneg_int, default=2, help="DataLoader workers")
    p.add_argument("--device", type=cli.device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--verify", action="store_true", help=VERIFY_HELP)
    p.add_argument("--image_root", default=None,
                   help="images of this store (<root>/<shard>/<key>.<ext>): with a split.json that records content hashes "
                        "(train_recon --image_root), an id collision with a train/val image is evaluated when its file "
                        "differs and refused when it is the same image; without, every collision is refused with a count")
    return p


# -- metrics --------------------------------------------------------------------------------------


def token_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Per-image mean over tokens of the per-token cosine, ``[B, T, D]`` → ``[B]`` (float32)."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8).mean(-1)


def score_batch(run: ReconRun, batch: dict[str, Any], samples: Sequence[Sample], vlm: VLM | None, amp: bool):
    """Per-image metrics and loss maps of one same-shape batch."""
    std = run.std
    device = std.pre_mean.device
    s0 = samples[int(batch["index"][0])]
    pre = batch["pre"].to(device).float()
    rec = reconstruct(run, batch["post"], s0.pre_grid, s0.post_grid, amp)
    per_token = ((std.pre_metric(rec) - std.pre_metric(pre)) ** 2).mean(-1)  # [B, T_pre]
    out = {"mse_pre": per_token.mean(-1).cpu(), "cosine_pre": token_cosine(rec, pre).cpu()}
    if vlm is not None:
        proj = torch.stack(reproject(vlm, list(rec), [s0.pre_grid] * rec.shape[0])).to(device)
        post = batch["post"].to(device).float()
        out["reproj_mse"] = ((std.post_metric(proj) - std.post_metric(post)) ** 2).mean((-1, -2)).cpu()
        out["reproj_cosine"] = token_cosine(proj, post).cpu()
    maps = per_token.reshape(-1, *s0.pre_grid).cpu()
    return out, maps


# -- per-shard files ------------------------------------------------------------------------------


class ShardResults:
    """One shard's rows and loss maps, keyed by key; loaded for --resume, rewritten atomically."""

    def __init__(self, out: Path, shard: str, resume: bool) -> None:
        self.csv = out / "per_shard" / f"{shard}.csv"
        self.maps_path = out / "loss_maps" / f"{shard}.pt"
        self.shard = shard
        self.rows: dict[str, dict[str, str]] = {}
        self.maps: dict[str, Tensor] = {}
        if resume and self.csv.exists() and self.maps_path.exists():
            saved = safe_torch_load(self.maps_path, mmap=False)
            self.maps = {k: m[:h, :w].clone() for k, m, (h, w) in zip(saved["keys"], saved["maps"], saved["grids"].tolist(), strict=True)}
            self.rows = {r["key"]: r for r in read_rows(self.csv) if r["key"] in self.maps}

    def add(self, key: str, row: dict[str, Any], loss_map: Tensor) -> None:
        self.rows[key] = row
        self.maps[key] = loss_map

    def save(self, order: Sequence[str]) -> None:
        keys = [k for k in order if k in self.rows]
        write_rows(self.csv, [self.rows[k] for k in keys], FIELDS)
        atomic_torch_save(pack_maps(keys, [self.shard] * len(keys), [self.maps[k] for k in keys]), self.maps_path)


def pack_maps(keys: Sequence[str], shards: Sequence[str], maps: Sequence[Tensor]) -> dict[str, Any]:
    """``{"keys", "shards", "grids" [N,2], "maps" [N,h,w]}``, NaN-padded to the largest grid."""
    h = max((m.shape[0] for m in maps), default=0)
    w = max((m.shape[1] for m in maps), default=0)
    out = torch.full((len(maps), h, w), math.nan)
    for i, m in enumerate(maps):
        out[i, : m.shape[0], : m.shape[1]] = m
    grids = torch.tensor([list(m.shape) for m in maps], dtype=torch.int64).reshape(-1, 2)
    return {"keys": list(keys), "shards": list(shards), "grids": grids, "maps": out}


def fmt(x: float) -> str:
    return f"{x:.6g}"


def eval_shard(run: ReconRun, samples: list[Sample], res: ShardResults, vlm: VLM | None, args, bar,
               stop: StopFlag | None = None) -> int:
    """Score the shard's samples not yet in ``res``; returns how many were scored."""
    todo = [s for s in samples if s.key not in res.rows]
    bar.update(len(samples) - len(todo))
    order = [s.key for s in samples]
    if not todo:
        res.save(order)
        return 0
    loader, _ = make_loader(todo, args.batch_size, False, 0, args.num_workers, pin=False)
    since = 0
    for batch in loader:
        metrics, maps = score_batch(run, batch, todo, vlm, args.amp)
        for j, i in enumerate(batch["index"].tolist()):
            s = todo[i]
            row = {"shard": s.shard, "key": s.key, "model": run.store.model, "recon_type": run.spec.model_type}
            row.update({k: fmt(float(v[j])) for k, v in metrics.items()})
            res.add(s.key, row, maps[j])
        since += len(batch["index"])
        bar.update(len(batch["index"]))
        if since >= args.save_every or stop:
            res.save(order)
            since = 0
        if stop:
            raise StopRequested()
    res.save(order)
    return len(todo)


def summarise(rows: Sequence[dict[str, str]], run: ReconRun, reproj: bool) -> dict[str, Any]:
    """Means of every metric over the held-out rows."""
    means = {}
    for m in METRICS:
        vals = [float(r[m]) for r in rows if r.get(m)]
        means[m] = sum(vals) / len(vals) if vals else None
    return {
        "model": run.store.model, "recon_type": run.spec.model_type, "model_dir": str(run.model_dir),
        "split": "test", "n": len(rows), "means": means, "best_epoch": run.meta.get("epoch"),
        "reproj": "ran" if reproj else "skipped (--no_reproj): reproj_* columns are empty",
    }


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_read_level("hash" if args.verify else "size")
    if args.batch_size < 1 or args.limit < 0 or args.save_every < 1:
        raise UsageError("--batch_size and --save_every must be >= 1, --limit >= 0")
    device = resolve_device(args.device)
    run = open_run(resolve_model_dir(args.model_dir, args.embed_model), device, args.vec_dir, args.embed_model,
                   parse_csv_list(args.shards) or None)
    counts = check_held_out(run, args.image_root)
    held_out = run.part("test")
    if not held_out:
        raise UsageError("no held-out images: the split's test part is empty and every image of the store was "
                         "fitted or selected on (train with a test part, or pass --vec_dir of another store)")
    if args.limit:
        held_out = held_out[: args.limit]
    vlm = None if args.no_reproj else load_connector_vlm(run, args.model_path, args.dtype, device)
    if vlm is None:
        log.warning("--no_reproj: reproj_mse / reproj_cosine are not computed")
    out = ensure_writable_dir(args.out_dir or f"data/output/recon_eval/{run.store.model}")
    by_shard: dict[str, list[Sample]] = defaultdict(list)
    for s in held_out:
        by_shard[s.shard].append(s)
    rows: list[dict[str, str]] = []
    all_maps: list[tuple[str, str, Tensor]] = []
    with StopFlag() as stop, tqdm(total=len(held_out), desc=f"eval {run.store.model}", unit="img", file=sys.stderr, disable=None) as bar:
        for shard in sorted(by_shard):
            res = ShardResults(out, shard, args.resume)
            try:
                eval_shard(run, by_shard[shard], res, vlm, args, bar, stop)
            except StopRequested:
                log.warning("stopped by signal; rerun with --resume to continue (exit %d)", EXIT_PREEMPTED)
                return EXIT_PREEMPTED
            for s in by_shard[shard]:
                rows.append(res.rows[s.key])
                all_maps.append((s.shard, s.key, res.maps[s.key]))
    rows.sort(key=lambda r: (r["shard"], r["key"]))
    all_maps.sort(key=lambda t: (t[0], t[1]))
    write_rows(out / "per_sample.csv", rows, FIELDS)
    atomic_torch_save(pack_maps([k for _, k, _ in all_maps], [s for s, _, _ in all_maps], [m for _, _, m in all_maps]),
                      out / "loss_maps.pt")
    summary = {**summarise(rows, run, vlm is not None), **counts}
    atomic_write_json(out / "summary.json", summary)
    log.info("%d held-out images: %s → %s", len(rows), {k: v for k, v in summary["means"].items() if v is not None}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
