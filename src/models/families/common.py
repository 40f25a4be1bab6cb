"""Helpers shared by the Hugging Face family adapters (``llava``, ``idefics2``, ``qwen*``).

This module is a stable, documented toolbox: any family module may import from it. Nothing here
knows a family by name. Two layers:

* plain functions (``build_random``, ``load_hf``, ``chat_texts``, ``greedy_generate``, ...) usable by
  any adapter;
* ``HFAdapter``, an optional ``FamilyAdapter`` base that implements ``load_pretrained``,
  ``build_from_config`` and ``generate`` on top of four small family hooks (see its docstring).

Conventions every helper follows:

* Floating inputs are cast to the model dtype, everything is moved to the model device.
* Generation is greedy (``do_sample=False, num_beams=1``), batched, left-padded, with the KV cache.
* A replacement E_post is injected through transformers 5's ``mm_encoder_outputs={"image":
  BaseModelOutputWithPooling(pooler_output=[...])}``: ``generate`` itself builds exactly this object
  from the pixels (``_prepare_multimodal_encoder_kwargs_for_generation`` calls the model's
  ``get_image_features``), so injecting the model's own E_post reproduces its own tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from transformers import AttentionInterface, AutoConfig, AutoProcessor, GenerationConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlmc.models.base import VLM, FamilyAdapter
from vlmc.utils.cli import UsageError

# -- building and loading -------------------------------------------------------------------------

META_ATTENTION = "vlmc_meta_sdpa"
_meta_attention_registered = False


def meta_attention() -> str:
    """Name of an attention implementation usable on the ``meta`` device (registered on first use).

    transformers builds SDPA masks by asking ``padding_mask.all()``, a data-dependent ``.item()``
    that meta tensors refuse (Idefics2's vision tower and perceiver hit it). Meta tensors carry no
    values, so masks cannot change any result there: this implementation is plain SDPA under a name
    the mask factory does not know, which makes transformers skip mask creation. Use it for
    ``device="meta"`` shape runs only.
    """
    global _meta_attention_registered
    if not _meta_attention_registered:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        AttentionInterface.register(META_ATTENTION, sdpa_attention_forward)
        _meta_attention_registered = True
    return META_ATTENTION


def build_random(
    model_cls: type[nn.Module],
    config: Any,
    dtype: torch.dtype,
    device: torch.device | str,
    attn_implementation: str | None = None,
) -> nn.Module:
    """``model_cls`` at ``config`` with random weights, created directly on ``device``.

    ``device="meta"`` allocates nothing (a 7B model builds in ~0.2 s) and switches attention to
    ``meta_attention()``; any other device initialises the weights in place there (use bf16 on a GPU
    for real-scale speed and memory figures). ``attn_implementation`` goes to ``_from_config``.
    """
    device = torch.device(device)
    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if device.type == "meta":
        kwargs["attn_implementation"] = meta_attention()
    with torch.device(device):
        model = model_cls._from_config(config, dtype=dtype, **kwargs)
    return model.eval()


def load_hf(
    model_cls: type[nn.Module],
    path: str,
    dtype: torch.dtype,
    device: torch.device | str,
    attn_implementation: str | None = None,
) -> tuple[nn.Module, Any]:
    """``model_cls.from_pretrained(path)`` and ``AutoProcessor.from_pretrained(path)`` (folder or HF id).

    On an accelerator the weights are loaded straight onto it (``device_map``); on ``meta`` only the
    config is read and the model is built there without weights (shape checks of a checkpoint).
    ``attn_implementation`` goes to ``from_pretrained`` (``None``: transformers' default).
    """
    device = torch.device(device)
    processor = AutoProcessor.from_pretrained(path)
    kw: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if device.type == "meta":
        model = build_random(model_cls, AutoConfig.from_pretrained(path), dtype, device)
    elif device.type == "cpu":
        model = model_cls.from_pretrained(path, dtype=dtype, **kw)
    else:
        model = model_cls.from_pretrained(path, dtype=dtype, device_map=str(device), **kw)
    return model.eval(), processor


def set_generation_defaults(model: nn.Module, tokenizer: Any, eos_token_ids: Sequence[int] | None = None) -> None:
    """Greedy generation config with the tokenizer's pad / bos / eos ids (for saved tiny variants)."""
    eos = list(eos_token_ids) if eos_token_ids else [tokenizer.eos_token_id]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        num_beams=1,
        max_new_tokens=32,
    )


def pad_left_by_default(tokenizer: Any) -> None:
    """Make left padding the tokenizer's saved default (``padding_side`` alone is not serialised)."""
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"


def save_variant(model: nn.Module, processor: Any, out_dir: str | Path) -> None:
    """``save_pretrained`` model (safetensors) and processor into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def n_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


# -- tensors --------------------------------------------------------------------------------------


def to_model(inputs: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Move tensors to ``device``; floating ones are also cast to ``dtype``. Non-tensors pass through."""
    out: dict[str, Any] = {}
    for k, v in inputs.items():
        if isinstance(v, Tensor):
            v = v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
        out[k] = v
    return out


def stack_or_pad(rows: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    """``[B, T_max, D]`` from ``[T_i, D]`` rows (zero padded at the end) and a bool mask ``[B, T_max]``.

    The mask is ``None`` when every row has the same length (no padding).
    """
    lengths = [r.shape[0] for r in rows]
    if len(set(lengths)) == 1:
        return torch.stack(list(rows)), None
    t_max = max(lengths)
    first = rows[0]
    out = first.new_zeros((len(rows), t_max, first.shape[-1]))
    mask = torch.zeros((len(rows), t_max), dtype=torch.bool, device=first.device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return out, mask


def check_rows(
    what: str, rows: Sequence[Tensor], n: int, tokens: Sequence[int] | int | None, dim: int | None
) -> None:
    """Raise a ``UsageError`` unless ``rows`` are ``n`` 2-D tensors of the expected tokens / dim."""
    if len(rows) != n:
        raise UsageError(f"{what}: got {len(rows)} tensors for {n} images")
    for i, r in enumerate(rows):
        want_t = tokens[i] if isinstance(tokens, Sequence) else tokens
        if r.ndim != 2 or (want_t is not None and r.shape[0] != want_t) or (dim is not None and r.shape[1] != dim):
            raise UsageError(f"{what}[{i}] has shape {tuple(r.shape)}; expected [{want_t}, {dim}]")


# -- prompts and generation -----------------------------------------------------------------------


def chat_texts(processor: Any, prompt: str, n: int) -> list[str]:
    """``n`` copies of the chat-templated user turn (one image, then ``prompt``) plus generation prompt."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return [text] * n


@contextmanager
def left_padding(tokenizer: Any) -> Iterator[None]:
    """Temporarily pad on the left (decoder-only batched generation)."""
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = old


def injected(post: Sequence[Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, BaseModelOutputWithPooling]:
    """The ``mm_encoder_outputs`` argument that makes ``generate`` use ``post`` as the image features."""
    return {"image": BaseModelOutputWithPooling(pooler_output=[p.to(device=device, dtype=dtype) for p in post])}


def greedy_generate(
    model: nn.Module,
    inputs: Mapping[str, Any],
    max_new_tokens: int,
    mm_encoder_outputs: dict[str, Any] | None = None,
    pad_token_id: int | None = None,
) -> Tensor:
    """``model.generate`` greedily with the KV cache; returns the full ``[B, L_prompt + new]`` ids.

    With ``mm_encoder_outputs`` the pixel inputs must already be removed from ``inputs``.
    """
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
        # pure greedy whatever the checkpoint's generation_config says (sampling, repetition penalty)
        temperature=None, top_p=None, top_k=None, repetition_penalty=1.0, no_repeat_ngram_size=0,
    )
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    if mm_encoder_outputs is not None:
        kwargs["mm_encoder_outputs"] = mm_encoder_outputs
    with torch.no_grad():
        return model.generate(**inputs, **kwargs)


def decode_new(processor: Any, sequences: Tensor, prompt_len: int) -> list[str]:
    """Decode the generated part of each row (special tokens skipped, whitespace stripped)."""
    texts = processor.batch_decode(sequences[:, prompt_len:], skip_special_tokens=True)
    return [t.strip() for t in texts]


# -- an optional adapter base -----------------------------------------------------------------------


class HFAdapter(FamilyAdapter):
    """``FamilyAdapter`` for transformers VLMs whose ``generate`` accepts ``mm_encoder_outputs``.

    Subclasses set ``model_cls`` (and ``pixel_keys``, see ``FamilyAdapter``) and implement:

    * ``_config_processor(config)``: an offline processor for a ``real_configs`` config;
    * ``_after_load(model, processor)``: optional fix-ups of a loaded processor (default: none);
    * ``_generation_inputs(vlm, images, texts, img_size)``: the processor's text+image batch
      (``BatchFeature``) for ``generate``;
    * ``_post_shapes(vlm, inputs)``: per-image ``(T_post, D_post)`` the model expects for those
      inputs (to reject a wrong ``post`` with a clear message instead of a shape error in the LM).

    Then ``generate`` and ``generate_ids`` work: the model's own captions, or captions from an
    injected E_post through ``mm_encoder_outputs`` (identical tokens when ``post`` is the model's
    own E_post in canonical order; families whose canonical order differs from the model's internal
    order override ``_to_model_post``).
    """

    model_cls: ClassVar[type[nn.Module]]

    # -- weights ---------------------------------------------------------------------------------
    def load_pretrained(
        self, path: str, dtype: torch.dtype, device: torch.device, attn_implementation: str | None = None
    ) -> tuple[nn.Module, Any]:
        model, processor = load_hf(self.model_cls, path, dtype, device, attn_implementation)
        self._after_load(model, processor)
        return model, processor

    def build_from_config(
        self, config_name: str, dtype: torch.dtype, device: torch.device, attn_implementation: str | None = None
    ) -> tuple[nn.Module, Any]:
        config, processor = self.config_and_processor(config_name)
        model = build_random(self.model_cls, config, dtype, device, attn_implementation)
        set_generation_defaults(model, processor.tokenizer)
        return model, processor

    def load_processor(self, path: str) -> Any:
        processor = AutoProcessor.from_pretrained(path)
        self._after_load(None, processor)
        return processor

    def config_and_processor(self, config_name: str) -> tuple[Any, Any]:
        config = self.real_configs[config_name]()
        return config, self._config_processor(config)

    def _config_processor(self, config: Any) -> Any:
        raise NotImplementedError

    def _after_load(self, model: nn.Module | None, processor: Any) -> None:
        return None

    def image_tensors(self, images: Sequence[Image.Image], img_size: int | None) -> list[Tensor]:
        return uint8_chw(images)

    # -- language path ---------------------------------------------------------------------------
    def _generation_inputs(self, vlm: VLM, images: Sequence[Image.Image], texts: list[str], img_size: int | None) -> Any:
        raise NotImplementedError

    def _post_shapes(self, vlm: VLM, inputs: Mapping[str, Any]) -> list[tuple[int, int]]:
        raise NotImplementedError

    def _to_model_post(self, vlm: VLM, post: Sequence[Tensor], inputs: Mapping[str, Any]) -> list[Tensor]:
        """Canonical-order E_post → the order the model's LM consumes (identity by default)."""
        return list(post)

    def prompt_inputs(
        self, vlm: VLM, images: Sequence[Image.Image], prompt: str | None = None, img_size: int | None = None
    ) -> dict[str, Tensor]:
        texts = chat_texts(vlm.processor, prompt or self.default_prompt, len(images))
        with left_padding(vlm.processor.tokenizer):
            return dict(self._generation_inputs(vlm, images, texts, img_size))

    def injected_outputs(
        self, vlm: VLM, inputs: Mapping[str, Any], post: Sequence[Tensor], deepstack: str | None = None
    ) -> dict[str, Any]:
        self._refuse_deepstack(deepstack)
        return injected(self._to_model_post(vlm, list(post), inputs), vlm.device, vlm.dtype)

    def generate_ids(
        self,
        vlm: VLM,
        images: Sequence[Image.Image],
        prompt: str | None = None,
        max_new_tokens: int = 32,
        post: Sequence[Tensor] | None = None,
        img_size: int | None = None,
    ) -> tuple[Tensor, int]:
        """Greedy token ids ``[B, L_prompt + new]`` and ``L_prompt`` (see ``generate``)."""
        tokenizer = vlm.processor.tokenizer
        batch = self.prompt_inputs(vlm, images, prompt, img_size)
        inputs = to_model(batch, vlm.device, vlm.dtype)
        mm = None
        if post is not None:
            shapes = self._post_shapes(vlm, inputs)
            check_rows("post", post, len(images), [t for t, _ in shapes], shapes[0][1] if shapes else None)
            for k in self.pixel_keys:
                inputs.pop(k, None)
            mm = self.injected_outputs(vlm, batch, post)
        seq = greedy_generate(vlm.model, inputs, max_new_tokens, mm, pad_token_id=tokenizer.pad_token_id)
        return seq, inputs["input_ids"].shape[1]

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
        self._refuse_deepstack(deepstack)
        if not images:
            return []
        seq, prompt_len = self.generate_ids(vlm, images, prompt, max_new_tokens, post, img_size)
        return decode_new(vlm.processor, seq, prompt_len)


def uint8_chw(images: Sequence[Image.Image]) -> list[Tensor]:
    """RGB PIL images → uint8 ``[3, H, W]`` tensors (what the torchvision image processors convert them to)."""
    return [torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous() for im in rgb(images)]


def rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    """Images converted to RGB (palette / grey / RGBA inputs are common in folders)."""
    return [im if im.mode == "RGB" else im.convert("RGB") for im in images]


__all__ = [
    "HFAdapter",
    "META_ATTENTION",
    "build_random",
    "chat_texts",
    "check_rows",
    "decode_new",
    "greedy_generate",
    "injected",
    "left_padding",
    "load_hf",
    "meta_attention",
    "n_params",
    "pad_left_by_default",
    "rgb",
    "save_variant",
    "set_generation_defaults",
    "stack_or_pad",
    "to_model",
    "uint8_chw",
]
