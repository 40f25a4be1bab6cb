"""A trained reconstructor run reopened as a library: its model, stats, split and store; reconstruct, re-project.

``open_run`` reopens a train_recon output folder read-only (``best_model.pt``, ``normalization.safetensors``,
``split.json``) over the store it was trained on or another one; ``ReconRun.part`` / ``check_held_out``
say which images it never saw; ``reconstruct`` gives Ê_pre and ``reproject`` the real connector's
Ê_post. Used by export (stage 5), reconstruction metrics (stage 6) and captions from Ê_post (stage 7).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlmc.models.base import VLM
from vlmc.models.reconstructors import MODEL_TYPES, ReconSpec, load_reconstructor
from vlmc.store.normalization import STATS_FILE, Standardizer, load_stats
from vlmc.store.reader import Grid, Sample, Store, index_samples, open_store
from vlmc.store.split import SPLIT_FILE, apply_split, content_hashes, load_split
from vlmc.utils.cli import UsageError, parse_dtype
from vlmc.utils.io import sha256_file

log = logging.getLogger(__name__)


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


def _open_training_store(
    meta: dict[str, Any], vec_dir: str | None, embed_model: str | None, shards: Sequence[str] | None
) -> Store:
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
def reconstruct(run: ReconRun, post: Tensor, pre_grid: Grid, post_grid: Grid, amp: bool) -> Tensor:
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
