"""Stage 8: captions from controlled perturbations of the stored E_post.

For every image of a stage-1 store and every ``--level``:

    caption_original    the stored, unperturbed E_post injected into the model (cached once per
                        (model, image) in <cache_dir>/original_<model>.csv and reused by every mode/level)
    caption_perturbed   apply_perturbation(E_post, mode, level, seed, "<shard>/<key>") injected the same way

written to ``<out_dir>/perturb_<model>_<mode>_<level>.csv`` with columns
``key, shard, image_path, caption_original, caption_perturbed, mode, level, seed`` (what
score_perturb.py reads), and ``<csv>.run.json`` recording the settings. The perturbation of an image
depends only on (seed, shard/key), never on the batch. Modes and level meanings:

    none        level ignored
    mask        probability of dropping each token (--fill zero|mean), in [0, 1]
    lowrank     retained fraction of min(T, D) in (0, 1], or an integer rank > 1
    orthogonal  blend alpha in [0, 1] between X and X·Q, Q Haar-random orthogonal (--shared_rotation:
                one Q for all images; a QR of a 4096x4096 matrix per image costs seconds on a CPU).
                Between 0 and 1 the blend also shrinks tokens: norms ~ sqrt((1-a)^2 + a^2), 0.71 at a = 0.5
    noise       SNR in dB relative to the image's mean(X^2) ("inf" adds nothing): uncentred power, so the
                shared mean token counts as signal and one nominal SNR is harsher on the token-varying part
                by a model-dependent amount; --centred uses mean((X - mean token)^2) instead

The model is the store manifest's family and source (``--model_path`` overrides the weights); captions
are greedy, batched by token shape (a batch's captions equal the batch-1 captions), with the image size
the store was extracted at. Vectors are cast to the model dtype before they are perturbed; the
perturbation runs on the model's device. ``--resume`` keeps the rows already written (unique by
(shard, key); every write is atomic) and refuses a CSV made with other settings. A Slurm USR1 (see
scripts/perturb.sh) makes it write what it has and exit 75."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from vlmc.eval import inject
from vlmc.eval.evaluate import Identity, Output, Perturbed, PostDirect, evaluate, prepare
from vlmc.eval.perturb import LEVEL_HELP, MASK_FILLS, PERTURBATIONS, check_level
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
from vlmc.utils.tracking import add_tracking_args

log = logging.getLogger("vlmc.eval_perturb")

COLUMNS = ("key", "shard", "image_path", "caption_original", "caption_perturbed", "mode", "level", "seed")


def build_parser():
    """The stage-8 argument parser."""
    p = make_parser(__doc__ + inject.help_notes())
    p.add_argument("--vec_dir", default="data/vector", help="stage-1 store: base folder (+ --model), model folder or one shard folder")
    p.add_argument("--image_dir", default="sample/images", help="the images the store was extracted from (see above)")
    cli.add_model_arg(p, "--model_name", default=None, help="model name: a subfolder of --vec_dir (e.g. llava); default: the manifest's")
    p.add_argument("--model_path", "--model-path", dest="model_path", default=None,
                   help=f"VLM weights: {VLM_SOURCE_HELP}. Default: the store manifest's source at its recorded commit")
    p.add_argument("--mode", default="mask", choices=list(PERTURBATIONS), help="perturbation")
    p.add_argument("--level", default=None,
                   help="one level or a comma list (one CSV each); " + "; ".join(f"{k}: {v}" for k, v in LEVEL_HELP.items())
                   + " (default: required, except 0 for none)")
    p.add_argument("--seed", type=int, default=0, help="run seed; an image's draw depends on (seed, shard/key) only")
    p.add_argument("--fill", default="zero", choices=list(MASK_FILLS), help="mask: what a dropped token becomes")
    p.add_argument("--shared_rotation", action="store_true", help="orthogonal: one Q for all images (seeded by --seed)")
    p.add_argument("--centred", action="store_true",
                   help="noise: SNR against the token-centred power mean((X - mean token)^2) instead of mean(X^2) "
                        "(default: off; recorded in the run's options, use its own --out_dir)")
    cli.add_out_dir_arg(p, default="data/output/perturb_out", help="output folder of perturb_<model>_<mode>_<level>.csv")
    p.add_argument("--cache_dir", default=None, help="caption_original cache folder (default <out_dir>/cache); "
                   "point stage 7's --cache_dir here to share it")
    p.add_argument("--prompt", "--caption_prompt", dest="prompt", default=None,
                   help="caption instruction (default: the store's recorded prompt, else the family's)")
    p.add_argument("--max_new_tokens", "--caption_max_new_tokens", dest="max_new_tokens", type=cli.positive_int, default=32,
                   help="caption length limit (tokens)")
    p.add_argument("--batch_size", type=cli.positive_int, default=8, help="images per generate call")
    p.add_argument("--limit", type=cli.nonneg_int, default=0, help="at most this many images (store order); 0 = all")
    p.add_argument("--shards", default=None, help="comma list of shards (default: all)")
    p.add_argument("--save_every", type=cli.positive_int, default=256, help="rewrite the CSV after this many new rows")
    p.add_argument("--device", type=cli.device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    add_attn_arg(p)
    p.add_argument("--dtype", default="auto", help="model compute dtype: auto (the stage-1 run's), fp32, bf16, fp16")
    p.add_argument("--amp", action="store_true", help="the original pipeline's flag: same as --dtype bf16")
    p.add_argument("--deepstack", default=None, choices=list(inject.DEEPSTACK_MODES),
                   help="Qwen3-VL only (default original; see above)")
    cli.add_resume_arg(p, help="keep rows an earlier run wrote; generate only the rest")
    add_tracking_args(p)
    return p


def parse_levels(mode: str, text: str | None) -> list[tuple[str, float]]:
    """``--level`` → ``[(name used in the file name and the level column, value)]``, each checked."""
    items = parse_csv_list(text)
    if not items:
        if mode != "none":
            raise UsageError(f"--level is required for --mode {mode} ({LEVEL_HELP[mode]})")
        items = ["0"]
    out = []
    for it in items:
        try:
            value = float(it)
        except ValueError:
            raise UsageError(f"--level {it!r} is not a number") from None
        check_level(mode, value)
        name = f"{value:g}"
        if name in {n for n, _ in out}:
            raise UsageError(f"--level lists {it} twice")
        out.append((name, value))
    return out


def check_args(args) -> None:
    """Reject impossible numbers before anything is loaded."""
    if args.batch_size < 1 or args.save_every < 1 or args.max_new_tokens < 1:
        raise UsageError("--batch_size, --save_every and --max_new_tokens must be >= 1")
    if args.limit < 0:
        raise UsageError("--limit must be >= 0")
    if args.amp:
        if args.dtype not in ("auto", "bf16"):
            raise UsageError(f"--amp means --dtype bf16; it contradicts --dtype {args.dtype}")
        args.dtype = "bf16"


def perturb_opts(args) -> dict:
    """Mode options for ``apply_perturbation``."""
    if args.mode == "mask":
        return {"fill": args.fill}
    if args.mode == "orthogonal" and args.shared_rotation:
        return {"shared_seed": args.seed}
    if args.mode == "noise" and args.centred:
        return {"centred": True}
    return {}


def output_path(out_dir: Path, model: str, mode: str, level: str) -> Path:
    return out_dir / f"perturb_{model}_{mode}_{level}.csv"


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    levels = parse_levels(args.mode, args.level)
    opts = perturb_opts(args)
    device = resolve_device(args.device)
    store = inject.open_vectors(args.vec_dir, args.model_name, parse_csv_list(args.shards) or None)
    samples = inject.select_samples(inject.store_samples(store), max_items=args.limit)
    images = inject.ImageIndex(args.image_dir)
    images.check_shards([s.shard for s in samples])
    out_dir = ensure_writable_dir(args.out_dir)
    plan = prepare(store, device, args.model_path, args.dtype, args.prompt, args.max_new_tokens, args.deepstack)
    outputs = []
    for name, value in levels:  # every output checked (and a fresh run's old files removed) before the model loads
        path = output_path(out_dir, store.model, args.mode, name)
        settings = {**plan.settings, "model": store.model, "mode": args.mode, "level": name, "seed": args.seed,
                    "options": opts, "vec_dir": str(Path(args.vec_dir).resolve())}
        inject.start_output(path, settings, args.resume)
        conditions = (Identity(), PostDirect("caption_original"), Perturbed(args.mode, name, value, args.seed, opts))
        outputs.append((name, Output(path, conditions, f"{args.mode} {name}")))
    cap = plan.load(args.attn_implementation, args.cache_dir or out_dir / "cache", args.batch_size, args.deepstack)
    with StopFlag() as stop, tracking.start(args, out_dir, f"perturb-{store.model}-{args.mode}",
                                            job_type="captions") as tracker:
        for name, out in outputs:
            res = evaluate(cap, images, samples, out, args.resume, args.save_every, stop)
            tracker.log({f"{args.mode}_{name}/rows_new": res.new, f"{args.mode}_{name}/seconds": res.seconds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
