"""Qwen-family adapters: Qwen2.5-VL, Qwen3.5 and Qwen3-VL (patch merger, 2x2 tokens → 1).

All three share one vision layout, implemented once in ``QwenMergerAdapter``:

* The processor cuts an image of ``h x w`` patches into 2x2 *merge blocks* and flattens the patches
  block-major: ``(t, h/2, w/2, 2, 2)``. Position ``p`` of an image's ``pixel_values`` is patch
  ``(r, c)`` with ``p = ((r//2) * (w/2) + c//2) * 4 + (r%2) * 2 + c%2``.
* Qwen2.5-VL's vision tower then permutes whole merge blocks into *window order* (window attention;
  ``get_vision_window_index``) and keeps that order through the merger. Qwen3.5 / Qwen3-VL do not.
* The merger (``model.model.visual.merger``) views 4 consecutive rows as one token: E_pre is its
  **input** (before its norm — ``ln_q`` RMSNorm in Qwen2.5-VL, ``norm`` LayerNorm in Qwen3.x), in
  window order for Qwen2.5-VL. ``visual(...).pooler_output`` is the merger output with the window
  permutation undone, i.e. row-major over the merged ``(h/2, w/2)`` grid, which is what the LM sees.

Canonical order here: E_pre row-major over the ``(h, w)`` patch grid, E_post row-major over
``(h/2, w/2)``. ``_orders`` builds one gather index (model row of every canonical position) with
tensor ops, no per-token Python.

Qwen3-VL's deepstack: ``visual.deepstack_merger_list[k]`` merges the hidden states of vision layers
``deepstack_visual_indexes[k]`` and the LM *adds* them to the image-token hidden states after its first
decoder layers. They are not a function of E_pre (they read intermediate layers), so:

* ``encode`` also returns them, per image in canonical post order, as
  ``Captured.modules["deepstack.<k>"]`` (``DEEPSTACK_KEY``);
* ``generate(..., post=..., deepstack=...)`` chooses what the LM gets with a replacement E_post:
  ``"original"`` (default: the images' own deepstack features — reproduces the model exactly when
  ``post`` is the captured E_post, but **leaks the original image** into the LM), ``"zero"`` (no
  deepstack: nothing of the original image leaks, but the model is then not its own reference), or
  explicit per-level, per-image tensors (a full replacement, e.g. perturbed ``modules`` captures).
  ``tests/test_models_qwen.py`` measures the leak and shows both alternatives remove it.
"""

from __future__ import annotations

