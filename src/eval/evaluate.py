"""One caption evaluator: a declarative list of conditions captioned per stored image, batched, resumable.

A stage describes each output CSV as an :class:`Output`: its path and the :class:`Condition` s whose
columns make up a row, in column order (e.g. stage 7: ``[Identity(with_gt=True), PostDirect(...),
Recon(...), ImageCaption()]``; stage 8, one output per level: ``[Identity(), PostDirect(...),
Perturbed(...)]``). :func:`evaluate` then does, once for every stage: the resume (ids whose required
columns are filled), batching by token shape, image loading (rows without an image are skipped),
injection through :mod:`vlmc.eval.inject`, atomic row writes every ``save_every`` rows, the progress
bar, a clean stop on a Slurm USR1, and the final store-order rewrite.

:func:`prepare` and :meth:`Plan.load` hold the model setup both stages share (the resolved weights,
dtype, prompt and generation settings known before loading, so outputs are checked first; then the
model and the unperturbed-caption cache).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from PIL import Image
from torch import Tensor

from vlmc.eval import inject
from vlmc.store.batches import plan_batches
from vlmc.utils.cli import progress_bar
from vlmc.utils.rows import done_ids, upsert_rows
from vlmc.utils.stop import StopFlag, StopRequested

log = logging.getLogger(__name__)


# -- the model a stage captions with -------------------------------------------------------------


@dataclass
class Plan:
    """What decides the captions, known before the model loads (see :func:`prepare`)."""

    store: Any
    device: torch.device
    source: str
    dtype: torch.dtype
    prompt: str
    settings: dict[str, Any]

    def load(self, attn_implementation: str | None, cache_dir: str | Path, batch_size: int,
             deepstack: str | None) -> Captioner:
        """Load the model and open the ``original_<model>.csv`` caption cache in ``cache_dir``."""
        from vlmc.models.attention import check_attn_implementation
        from vlmc.models.load import load_vlm

        vlm = load_vlm(self.store.family, self.source, self.dtype, self.device,
                       attn_implementation=check_attn_implementation(attn_implementation))
        cache = inject.CaptionCache(Path(cache_dir) / f"original_{self.store.model}.csv", self.settings,
                                    inject.chunk_digests(self.store))
        return Captioner(vlm, self.prompt, int(self.settings["max_new_tokens"]), batch_size,
                         self.store.manifest.get("img_size"), deepstack, cache)


def prepare(store: Any, device: torch.device, model_path: str | None, dtype: str, prompt: str | None,
            max_new_tokens: int, deepstack: str | None) -> Plan:
    """The :class:`Plan` for captioning ``store``: weights, compute dtype, prompt and generation settings.

    Args:
        store: the stage-1 store.
        device: where the model will run.
        model_path: ``--model_path`` (``None``: the manifest's source at its recorded commit).
        dtype: ``--dtype`` (``auto``: the stage-1 run's).
        prompt: ``--prompt`` (``None``: the store's recorded prompt, else the family's).
        max_new_tokens: caption length limit.
        deepstack: Qwen3-VL's deepstack mode (``None``: the adapter's default).
    """
    adapter, source, torch_dtype, text = inject.model_setup(store, model_path, dtype, device, prompt)
    settings = inject.generation_settings(adapter, source, torch_dtype, store, text, max_new_tokens, deepstack)
    return Plan(store, device, source, torch_dtype, text, settings)


@dataclass
class Captioner:
    """A loaded model with the generation settings every condition uses, and the unperturbed-caption cache."""

    vlm: Any
    prompt: str
    max_new_tokens: int
    batch_size: int
    img_size: int | None
    deepstack: str | None
    cache: inject.CaptionCache

    def from_post(self, images: Sequence[Image.Image], posts: Sequence[Tensor]) -> list[str]:
        """Greedy captions with each image's E_post replaced by ``posts[i]``."""
        return inject.caption_from_post(self.vlm, images, posts, self.prompt, self.max_new_tokens, self.batch_size,
                                        self.img_size, self.deepstack)

    def from_images(self, images: Sequence[Image.Image], shapes: Sequence[Any]) -> list[str]:
        """The model's own greedy captions from the pixels (batched by ``shapes``)."""
        return inject.caption_from_images(self.vlm, images, self.prompt, self.max_new_tokens, self.batch_size,
                                          self.img_size, shapes)

    def unperturbed(self, batch: Batch) -> list[str]:
        """Captions of the stored E_post: from the cache where valid, else generated and cached."""
        return inject.cached_or_generate(self.cache, self.vlm, batch.samples, batch.images, batch.posts, self.prompt,
                                         self.max_new_tokens, self.batch_size, self.img_size, self.deepstack)


# -- conditions ------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Same-shape samples that have an image: their records, images and stored E_post."""

    samples: list[Any]
    records: list[Any]
    images: list[Image.Image]
    raw: list[Tensor]  # as stored (store dtype, CPU views)
    posts: list[Tensor]  # cast to the model's dtype and device (own memory)


class Condition(Protocol):
    """One block of a row's columns: ``columns`` in order, ``required`` filled on a finished row."""

    columns: tuple[str, ...]
    required: tuple[str, ...]

    def values(self, cap: Captioner, batch: Batch) -> list[dict[str, str]]:
        """This condition's column values for each sample of ``batch``."""
        ...


@dataclass(frozen=True)
class Identity:
    """The image's identity: ``key, shard, image_path`` (and ``caption_gt``, its ``<key>.txt``, with ``with_gt``)."""

    with_gt: bool = False
    required: ClassVar[tuple[str, ...]] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        return ("key", "shard", "image_path") + (("caption_gt",) if self.with_gt else ())

    def values(self, cap: Captioner, batch: Batch) -> list[dict[str, str]]:
        rows = [{"key": s.key, "shard": s.shard, "image_path": str(r.path)} for s, r in zip(batch.samples, batch.records,
                                                                                             strict=True)]
        if self.with_gt:
            for row, r in zip(rows, batch.records, strict=True):
                row["caption_gt"] = inject.gt_caption(r)
        return rows


@dataclass(frozen=True)
class PostDirect:
    """The stored, unperturbed E_post injected (the reference condition; cached) → ``column``."""

    column: str = "caption_post_direct"

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)

    @property
    def required(self) -> tuple[str, ...]:
        return self.columns

    def values(self, cap: Captioner, batch: Batch) -> list[dict[str, str]]:
        return [{self.column: c} for c in cap.unperturbed(batch)]


