"""Train a REPLACEMENT connector between a VLM's frozen vision tower and its frozen language model.

The new connector (``--connector mlp|crossattn|invertible``, see ``vlmc.train.connectors``) maps each
image's E_pre (canonical order, from the family adapter's ``encode`` or from a stage-1 store with
``--vec_dir``) to an E_post of exactly the shape the family's LM expects, which replaces the original
connector's output. It is trained with the caption cross-entropy of the (frozen) LM: the input is the
family's chat prompt (``--prompt``, default the adapter's) with the image, followed by the reference
caption (``<key>.txt`` beside each image in ``--image_dir``) and the tokenizer's EOS; only the caption
tokens and EOS are supervised (prompt and padding are labelled -100, for either ``--padding_side``).
``--geometry_weight w`` adds ``w · MSE`` between the new and the original connector's E_post, both
standardised with the original E_post's train-split per-channel statistics (token i against token i: for
Idefics2, whose latents have no spatial meaning, output token i is pulled towards perceiver latent i).

Writes to ``--out_dir`` (default data/output/connector/<model>_<connector>):

    best_model.pt              {state_dict, vlm_state, meta}: the connector of the best val-CE epoch (a copy,
                               never the last); vlm_state holds fine-tuned LM / vision weights, if any
    last.pt                    everything to resume (connector, trained VLM weights, optimizer, scheduler,
                               scaler, RNG, counters)
    normalization.safetensors  per-channel mean/std of E_pre and of the ORIGINAL E_post, train split only
    split.json                 {"train": [[shard, key], ...], "val": [...]}; val is never empty
    history.csv                epoch, train_loss, val_loss (caption CE per supervised token), train_geometry,
                               val_geometry (standardised MSE to the original E_post), lr, seconds
    config.json                arguments, connector spec, baselines (val CE of the original connector and of
                               the untrained replacement)

Inference modes (need best_model.pt; flags not given are taken from the run's config.json; both start
afresh unless --resume, which keeps the rows / chunks an interrupted run wrote):

    --predict              <out_dir>/captions.csv: key, shard, image_path, caption_gt, caption_trained
                           (+ caption_original with --with_original) for the val images (--predict_split)
    --export_post_vectors  <export_dir>/<export_name>/<shard>/ in the stage-1 layout (pre = the E_pre fed to the
                           connector, post = its E_post), readable by every later stage as another model
                           (default name <model>_conn_<connector>; --export_split val|all)

Qwen3-VL: its LM also receives deepstack features from intermediate vision layers, which would carry the
original image past any replacement connector; training, the baselines and --predict therefore zero them
(the adapter's ``deepstack="zero"``), and fine-tuning its vision tower is refused.

Injection: E_post reaches the LM through the model's ``mm_encoder_outputs`` forward argument (the same
path the adapters' ``generate`` uses), which carries gradients into the connector. With
``--no-freeze_vision`` the vision tower runs inside the model and a forward hook on the original
connector module swaps its output for the new connector's (model token order converted to canonical
and back). SIGUSR1/SIGTERM save last.pt at the next optimizer step and exit 75; rerun with --resume.

Examples:
    python src/train/train_connector.py --embed_model llava --image_dir sample/images --connector mlp
    python src/train/train_connector.py --embed_model qwen2.5vl --vec_dir data/vector --image_dir data/images \\
        --connector crossattn --device cuda --amp --resume
    python src/train/train_connector.py --out_dir OUT --predict --max_new_tokens 24
    python src/train/train_connector.py --out_dir OUT --export_post_vectors --export_dir data/vector
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vlmc.data.images import ImageRecord, discover_images, read_caption, try_load_image
from vlmc.extract.runner import Encoded, RunConfig, run_shards, versions
from vlmc.extract.vectors import shape_meta
from vlmc.models.attention import add_attn_arg, check_attn_implementation
from vlmc.models.base import VLM, Captured, families, get_adapter
from vlmc.models.families.common import to_model
from vlmc.models.load import VLM_SOURCE_HELP, load_vlm
from vlmc.models.partial import on_vision_side
from vlmc.store.batches import ShapeBatchSampler, plan_batches
from vlmc.store.normalization import (
    STATS_FILE,
    NormStats,
    RunningMoments,
    compute_stats,
    load_stats,
    save_stats,
)
from vlmc.store.reader import ChunkCache, Sample, index_samples, open_store, parse_correspondence
from vlmc.store.split import SPLIT_FILE, apply_split, load_split, make_split, save_split
from vlmc.store.vectors import ShardWriter, pack, unpack, verified_chunk
from vlmc.train.connectors import (
    BEST,
    ConnectorSpec,
    ReplacementConnector,
    build_connector,
    checkpoint,
    connector_types,
    describe,
    load_connector,
    make_spec,
)
from vlmc.train.loop import (
    CONFIG,
    HISTORY,
    LAST,
    Loop,
    Task,
    add_optim_args,
    amp_context,
    check_optim_args,
    flag_diffs,
    param_groups,
    prepare_out_dir,
    refuse_other_settings,
    run_preemptible,
)
from vlmc.utils import cli
from vlmc.utils.cli import (
    DTYPES,
    UsageError,
    entry_point,
    make_parser,
    parse_csv_list,
    parse_dtype,
    resolve_device,
    resolve_dtype,
)
from vlmc.utils.io import (
    atomic_write_json,
    read_json,
    sha256_file,
)
from vlmc.utils.stop import StopFlag, StopRequested
from vlmc.utils.tracking import add_tracking_args

log = logging.getLogger("vlmc.train_connector")

CAPTIONS = "captions.csv"
HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "train_geometry", "val_geometry", "lr", "seconds")
RUN_FILES = (BEST, LAST, STATS_FILE, SPLIT_FILE, HISTORY, CONFIG)
IGNORE = -100
# processor outputs that carry text, not pixels (the rest goes to the adapter's encode)
TEXT_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "token_type_ids")
# flags an inference run (--predict / --export_post_vectors) takes from the training run's config.json
INHERITED = ("embed_model", "model_path", "image_dir", "vec_dir", "prompt", "img_size", "shards", "limit", "dtype")
# flags a --resume must repeat exactly
RESUME_FLAGS = ("embed_model", "model_path", "image_dir", "vec_dir", "shards", "limit", "val_split", "seed", "prompt",
                "img_size", "connector", "hidden_size", "num_layers", "num_heads", "dropout", "padding_side")
DEFAULTS = {"model_path": "tiny", "dtype": "auto", "limit": 0}
FINETUNE_LR = 2e-5  # LM / vision tower learning rate when unfrozen without an explicit rate


def build_parser():
    """The connector-training argument parser."""
    p = make_parser(__doc__)
    g = p.add_argument_group("data")
    cli.add_model_arg(g, "--embed_model", default=None, help=f"model family ({', '.join(families())})")
    g.add_argument("--model-path", "--model_path", dest="model_path", default=None,
                   help=f"weights: {VLM_SOURCE_HELP} [tiny]")
    g.add_argument("--image_dir", default=None, help="images + <key>.txt captions: <image_dir>/<shard>/<key>.<ext>")
    g.add_argument("--vec_dir", default=None,
                   help="optional stage-1 store (base folder + --model, or the model folder): read E_pre and the "
                   "original E_post from it instead of running the vision tower")
    g.add_argument("--shards", default=None, help="comma list of shards to use (default: all)")
    g.add_argument("--limit", type=cli.nonneg_int, default=None, help="use at most this many captioned images; 0 = all")
    g.add_argument("--val_split", type=cli.split_fraction, default=0.1,
                   help="fraction of images held out for validation (seeded, by image); must leave >= 1 val image")
    g.add_argument("--prompt", default=None, help="instruction in the chat prompt (default: the family's)")
    g.add_argument("--img_size", type=cli.positive_int, default=None,
                   help="square image size (default: the store manifest's with --vec_dir, else the processor's)")
    g.add_argument("--padding_side", default="right", choices=["right", "left"], help="padding of training batches")
    g.add_argument("--num_workers", type=cli.nonneg_int, default=2, help="DataLoader workers (image decoding + processor)")
    g.add_argument("--stats_images", type=cli.positive_int, default=1000,
                   help="without --vec_dir: train images encoded for the normalisation statistics; 0 = all")
    m = p.add_argument_group("connector")
    m.add_argument("--connector", default="mlp", choices=connector_types(), help="replacement connector type")
    m.add_argument("--hidden_size", type=cli.positive_int, default=None, help="hidden / attention width (default per type)")
    m.add_argument("--num_layers", type=cli.positive_int, default=None, help="crossattn blocks / invertible coupling layers")
    m.add_argument("--num_heads", type=cli.positive_int, default=None, help="crossattn attention heads")
    m.add_argument("--dropout", type=cli.dropout_rate, default=None, help="dropout (default 0)")
    o = add_optim_args(p, epochs=5, lr=1e-3, warmup_steps=50, patience=0, val_name="val CE",
                       lr_help="peak learning rate of the new connector (AdamW)",
                       grad_clip_help="max gradient norm over all trained weights; 0 = off",
                       amp_help="autocast connector + LM (--amp_dtype)", seed_help="seed of the split, init and data order")
    o.add_argument("--lr_connector", type=cli.positive_float, default=None, help="learning rate of the new connector [--lr]")
    o.add_argument("--freeze_lm", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the language model frozen [frozen unless --train_lm_lr or --no-freeze_lm]")
    o.add_argument("--train_lm_lr", "--lm_lr", dest="train_lm_lr", type=cli.positive_float, default=None,
                   help=f"fine-tune the LM (+ embeddings, LM head) at this learning rate (implies --no-freeze_lm; "
                   f"--no-freeze_lm alone: {FINETUNE_LR:g})")
    o.add_argument("--freeze_vision", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the vision tower frozen [frozen unless --train_vision_lr or --no-freeze_vision]")
    o.add_argument("--train_vision_lr", "--vision_lr", dest="train_vision_lr", type=cli.positive_float, default=None,
                   help=f"fine-tune the vision tower at this learning rate (implies --no-freeze_vision; not with "
                   f"--vec_dir; --no-freeze_vision alone: {FINETUNE_LR:g})")
    o.add_argument("--geometry_weight", type=cli.nonneg_float, default=0.0,
                   help="weight of the MSE to the original connector's E_post (standardised); 0 = off")
    r = p.add_argument_group("run")
    cli.add_out_dir_arg(r, default=None, help="run folder (default data/output/connector/<model>_<connector>)")
    cli.add_resume_arg(r, help="continue the run in --out_dir from last.pt (or start it)")
    r.add_argument("--overwrite", action="store_true", help="delete an earlier run's files in --out_dir and start afresh")
    r.add_argument("--device", type=cli.device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    add_attn_arg(r)
    r.add_argument("--dtype", default=None, help="VLM weights dtype: auto (bf16 on cuda, fp32 on cpu), bf16, fp16, fp32")
    r.add_argument("--run_name", default=None, help="W&B run name (default: the out_dir name)")
    add_tracking_args(p)
    i = p.add_argument_group("inference (need best_model.pt in --out_dir)")
    i.add_argument("--predict", action="store_true", help="caption images with the trained connector → captions.csv")
    i.add_argument("--predict_split", default="val", choices=["val", "train", "all"], help="images --predict captions")
    i.add_argument("--predict_csv", default=None, help=f"output CSV (default <out_dir>/{CAPTIONS})")
    i.add_argument("--with_original", action="store_true", help="--predict: also caption with the original connector")
    i.add_argument("--max_new_tokens", type=cli.positive_int, default=32, help="caption length limit")
    i.add_argument("--export_post_vectors", action="store_true", help="write the connector's E_post in the stage-1 layout")
    i.add_argument("--export_dir", default="data/vector", help="base folder of the export")
    i.add_argument("--export_name", default=None, help="model name of the export (default <model>_conn_<connector>)")
    i.add_argument("--export_split", default="all", choices=["all", "val"], help="images to export")
    i.add_argument("--save_every", type=cli.positive_int, default=256, help="export: images per chunk file")
    i.add_argument("--store_dtype", default="fp16", help="export: dtype of stored vectors (fp16, bf16, fp32)")
    return p


@dataclass
class Parts:
    """Which parts of the VLM are trained, and their learning rates."""

    lr_connector: float
    lm_lr: float | None
    vision_lr: float | None


def check_args(args) -> Parts:
    """Reject impossible numbers and contradictory flags before anything is loaded."""
    check_optim_args(args, at_least_1=("max_new_tokens", "save_every"),
                     at_least_0=("num_workers", "stats_images", "geometry_weight", "limit"))
    if not 0.0 < args.val_split < 1.0:
        raise UsageError(f"--val_split must be strictly between 0 and 1 (got {args.val_split}): "
                         "training without a validation set is refused")
    for flag in ("lr_connector", "train_lm_lr", "train_vision_lr"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise UsageError(f"--{flag} must be > 0")
    parse_dtype(args.store_dtype)
    lm_lr = _part_lr("lm", args.freeze_lm, args.train_lm_lr, FINETUNE_LR)
    vision_lr = _part_lr("vision", args.freeze_vision, args.train_vision_lr, FINETUNE_LR)
    if vision_lr is not None and args.vec_dir:
        raise UsageError("--vec_dir reads stored E_pre: the vision tower cannot be fine-tuned from it (drop --vec_dir)")
    return Parts(args.lr_connector or args.lr, lm_lr, vision_lr)


def _part_lr(part: str, freeze: bool | None, lr: float | None, default: float) -> float | None:
    if freeze and lr is not None:
        raise UsageError(f"--freeze_{part} and --train_{part}_lr contradict each other")
    if freeze is False or lr is not None:
        return lr or default
    return None


# -- items ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One captioned image (and, with --vec_dir, where its stored vectors are)."""

    shard: str
    key: str
    path: str
    caption: str
    sample: Sample | None = None

    @property
    def id(self) -> tuple[str, str]:
        return (self.shard, self.key)

    @property
    def shape(self) -> tuple:
        return self.sample.shape if self.sample is not None else ((0, 0), (0, 0))


