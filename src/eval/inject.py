"""Captions from replacement connector outputs: the thin layer stages 7 and 8 share over the adapters.

What it does, and nothing more:

* ``caption_from_post`` / ``caption_from_images``: batched greedy captions through
  ``adapter.generate`` (E_post injected through the adapter, canonical token order), images grouped so
  that a batch never mixes token shapes (no padding inside a batch: the batched captions are the
  batch-1 captions), output in input order.
* Reading stored E_post of a stage-1 store for ``(shard, key)`` samples (``vlmc.store.reader``'s
  index, chunk files mmap'd once), cast to the model dtype.
* ``ImageIndex``: ``(shard, key)`` → image file under ``--image_dir`` (``vlmc.data.images``). The
  images are still needed with a replacement E_post: the processor expands the prompt's image token
  to the right number of tokens from the image's size (and Qwen's M-RoPE positions come from its
  grid), and Qwen3-VL's ``--deepstack original`` reads the pixels.
* ``CaptionCache``: the caption of the *unperturbed* stored E_post, one row per ``(shard, key)`` in
  ``<cache_dir>/original_<model>.csv``, valid only while its fingerprint (model family + source,
  compute dtype, prompt, max_new_tokens, image size, deepstack mode, store dtype, and the sha256 of
  the chunk file holding the vector) matches. Stage 8 generates ``caption_original`` once and reuses it
  for every mode and level; stage 7's ``caption_post_direct`` is the same quantity and uses the same
  cache when both stages point ``--cache_dir`` at one folder.

Qwen3-VL (any family whose adapter ``has_deepstack``): the LM also receives *deepstack*
features taken from intermediate vision layers, which are not a function of E_post. ``deepstack=
"original"`` feeds the images' own (the model reproduces itself from its own E_post, but the original
image leaks into the LM next to a perturbed / reconstructed E_post); ``"zero"`` feeds none (no leak,
but then the model is not its own reference). See ``DEEPSTACK_HELP``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from vlmc.data.images import FLAT_SHARD, ImageRecord, discover_images, read_caption, try_load_image
from vlmc.models.base import VLM, FamilyAdapter
from vlmc.store.reader import ChunkCache, Sample, Store, index_samples, open_store
from vlmc.utils.cli import UsageError, parse_dtype
from vlmc.utils.rows import read_table, upsert_rows

log = logging.getLogger(__name__)

DEEPSTACK_MODES = ("original", "zero")
DEEPSTACK_HELP = (
    "Qwen3-VL only (ignored by other families): deepstack features the LM gets next to an injected E_post. "
    "'original' = the image's own (reproduces the model from its own E_post, but the ORIGINAL image leaks "
    "into the LM's first layers next to a perturbed/reconstructed E_post, so caption changes are "
    "underestimated); 'zero' = none (no leak, but the unperturbed reference is no longer the model's own "
    "caption)"
)
IMAGES_HELP = (
    "image root <root>/<shard>/<key>.<ext> (a flat folder is one shard, matched by key). The images are "
    "needed even though E_post is injected: the processor sizes the prompt's image tokens (and Qwen's "
    "M-RoPE grid) from them; keys without a readable image are skipped with a warning"
)



def help_notes(extra: str = "") -> str:
    """The images and deepstack paragraphs of the stages' ``--help`` (wrapped to 100 columns)."""
    import textwrap

    paras = ["Images: " + IMAGES_HELP + ".", "Deepstack (--deepstack): " + DEEPSTACK_HELP + "." + extra]
    return "\n\n" + "\n\n".join(textwrap.fill(p, 100) for p in paras)

# -- generation -----------------------------------------------------------------------------------


def supports_deepstack(adapter: FamilyAdapter) -> bool:
    """Whether the family's ``generate`` takes a ``deepstack=`` choice (Qwen3-VL)."""
    return adapter.has_deepstack


