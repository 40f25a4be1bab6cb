"""Stage 7: captions from the stored E_post and from reconstructed embeddings, per image.

For every selected image of a stage-1 store (with ``--recon_dir``: by default only the images the
reconstructor was neither fitted nor selected on: its split.json test images, or every image of another
store, an id collision with a train/val image evaluated when its file under --image_dir differs and refused
otherwise, see train_recon --image_root; ``--split all`` for every image):

    caption_gt           the reference caption <key>.txt beside the image ("" if none)
    caption_post_direct  the stored E_post injected into the model (the reference condition; cached in
                         <cache_dir>/original_<model>.csv, shared with stage 8 when --cache_dir matches)
    caption_recon        Ê_pre = reconstructor(E_post) → the model's REAL connector → injected (--recon_dir)
    reproj_mse           MSE(connector(Ê_pre), E_post) in the standardised E_post space (train-split
                         stats), mean over tokens × channels (as eval_recon.py)
    reproj_cosine        per-token cosine(connector(Ê_pre), E_post), mean over tokens (as eval_recon.py)
    caption_image        (--with_image_caption) the model's own caption from the pixels
    split                (--recon_dir) train: fitted on; val: selected on (ridge, best epoch); test: held out

into ``<out_dir>/captions_<model>.csv`` (columns key, shard, image_path, caption_gt,
caption_post_direct[, caption_recon, reproj_mse, reproj_cosine, split][, caption_image], plus score
columns with --with_clipscore / --with_bertscore, exactly as score_captions.py writes them; either also
adds the scene attribute accuracy attr_acc_*) and
``<csv>.run.json`` with the settings. Rows are unique by (shard, key); writes are atomic; ``--resume``
generates only the rows still missing and refuses a CSV made with other settings. A Slurm USR1 (see
scripts/caption.sh) makes it write what it has and exit 75.

The model is the store manifest's family and source (``--model_path`` overrides the weights; it is
NOT the reconstructor any more: that is ``--recon_dir``). Captions are greedy, batched by token shape
(a batch's captions equal the batch-1 captions), at the image size the store was extracted at."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from vlmc.eval import inject
from vlmc.eval.evaluate import Identity, ImageCaption, Output, PostDirect, Recon, evaluate, prepare
from vlmc.eval.scoring import add_scoring_args, build_scorers
from vlmc.models.attention import add_attn_arg
from vlmc.models.load import VLM_SOURCE_HELP
from vlmc.utils import cli, tracking
from vlmc.utils.cli import (
    UsageError,
    ensure_writable_dir,
    entry_point,
    make_parser,
    parse_csv_list,
    resolve_device,
)
from vlmc.utils.stop import StopFlag
from vlmc.utils.tracking import add_tracking_args, column_means

log = logging.getLogger("vlmc.eval_captions")

RECON_SUFFIXES = (".pt", ".pth", ".ckpt")  # a --model_path file with one of these is the original pipeline's reconstructor


def build_parser():
    """The stage-7 argument parser."""
    p = make_parser(__doc__ + inject.help_notes(" caption_recon replaces only the merger output: with 'original' the "
                                                 "image's own deepstack features go with it."))
    p.add_argument("--vec_dir", default=None, help="stage-1 store: base folder (+ --model), model folder or one shard "
                   "folder (default: data/vector; with --recon_dir: the store the reconstructor was trained on)")
    p.add_argument("--image_dir", default="sample/images", help="the images the store was extracted from (see above)")
    cli.add_model_arg(p, "--embed_model", default=None, help="model name: a subfolder of --vec_dir (e.g. llava); default: the manifest's")
    p.add_argument("--model_path", "--model-path", dest="model_path", default=None,
                   help=f"VLM weights: {VLM_SOURCE_HELP}. Default: the store manifest's source at its recorded commit. "
                   "A *.pt/*.pth/*.ckpt file is the original pipeline's reconstructor checkpoint: its folder is taken as --recon_dir "
                   "(docs/seed_compat.md)")
    p.add_argument("--recon_dir", default=None,
                   help="train_recon --out_dir (best_model.pt, normalization.safetensors, split.json); unset: no caption_recon")
    # the original pipeline's flags, kept for its command lines (docs/seed_compat.md), not listed in --help
    p.add_argument("--recon_stats_path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--split", default="test", choices=["test", "all"],
                   help="with --recon_dir: test = only images the reconstructor was neither fitted nor selected on "
                   "(its split's test part; every image of a store other than its training store); all = every image")
    cli.add_out_dir_arg(p, default="data/output/captions", help="output folder of captions_<model>.csv")
    p.add_argument("--cache_dir", default=None, help="caption_post_direct cache folder (default <out_dir>/cache)")
    p.add_argument("--batch_size", type=cli.positive_int, default=8, help="images per generate call")
    p.add_argument("--shards", default=None, help="comma list of shards (default: all)")
    p.add_argument("--shard_limit", type=cli.nonneg_int, default=0, help="at most this many images per shard; 0 = all")
    p.add_argument("--max_items", type=cli.nonneg_int, default=0, help="at most this many images in all (store order); 0 = all")
    p.add_argument("--caption_prompt", "--prompt", dest="prompt", default=None,
                   help="caption instruction (default: the store's recorded prompt, else the family's)")
    p.add_argument("--caption_max_new_tokens", "--max_new_tokens", dest="max_new_tokens", type=cli.positive_int, default=32,
                   help="caption length limit (tokens)")
    p.add_argument("--with_image_caption", action="store_true", help="also caption_image: the model's caption from the pixels")
    p.add_argument("--with_clipscore", action="store_true", help="score the CSV with CLIPScore when done (as score_captions.py)")
    p.add_argument("--with_bertscore", action="store_true", help="score the CSV with BERTScore when done (as score_captions.py)")
    p.add_argument("--compare_post_vs_recon", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the reconstructor")
    p.add_argument("--dtype", default="auto", help="VLM compute dtype: auto (the stage-1 run's), fp32, bf16, fp16")
    p.add_argument("--device", type=cli.device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    add_attn_arg(p)
    p.add_argument("--deepstack", default=None, choices=list(inject.DEEPSTACK_MODES),
                   help="Qwen3-VL only (default original; see above)")
    p.add_argument("--save_every", type=cli.positive_int, default=256, help="rewrite the CSV after this many new rows")
    cli.add_resume_arg(p, help="keep rows an earlier run wrote; generate only the rest")
    add_scoring_args(p, standalone=False)
    add_tracking_args(p)
    return p


def check_args(args) -> None:
    """Reject impossible numbers and the original pipeline's old meanings before anything is loaded."""
    if args.batch_size < 1 or args.save_every < 1 or args.max_new_tokens < 1:
        raise UsageError("--batch_size, --save_every and --caption_max_new_tokens must be >= 1")
    if args.shard_limit < 0 or args.max_items < 0:
        raise UsageError("--shard_limit and --max_items must be >= 0")
    if args.model_path and args.model_path.endswith(RECON_SUFFIXES):  # the original pipeline's meaning: the reconstructor
        _seed_recon_flag(args, "--model_path", Path(args.model_path).parent)
        args.model_path = None
    if args.recon_stats_path:
        stats = Path(args.recon_stats_path)
        _seed_recon_flag(args, "--recon_stats_path", stats if stats.is_dir() else stats.parent)
    if args.compare_post_vs_recon and not args.recon_dir:
        raise UsageError("--compare_post_vs_recon needs a reconstructor: pass its folder as --recon_dir")