def collect_items(args, store=None, need_caption: bool = True) -> list[Item]:
    """Captioned images of ``--image_dir`` (joined with the store's samples with ``--vec_dir``).

    Images without a caption are left out (counted in the log); with a store, so are images it lacks.
    """
    if not args.image_dir:
        raise UsageError("--image_dir is required (images and their <key>.txt captions)")
    shards = parse_csv_list(args.shards) or None
    records = discover_images(args.image_dir, shards=shards)
    by_id: dict[tuple[str, str], ImageRecord] = {r.id: r for r in records}
    samples = {s.id: s for s in index_samples(store)} if store is not None else None
    items, no_caption, not_stored = [], 0, 0
    for rid, rec in by_id.items():
        caption = read_caption(rec)
        if caption is None and need_caption:
            no_caption += 1
            continue
        sample = None
        if samples is not None:
            sample = samples.get(rid)
            if sample is None:
                not_stored += 1
                continue
        items.append(Item(rec.shard, rec.key, str(rec.path), caption or "", sample))
    if no_caption:
        log.info("%d image(s) without a <key>.txt caption left out", no_caption)
    if not_stored:
        log.warning("%d image(s) of --image_dir are not in the --vec_dir store: left out", not_stored)
    items.sort(key=lambda it: it.id)
    if args.limit:
        items = items[: args.limit]
    if not items:
        raise UsageError(f"no usable images under {args.image_dir} (need an image, its <key>.txt caption"
                         f"{' and its vectors in --vec_dir' if store is not None else ''})")
    return items