@dataclass(frozen=True)
class ImageCaption:
    """The model's own caption from the pixels → ``caption_image``."""

    columns: ClassVar[tuple[str, ...]] = ("caption_image",)
    required: ClassVar[tuple[str, ...]] = ("caption_image",)

    def values(self, cap: Captioner, batch: Batch) -> list[dict[str, str]]:
        return [{"caption_image": c} for c in cap.from_images(batch.images, [tuple(t.shape) for t in batch.raw])]


@dataclass(frozen=True)
class Recon:
    """Ê_pre = reconstructor(E_post) → the model's real connector → injected, with the reprojection metrics."""

    run: Any  # the reconstructor run (vlmc.store.recon_run.open_run)
    amp: bool = False
    columns: ClassVar[tuple[str, ...]] = ("caption_recon", "reproj_mse", "reproj_cosine", "split")
    required: ClassVar[tuple[str, ...]] = columns

    def values(self, cap: Captioner, batch: Batch) -> list[dict[str, str]]:
        from vlmc.eval.eval_recon import fmt

        proj, m = self.reproject(cap.vlm, batch)
        caps = cap.from_post(batch.images, proj)
        return [{"caption_recon": caps[j], "reproj_mse": fmt(float(m["reproj_mse"][j])),
                 "reproj_cosine": fmt(float(m["reproj_cosine"][j])), "split": self.run.part_of(s)}
                for j, s in enumerate(batch.samples)]

    def reproject(self, vlm: Any, batch: Batch) -> tuple[list[Tensor], dict[str, Tensor]]:
        """connector(reconstructor(E_post)) per image (float32) and the reproj metrics of the batch."""
        from vlmc.eval.eval_recon import token_cosine
        from vlmc.store.recon_run import reconstruct, reproject

        run, s0 = self.run, batch.samples[0]
        post = torch.stack(batch.raw)
        rec = reconstruct(run, post, s0.pre_grid, s0.post_grid, self.amp)
        proj = reproject(vlm, list(rec), [s.pre_grid for s in batch.samples])
        dev = run.std.post_mean.device
        p, q = torch.stack(proj).to(dev), post.to(dev).float()
        metrics = {
            "reproj_mse": ((run.std.post_metric(p) - run.std.post_metric(q)) ** 2).mean((-1, -2)).cpu(),
            "reproj_cosine": token_cosine(p, q).cpu(),
        }
        return proj, metrics