import functools
import json
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from tokenizers import Tokenizer, models, processors
from torch import Tensor, nn
from transformers import (
    AutoProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.utils.generic import get_max_seqlen
from transformers.vision_utils import (
    get_vision_attention_seqlens,
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
    get_vision_window_index,
)

from vlmc.data.scenes import SCENE_PIXEL_MEAN, SCENE_PIXEL_STD
from vlmc.models.base import (
    VLM,
    Captured,
    Correspondence,
    FamilyAdapter,
    TinyDims,
    register,
)
from vlmc.models.families.common import build_random, set_generation_defaults, uint8_chw
from vlmc.models.tiny import seed_everything, train_word_tokenizer
from vlmc.utils.cli import UsageError

log = logging.getLogger(__name__)

# Qwen's chat / vision special tokens (the tiny tokenizers use the same strings as the real ones).
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_SPECIALS = [ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]

# Minimal Qwen chat template (newlines written as {{ '\n' }} so it survives JSON round trips).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}{{ '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)

DEEPSTACK_KEY = "deepstack.{}"

# Tiny processors: 8-px patches, so a 64-112 px image gives 8-14 patches a side (16-49 LM tokens).
TINY_PATCH = 8
TINY_MIN_PIXELS = 32 * 32
TINY_MAX_PIXELS = 128 * 128
# Testbed variants (trained on scenes): 96x96 images → 6x6 patches of 16 px → 3x3 merged tokens, one per
# cell of the scenes' 3x3 grid. 96 wide, as LLaVA's. (Colour-blindness at lr 2e-3 — colour accuracy 0.14,
# chance 0.17, with 64- and 96-wide towers alike — was the learning rate: see RECIPES in train/testbed.py.)
TESTBED_DIMS = TinyDims(
    image=96, patch=16, vision_hidden=96, vision_layers=4, text_hidden=128, text_layers=3,
    pixel_mean=SCENE_PIXEL_MEAN, pixel_std=SCENE_PIXEL_STD,
)  # fmt: skip


def mrope_sections(head_dim: int, rotary_fraction: float = 1.0) -> list[int]:
    """(t, h, w) rotary sections of a tiny LM's rotary half: 1/4, 3/8, 3/8 (Qwen2.5-VL's split), or
    1/2, 1/4, 1/4 with a partial rotary fraction (Qwen3.5's tiny split)."""
    half = int(head_dim * rotary_fraction) // 2
    if rotary_fraction < 1.0:
        return [half // 2, half // 4, half - half // 2 - half // 4]
    return [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]


def _tiny_tokenizer(special_ids: dict[str, int] | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer with Qwen's special tokens; ``special_ids`` pins them to real ids.

    Pinning matters for ``config:`` models: the published config's ``image_token_id`` (151655, ...)
    must be the id the processor writes, or the model cannot find its image tokens.
    """
    tok = train_word_tokenizer(QWEN_SPECIALS, bos=ENDOFTEXT, eos=IM_END)
    if not special_ids:
        return tok
    backend = tok.backend_tokenizer
    vocab = backend.get_vocab()
    moved = {t: i for t, i in special_ids.items() if t in vocab}
    taken = set(moved.values())
    vocab = {t: (moved[t] if t in moved else i) for t, i in vocab.items()}
    assert not taken & {i for t, i in vocab.items() if t not in moved}, "special id collides with a word id"
    new = Tokenizer(models.WordLevel(vocab, unk_token=tok.unk_token))
    new.normalizer, new.pre_tokenizer, new.decoder = (
        backend.normalizer,
        backend.pre_tokenizer,
        backend.decoder,
    )
    new.post_processor = processors.TemplateProcessing(
        single=f"{ENDOFTEXT} $A", special_tokens=[(ENDOFTEXT, vocab[ENDOFTEXT])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=new,
        unk_token=tok.unk_token,
        pad_token=tok.pad_token,
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
    )
    fast.add_special_tokens(
        {"additional_special_tokens": [t for t in QWEN_SPECIALS if t not in (ENDOFTEXT, IM_END)]}
    )
    return fast


def _is_word_level(path: str) -> bool:
    """Whether ``path`` is a local folder whose ``tokenizer.json`` is a WordLevel model (a tiny variant)."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return False
    with open(file, encoding="utf-8") as f:
        return json.load(f).get("model", {}).get("type") == "WordLevel"


# visual tower -> {(batch grid, device): its grid-derived kwargs}; a few entries per tower (one per distinct
# batch shape: images of one size give one, plus the short last batch of each chunk)
_TOWER_INPUTS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, dict[str, Any]]] = weakref.WeakKeyDictionary()
_TOWER_INPUTS_MAX = 16


@functools.lru_cache(maxsize=64)
def canonical_orders(
    grids: tuple[tuple[int, int], ...], window: tuple[int, int] | None
) -> tuple[Tensor, Tensor | None]:
    """``(pre_index, post_perm)`` of a batch of ``(h, w)`` patch grids under a 2x2 merger (cpu; never mutate).

    ``merger_input[pre_index]`` is E_pre of all images, each row-major over its (h, w) patch grid;
    ``merger_output[post_perm]`` is E_post row-major over each (h/2, w/2) grid (``None``: identity).
    Built per image with reshapes, no per-token loop: the processor position of patch (r, c) is
    ``block(r//2, c//2) * 4 + (r%2) * 2 + c%2``. With windows (``window = (window_size, patch_size)``,
    Qwen2.5-VL), merge block ``b`` (processor order) sits at merger row ``argsort(window_index)[b]``, and
    ``argsort(window_index)`` also restores the merger output's spatial order (what the tower itself does
    for ``pooler_output``). Cached: a pure function of the grids, and one per batch shape in practice.
    """
    parts, offset = [], 0
    for h, w in grids:
        blocks = torch.arange(h * w).reshape(h // 2, w // 2, 2, 2)  # (bh, bw, ih, iw) in processor order
        parts.append(blocks.permute(0, 2, 1, 3).reshape(h * w) + offset)  # (bh, ih, bw, iw) = (r, c)
        offset += h * w
    pre_index = torch.cat(parts)
    if window is None:
        return pre_index, None
    grid_thw = torch.tensor([[1, h, w] for h, w in grids])
    window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=2, window_size=window[0], patch_size=window[1])
    block_row = torch.argsort(window_index)  # processor block → merger row
    return block_row[pre_index // 4] * 4 + pre_index % 4, block_row


def _on(index: Tensor, device: torch.device) -> Tensor:
    """``index`` on ``device`` (cached cpu indices: a no-op on cpu)."""
    return index if index.device == device else index.to(device)


PATCH_EMBED = "model.visual.patch_embed"  # runs before the window permutation (Qwen2.5-VL)


class QwenMergerAdapter(FamilyAdapter):
    """Shared logic of Qwen's patch-merger VLMs; subclasses give classes, configs and window use."""

    correspondence: ClassVar[Correspondence] = Correspondence("merge", 2)
    model_cls: ClassVar[type[nn.Module]]
    processor_cls: ClassVar[type]
    video_processor_cls: ClassVar[type]
    windowed: ClassVar[bool] = False  # Qwen2.5-VL: merge blocks are permuted into window order
    vision_prefixes: ClassVar[tuple[str, ...]] = ("model.visual",)  # tower, merger (and deepstack mergers)
    tiny_version: ClassVar[int] = 1
    # (patch_size, min_pixels, max_pixels) of the published image processor, for config: models
    real_processor: ClassVar[tuple[int, int, int]] = (14, 56 * 56, 28 * 28 * 1280)
    real_special_ids: ClassVar[dict[str, int]] = {}

    # -- configs ---------------------------------------------------------------------------------
    tiny_dims: ClassVar[TinyDims] = TinyDims(
        image=128, patch=TINY_PATCH, vision_hidden=32, vision_layers=3, text_hidden=64, text_layers=2
    )

    def tiny_config(self, tok: PreTrainedTokenizerFast, dims: TinyDims) -> Any:
        """The family's config at ``dims`` (the random tiny variant or the testbed one)."""
        raise NotImplementedError

    # Gain on the tiny LM's residual-branch outputs (attention o_proj / DeltaNet out_proj / MLP
    # down_proj). At the default init (std 0.02) each layer adds ~15% of the token embedding's norm, so
    # the first generated word barely depends on the image; RMSNorm makes scaling the merger output
    # useless. Tuned on 6 synthetic images x 2 sizes x 2 seeds: all 6 captions distinct, 3-6 distinct
    # first words (1-2 at gain 1 for Qwen3.5).
    tiny_lm_gain: ClassVar[float] = 1.0

    def tune_tiny(self, model: nn.Module) -> None:
        """Post-init tweak that makes the random tiny model's captions depend on its image."""
        with torch.no_grad():
            for name, mod in model.model.language_model.named_modules():
                if name.endswith(("o_proj", "out_proj", "down_proj")):
                    mod.weight.mul_(self.tiny_lm_gain)

    @staticmethod
    def _token_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
        ids = tok.convert_tokens_to_ids
        return {
            "image_token_id": ids(IMAGE_PAD),
            "video_token_id": ids(VIDEO_PAD),
            "vision_start_token_id": ids(VISION_START),
            "vision_end_token_id": ids(VISION_END),
        }

    def _make_processor(
        self, tok: PreTrainedTokenizerFast, patch: int, min_px: int, max_px: int, **norm: Any
    ) -> Any:
        common = dict(patch_size=patch, merge_size=2, temporal_patch_size=2)
        if norm:  # testbed: transformers 5 ignores min_pixels/max_pixels; the bounds are `size`
            norm = {**norm, "size": {"shortest_edge": min_px, "longest_edge": max_px}}
        image_processor = Qwen2VLImageProcessor(min_pixels=min_px, max_pixels=max_px, **common, **norm)
        video_processor = self.video_processor_cls(**common)
        tok.padding_side = "left"
        return self.processor_cls(
            image_processor=image_processor,
            tokenizer=tok,
            video_processor=video_processor,
            chat_template=CHAT_TEMPLATE,
        )

    # -- weights ---------------------------------------------------------------------------------
    def build_tiny(self, out_dir: Path, seed: int = 0) -> None:
        self._build(out_dir, seed, self.tiny_dims, testbed=False)

    def build_testbed(self, out_dir: Path, seed: int = 0) -> None:
        self._build(out_dir, seed, TESTBED_DIMS, testbed=True)

    def _build(self, out_dir: Path, seed: int, dims: TinyDims, testbed: bool) -> None:
        """A small model at ``dims``: random tiny (``tune_tiny`` init) or testbed (default init, to train)."""
        tok = _tiny_tokenizer()
        processor = self._make_processor(
            tok, dims.patch, TINY_MIN_PIXELS, dims.image * dims.image, **dims.normalisation()
        )
        config = self.tiny_config(tok, dims)
        seed_everything(seed)
        model = self.model_cls(config).eval()
        if not testbed:
            self.tune_tiny(model)
        set_generation_defaults(model, tok)
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)

    def load_pretrained(
        self, path: str, dtype: torch.dtype, device: torch.device, attn_implementation: str | None = None
    ) -> tuple[nn.Module, Any]:
        kw: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
        if device.type == "cuda":  # load straight onto the GPU, not via host memory
            model = self.model_cls.from_pretrained(path, dtype=dtype, device_map=str(device), **kw)
        else:
            model = self.model_cls.from_pretrained(path, dtype=dtype, **kw).to(device)
        return model, self.load_processor(path)

    def load_processor(self, path: str) -> Any:
        kwargs = {}
        if _is_word_level(path):
            # our offline tiny tokenizer: AutoTokenizer would force the family's registered class on it
            # (Qwen3.5 → Qwen3_5Tokenizer, whose byte-level pre-tokenizer turns every word into <unk>)
            kwargs["tokenizer"] = PreTrainedTokenizerFast.from_pretrained(path)
        processor = AutoProcessor.from_pretrained(path, **kwargs)
        processor.tokenizer.padding_side = "left"
        return processor

    def config_and_processor(self, config_name: str) -> tuple[Any, Any]:
        patch, min_px, max_px = self.real_processor
        processor = self._make_processor(_tiny_tokenizer(self.real_special_ids), patch, min_px, max_px)
        return self.real_configs[config_name](), processor

    def build_from_config(
        self, config_name: str, dtype: torch.dtype, device: torch.device, attn_implementation: str | None = None
    ) -> tuple[nn.Module, Any]:
        config, processor = self.config_and_processor(config_name)
        model = build_random(self.model_cls, config, dtype, device, attn_implementation)  # meta: no memory, meta-safe attention
        set_generation_defaults(model, processor.tokenizer)
        return model, processor

    # -- vision path -----------------------------------------------------------------------------
    def _size_kwargs(self, processor: Any, img_size: int | None) -> dict[str, Any]:
        """Processor size override for a fixed square size: keep ``img_size`` rounded to the factor.

        Images are first resized to ``img_size x img_size``; the pixel bounds are then opened so that
        ``smart_resize`` only rounds each side to a multiple of ``patch * merge`` (336 → 336 at patch
        14, 336 → 320 at patch 16, Python's round-half-even) instead of rescaling to its own bounds.
        """
        if img_size is None:
            return {}
        ip = processor.image_processor
        factor = ip.patch_size * ip.merge_size
        return {
            "size": {
                "shortest_edge": factor * factor,
                "longest_edge": max(ip.size["longest_edge"], (img_size + factor) ** 2),
            }
        }

    @staticmethod
    def _resize(images: Sequence[Image.Image], img_size: int | None) -> list[Image.Image]:
        images = [im.convert("RGB") for im in images]
        if img_size is None:
            return images
        return [
            im if im.size == (img_size, img_size) else im.resize((img_size, img_size), Image.BICUBIC)
            for im in images
        ]

    def preprocess(
        self, processor: Any, images: Sequence[Image.Image], img_size: int | None
    ) -> dict[str, Tensor]:
        out = processor.image_processor(
            images=self._resize(images, img_size),
            return_tensors="pt",
            **self._size_kwargs(processor, img_size),
        )
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def image_tensors(self, images: Sequence[Image.Image], img_size: int | None) -> list[Tensor]:
        return uint8_chw(self._resize(images, img_size))  # the project's PIL resize stays in the workers

    def preprocess_tensors(
        self, processor: Any, images: Sequence[Tensor], img_size: int | None, device: torch.device
    ) -> dict[str, Tensor]:
        out = processor.image_processor(
            images=list(images), return_tensors="pt", device=device, **self._size_kwargs(processor, img_size)
        )
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def connector_module(self, model: nn.Module) -> nn.Module:
        """``model.model.visual.merger`` (Qwen3-VL's deepstack mergers are separate: ``deepstack_merger_list``)."""
        return model.model.visual.merger

    @staticmethod
    def _grids(grid_thw: Tensor) -> list[tuple[int, int]]:
        grid = grid_thw.tolist()
        if any(t != 1 for t, _, _ in grid):
            raise UsageError(f"Qwen adapters handle still images only (t == 1), got grid_thw {grid}")
        if any(h % 2 or w % 2 for _, h, w in grid):
            raise UsageError(f"patch grid not divisible by the 2x2 merge: {grid}")
        return [(h, w) for _, h, w in grid]

    def _window(self, visual: nn.Module) -> tuple[int, int] | None:
        """``(window_size, patch_size)`` of a windowed tower (Qwen2.5-VL), ``None`` otherwise."""
        return (visual.window_size, visual.patch_size) if self.windowed else None

    def token_orders(self, vlm: VLM, inputs: Mapping[str, Any]) -> tuple[Tensor, Tensor | None]:
        """The merger runs on all images' patches as one flat, (window-)permuted sequence."""
        return self._orders(vlm.model.model.visual, inputs["image_grid_thw"].cpu())

    def _orders(self, visual: nn.Module, grid_thw: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(pre_index, post_perm)`` for a batch of images (cpu tensors; see ``canonical_orders``)."""
        if visual.spatial_merge_size != 2:
            raise ValueError(
                f"expected a 2x2 patch merger, got spatial_merge_size={visual.spatial_merge_size}"
            )
        return canonical_orders(tuple(self._grids(grid_thw)), self._window(visual))

    def _tower_inputs(self, visual: nn.Module, grid_thw: Tensor) -> dict[str, Any]:
        """The tower's grid-derived inputs (position ids, attention segments, windows, position-embedding
        taps), computed with the model's own helpers on ``grid_thw``'s device, once per distinct batch grid.

        The tower pops each of them from its kwargs instead of recomputing it: bit-identical, and the
        per-image Python loops of those helpers run once per grid, not once per batch.
        """
        per_visual = _TOWER_INPUTS.setdefault(visual, {})
        key = (tuple(map(tuple, grid_thw.tolist())), str(grid_thw.device))
        if key not in per_visual:
            if len(per_visual) >= _TOWER_INPUTS_MAX:
                per_visual.pop(next(iter(per_visual)))  # oldest first
            per_visual[key] = self._compute_tower_inputs(visual, grid_thw)
        return per_visual[key]

    def _compute_tower_inputs(self, visual: nn.Module, grid_thw: Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {"position_ids": get_vision_position_ids(grid_thw, visual.spatial_merge_size)}
        out["cu_seqlens"], out["max_seqlen"] = get_vision_attention_seqlens(grid_thw, visual.config)
        if hasattr(visual, "pos_embed"):  # Qwen3.x: learned position grid resampled per image
            out["interp_indices"], out["interp_weights"] = get_vision_interpolation_indices_and_weights(
                grid_thw,
                num_grid_per_side=visual.num_grid_per_side,
                mode=visual.interpolation_mode,
                align_corners=visual.interpolation_align_corners,
                spatial_merge_size=visual.config.spatial_merge_size,
            )
        if self.windowed:
            out["window_index"], out["cu_window_seqlens"] = get_vision_window_index(
                grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size
            )
            out["max_window_seqlen"] = get_max_seqlen(out["cu_window_seqlens"], visual.config)
        return out

    @staticmethod
    def _split(flat: Tensor, sizes: list[int]) -> list[Tensor]:
        """Per-image tensors that own their memory (a split view would drag the batch into torch.save)."""
        return [t.clone() for t in torch.split(flat, sizes)]

    def _visual_inputs(
        self, vlm: VLM, pixel_inputs: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """``(pixel_values, grid_thw, the tower's grid-derived kwargs)`` on the model's device.

        On ``meta`` the grid must stay real (the tower calls ``.tolist()`` on it and on cu_seqlens), so
        the grid-derived tensors are computed on cpu and those that meet weights (rotary position ids,
        position-embedding taps) are moved to meta.
        """
        visual = vlm.model.model.visual
        pixel_values = pixel_inputs["pixel_values"].to(vlm.device, visual.dtype)
        if vlm.device.type != "meta":
            grid_thw = pixel_inputs["image_grid_thw"].to(vlm.device)
            return pixel_values, grid_thw, self._tower_inputs(visual, grid_thw)
        grid_thw = pixel_inputs["image_grid_thw"].cpu()
        extra = self._compute_tower_inputs(visual, grid_thw)
        for k in ("position_ids", "interp_indices", "interp_weights"):
            if k in extra:
                extra[k] = extra[k].to(vlm.device)
        return pixel_values, grid_thw, extra

    def encode(self, vlm: VLM, pixel_inputs: dict[str, Tensor]) -> Captured:
        visual = vlm.model.model.visual
        pixel_values, grid_thw, extra = self._visual_inputs(vlm, pixel_inputs)
        grids = self._grids(grid_thw)
        store: dict[str, Tensor] = {}

        def pre_hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            store["pre"] = args[0]

        handle = visual.merger.register_forward_pre_hook(pre_hook)
        try:
            with torch.no_grad():
                out = visual(pixel_values, grid_thw=grid_thw, return_dict=True, **extra)
        finally:
            handle.remove()
        pre_flat = store["pre"]
        index, _ = self._orders(visual, grid_thw)
        pre = self._split(pre_flat[_on(index, pre_flat.device)], [h * w for h, w in grids])
        post = self._split(out.pooler_output, [h * w // 4 for h, w in grids])
        captured = Captured(
            pre=pre,
            post=post,
            pre_grid=list(grids),
            post_grid=[(h // 2, w // 2) for h, w in grids],
        )
        self._extra_captures(out, grids, captured)
        return captured

    def vision_module_rows(
        self, vlm: VLM, name: str, out: Tensor | None, pixel_inputs: dict[str, Tensor], n: int
    ) -> list[Tensor]:
        """Split a tower / merger module's flat ``(sum of tokens, ...)`` output per image, canonical order.

        Patch-level outputs (``sum h*w`` rows: patch embedding, blocks, ``ln_q``) are reordered like
        E_pre: the patch embedding's in processor order, everything after it in the tower's window
        order (Qwen2.5-VL); merged outputs (``sum h*w/4`` rows: the merger, its MLP, deepstack mergers)
        like E_post. Anything else is not per image.
        """
        visual = vlm.model.model.visual
        grids = self._grids(pixel_inputs["image_grid_thw"].cpu())
        pre_sizes, post_sizes = [h * w for h, w in grids], [h * w // 4 for h, w in grids]
        rows = None if out is None or out.ndim < 1 else out.shape[0]
        if rows == sum(pre_sizes):
            before_windows = name == PATCH_EMBED or name.startswith(PATCH_EMBED + ".")
            index, _ = canonical_orders(tuple(grids), None if before_windows else self._window(visual))
            return self._split(out[_on(index, out.device)], pre_sizes)
        if rows == sum(post_sizes):
            _, perm = canonical_orders(tuple(grids), self._window(visual))
            return self._split(out if perm is None else out[_on(perm, out.device)], post_sizes)
        shape = None if out is None else tuple(out.shape)
        raise UsageError(f"module {name} output {shape} is not per image: its first dim is neither the batch's "
                         f"{sum(pre_sizes)} patches nor its {sum(post_sizes)} merged tokens")

    def _extra_captures(self, out: Any, grids: list[tuple[int, int]], captured: Captured) -> None:
        """Family-specific extras of the vision output (Qwen3-VL: deepstack features)."""

    def apply_connector(
        self, vlm: VLM, pre: Sequence[Tensor], pre_grid: Sequence[tuple[int, int]]
    ) -> list[Tensor]:
        visual = vlm.model.model.visual
        grids = [(int(h), int(w)) for h, w in pre_grid]
        for x, (h, w) in zip(pre, grids, strict=True):
            if x.ndim != 2 or x.shape[0] != h * w:
                raise UsageError(
                    f"E_pre of shape {tuple(x.shape)} does not fit its {h}x{w} grid ({h * w} tokens)"
                )
        grid_thw = torch.tensor([[1, h, w] for h, w in grids], dtype=torch.long)
        index, perm = self._orders(visual, grid_thw)
        flat = torch.cat([x.to(vlm.device, visual.dtype) for x in pre])
        model_order = torch.empty_like(flat)
        model_order[_on(index, flat.device)] = flat  # inverse of the gather in encode
        merged = visual.merger(model_order)
        if perm is not None:
            merged = merged[_on(perm, merged.device)]
        return self._split(merged, [h * w // 4 for h, w in grids])

    # -- language path ---------------------------------------------------------------------------
    def _chat_inputs(
        self, vlm: VLM, images: Sequence[Image.Image], prompt: str | None, img_size: int | None,
        device: torch.device | None = None,
    ) -> dict[str, Tensor]:
        """The processor batch; every tensor but ``image_grid_thw`` on ``device`` (``None``: the model's)."""
        processor = vlm.processor
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": prompt or self.default_prompt}],
            }
        ]
        template = processor.chat_template if isinstance(processor.chat_template, str) else ""
        # Qwen3.5's own template opens a <think> block unless told not to; others have no such switch
        extra = {"enable_thinking": False} if "enable_thinking" in template else {}
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
        processor.tokenizer.padding_side = "left"
        inputs = processor(
            text=[text] * len(images),
            images=self._resize(images, img_size),
            return_tensors="pt",
            padding=True,
            padding_side="left",
            **self._size_kwargs(processor, img_size),
        )
        device = vlm.device if device is None else device
        return {k: v.to(device) if k != "image_grid_thw" else v for k, v in inputs.items()}

    def prompt_inputs(
        self, vlm: VLM, images: Sequence[Image.Image], prompt: str | None = None, img_size: int | None = None
    ) -> dict[str, Tensor]:
        return self._chat_inputs(vlm, images, prompt, img_size, torch.device("cpu"))

    def injected_outputs(
        self, vlm: VLM, inputs: Mapping[str, Any], post: Sequence[Tensor], deepstack: str | None = None
    ) -> dict[str, Any]:
        """``post`` as the image features (canonical = the LM's own order); ``deepstack``: Qwen3-VL only."""
        self._refuse_deepstack(deepstack)
        return {"image": BaseModelOutputWithPooling(pooler_output=tuple(post))}

    def _check_post(
        self, vlm: VLM, grid_thw: Tensor, post: Sequence[Tensor], what: str = "post"
    ) -> list[Tensor]:
        grids = self._grids(grid_thw)
        if len(post) != len(grids):
            raise UsageError(f"{what}: {len(post)} tensors for {len(grids)} images")
        weight = vlm.model.model.language_model.embed_tokens.weight
        out = []
        for i, (x, (h, w)) in enumerate(zip(post, grids, strict=True)):
            if x.ndim != 2 or x.shape != (h * w // 4, weight.shape[1]):
                raise UsageError(
                    f"{what}[{i}] has shape {tuple(x.shape)}; the image's {h}x{w} patch grid needs "
                    f"[{h * w // 4}, {weight.shape[1]}]"
                )
            out.append(x.to(weight.device, weight.dtype))
        return out

    def generate(
        self,
        vlm: VLM,
        images: Sequence[Image.Image],
        prompt: str | None = None,
        max_new_tokens: int = 32,
        post: Sequence[Tensor] | None = None,
        img_size: int | None = None,
        deepstack: str | None = None,
    ) -> list[str]:
        if not images:
            return []
        inputs = self._chat_inputs(vlm, images, prompt, img_size)
        gen_kwargs = {
            k: inputs[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")
        }
        gen_kwargs["image_grid_thw"] = gen_kwargs["image_grid_thw"].to(vlm.device)
        if post is None:
            if deepstack is not None:
                raise TypeError("deepstack= goes with post= (an injected E_post) only")
            gen_kwargs["pixel_values"] = inputs["pixel_values"].to(vlm.device, vlm.model.model.visual.dtype)
        else:
            post = self._check_post(vlm, inputs["image_grid_thw"], post)
            gen_kwargs["mm_encoder_outputs"] = self.injected_outputs(vlm, inputs, post, deepstack)
        tok = vlm.processor.tokenizer
        eos = vlm.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        eos += [tok.eos_token_id] if tok.eos_token_id is not None and tok.eos_token_id not in eos else []
        with torch.no_grad():
            # pure greedy: the checkpoints' sampling defaults and Qwen2.5-VL's repetition_penalty=1.05
            # are overridden, so captions are a deterministic function of the LM inputs
            out = vlm.model.generate(
                **gen_kwargs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                repetition_penalty=1.0,
                temperature=None,
                top_p=None,
                top_k=None,
                use_cache=True,
                pad_token_id=tok.pad_token_id,
                eos_token_id=eos,
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        return [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]


# -- Qwen2.5-VL ------------------------------------------------------------------------------------


def _qwen25_vl_7b() -> Qwen2_5_VLConfig:
    """Qwen/Qwen2.5-VL-7B-Instruct config.json (vision 1280 x 32, window 112, LM 3584 x 28)."""
    return Qwen2_5_VLConfig(
        vision_config=dict(
            depth=32, hidden_size=1280, hidden_act="silu", intermediate_size=3420, num_heads=16, in_channels=3,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
            out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31],
        ),
        text_config=dict(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000,
            rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False,
        ),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False,
    )  # fmt: skip


QWEN2_SPECIAL_IDS = {
    ENDOFTEXT: 151643, IM_START: 151644, IM_END: 151645, VISION_START: 151652, VISION_END: 151653,
    IMAGE_PAD: 151655, VIDEO_PAD: 151656,
}  # fmt: skip


@register
class Qwen25VLAdapter(QwenMergerAdapter):
    """Qwen2.5-VL: window attention in the vision tower; merger = ln_q (RMSNorm) + MLP."""

    name = "qwen2.5vl"
    default_id = "Qwen/Qwen2.5-VL-7B-Instruct"
    model_cls = Qwen2_5_VLForConditionalGeneration
    processor_cls = Qwen2_5_VLProcessor
    video_processor_cls = Qwen2VLVideoProcessor
    windowed = True
    tiny_lm_gain = 2.0
    real_configs: ClassVar[dict[str, Callable[[], Any]]] = {"qwen2.5-vl-7b": _qwen25_vl_7b}
    real_shapes = {"qwen2.5-vl-7b": ((576, 1280), (144, 3584))}
    label, color, display_rank = "Qwen2.5-VL", "#2ca02c", 2
    real_processor = (14, 56 * 56, 28 * 28 * 1280)  # preprocessor_config.json min/max_pixels
    real_special_ids = QWEN2_SPECIAL_IDS

    tiny_dims = TinyDims(image=128, patch=TINY_PATCH, vision_hidden=32, vision_layers=4, text_hidden=64, text_layers=2)

    def tiny_config(self, tok: PreTrainedTokenizerFast, dims: TinyDims) -> Qwen2_5_VLConfig:
        # window_size = 4 patches = 2x2 merge blocks (tiny: 32 px): a 64x96 tiny image has 2x3 windows and
        # the testbed's 3x3 merge grid has windows of 4, 2, 2 and 1 blocks, so the window permutation is
        # far from the identity; blocks 1 and 3 attend globally, 0 and 2 in windows.
        return Qwen2_5_VLConfig(
            vision_config=dict(
                depth=dims.vision_layers, hidden_size=dims.vision_hidden, intermediate_size=2 * dims.vision_hidden,
                num_heads=dims.vision_heads, patch_size=dims.patch, spatial_merge_size=2, temporal_patch_size=2,
                window_size=4 * dims.patch, fullatt_block_indexes=[1, 3], out_hidden_size=dims.text_hidden,
                hidden_act="silu",
            ),
            text_config=dict(
                vocab_size=len(tok), hidden_size=dims.text_hidden, intermediate_size=2 * dims.text_hidden,
                num_hidden_layers=dims.text_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048,
                rope_parameters={
                    "rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_sections(dims.text_hidden // 4),
                },
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            ),
            tie_word_embeddings=False,
            **self._token_ids(tok),
        )  # fmt: skip


# -- Qwen3.5 ---------------------------------------------------------------------------------------


def _qwen35_9b() -> Qwen3_5Config:
    """Qwen/Qwen3.5-9B config.json (vision 1152 x 27, patch 16, out 4096; hybrid DeltaNet LM 4096 x 32)."""
    return Qwen3_5Config(
        vision_config=dict(
            depth=27, hidden_size=1152, hidden_act="gelu_pytorch_tanh", intermediate_size=4304, num_heads=16,
            in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096,
            num_position_embeddings=2304,
        ),
        text_config=dict(
            vocab_size=248320, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
            num_attention_heads=16, num_key_value_heads=4, head_dim=256, linear_conv_kernel_dim=4,
            linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
            max_position_embeddings=262144, rms_norm_eps=1e-6, full_attention_interval=4,
            rope_parameters={
                "rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                "mrope_section": [11, 11, 10], "mrope_interleaved": True,
            },
            eos_token_id=248044, tie_word_embeddings=False,
        ),
        image_token_id=248056, video_token_id=248057, vision_start_token_id=248053, vision_end_token_id=248054,
        tie_word_embeddings=False,
    )  # fmt: skip


QWEN35_SPECIAL_IDS = {
    ENDOFTEXT: 248044, IM_START: 248045, IM_END: 248046, VISION_START: 248053, VISION_END: 248054,
    IMAGE_PAD: 248056, VIDEO_PAD: 248057,
}  # fmt: skip


@register
class Qwen35Adapter(QwenMergerAdapter):
    """Qwen3.5: no window attention, learned + rotary positions; merger = norm (LayerNorm) + MLP."""

    name = "qwen3.5"
    default_id = "Qwen/Qwen3.5-9B"
    model_cls = Qwen3_5ForConditionalGeneration
    processor_cls = Qwen3VLProcessor  # Qwen3.5 has no processor of its own
    video_processor_cls = Qwen3VLVideoProcessor
    real_configs: ClassVar[dict[str, Callable[[], Any]]] = {"qwen3.5-9b": _qwen35_9b}
    real_shapes = {"qwen3.5-9b": ((400, 1152), (100, 4096))}
    label, color, display_rank = "Qwen3.5", "#d62728", 3
    real_processor = (16, 65536, 16777216)  # preprocessor_config.json size shortest/longest_edge
    real_special_ids = QWEN35_SPECIAL_IDS
    tiny_lm_gain = 6.0

    def tiny_config(self, tok: PreTrainedTokenizerFast, dims: TinyDims) -> Qwen3_5Config:
        # one linear-attention (gated DeltaNet) and one full-attention layer, as in the real hybrid LM
        return Qwen3_5Config(
            vision_config=dict(
                depth=dims.vision_layers, hidden_size=dims.vision_hidden, intermediate_size=2 * dims.vision_hidden,
                num_heads=dims.vision_heads, patch_size=dims.patch, spatial_merge_size=2, temporal_patch_size=2,
                out_hidden_size=dims.text_hidden, num_position_embeddings=64,
            ),
            text_config=dict(
                vocab_size=len(tok), hidden_size=dims.text_hidden, intermediate_size=2 * dims.text_hidden,
                num_hidden_layers=dims.text_layers, num_attention_heads=4, num_key_value_heads=2,
                head_dim=dims.text_hidden // 4, linear_conv_kernel_dim=4, linear_key_head_dim=dims.text_hidden // 4,
                linear_value_head_dim=dims.text_hidden // 4, linear_num_key_heads=2, linear_num_value_heads=4,
                layer_types=(["linear_attention"] * (dims.text_layers - 1) + ["full_attention"]),
                max_position_embeddings=2048,
                rope_parameters={
                    "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                    "mrope_section": mrope_sections(dims.text_hidden // 4, 0.5), "mrope_interleaved": True,
                },
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            ),
            tie_word_embeddings=False,
            **self._token_ids(tok),
        )  # fmt: skip


# -- Qwen3-VL --------------------------------------------------------------------------------------


def _qwen3_vl_8b() -> Qwen3VLConfig:
    """Qwen/Qwen3-VL-8B-Instruct config.json (vision 1152 x 27, deepstack [8, 16, 24], LM 4096 x 36)."""
    return Qwen3VLConfig(
        vision_config=dict(
            depth=27, hidden_size=1152, hidden_act="gelu_pytorch_tanh", intermediate_size=4304, num_heads=16,
            in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096,
            num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
        ),
        text_config=dict(
            vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True,
            },
            bos_token_id=151643, eos_token_id=151645,
        ),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False,
    )  # fmt: skip


@register
class Qwen3VLAdapter(QwenMergerAdapter):
    """Qwen3-VL: Qwen3.5's vision layout plus deepstack mergers feeding the LM's first layers.

    ``generate(..., post=..., deepstack=...)``: see the module docstring. ``deepstack`` is
    ``"original"`` (default), ``"zero"``, or ``[level][image]`` tensors ``[T_post_i, D_post]`` in
    canonical order (``Captured.modules["deepstack.<level>"]`` has exactly that layout).
    """

    name = "qwen3vl"
    default_id = "Qwen/Qwen3-VL-8B-Instruct"
    model_cls = Qwen3VLForConditionalGeneration
    processor_cls = Qwen3VLProcessor
    video_processor_cls = Qwen3VLVideoProcessor
    real_configs: ClassVar[dict[str, Callable[[], Any]]] = {"qwen3-vl-8b": _qwen3_vl_8b}
    real_shapes = {"qwen3-vl-8b": ((400, 1152), (100, 4096))}
    label, color, display_rank = "Qwen3-VL", "#9467bd", 4
    real_processor = (16, 65536, 16777216)
    real_special_ids = QWEN2_SPECIAL_IDS
    tiny_lm_gain = 4.0
    deepstack_default: ClassVar[str] = "original"
    _warned_leak: ClassVar[bool] = False

    def tiny_config(self, tok: PreTrainedTokenizerFast, dims: TinyDims) -> Qwen3VLConfig:
        return Qwen3VLConfig(
            vision_config=dict(
                depth=dims.vision_layers, hidden_size=dims.vision_hidden, intermediate_size=2 * dims.vision_hidden,
                num_heads=dims.vision_heads, patch_size=dims.patch, spatial_merge_size=2, temporal_patch_size=2,
                out_hidden_size=dims.text_hidden, num_position_embeddings=64,
                deepstack_visual_indexes=[0, 1],
            ),
            text_config=dict(
                vocab_size=len(tok), hidden_size=dims.text_hidden, intermediate_size=2 * dims.text_hidden,
                num_hidden_layers=dims.text_layers, num_attention_heads=4, num_key_value_heads=2,
                head_dim=dims.text_hidden // 4, max_position_embeddings=2048,
                rope_parameters={
                    "rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_sections(dims.text_hidden // 4),
                    "mrope_interleaved": True,
                },
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            ),
            tie_word_embeddings=False,
            **self._token_ids(tok),
        )  # fmt: skip

    def _extra_captures(self, out: Any, grids: list[tuple[int, int]], captured: Captured) -> None:
        sizes = [h * w // 4 for h, w in grids]
        for level, feat in enumerate(out.deepstack_features):
            captured.modules[DEEPSTACK_KEY.format(level)] = self._split(feat, sizes)

    def injected_outputs(
        self,
        vlm: VLM,
        inputs: Mapping[str, Any],
        post: Sequence[Tensor],
        deepstack: str | Sequence[Sequence[Tensor]] | None = None,
    ) -> dict[str, Any]:
        """``post`` with deepstack features: ``"original"`` (the pixels' own), ``"zero"`` or given levels."""
        visual = vlm.model.model.visual
        n_levels = len(visual.deepstack_visual_indexes)
        if deepstack is None:
            deepstack = self.deepstack_default
            if deepstack == "original" and not Qwen3VLAdapter._warned_leak:
                Qwen3VLAdapter._warned_leak = True
                log.warning(
                    "qwen3vl: injecting E_post with the images' own deepstack features (deepstack='original'): "
                    "the original image still reaches the LM; pass deepstack='zero' or replacement features to avoid it"
                )
        if isinstance(deepstack, str):
            if deepstack == "original":
                captured = self.encode(vlm, {k: inputs[k] for k in ("pixel_values", "image_grid_thw")})
                levels = [captured.modules[DEEPSTACK_KEY.format(k)] for k in range(n_levels)]
            elif deepstack == "zero":
                levels = [[torch.zeros_like(x) for x in post] for _ in range(n_levels)]
            else:
                raise UsageError(f"deepstack must be 'original', 'zero' or tensors, got {deepstack!r}")
        else:
            levels = [list(level) for level in deepstack]
            if len(levels) != n_levels:
                raise UsageError(f"{len(levels)} deepstack levels given; the model has {n_levels}")
            levels = [
                self._check_post(vlm, inputs["image_grid_thw"], level, f"deepstack[{k}]")
                for k, level in enumerate(levels)
            ]
        return {"image": BaseModelOutputWithDeepstackFeatures(
            pooler_output=tuple(post), deepstack_features=[tuple(level) for level in levels]
        )}


__all__ = ["QwenMergerAdapter", "Qwen25VLAdapter", "Qwen35Adapter", "Qwen3VLAdapter", "DEEPSTACK_KEY"]