def split_items(items: Sequence[Item], val_split: float, seed: int) -> dict[str, list[list[str]]]:
    """A seeded train/val split by image; refuses (exit 2) one whose val or train side would be empty."""
    n = len(items)
    n_val = round(val_split * n)
    if n_val < 1:
        raise UsageError(f"--val_split {val_split} of {n} image(s) leaves the validation set empty; "
                         f"use --val_split >= {0.5 / n:.3g} or more images")
    if n_val >= n:
        raise UsageError(f"--val_split {val_split} of {n} image(s) leaves no training image")
    return make_split(items, (n - n_val) / n, seed)


# -- adapter bridges ----------------------------------------------------------------------------------


def _deepstack_kwargs(vlm: VLM) -> dict[str, Any]:
    """Qwen3-VL: zero the deepstack features with a replacement E_post (else the original image leaks in)."""
    return {"deepstack": "zero"} if vlm.adapter.has_deepstack else {}


# -- batches ---------------------------------------------------------------------------------------------


def build_lm_batch(
    prompt: Mapping[str, Any], captions: Sequence[Sequence[int]], eos_id: int, pad_id: int, side: str
) -> dict[str, Any]:
    """Prompt batch + caption ids → LM inputs with ``labels``, padded on ``side``.

    Each row is ``prompt tokens (unpadded) + caption ids + [eos]``; ``labels`` is -100 on the prompt and
    on padding, the token id on the caption and EOS. Per-token processor outputs (``mm_token_type_ids``)
    are extended with 0 and padded alike; the rest (pixels, grids) pass through.
    """
    ids, mask = prompt["input_ids"], prompt["attention_mask"]
    if side not in ("left", "right"):
        raise ValueError(f"padding side {side!r}")
    token_keys = [k for k, v in prompt.items()
                  if isinstance(v, Tensor) and v.shape == ids.shape and k not in ("input_ids", "attention_mask")]
    rows: list[dict[str, Tensor]] = []
    for i in range(ids.shape[0]):
        keep = mask[i].bool()
        p = ids[i][keep]
        c = torch.tensor([*captions[i], eos_id], dtype=ids.dtype)
        row = {"input_ids": torch.cat([p, c]), "labels": torch.cat([torch.full_like(p, IGNORE), c]),
               "attention_mask": torch.ones(len(p) + len(c), dtype=mask.dtype)}
        for k in token_keys:
            v = prompt[k][i][keep]
            row[k] = torch.cat([v, v.new_zeros(len(c))])
        rows.append(row)
    length = max(len(r["input_ids"]) for r in rows)
    fill = {"input_ids": pad_id, "labels": IGNORE, "attention_mask": 0}
    out: dict[str, Any] = {}
    for k in rows[0]:
        padded = []
        for r in rows:
            n = length - len(r[k])
            pad = r[k].new_full((n,), fill.get(k, 0))
            padded.append(torch.cat([pad, r[k]] if side == "left" else [r[k], pad]))
        out[k] = torch.stack(padded)
    for k, v in prompt.items():
        if k not in out:
            out[k] = v
    return out


class ItemDataset(Dataset):
    """``(item, image or None, skip reason, E_pre, E_post)`` per item (vectors only with a store)."""

    def __init__(self, items: Sequence[Item], with_vectors: bool) -> None:
        self.items = list(items)
        self.with_vectors = with_vectors
        self.cache = ChunkCache()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Item, Image.Image | None, str | None, Tensor | None, Tensor | None]:
        it = self.items[i]
        image, reason = try_load_image(it.path)
        pre = post = None
        if self.with_vectors and it.sample is not None:
            s = it.sample
            pre, post = self.cache.get(s.pre_file)[s.row], self.cache.get(s.post_file)[s.row]
        return it, image, reason, pre, post


class BatchMaker:
    """Collate: decoded images + captions → the LM batch (runs in DataLoader workers)."""

    def __init__(self, vlm: VLM, prompt: str, img_size: int | None, side: str, keep_images: bool = False) -> None:
        # a model-less VLM: workers need the adapter and the processor only
        self.vlm = VLM(vlm.adapter, None, vlm.processor, vlm.source, torch.device("cpu"), vlm.dtype)  # type: ignore[arg-type]
        self.prompt, self.img_size, self.side, self.keep_images = prompt, img_size, side, keep_images
        tok = vlm.processor.tokenizer
        self.eos_id, self.pad_id = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def __call__(self, rows: list) -> dict[str, Any]:
        good = [r for r in rows if r[1] is not None]
        skipped = [{"key": r[0].key, "shard": r[0].shard, "reason": r[2]} for r in rows if r[1] is None]
        batch: dict[str, Any] = {"items": [r[0] for r in good], "skipped": skipped}
        if not good:
            return batch
        images = [r[1] for r in good]
        tok = self.vlm.processor.tokenizer
        caps = [tok(r[0].caption, add_special_tokens=False)["input_ids"] for r in good]
        prompt = self.vlm.adapter.prompt_inputs(self.vlm, list(images), self.prompt, self.img_size)
        batch["lm"] = build_lm_batch(prompt, caps, self.eos_id, self.pad_id, self.side)
        if good[0][3] is not None:
            batch["pre"] = [r[3] for r in good]
            batch["post"] = [r[4] for r in good]
            batch["grids"] = [r[0].sample.pre_grid for r in good]
        if self.keep_images:
            batch["images"] = images
        return batch


