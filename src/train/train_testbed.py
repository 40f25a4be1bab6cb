"""Train the calibrated testbed: small VLMs and a small CLIP on captioned synthetic scenes.

Each VLM is its family's real transformers class at the adapter's testbed dimensions, trained end to end
(vision tower, connector, LM) on the true captions of ``--n_train`` scenes (keys below 10000, seed 0; keys
from 10000 on are held out, ``sample/images`` among them). The CLIP is a ``CLIPModel`` trained
contrastively on the same pairs; it is the demo's CLIPScore backbone (``--clip_model testbed``).

Writes, each folder atomically (a crash keeps the previous one):

    <out>/<name>/        from_pretrained folder: config.json, model.safetensors, processor + tokenizer
    <out>/testbed.json   per model: parameters, bytes on disk, training seconds, loss curve, held-out scores

Held-out scores: attribute accuracy of greedy captions (VLMs; ``vlmc.data.scenes.attribute_scores``) and
the fraction of images whose true caption beats a shuffled one under cosine similarity (CLIP). Training
is seeded: the same command, thread count and library versions reproduce the same weights.

Examples:
    python src/train/train_testbed.py                         # every model into sample/models
    python src/train/train_testbed.py --models llava --steps 300 --out /tmp/testbed
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from vlmc.extract.reference import build_testbed_clip
from vlmc.models.base import get_adapter
from vlmc.models.load import TESTBED_CLIP, default_testbed_dir, load_vlm
from vlmc.train.testbed import (
    HELD_OUT_FIRST,
    RECIPES,
    TESTBED_FAMILIES,
    TrainConfig,
    caption_accuracy,
    recipe,
    scene_items,
    timed,
    train_clip,
    train_vlm,
    true_vs_shuffled,
    untracked_testbed_families,
)
from vlmc.utils import cli
from vlmc.utils.cli import UsageError, ensure_writable_dir, entry_point, make_parser, parse_csv_list
from vlmc.utils.io import atomic_dir, atomic_write_json, read_json

log = logging.getLogger("vlmc.train_testbed")

ALL = (*TESTBED_FAMILIES, TESTBED_CLIP)  # --models all: the committed testbed
TRAINABLE = (*TESTBED_FAMILIES, *untracked_testbed_families(), TESTBED_CLIP)  # e.g. qwen3vl: trains, not committed
EVAL_FIRST = HELD_OUT_FIRST + 10_000  # held-out keys not in sample/images
REPORT = "testbed.json"


def folder_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def train_family(
    family: str, out: Path, train, held_out, cfg: TrainConfig, init_from: Path | None = None
) -> dict[str, Any]:
    """Build (or continue ``init_from``), train, evaluate and save one testbed VLM into ``out``; returns its
    report entry."""
    adapter = get_adapter(family)
    with tempfile.TemporaryDirectory() as untrained, atomic_dir(out) as tmp:
        if init_from is None:
            adapter.build_testbed(Path(untrained), seed=cfg.seed)
        vlm = load_vlm(family, str(init_from or untrained))
        curve, seconds = timed(lambda: train_vlm(vlm, train, cfg))
        scores = caption_accuracy(vlm, held_out)
        vlm.model.save_pretrained(tmp)
        vlm.processor.save_pretrained(tmp)
    log.info("%s: %.0f s, held-out attribute accuracy %.3f", family, seconds, scores["mean"])
    return {
        "family": family,
        "class": type(vlm.model).__name__,
        "params": sum(p.numel() for p in vlm.model.parameters()),
        "train_seconds": round(seconds, 1),
        "loss_curve": [round(x, 4) for x in curve],
        "held_out_attribute_accuracy": {k: round(v, 4) for k, v in scores.items()},
    }


def train_clip_model(out: Path, train, held_out, cfg: TrainConfig) -> dict[str, Any]:
    """Build, train, evaluate and save the testbed CLIP into ``out``; returns its report entry."""
    from transformers import AutoProcessor, CLIPModel

    with tempfile.TemporaryDirectory() as untrained, atomic_dir(out) as tmp:
        build_testbed_clip(Path(untrained), seed=cfg.seed)
        model = CLIPModel.from_pretrained(untrained)
        processor = AutoProcessor.from_pretrained(untrained)
        curve, seconds = timed(lambda: train_clip(model, processor, train, cfg))
        beats = true_vs_shuffled(model, processor, held_out, seed=cfg.seed)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    log.info("clip: %.0f s, true caption beats a shuffled one on %.1f%% of held-out images", seconds, 100 * beats)
    return {
        "family": "clip",
        "class": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1),
        "loss_curve": [round(x, 4) for x in curve],
        "held_out_true_beats_shuffled": round(beats, 4),
    }


def update_report(out_dir: Path, name: str, entry: dict[str, Any], cfg: TrainConfig, n_eval: int) -> None:
    """Merge one model's entry into ``<out_dir>/testbed.json`` (atomic rewrite, under a file lock)."""
    path = out_dir / REPORT
    fd = os.open(out_dir, os.O_RDONLY)  # lock the folder: concurrent trainers (e.g. one per family) share the report
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _merge_entry(path, name, entry, cfg, n_eval)
    finally:
        os.close(fd)