def _seed_recon_flag(args, flag: str, folder: Path) -> None:
    """The original pipeline named the reconstructor by its checkpoint or stats file: take that file's folder as --recon_dir."""
    if args.recon_dir and Path(args.recon_dir).resolve() != folder.resolve():
        raise UsageError(f"{flag} (folder {folder}) and --recon_dir {args.recon_dir} name different reconstructors")
    log.warning("%s %s: the original pipeline's reconstructor file; using its folder %s as --recon_dir", flag, getattr(args, flag[2:]),
                folder)
    args.recon_dir = str(folder)


def select(args, device: torch.device):
    """``(store, samples, run)``: the store, the selected samples (store order), the reconstructor run or None."""
    shards = parse_csv_list(args.shards) or None
    run = None
    if args.recon_dir:
        from vlmc.store.recon_run import open_run

        if args.vec_dir and not Path(args.vec_dir).exists():
            raise UsageError(f"--vec_dir {args.vec_dir} does not exist")
        from vlmc.store.recon_run import check_held_out

        run = open_run(args.recon_dir, device, args.vec_dir, args.embed_model)
        check_held_out(run, args.image_dir)
        store, samples = run.store, run.part(args.split)
    else:
        store = inject.open_vectors(args.vec_dir or "data/vector", args.embed_model)
        samples = inject.store_samples(store)
        if args.split == "test":
            log.info("no --recon_dir: --split test has no held-out set to select; captioning every image")
    return store, inject.select_samples(samples, shards, args.shard_limit, args.max_items), run


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    device = resolve_device(args.device)
    metrics = [m for m, on in (("clipscore", args.with_clipscore), ("bertscore", args.with_bertscore)) if on]
    metrics += ["attributes"] if metrics else []  # scene attribute accuracy: free, empty for non-scenes
    scorers = build_scorers(args, metrics) if metrics else None
    store, samples, run = select(args, device)
    images = inject.ImageIndex(args.image_dir)
    images.check_shards([s.shard for s in samples])
    out_dir = ensure_writable_dir(args.out_dir)
    plan = prepare(store, device, args.model_path, args.dtype, args.prompt, args.max_new_tokens, args.deepstack)
    path = out_dir / f"captions_{store.model}.csv"
    settings: dict[str, Any] = {**plan.settings, "model": store.model, "image_caption": args.with_image_caption}
    if run is not None:
        settings["recon"] = {"dir": str(run.model_dir.resolve()), "stats_sha256": run.meta.get("stats_sha256"),
                             "epoch": run.meta.get("epoch"), "amp": args.amp}
    inject.start_output(path, settings, args.resume)
    cap = plan.load(args.attn_implementation, args.cache_dir or out_dir / "cache", args.batch_size, args.deepstack)
    conditions = (Identity(with_gt=True), PostDirect("caption_post_direct"), *([Recon(run, args.amp)] if run else []),
                  *([ImageCaption()] if args.with_image_caption else []))
    with StopFlag() as stop, tracking.start(args, out_dir, f"captions-{store.model}", job_type="captions") as tracker:
        res = evaluate(cap, images, samples, Output(path, conditions, f"captions {path.stem}"), args.resume,
                       args.save_every, stop)
        tracker.log({"rows_new": res.new, "rows_skipped": res.skipped, "seconds": res.seconds,
                     "captions_per_s": res.new / max(res.seconds, 1e-9)})
        if scorers is not None and path.exists():
            from vlmc.eval.score_captions import score_file

            score_file(path, path, scorers, None, args.resume, args.save_every)
            tracker.summary(**column_means(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