def make_item_loader(items: Sequence[Item], maker: BatchMaker, batch_size: int, shuffle: bool, seed: int,
                     num_workers: int, with_vectors: bool) -> tuple[DataLoader, ShapeBatchSampler]:
    """Shape-grouped (store) or plain batches; deterministic per (seed, epoch); ``set_epoch(e, start)`` resumes."""
    sampler = ShapeBatchSampler(list(items), batch_size, shuffle, seed)
    loader = DataLoader(ItemDataset(items, with_vectors), batch_sampler=sampler, collate_fn=maker,
                        num_workers=num_workers, persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(seed))
    return loader, sampler


# -- the model side ---------------------------------------------------------------------------------------


class Context:
    """The loaded VLM, which parts of it train, and the forward pass of one batch."""

    def __init__(self, vlm: VLM, parts: Parts | None, from_store: bool, amp: bool, amp_dtype: torch.dtype) -> None:
        self.vlm, self.from_store = vlm, from_store
        self.device = vlm.device
        self.amp_enabled, self.amp_dtype = amp, amp_dtype
        self.groups = split_parameters(vlm)
        self.train_lm = parts is not None and parts.lm_lr is not None
        self.train_vision = parts is not None and parts.vision_lr is not None
        vlm.model.requires_grad_(False)
        for _, p in self.groups["lm"]:
            p.requires_grad_(self.train_lm)
        for _, p in self.groups["vision"]:
            p.requires_grad_(self.train_vision)
        self.image_token_id = getattr(vlm.model.config, "image_token_id", None)
        self.lm_head = vlm.model.get_output_embeddings()
        self.base = vlm.model.base_model
        self.pixel_keys = vlm.adapter.pixel_keys

    def amp(self):
        return amp_context(self.device, self.amp_enabled, self.amp_dtype)

    def trained_vlm_params(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for g in ("lm", "vision") for n, p in self.groups[g] if p.requires_grad]

    def vlm_state(self) -> dict[str, Tensor]:
        """CPU copies of the fine-tuned VLM weights (empty when the VLM is frozen)."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.trained_vlm_params()}

    def load_vlm_state(self, state: Mapping[str, Tensor]) -> None:
        if not state:
            return
        missing = set(state) - {n for n, _ in self.vlm.model.named_parameters()}
        if missing:
            raise UsageError(f"checkpoint holds VLM weights this model lacks, e.g. {sorted(missing)[0]}")
        self.vlm.model.load_state_dict(dict(state), strict=False)

    # inputs
    def encode(self, batch: Mapping[str, Any]) -> tuple[list[Tensor], list[Tensor], list[tuple[int, int]]]:
        """Per-image E_pre, original E_post and pre grids of a batch (store or vision tower, no grad)."""
        if self.from_store:
            dev = self.device
            return ([p.to(dev) for p in batch["pre"]], [q.to(dev) for q in batch["post"]],
                    [tuple(g) for g in batch["grids"]])
        pix = {k: v for k, v in batch["lm"].items() if k not in TEXT_KEYS}
        pix = to_model(pix, self.device, self.vlm.dtype)
        cap: Captured = self.vlm.adapter.encode(self.vlm, pix)
        return list(cap.pre), list(cap.post), [tuple(g) for g in cap.pre_grid]

    def check_tokens(self, input_ids: Tensor, post: Sequence[Tensor]) -> None:
        """Each row's image placeholders must equal its E_post token count (clear error, not an LM shape error)."""
        if self.image_token_id is None:
            return
        counts = (input_ids == self.image_token_id).sum(1).tolist()
        for i, (c, p) in enumerate(zip(counts, post, strict=True)):
            if c != p.shape[0]:
                raise UsageError(f"image {i} of the batch: the prompt holds {c} image tokens but the connector "
                                 f"produced {p.shape[0]} (stored E_pre grid and --img_size disagree?)")

    def lm_ce(self, inputs: Mapping[str, Any], labels: Tensor, mm: dict[str, Any] | None) -> tuple[Tensor, int]:
        """Summed caption cross-entropy over the supervised tokens, and their count."""
        kwargs = dict(inputs)
        if mm is not None:
            kwargs["mm_encoder_outputs"] = mm
        out = self.base(**kwargs, use_cache=False, return_dict=True)
        h = out.last_hidden_state[:, :-1]
        target = labels[:, 1:]
        sel = target != IGNORE
        logits = self.lm_head(h[sel]).float()
        return F.cross_entropy(logits, target[sel], reduction="sum"), int(sel.sum())

    def forward(self, connector: ReplacementConnector | None, batch: Mapping[str, Any], path: str = "auto"):
        """Caption CE (sum, tokens) and geometry SE (sum, elements) of one batch.

        ``connector=None`` scores the ORIGINAL connector (its own E_post injected). ``path``: ``mm`` injects
        through ``mm_encoder_outputs``; ``hook`` runs the vision tower in the model and swaps the original
        connector's output with a forward hook (needed to fine-tune the vision tower); ``auto`` picks.
        """
        if path == "auto":
            path = "hook" if self.train_vision and connector is not None else "mm"
        cpu = batch["lm"]
        labels = cpu["labels"].to(self.device)
        pre, post_orig, grids = self.encode(batch)
        with self.amp():
            if path == "hook" and connector is not None:
                full = to_model({k: v for k, v in cpu.items() if k != "labels"}, self.device, self.vlm.dtype)
                with swapped_connector(self, connector, grids, full) as captured:
                    ce, n = self.lm_ce(full, labels, None)
                return ce, n, *self._geometry(connector, captured["z"], post_orig)
            text = to_model({k: v for k, v in cpu.items() if k != "labels" and k not in self.pixel_keys},
                            self.device, self.vlm.dtype)
            if connector is None:
                new_post, zs = post_orig, None
            else:
                new_post, zs = connector.apply(pre, grids)
            self.check_tokens(text["input_ids"], new_post)
            ce, n = self.lm_ce(text, labels, self.vlm.adapter.injected_outputs(self.vlm, text, new_post, **_deepstack_kwargs(self.vlm)))
        return ce, n, *self._geometry(connector, zs, post_orig)

    @staticmethod
    def _geometry(connector, zs, post_orig) -> tuple[Tensor, int]:
        if connector is None or zs is None:
            return torch.zeros(()), 0
        se = sum(((z.float() - connector.standardise_post(q)) ** 2).sum() for z, q in zip(zs, post_orig, strict=True))
        return se, sum(z.numel() for z in zs)