def shape_groups(shapes: Sequence[Any], batch_size: int) -> list[list[int]]:
    """Indices grouped by equal ``shapes`` (first-appearance order), cut into batches of ``batch_size``."""
    if batch_size < 1:
        raise UsageError("batch_size must be >= 1")
    groups: dict[Any, list[int]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(s, []).append(i)
    return [g[j : j + batch_size] for g in groups.values() for j in range(0, len(g), batch_size)]


def _generate(vlm: VLM, images: Sequence[Image.Image], prompt: str | None, max_new_tokens: int,
              post: Sequence[Tensor] | None, img_size: int | None, deepstack: str | None) -> list[str]:
    kwargs: dict[str, Any] = {}
    if post is not None and deepstack is not None and supports_deepstack(vlm.adapter):
        kwargs["deepstack"] = deepstack
    return vlm.adapter.generate(vlm, list(images), prompt, max_new_tokens, post=post, img_size=img_size, **kwargs)


def caption_from_post(
    vlm: VLM,
    images: Sequence[Image.Image],
    posts: Sequence[Tensor],
    prompt: str | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    img_size: int | None = None,
    deepstack: str | None = None,
) -> list[str]:
    """Greedy captions with each image's E_post replaced by ``posts[i]`` (``[T_i, D]``, canonical order).

    Batches hold images whose E_post has the same shape (the same number of image tokens, so no
    padding); captions come back in input order. ``posts`` are cast to the model dtype and device.

    Args:
        vlm: the loaded model.
        images: one RGB image per item (sizes the prompt's image tokens; see the module docstring).
        posts: replacement E_post per image.
        prompt: instruction (``None``: the family's default).
        max_new_tokens: caption length limit.
        batch_size: images per ``generate`` call.
        img_size: the square size the store was extracted at (manifest ``img_size``), or ``None``.
        deepstack: Qwen3-VL's ``original`` / ``zero`` (ignored by other families; ``None``: adapter default).
    """
    if len(images) != len(posts):
        raise ValueError(f"{len(images)} images but {len(posts)} E_post tensors")
    if deepstack is not None and deepstack not in DEEPSTACK_MODES:
        raise UsageError(f"deepstack must be one of {', '.join(DEEPSTACK_MODES)}, got {deepstack!r}")
    out: list[str | None] = [None] * len(images)
    for idx in shape_groups([tuple(p.shape) for p in posts], batch_size):
        batch = [posts[i].to(device=vlm.device, dtype=vlm.dtype) for i in idx]
        caps = _generate(vlm, [images[i] for i in idx], prompt, max_new_tokens, batch, img_size, deepstack)
        for i, c in zip(idx, caps, strict=True):
            out[i] = c
    return out  # type: ignore[return-value]


def caption_from_images(
    vlm: VLM,
    images: Sequence[Image.Image],
    prompt: str | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    img_size: int | None = None,
    shapes: Sequence[Any] | None = None,
) -> list[str]:
    """The model's own greedy captions from pixels, in input order.

    Batches hold images of equal ``shapes`` (e.g. their stored E_post shapes, i.e. equal image-token
    counts); default: equal pixel sizes.
    """
    if shapes is not None and len(shapes) != len(images):
        raise ValueError(f"{len(images)} images but {len(shapes)} shapes")
    out: list[str | None] = [None] * len(images)
    for idx in shape_groups(list(shapes) if shapes is not None else [im.size for im in images], batch_size):
        caps = _generate(vlm, [images[i] for i in idx], prompt, max_new_tokens, None, img_size, None)
        for i, c in zip(idx, caps, strict=True):
            out[i] = c
    return out  # type: ignore[return-value]


# -- stored vectors -------------------------------------------------------------------------------


def open_vectors(vec_dir: str | os.PathLike, model: str | None, shards: Sequence[str] | None = None) -> Store:
    """A stage-1 store: the base folder + ``model`` (``data/vector`` + ``llava``), a model folder, or one shard."""
    p = Path(vec_dir)
    if not p.exists():
        raise UsageError(f"--vec_dir {p} does not exist")
    try:
        return open_store(p, embed_model=model, shards=list(shards) if shards else None)
    except UsageError as e:
        if model is None and "no vector shards" in str(e):
            raise UsageError(f"{e}; if {p} is the base folder, name the model too") from None
        raise


def select_samples(samples: Sequence[Sample], shards: Sequence[str] | None = None, shard_limit: int = 0,
                   max_items: int = 0) -> list[Sample]:
    """Store-order subset: only ``shards`` (when given), ≤ ``shard_limit`` per shard, ≤ ``max_items`` in all (0 = no limit)."""
    wanted = set(shards) if shards else None
    if wanted is not None:
        unknown = wanted - {s.shard for s in samples}
        if unknown:
            raise UsageError(f"shard(s) {', '.join(sorted(unknown))} not among the selected images")
    out: list[Sample] = []
    per: dict[str, int] = {}
    for s in samples:
        if wanted is not None and s.shard not in wanted:
            continue
        if shard_limit and per.get(s.shard, 0) >= shard_limit:
            continue
        per[s.shard] = per.get(s.shard, 0) + 1
        out.append(s)
        if max_items and len(out) >= max_items:
            break
    if not out:
        raise UsageError("no images selected (check --shards / --split / limits)")
    return out


def store_samples(store: Store) -> list[Sample]:
    """Every image of ``store`` in store order."""
    return index_samples(store)


class PostReader:
    """Stored E_post of samples: chunk files mmap'd once per process, rows returned cast as asked."""

    def __init__(self) -> None:
        self.cache = ChunkCache()

    def raw(self, samples: Sequence[Sample]) -> list[Tensor]:
        """The stored tensors (store dtype, CPU views)."""
        return [self.cache.get(s.post_file)[s.row] for s in samples]

    def load(self, samples: Sequence[Sample], dtype: torch.dtype, device: torch.device | str = "cpu") -> list[Tensor]:
        """Stored E_post per sample, cast to ``dtype`` on ``device`` (own memory, not views)."""
        return [t.to(device=device, dtype=dtype, copy=True) for t in self.raw(samples)]


def chunk_digests(store: Store) -> dict[str, str]:
    """Post chunk file path (as ``Sample.post_file`` spells it) → its sha256 from the manifest."""
    out = {}
    for sp in store.shards:
        for c in sp.post.manifest.get("chunks", []):
            f = c["files"].get("post")
            if f:
                out[str(sp.post.dir / f["name"])] = f.get("sha256") or f"{f['name']}:{f.get('bytes')}"
    return out


# -- images ---------------------------------------------------------------------------------------


class ImageIndex:
    """``(shard, key)`` → image record under an image root; a flat root (shard ``_root``) matches by key."""

    def __init__(self, image_dir: str | os.PathLike) -> None:
        self.root = Path(image_dir)
        records = discover_images(self.root)
        self.flat = {r.shard for r in records} == {FLAT_SHARD}
        self.records: dict[tuple[str, str], ImageRecord] = {r.id: r for r in records}
        self.by_key = {r.key: r for r in records} if self.flat else {}

    def record(self, shard: str, key: str) -> ImageRecord | None:
        r = self.records.get((shard, key))
        if r is None and self.flat:
            r = self.by_key.get(key)
        return r

    def check_shards(self, shards: Sequence[str]) -> None:
        """Warn when a flat root has to serve several store shards (keys may repeat across shards)."""
        if self.flat and len(set(shards)) > 1:
            log.warning("--image_dir %s is one flat folder but the store has shards %s: images are matched by "
                        "key only", self.root, ", ".join(sorted(set(shards))))

    def load(self, samples: Sequence[Sample]) -> tuple[list[Image.Image | None], list[ImageRecord | None]]:
        """RGB images (``None`` where missing or unreadable, logged) and records, per sample."""
        images: list[Image.Image | None] = []
        recs: list[ImageRecord | None] = []
        for s in samples:
            r = self.record(s.shard, s.key)
            im = None
            if r is None:
                log.warning("%s/%s: no image under %s; skipped", s.shard, s.key, self.root)
            else:
                im, why = try_load_image(r.path)
                if im is None:
                    log.warning("%s/%s: image %s unreadable (%s); skipped", s.shard, s.key, r.path, why)
            images.append(im)
            recs.append(r)
        return images, recs


def gt_caption(record: ImageRecord | None) -> str:
    """The reference caption (``<key>.txt``), whitespace collapsed; ``""`` when there is none."""
    return (read_caption(record) or "") if record is not None else ""


# -- run settings, fingerprints, the caption cache ---------------------------------------------------


def resolve_compute_dtype(name: str, store: Store, device: torch.device) -> torch.dtype:
    """``auto`` → the stage-1 run's compute dtype (manifest ``compute_dtype``), else ``fp32|bf16|fp16``."""
    if name == "auto":
        return getattr(torch, str(store.manifest.get("compute_dtype") or "float32"), torch.float32)
    return parse_dtype(name)


def resolve_prompt(prompt: str | None, store: Store, adapter: FamilyAdapter) -> str:
    """``--prompt`` → the store's recorded caption prompt → the family's default."""
    return prompt or store.manifest.get("prompt") or adapter.default_prompt


def generation_settings(adapter: FamilyAdapter, source: str, dtype: torch.dtype, store: Store, prompt: str,
                        max_new_tokens: int, deepstack: str | None) -> dict[str, Any]:
    """What decides the caption of an unperturbed stored E_post (the cache fingerprint's fields).

    ``source`` is the resolved weights (``vlmc.models.load.resolve_source``), so it is known before the
    model is loaded and a ``--resume`` with other settings fails fast.
    """
    return {
        "family": adapter.name,
        "source": source,
        "compute_dtype": str(dtype).replace("torch.", ""),
        "prompt": prompt,
        "max_new_tokens": int(max_new_tokens),
        "img_size": store.manifest.get("img_size"),
        "deepstack": (deepstack or adapter.deepstack_default) if supports_deepstack(adapter) else None,
        "store_dtype": store.store_dtype,
    }


def model_setup(store: Store, model_path: str | None, dtype_name: str, device: torch.device,
                prompt: str | None) -> tuple[FamilyAdapter, str, torch.dtype, str]:
    """``(adapter, resolved source, compute dtype, prompt)`` for captioning ``store``, without loading weights."""
    from vlmc.models.base import get_adapter
    from vlmc.models.load import resolve_source
    from vlmc.models.sources import pinned

    if not store.family:
        raise UsageError(f"{store.shards[0].post.dir}: the manifest names no model family; cannot caption")
    adapter = get_adapter(store.family)
    # without --model_path: the weights stage 1 loaded, at the commit its manifest records
    source = resolve_source(adapter, model_path or pinned(store.source, store.manifest.get("revision")))
    return adapter, source, resolve_compute_dtype(dtype_name, store, device), resolve_prompt(prompt, store, adapter)


def fingerprint(obj: Any) -> str:
    """Short sha256 of a JSON-serialisable object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive ``flock`` on ``<path>`` (a side file) while several jobs update one cache file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class CaptionCache:
    """Captions of the unperturbed stored E_post per ``(shard, key)``, valid for one fingerprint.

    File ``<cache_dir>/original_<model>.csv``: ``shard, key, caption, fingerprint``. A row is a hit
    only when its fingerprint equals ``fingerprint(settings + the sha256 of the sample's chunk)``; a
    stale row is replaced on the next write. Writes merge under a file lock (``flock``), so array jobs
    sharing a cache on one file system do not lose each other's rows.
    """

    COLUMNS = ("shard", "key", "caption", "fingerprint")

    def __init__(self, path: str | os.PathLike, settings: dict[str, Any], digests: dict[str, str]) -> None:
        self.path = Path(path)
        self.base = fingerprint(settings)
        self.digests = digests
        self.rows: dict[tuple[str, str], tuple[str, str]] = {}
        self.pending: list[dict[str, str]] = []
        self.hits = self.misses = 0
        if self.path.exists():
            df = read_table(self.path)
            if set(self.COLUMNS) <= set(df.columns):
                for s, k, c, f in df[list(self.COLUMNS)].itertuples(index=False):
                    self.rows[(s, k)] = (c, f)
            else:
                log.warning("%s: not a caption cache (columns %s); it will be rewritten", self.path, list(df.columns))

    def key_of(self, sample: Sample) -> str:
        return fingerprint([self.base, self.digests.get(sample.post_file, sample.post_file)])

    def get(self, sample: Sample) -> str | None:
        """The cached caption, or ``None`` (absent or made under other settings / another chunk)."""
        hit = self.rows.get(sample.id)
        if hit is not None and hit[1] == self.key_of(sample):
            self.hits += 1
            return hit[0]
        self.misses += 1
        return None

    def put(self, sample: Sample, caption: str) -> None:
        fp = self.key_of(sample)
        self.rows[sample.id] = (caption, fp)
        self.pending.append({"shard": sample.shard, "key": sample.key, "caption": caption, "fingerprint": fp})

    def flush(self) -> None:
        """Merge pending rows into the file (atomic rewrite under the lock)."""
        if not self.pending:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            upsert_rows(self.path, self.pending)
        self.pending = []


def cached_or_generate(
    cache: CaptionCache,
    vlm: VLM,
    samples: Sequence[Sample],
    images: Sequence[Image.Image],
    posts: Sequence[Tensor],
    prompt: str,
    max_new_tokens: int,
    batch_size: int,
    img_size: int | None,
    deepstack: str | None,
) -> list[str]:
    """Captions of the unperturbed ``posts``: from the cache where valid, else generated and cached."""
    out: list[str | None] = [cache.get(s) for s in samples]
    miss = [i for i, c in enumerate(out) if c is None]
    if miss:
        caps = caption_from_post(vlm, [images[i] for i in miss], [posts[i] for i in miss], prompt,
                                 max_new_tokens, batch_size, img_size, deepstack)
        for i, c in zip(miss, caps, strict=True):
            out[i] = c
            cache.put(samples[i], c)
    return out  # type: ignore[return-value]


# -- run sidecars ---------------------------------------------------------------------------------


def sidecar(csv_path: str | os.PathLike) -> Path:
    """``<csv>.run.json``: the settings a generated CSV was made with (checked on ``--resume``)."""
    p = Path(csv_path)
    return p.with_name(p.name + ".run.json")


def check_resume(csv_path: Path, settings: dict[str, Any]) -> None:
    """``UsageError`` when ``csv_path``'s recorded settings differ from this run's (``--resume`` would mix runs)."""
    from vlmc.utils.io import read_json

    side = sidecar(csv_path)
    if not csv_path.exists():
        return
    if not side.exists():
        raise UsageError(f"{csv_path}: exists without {side.name} (made by another tool?); rerun without --resume")
    old = read_json(side)
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
        details = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff[:4])
        raise UsageError(f"{csv_path}: made with other settings ({details}); rerun without --resume to redo it")


def start_output(csv_path: Path, settings: dict[str, Any], resume: bool) -> None:
    """Fresh run: remove the old CSV and its sidecars; resume: check the settings. Then record them."""
    from vlmc.utils.io import atomic_write_json

    if resume:
        check_resume(csv_path, settings)
    else:
        for p in (csv_path, sidecar(csv_path), csv_path.with_name(csv_path.name + ".scores.json")):
            p.unlink(missing_ok=True)
    atomic_write_json(sidecar(csv_path), settings)


def reorder_rows(csv_path: Path, order: Sequence[tuple[str, str]]) -> None:
    """Rewrite ``csv_path`` with its rows in ``order`` (ids not in ``order`` keep their place after them)."""
    from vlmc.utils.rows import row_ids, write_table

    if not csv_path.exists():
        return
    df = read_table(csv_path)
    if df.empty:
        return
    pos = {i: n for n, i in enumerate(order)}
    ids = row_ids(df)
    rank = sorted(range(len(df)), key=lambda r: (pos.get(ids[r], len(pos)), r))
    if rank != list(range(len(df))):
        write_table(csv_path, df.iloc[rank].reset_index(drop=True))


__all__ = [
    "DEEPSTACK_HELP",
    "DEEPSTACK_MODES",
    "IMAGES_HELP",
    "CaptionCache",
    "ImageIndex",
    "PostReader",
    "cached_or_generate",
    "caption_from_images",
    "caption_from_post",
    "check_resume",
    "chunk_digests",
    "fingerprint",
    "generation_settings",
    "model_setup",
    "gt_caption",
    "help_notes",
    "open_vectors",
    "reorder_rows",
    "resolve_compute_dtype",
    "resolve_prompt",
    "select_samples",
    "shape_groups",
    "start_output",
    "store_samples",
    "supports_deepstack",
]