@dataclass(frozen=True)
class Perturbed:
    """``apply_perturbation(E_post, mode, level, seed, "<shard>/<key>")`` injected → ``caption_perturbed``."""

    mode: str
    level: str  # the level's name (file name and ``level`` column)
    value: float
    seed: int
    opts: dict[str, Any] = field(default_factory=dict)
    columns: ClassVar[tuple[str, ...]] = ("caption_perturbed", "mode", "level", "seed")
    required: ClassVar[tuple[str, ...]] = ("caption_perturbed",)

    def values(self, cap: Captioner, batch: Batch) -> list[dict[str, str]]:
        from vlmc.eval.perturb import apply_batch, perturb_key

        keys = [perturb_key(s.shard, s.key) for s in batch.samples]
        caps = cap.from_post(batch.images, apply_batch(batch.posts, self.mode, self.value, self.seed, keys, **self.opts))
        return [{"caption_perturbed": c, "mode": self.mode, "level": self.level, "seed": str(self.seed)} for c in caps]


# -- the evaluator ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """One CSV: its path, its conditions in column order, and the progress bar's label."""

    path: Path
    conditions: tuple[Condition, ...]
    desc: str

    @property
    def required(self) -> list[str]:
        """The columns a finished row has filled (``--resume`` keeps those rows)."""
        return [c for cond in self.conditions for c in cond.required]


@dataclass
class Result:
    """What one :func:`evaluate` call did."""

    new: int
    kept: int
    skipped: int
    seconds: float


def evaluate(cap: Captioner, images: inject.ImageIndex, samples: Sequence[Any], out: Output, resume: bool,
             save_every: int, stop: StopFlag) -> Result:
    """Caption ``samples`` under ``out``'s conditions into ``out.path`` (rows unique by (shard, key), store order).

    Args:
        cap: the loaded model and settings.
        images: where the images are.
        samples: the selected samples, in store order.
        out: the output CSV and its conditions.
        resume: keep rows an earlier run finished (their required columns filled).
        save_every: rewrite the CSV after this many new rows.
        stop: the stage's stop flag (a Slurm USR1 writes what there is, then raises ``StopRequested``).
    """
    done = done_ids(out.path, out.required) if resume else set()
    todo = [s for s in samples if s.id not in done]
    t0 = time.perf_counter()
    n_new, n_skipped = _generate(cap, images, todo, out, save_every, stop)
    inject.reorder_rows(out.path, [s.id for s in samples])
    cached = next((c.column for c in out.conditions if isinstance(c, PostDirect)), "caption")
    cache_note = f"; {cached} cache: {cap.cache.hits} hits" if cap.cache.hits else ""
    log.info("%s: %d new rows, %d kept, %d skipped (no image)%s", out.path, n_new, len(samples) - len(todo), n_skipped,
             cache_note)
    return Result(n_new, len(samples) - len(todo), n_skipped, time.perf_counter() - t0)


def _load_batch(cap: Captioner, images: inject.ImageIndex, reader: inject.PostReader, batch: list[Any]) -> Batch:
    """The samples of ``batch`` that have an image, with their stored E_post (empty when none has)."""
    ims, recs = images.load(batch)
    keep = [j for j, im in enumerate(ims) if im is not None]
    samples = [batch[j] for j in keep]
    raw = reader.raw(samples)
    posts = [t.to(device=cap.vlm.device, dtype=cap.vlm.dtype, copy=True) for t in raw]
    return Batch(samples, [recs[j] for j in keep], [ims[j] for j in keep], raw, posts)


def _rows(cap: Captioner, out: Output, batch: Batch) -> list[dict[str, str]]:
    """One row per sample: every condition's values, merged in column order."""
    rows: list[dict[str, str]] = [{} for _ in batch.samples]
    for cond in out.conditions:
        for row, vals in zip(rows, cond.values(cap, batch), strict=True):
            row.update(vals)
    return rows


def _generate(cap: Captioner, images: inject.ImageIndex, todo: list[Any], out: Output, save_every: int,
              stop: StopFlag) -> tuple[int, int]:
    """Generate and write the rows of ``todo``; returns ``(rows written, images skipped)``."""
    reader = inject.PostReader()
    rows: list[dict[str, str]] = []
    n_new = n_skipped = 0

    def flush() -> None:
        nonlocal rows
        cap.cache.flush()
        if rows:
            upsert_rows(out.path, rows)
            rows = []

    bar = progress_bar(total=len(todo), desc=out.desc, unit="img")
    try:
        for idx in plan_batches(todo, cap.batch_size):
            batch = _load_batch(cap, images, reader, [todo[i] for i in idx])
            n_skipped += len(idx) - len(batch.samples)
            if batch.samples:
                rows += _rows(cap, out, batch)
                n_new += len(batch.samples)
            bar.update(len(idx))
            if len(rows) >= save_every or stop:
                flush()
            if stop:
                raise StopRequested(f"{out.path.name}: stopped after {n_new} new rows; rerun with --resume to continue")
        flush()
    finally:
        bar.close()
    return n_new, n_skipped