def _merge_entry(path: Path, name: str, entry: dict[str, Any], cfg: TrainConfig, n_eval: int) -> None:
    import transformers

    report = read_json(path) if path.exists() else {"models": {}}
    entry |= {
        "bytes": folder_bytes(path.parent / name),
        "config": cfg.to_dict(),
        "n_eval": n_eval,
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    report["models"][name] = entry
    report["split"] = {"train_keys": f"0..{cfg.n_train - 1} (seed 0)", "eval_keys_from": EVAL_FIRST}
    atomic_write_json(path, report)


def _previous(out_dir: Path, name: str) -> dict[str, Any]:
    """The report entry of the model ``--continue`` starts from (a ``UsageError`` if there is none)."""
    path = out_dir / REPORT
    report = read_json(path) if path.exists() else {"models": {}}
    if name not in report["models"] or not (out_dir / name / "config.json").is_file():
        raise UsageError(f"--continue: no trained {name} in {out_dir} to continue from")
    entry = report["models"][name]
    return {k: entry[k] for k in ("config", "train_seconds", "held_out_attribute_accuracy", "continues") if k in entry}


def parse_models(text: str) -> list[str]:
    """``all`` or a comma list of testbed names, validated."""
    names = list(ALL) if text == "all" else parse_csv_list(text)
    unknown = [n for n in names if n not in TRAINABLE]
    if unknown or not names:
        raise UsageError(f"unknown testbed model(s) {', '.join(unknown) or '(none)'}; known: {', '.join(TRAINABLE)}")
    return names


@entry_point
def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = make_parser(__doc__)
    cli.add_model_arg(
        parser, "--models", multiple=True, default="all", help=f"'all' ({', '.join(ALL)}) or a comma list of: {', '.join(TRAINABLE)}"
    )
    cli.add_out_dir_arg(parser, "--out", type=Path, default=default_testbed_dir(), help="output folder")
    d = TrainConfig()
    # These default to None (= the model's recipe); "%(default).0s" prints nothing and stops argparse's
    # formatter from appending "(default: None)".
    recipes = "; ".join(f"{n}: {', '.join(f'{k} {v:g}' for k, v in r.items())}" for n, r in RECIPES.items())
    parser.add_argument("--n_train", type=cli.positive_int, default=d.n_train, help="training scenes (keys 0..n-1)")
    parser.add_argument("--steps", type=cli.positive_int, default=None, help=f"optimiser steps per model (default: {d.steps}%(default).0s)")
    parser.add_argument("--batch_size", type=cli.positive_int, default=None, help=f"scenes per step (default: {d.batch_size}%(default).0s)")
    parser.add_argument(
        "--lr", type=float, default=None, help=f"peak AdamW learning rate (default: {d.lr:g}; per-model recipes: {recipes}%(default).0s)"
    )
    parser.add_argument("--clip_steps", type=cli.positive_int, default=None, help="steps for the CLIP (default: --steps)")
    parser.add_argument("--n_eval", type=cli.positive_int, default=200, help="held-out scenes scored after training")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch order")
    parser.add_argument("--threads", type=cli.positive_int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--continue", dest="cont", action="store_true",
        help="continue from the models already in --out_dir (a second schedule of --steps) instead of a fresh init",
    )
    args = parser.parse_args(argv)
    names = parse_models(args.models)
    if args.cont and TESTBED_CLIP in names:
        raise UsageError("--continue applies to the VLMs only; train the CLIP afresh")
    if not 1 <= args.n_train < HELD_OUT_FIRST:
        raise UsageError(f"--n_train must be between 1 and {HELD_OUT_FIRST - 1}, got {args.n_train}")
    if (args.steps is not None and args.steps < 1) or (args.batch_size is not None and args.batch_size < 2):
        raise UsageError("--steps must be >= 1 and --batch_size >= 2")
    if args.n_eval < 2:
        raise UsageError("--n_eval must be >= 2")
    ensure_writable_dir(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    given = dict(n_train=args.n_train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    train, held_out = scene_items(args.n_train, 0), scene_items(args.n_eval, EVAL_FIRST)
    for name in names:
        steps = (args.clip_steps or args.steps) if name == TESTBED_CLIP else args.steps
        cfg = recipe(name, **(given | {"steps": steps}))
        if name == TESTBED_CLIP:
            entry = train_clip_model(args.out / name, train, held_out, cfg)
            update_report(args.out, name, entry, cfg, args.n_eval)
        else:
            previous = _previous(args.out, name) if args.cont else None
            entry = train_family(name, args.out / name, train, held_out, cfg, args.out / name if args.cont else None)
            if previous is not None:  # the report keeps the whole recipe: every schedule, in order
                entry["continues"] = previous
            update_report(args.out, name, entry, cfg, args.n_eval)
    print(f"trained {', '.join(names)} into {args.out} (report: {args.out / REPORT})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