def split_parameters(vlm: VLM) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """VLM parameters by part: ``lm`` (decoder, embeddings, LM head), ``connector`` (the original one), ``vision``."""
    model = vlm.model
    lm_ids = {id(p) for p in model.get_decoder().parameters()}
    head = model.get_output_embeddings()
    if head is not None:
        lm_ids |= {id(p) for p in head.parameters()}
    conn_ids = {id(p) for p in vlm.adapter.connector_module(model).parameters()}
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"lm": [], "connector": [], "vision": []}
    for name, p in model.named_parameters():
        part = "lm" if id(p) in lm_ids else "connector" if id(p) in conn_ids else "vision"
        groups[part].append((name, p))
    return groups


@contextmanager
def swapped_connector(ctx: Context, connector: ReplacementConnector, grids: Sequence[tuple[int, int]],
                      inputs: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Forward hook replacing the original connector's output with ``connector(E_pre)`` (gradients flow).

    The hook sees the connector input in the model's token order: the same as canonical for LLaVA /
    Idefics2 (``[B, T, D]``); for Qwen the merger's flat, window-permuted rows, converted with the
    adapter's order helpers (and the output converted back, so ``visual`` un-permutes it itself).
    """
    vlm = ctx.vlm
    module = vlm.adapter.connector_module(vlm.model)
    captured: dict[str, Any] = {}
    orders = vlm.adapter.token_orders(vlm, inputs)

    def hook(_mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> Tensor:
        x = args[0] if args else kwargs["image_hidden_states"]
        if orders is None:
            if x.ndim != 3 or any(h * w != x.shape[1] for h, w in grids):
                raise UsageError(f"connector input of shape {tuple(x.shape)} does not match the images' grids "
                                 f"{list(grids)[:2]}... (padded batch? use --img_size for one fixed square size)")
            pre = list(x.unbind(0))
        else:
            index, _ = orders
            pre = list(torch.split(x[index.to(x.device)], [h * w for h, w in grids]))
        post, zs = connector.apply(pre, grids)
        captured["z"] = zs
        if orders is None:
            y = torch.stack(post)
        else:
            flat = torch.cat(post)
            perm = orders[1]
            if perm is None:
                y = flat
            else:
                y = torch.empty_like(flat)
                y[perm.to(flat.device)] = flat
        return y.to(out.dtype if isinstance(out, Tensor) else x.dtype)

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


@torch.no_grad()
def evaluate(ctx: Context, connector: ReplacementConnector | None, loader: DataLoader, desc: str = "val") -> tuple[float, float]:
    """Mean caption CE per supervised token and mean standardised geometry MSE over a loader."""
    if connector is not None:
        connector.eval()
    ce_sum, n_tok, se_sum, n_el = 0.0, 0, 0.0, 0
    for batch in tqdm(loader, desc=desc, unit="batch", file=sys.stderr, disable=None, leave=False):
        if not batch["items"]:
            continue
        ce, n, se, ne = ctx.forward(connector, batch, path="mm")
        ce_sum, n_tok, se_sum, n_el = ce_sum + float(ce), n_tok + n, se_sum + float(se), n_el + ne
    return ce_sum / max(n_tok, 1), (se_sum / n_el if n_el else float("nan"))


# -- statistics -----------------------------------------------------------------------------------------------


def load_or_make_stats(out: Path, ctx: Context, train: Sequence[Item], maker: BatchMaker, args, stop: StopFlag) -> NormStats:
    """``normalization.safetensors`` if present (never rewritten), else computed on the train split and saved."""
    path = out / STATS_FILE
    if path.exists():
        return load_stats(path)
    t0 = time.time()
    if ctx.from_store:
        stats = compute_stats([it.sample for it in train], ctx.device, max(args.batch_size, 32), 0,
                              should_stop=lambda: bool(stop))
    else:
        chosen = list(train)
        if args.stats_images and len(chosen) > args.stats_images:
            chosen = sorted(random.Random(args.seed).sample(chosen, args.stats_images), key=lambda it: it.id)
        loader, _ = make_item_loader(chosen, maker, args.batch_size, False, 0, args.num_workers, False)
        pre = post = None
        n_img = 0
        with torch.no_grad():
            for batch in tqdm(loader, desc="stats", unit="batch", file=sys.stderr, disable=None, leave=False):
                if stop:
                    raise InterruptedError("stopped while computing normalisation statistics")
                if not batch["items"]:
                    continue
                p, q, _ = ctx.encode(batch)
                if pre is None:
                    pre, post = RunningMoments(p[0].shape[-1], ctx.device), RunningMoments(q[0].shape[-1], ctx.device)
                for x in p:
                    pre.update(x)
                for y in q:
                    post.update(y)
                n_img += len(p)
        if pre is None:
            raise UsageError("no readable training image for the normalisation statistics")
        meta = {"n_images": str(n_img), "n_pre_tokens": str(pre.n), "n_post_tokens": str(post.n), "split": "train"}
        stats = NormStats(pre.mean.cpu(), pre.std().cpu(), post.mean.cpu(), post.std().cpu(), meta)
    save_stats(path, stats)
    log.info("normalisation stats from %s train images in %.1f s → %s", stats.meta.get("n_images"), time.time() - t0, path)
    return stats


def spec_for(args, ctx: Context, items: Sequence[Item], maker: BatchMaker, store) -> ConnectorSpec:
    """The connector spec: shapes from the store or one encoded batch, layout from the family's correspondence."""
    vlm = ctx.vlm
    corr = vlm.adapter.correspondence
    if store is not None:
        if parse_correspondence(str(store.correspondence)) != corr:
            raise UsageError(f"store correspondence {store.correspondence} differs from {vlm.name}'s {corr}")
        counts: dict[tuple, int] = {}
        for it in items:
            counts[it.sample.shape] = counts.get(it.sample.shape, 0) + 1
        pre_grid, post_grid = max(counts, key=counts.get)
        d_pre, d_post = store.d_pre, store.d_post
    else:
        loader, _ = make_item_loader(list(items[: args.batch_size]), maker, args.batch_size, False, 0, 0, False)
        batch = next(b for b in loader if b["items"])
        with torch.no_grad():
            pre, post, grids = ctx.encode(batch)
        pre_grid, d_pre, d_post = grids[0], pre[0].shape[1], post[0].shape[1]
        post_grid = (post[0].shape[0], 1)
    lm_dim = vlm.model.get_input_embeddings().embedding_dim
    if d_post != lm_dim:
        raise UsageError(f"E_post has {d_post} channels but the LM's embeddings have {lm_dim}")
    n_out = post_grid[0] * post_grid[1] if corr.kind == "none" else 0
    return make_spec(args.connector, corr, d_pre, d_post, pre_grid, n_out=n_out, hidden_size=args.hidden_size,
                     num_layers=args.num_layers, num_heads=args.num_heads, dropout=args.dropout,
                     family=vlm.adapter.name, source=vlm.source)


# -- training --------------------------------------------------------------------------------------------------


class ConnectorTask(Task):
    """The connector's part of the loop (vlmc.train.loop): caption CE (+ geometry MSE) through the frozen LM."""

    history_fields = HISTORY_FIELDS
    counters = {"ce_sum": 0.0, "tokens": 0, "se_sum": 0.0, "elements": 0}
    extra_state = {"best_geometry": math.nan}
    loss_label, val_label = "CE", "val CE"
    wandb_names = {"train_loss": "train_ce", "val_loss": "val_ce"}

    def __init__(self, args, parts: Parts, ctx: Context, connector: ReplacementConnector, train: Sequence[Item],
                 val: Sequence[Item], maker: BatchMaker, meta: dict[str, Any]) -> None:
        self.args, self.parts, self.ctx, self.meta = args, parts, ctx, meta
        self.model, self.spec, self.device, self.lr = connector, connector.spec, ctx.device, parts.lr_connector
        vec = ctx.from_store
        self.loader, self.sampler = make_item_loader(train, maker, args.batch_size, True, args.seed, args.num_workers, vec)
        self.val_loader, _ = make_item_loader(val, maker, args.batch_size, False, 0, args.num_workers, vec)
        self.n_batches = len(plan_batches(list(train), args.batch_size))
        self.params: list[nn.Parameter] = []

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The connector's groups at its rate, then the unfrozen LM / vision weights at theirs (no decay)."""
        groups = [dict(g, lr=self.parts.lr_connector) for g in param_groups(self.model, weight_decay)]
        for part, lr in (("lm", self.parts.lm_lr), ("vision", self.parts.vision_lr)):
            params = [p for _, p in self.ctx.groups[part] if p.requires_grad]
            if lr is not None and params:
                groups.append({"params": params, "lr": lr, "weight_decay": 0.0})
        self.params = [p for g in groups for p in g["params"]]
        return groups

    def trained_params(self) -> list[nn.Parameter]:
        """Every trained weight (connector and unfrozen VLM parts)."""
        return self.params

    def loss(self, batch: Mapping[str, Any], state: dict[str, Any]) -> Tensor | None:
        """Caption CE per supervised token (+ ``--geometry_weight`` x standardised MSE) of one micro-batch."""
        for s in batch["skipped"]:
            log.warning("skipped unreadable image %s/%s: %s", s["shard"], s["key"], s["reason"])
        if not batch["items"]:
            return None
        ce, n, se, ne = self.ctx.forward(self.model, batch)
        loss = ce / max(n, 1)
        if self.args.geometry_weight and ne:
            loss = loss + self.args.geometry_weight * se / ne
        state["ce_sum"] += float(ce.detach())
        state["tokens"] += n
        state["se_sum"] += float(se.detach()) if isinstance(se, Tensor) else float(se)
        state["elements"] += ne
        return loss

    def train_metrics(self, state: dict[str, Any]) -> dict[str, float]:
        """The epoch's caption CE per token and geometry MSE."""
        return {"train_loss": state["ce_sum"] / max(state["tokens"], 1),
                "train_geometry": state["se_sum"] / state["elements"] if state["elements"] else float("nan")}

    def validate(self) -> dict[str, float]:
        """Validation caption CE per token and geometry MSE."""
        ce, geometry = evaluate(self.ctx, self.model, self.val_loader)
        return {"val_loss": ce, "val_geometry": geometry}

    def describe(self, metrics: Mapping[str, float]) -> str:
        """``train CE … val CE … (geometry …)`` of the epoch log line."""
        return (f"train CE {metrics['train_loss']:.4f} val CE {metrics['val_loss']:.4f} "
                f"(geometry {metrics['val_geometry']:.4f})")

    def best_extras(self, metrics: Mapping[str, float]) -> dict[str, Any]:
        """The best epoch's validation geometry (for ``best_model.pt``'s meta)."""
        return {"best_geometry": metrics["val_geometry"]}

    def best_checkpoint(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """``best_model.pt``: the connector and fine-tuned VLM weights as the best epoch's."""
        return checkpoint(self.model, self.ctx.vlm_state(), epoch=state["best_epoch"], train_loss=state["best_train"],
                          val_loss=state["best_val"], val_geometry=state["best_geometry"], **self.meta)

    def last_extras(self) -> dict[str, Any]:
        """The fine-tuned VLM weights (empty when frozen)."""
        return {"vlm_state": self.ctx.vlm_state()}

    def restore_extras(self, ck: Mapping[str, Any]) -> None:
        """Load the fine-tuned VLM weights of ``last.pt``."""
        self.ctx.load_vlm_state(ck.get("vlm_state", {}))

    def progress(self, state: Mapping[str, Any]) -> dict[str, str] | None:
        """The running train CE."""
        return {"ce": f"{state['ce_sum'] / state['tokens']:.3f}"} if state["tokens"] else None


# -- inference: captions and export -----------------------------------------------------------------------------


def predict(args, ctx: Context, connector: ReplacementConnector, items: Sequence[Item], maker: BatchMaker,
            out_csv: Path, stop: StopFlag) -> int:
    """Caption ``items`` with the trained connector's E_post → CSV (resumable: rows already there are kept)."""
    from vlmc.utils.rows import done_ids, upsert_rows

    cols = ["caption_trained"] + (["caption_original"] if args.with_original else [])
    if out_csv.exists() and not args.resume:
        out_csv.unlink()  # a fresh run; --resume keeps the rows an interrupted run wrote
    done = done_ids(out_csv, cols)
    todo = [it for it in items if it.id not in done]
    log.info("captioning %d image(s) (%d already in %s)", len(todo), len(items) - len(todo), out_csv)
    if not todo:
        return 0
    maker.keep_images = True
    loader, _ = make_item_loader(todo, maker, args.batch_size, False, 0, args.num_workers, ctx.from_store)
    vlm = ctx.vlm
    prompt = maker.prompt
    connector.eval()
    for batch in tqdm(loader, desc="predict", unit="batch", file=sys.stderr, disable=None):
        rows = [{"key": s["key"], "shard": s["shard"], "image_path": "", "caption_gt": "",
                 "caption_trained": "nan", **({"caption_original": "nan"} if args.with_original else {})}
                for s in batch["skipped"]]
        if batch["items"]:
            with torch.no_grad():
                pre, _, grids = ctx.encode(batch)
                with ctx.amp():
                    post, _ = connector.apply(pre, grids)
            post = [p.to(vlm.dtype) for p in post]
            caps = vlm.adapter.generate(vlm, batch["images"], prompt, args.max_new_tokens, post=post,
                                        img_size=maker.img_size, **_deepstack_kwargs(vlm))
            orig = (vlm.adapter.generate(vlm, batch["images"], prompt, args.max_new_tokens, img_size=maker.img_size)
                    if args.with_original else None)
            for j, it in enumerate(batch["items"]):
                row = {"key": it.key, "shard": it.shard, "image_path": it.path, "caption_gt": it.caption,
                       "caption_trained": caps[j]}
                if orig is not None:
                    row["caption_original"] = orig[j]
                rows.append(row)
        upsert_rows(out_csv, rows)
        if stop:
            raise StopRequested(f"stopped while captioning; rerun with --resume to continue ({out_csv})")
    log.info("captions → %s", out_csv)
    return 0


class ConnectorEncoder:
    """A stage-1 ``Encoder`` (vlmc.extract.runner) whose E_post is the replacement connector's."""

    def __init__(self, ctx: Context, connector: ReplacementConnector, name: str, source: str, img_size: int | None) -> None:
        self.ctx, self.connector, self.name, self.source, self.img_size = ctx, connector, name, source, img_size

    def meta(self) -> dict[str, Any]:
        vlm, spec = self.ctx.vlm, self.connector.spec
        return {"model": self.name, "family": vlm.adapter.name, "source": self.source, "revision": None,
                "model_class": f"{type(vlm.model).__name__}+{spec.connector_type}_connector",
                "compute_dtype": str(vlm.dtype).replace("torch.", ""), "pool": "mean",
                "correspondence": str(spec.correspondence), "prompt": None, "img_size": self.img_size,
                "modules": [], "kinds": ["pre", "post"], "connector": spec.to_dict()}

    def preprocess(self, images: list[Image.Image]) -> dict[str, Any]:
        vlm = self.ctx.vlm
        return vlm.adapter.preprocess(vlm.processor, images, self.img_size)

    def encode(self, inputs: dict[str, Any], images: list[Image.Image]) -> Encoded:
        vlm = self.ctx.vlm
        cap = vlm.adapter.encode(vlm, to_model(inputs, vlm.device, vlm.dtype))
        return _encoded(self.connector, list(cap.pre), list(cap.pre_grid), self.ctx)


def _encoded(connector: ReplacementConnector, pre: list[Tensor], grids: list[tuple[int, int]], ctx: Context) -> Encoded:
    with torch.no_grad(), ctx.amp():
        post, _ = connector.apply([p.to(ctx.device) for p in pre], grids)
    spec = connector.spec
    post_grids = [spec.out_grid(g) for g in grids]
    cap = Captured(pre=pre, post=post, pre_grid=list(grids), post_grid=post_grids)
    return Encoded(vectors={"pre": pre, "post": post},
                   extras={"pre": {"grids": [list(g) for g in grids]}, "post": {"grids": [list(g) for g in post_grids]}},
                   shapes=shape_meta(cap))


def export_vectors(args, ctx: Context, connector: ReplacementConnector, store, keep: set | None, out_root: Path,
                   name: str, source: str, img_size: int | None) -> int:
    """Write ``pre`` (the connector's input) and ``post`` (its output) per shard in the stage-1 layout."""
    if store is None:
        records = discover_images(args.image_dir, shards=parse_csv_list(args.shards) or None)
        if keep is not None:
            records = [r for r in records if r.id in keep]
        if args.limit:
            records = records[: args.limit]
        cfg = RunConfig(batch_size=args.batch_size, num_workers=args.num_workers, save_every=args.save_every,
                        skip_existing=args.resume, store_dtype=args.store_dtype, save="both")
        run_shards(ConnectorEncoder(ctx, connector, name, source, img_size), records, out_root / name, cfg, desc=name)
        return 0
    dtype = DTYPES[args.store_dtype]
    encoder = ConnectorEncoder(ctx, connector, name, source, img_size)
    with StopFlag() as stop:
        for sp in store.shards:
            meta = {**encoder.meta(), "shard": sp.shard, "store_dtype": args.store_dtype, "save": "both",
                    "save_every": sp.pre.manifest.get("save_every"), "img_size": sp.pre.manifest.get("img_size"),
                    "versions": versions(), "vectors_from": str(sp.pre.dir.resolve())}
            writer = ShardWriter(out_root / name / sp.shard, meta, resume=args.resume)
            chunks = sp.pre.manifest["chunks"]
            for c in tqdm(chunks, desc=f"{name} {sp.shard}", unit="chunk", file=sys.stderr, disable=None):
                if writer.is_done(c["index"], c["input_digest"]):
                    continue
                chunk = verified_chunk(sp.pre.dir, c, "pre") if c["rows"] else {"keys": []}
                keys = [str(k) for k in chunk["keys"]]
                sel = [i for i, k in enumerate(keys) if keep is None or (sp.shard, k) in keep]
                if keys and sel:
                    vecs = unpack(chunk)
                    grids = [tuple(int(v) for v in g) for g in chunk["grids"].tolist()] if "grids" in chunk else \
                        [tuple(sp.pre.manifest["pre"]["grid"])] * len(keys)
                    enc = _encoded(connector, [vecs[i].float() for i in sel], [grids[i] for i in sel], ctx)
                    writer.meta.update(enc.shapes)
                    ks = [keys[i] for i in sel]
                    data = {}
                    for kind in ("pre", "post"):
                        data[kind] = pack([v.detach().cpu() for v in enc.vectors[kind]], ks, dtype, "both")
                        data[kind]["grids"] = torch.tensor(enc.extras[kind]["grids"], dtype=torch.int64)
                else:  # nothing selected: no chunk (an empty one would trip ShardReader.tokens)
                    continue
                writer.write_chunk(c["index"], c["input_digest"], ks, data, skipped=c.get("skipped", []))
                if stop:
                    raise StopRequested(f"{writer.dir}: stopped after chunk {c['index']}; rerun with --resume")
            writer.write_manifest(complete=True, n_chunks=len(chunks))
            log.info("exported %s/%s → %s", name, sp.shard, writer.dir)
    return 0


# -- main -----------------------------------------------------------------------------------------------------------


def resolve_args(args, config: dict[str, Any] | None) -> None:
    """Flags left unset: the training run's values (inference modes), else the built-in defaults."""
    saved = (config or {}).get("args", {})
    for k in INHERITED:
        if getattr(args, k) is None and k in saved:
            setattr(args, k, saved[k])
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not args.embed_model:
        raise UsageError(f"--model is required ({', '.join(families())})")


def check_resume(out: Path, args) -> dict[str, Any] | None:
    """On resume: the saved config must match this run's data and connector flags."""
    path = out / CONFIG
    if not path.exists():
        return None
    cfg = read_json(path)
    refuse_other_settings(out, flag_diffs(cfg.get("args", {}), args, RESUME_FLAGS))
    return cfg


def open_vlm(args, device: torch.device, vision_only: bool = False) -> VLM:
    """The VLM; ``vision_only``: its vision tower + connector only (``vlmc.models.partial``), LM on meta."""
    dtype = resolve_dtype(args.dtype, device)
    attn = check_attn_implementation(args.attn_implementation)
    return load_vlm(args.embed_model, args.model_path, dtype, device, vision_only=vision_only, attn_implementation=attn)


def open_data(args):
    """(store or None, img_size): the store's manifest decides the image size with --vec_dir."""
    if not args.vec_dir:
        return None, args.img_size
    store = open_store(args.vec_dir, embed_model=args.embed_model, shards=parse_csv_list(args.shards) or None)
    if store.family and store.family != args.embed_model:
        raise UsageError(f"--vec_dir holds {store.family} vectors, not --embed_model {args.embed_model}")
    stored = store.manifest.get("img_size")
    if args.img_size is not None and stored is not None and args.img_size != stored:
        raise UsageError(f"--img_size {args.img_size} but the store was extracted at {stored}")
    return store, args.img_size if args.img_size is not None else stored


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    parts = check_args(args)
    if args.predict or args.export_post_vectors:
        return run_preemptible(lambda stop: run_inference(args, stop), log)
    return run_preemptible(lambda stop: run_training(args, parts, stop), log)


def run_training(args, parts: Parts, stop: StopFlag) -> int:
    resolve_args(args, None)
    if parts.vision_lr is not None and get_adapter(args.embed_model).has_deepstack:
        raise UsageError(f"{args.embed_model}: fine-tuning the vision tower runs it inside the model, whose deepstack "
                         "features would carry the original image past the replacement connector; keep it frozen")
    args.out_dir = args.out_dir or f"data/output/connector/{args.embed_model}_{args.connector}"
    out = prepare_out_dir(args, RUN_FILES)
    cfg = check_resume(out, args) if args.resume else None
    device = resolve_device(args.device)
    store, img_size = open_data(args)
    items = collect_items(args, store)
    split_path = out / SPLIT_FILE
    if split_path.exists():
        split = load_split(split_path)
    else:
        split = split_items(items, args.val_split, args.seed)
        save_split(split_path, split)
        log.info("split: %d train, %d val images → %s", len(split["train"]), len(split["val"]), split_path)
    train, val = apply_split(items, split, "train"), apply_split(items, split, "val")
    if not val:
        raise UsageError(f"{split_path}: empty validation set")
    vlm = open_vlm(args, device)
    ctx = Context(vlm, parts, store is not None, args.amp, parse_dtype(args.amp_dtype))
    prompt = args.prompt or vlm.adapter.default_prompt
    maker = BatchMaker(vlm, prompt, img_size, args.padding_side)
    stats = load_or_make_stats(out, ctx, train, maker, args, stop)
    spec = ConnectorSpec.from_dict(cfg["spec"]) if cfg and cfg.get("spec") else spec_for(args, ctx, train, maker, store)
    torch.manual_seed(args.seed)
    connector = build_connector(spec, stats).to(device)
    log.info("%s; %d train / %d val images; LM %s, vision %s; device %s", describe(spec, connector), len(train),
             len(val), "trained" if ctx.train_lm else "frozen", "trained" if ctx.train_vision else "frozen", device)
    if cfg is None or "baselines" not in cfg:
        val_loader, _ = make_item_loader(val, maker, args.batch_size, False, 0, args.num_workers, store is not None)
        orig_ce, _ = evaluate(ctx, None, val_loader, desc="val (original connector)")
        init_ce, init_geom = evaluate(ctx, connector, val_loader, desc="val (untrained connector)")
        baselines = {"original_val_ce": orig_ce, "initial_val_ce": init_ce, "initial_val_geometry": init_geom}
        log.info("val CE: original connector %.4f, untrained replacement %.4f", orig_ce, init_ce)
        atomic_write_json(out / CONFIG, {
            "args": {k: v for k, v in vars(args).items()}, "spec": spec.to_dict(), "baselines": baselines,
            "prompt": prompt, "img_size": img_size, "n_train": len(train), "n_val": len(val),
            "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        })
        torch.manual_seed(args.seed)  # the baselines drew nothing, but keep init/order independent of them
    else:
        baselines = cfg["baselines"]
    meta = {"embed_model": args.embed_model, "family": vlm.adapter.name, "source": vlm.source, "prompt": prompt,
            "img_size": img_size, "n_train": len(train), "n_val": len(val), "seed": args.seed,
            "stats_sha256": sha256_file(out / STATS_FILE), "trained": {"lm": ctx.train_lm, "vision": ctx.train_vision},
            **baselines}
    task = ConnectorTask(args, parts, ctx, connector, train, val, maker, meta)
    return Loop(args, task, out, stop, log).run()


def run_inference(args, stop: StopFlag) -> int:
    out = Path(args.out_dir or "")
    if not args.out_dir or not (out / BEST).exists():
        raise UsageError(f"{out / BEST if args.out_dir else '--out_dir'}: no trained connector (train first, then "
                         "--predict / --export_post_vectors with the same --out_dir)")
    cfg = read_json(out / CONFIG) if (out / CONFIG).exists() else None
    resolve_args(args, cfg)
    device = resolve_device(args.device)
    connector, vlm_state, meta = load_connector(out, device)
    store, img_size = open_data(args)
    if cfg and cfg.get("img_size") is not None and img_size is None:
        img_size = cfg["img_size"]
    # an export alone never runs the LM: load the vision side only, unless fine-tuned LM weights come back
    prefixes = get_adapter(args.embed_model).vision_prefixes
    vision_only = (args.export_post_vectors and not args.predict and bool(prefixes)
                   and all(on_vision_side(n, prefixes) for n in vlm_state))  # fmt: skip
    vlm = open_vlm(args, device, vision_only=vision_only)
    ctx = Context(vlm, None, store is not None, args.amp, parse_dtype(args.amp_dtype))
    ctx.load_vlm_state(vlm_state)
    prompt = args.prompt or meta.get("prompt") or vlm.adapter.default_prompt
    split = load_split(out / SPLIT_FILE) if (out / SPLIT_FILE).exists() else None
    rc = 0
    if args.predict:
        items = collect_items(args, store)
        if args.predict_split != "all":
            if split is None:
                raise UsageError(f"{out / SPLIT_FILE} missing: use --predict_split all")
            wanted = {tuple(x) for x in split[args.predict_split]}
            items = [it for it in items if it.id in wanted]
        if not items:
            raise UsageError(f"no {args.predict_split} image to caption")
        maker = BatchMaker(vlm, prompt, img_size, "left", keep_images=True)
        rc = predict(args, ctx, connector, items, maker, Path(args.predict_csv or out / CAPTIONS), stop)
    if args.export_post_vectors:
        keep = None
        if args.export_split == "val":
            if split is None:
                raise UsageError(f"{out / SPLIT_FILE} missing: use --export_split all")
            keep = {tuple(x) for x in split["val"]}
        name = args.export_name or f"{args.embed_model}_conn_{connector.spec.connector_type}"
        source = f"{(out / BEST).resolve()}@{sha256_file(out / BEST)[:16]}"
        rc = rc or export_vectors(args, ctx, connector, store, keep, Path(args.export_dir), name, source, img_size)
    return rc


if __name__ == "__main__":
    sys.exit(main())
