"""LLaVA-1.5 (``llava-hf/llava-1.5-7b-hf``): CLIP ViT-L/14-336 → 2-layer GELU MLP projector → Llama-2.

E_pre is the projector's *input*: ``hidden_states[vision_feature_layer]`` (layer -2, not the tower's
last_hidden_state) with the CLS token dropped (``vision_feature_select_strategy="default"``), i.e.
``[(H/p)·(W/p), 1024]`` row-major over the patch grid. E_post is the projector output, one token per
patch (correspondence ``1:1``). Both come straight out of the model's own ``get_image_features``
(which returns the tower's selected hidden states next to the projected features), so no hooks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from vlmc.data.scenes import SCENE_PIXEL_MEAN, SCENE_PIXEL_STD
from vlmc.models.base import (
    VLM,
    Captured,
    Correspondence,
    TinyDims,
    register,
)
from vlmc.models.families.common import (
    HFAdapter,
    check_rows,
    pad_left_by_default,
    rgb,
    save_variant,
    set_generation_defaults,
)
from vlmc.models.tiny import seed_everything, train_word_tokenizer
from vlmc.utils.cli import UsageError

IMAGE_TOKEN = "<image>"

# llava-hf's template, reduced to what we use: "USER: <image>\n{prompt} ASSISTANT:"
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ (message['role'] | upper) + ': ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }} "
    "{%- else -%}"
    "{%- for c in message['content'] if c['type'] == 'image' %}{{ '<image>' }}{{ '\\n' }}{% endfor -%}"
    "{%- for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }} {% endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)

# Tiny variant: 64 px, patch 16 → 4×4 = 16 tokens per image. Testbed (trained on scenes): 96 px →
# 6×6 tokens, two per side of each cell of the scenes' 3×3 grid.
TINY_DIMS = TinyDims(image=64, patch=16, vision_hidden=64, vision_layers=3, text_hidden=64, text_layers=2)
TESTBED_DIMS = TinyDims(
    image=96, patch=16, vision_hidden=96, vision_layers=4, text_hidden=128, text_layers=3,
    pixel_mean=SCENE_PIXEL_MEAN, pixel_std=SCENE_PIXEL_STD,
)  # fmt: skip
# Std of the tiny LM's re-initialised matrices (default 0.02 lets the text tokens drown the image).
TINY_LM_STD = 0.2


def llava_15_7b() -> LlavaConfig:
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 (1024-d, 24 layers), feature layer -2, Llama-2-7B."""
    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        ),
        text_config=LlamaConfig(
            vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
            rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=32001,
        ),
        image_token_id=32000,
        image_seq_length=576,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def _processor(tokenizer: Any, image_size: int, patch_size: int, **norm: Any) -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, **norm
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS (dropped again by "default")
        chat_template=CHAT_TEMPLATE,
    )


def _image_kwargs(img_size: int | None) -> dict[str, Any]:
    """``img_size`` → square resize without crop (the project's fixed-size policy); None → processor default."""
    if not img_size:
        return {}
    return {"size": {"height": img_size, "width": img_size}, "do_center_crop": False}


@register
class LlavaAdapter(HFAdapter):
    name = "llava"
    default_id = "llava-hf/llava-1.5-7b-hf"
    correspondence = Correspondence("1:1")
    real_configs = {"llava-1.5-7b": llava_15_7b}
    real_shapes = {"llava-1.5-7b": ((576, 1024), (576, 4096))}
    label, color, display_rank = "LLaVA", "#1f77b4", 0
    model_cls = LlavaForConditionalGeneration
    vision_prefixes = ("model.vision_tower", "model.multi_modal_projector")
    pixel_keys = ("pixel_values", "image_sizes")
    tiny_version = 2  # v2: 'USER: <image>' (space restored), left-padding tokenizer

    # -- weights ---------------------------------------------------------------------------------
    def build_tiny(self, out_dir: Path, seed: int = 0) -> None:
        self._build(out_dir, seed, TINY_DIMS, testbed=False)

    def build_testbed(self, out_dir: Path, seed: int = 0) -> None:
        self._build(out_dir, seed, TESTBED_DIMS, testbed=True)

    def _build(self, out_dir: Path, seed: int, dims: TinyDims, testbed: bool) -> None:
        """A small LLaVA at ``dims``: random tiny (image-dependent init) or testbed (default init, to train)."""
        seed_everything(seed)
        tok = train_word_tokenizer([IMAGE_TOKEN], corpus=[":"])
        pad_left_by_default(tok)
        processor = _processor(tok, dims.image, dims.patch, **dims.normalisation())
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=dims.vision_hidden, intermediate_size=2 * dims.vision_hidden,
                num_hidden_layers=dims.vision_layers, num_attention_heads=dims.vision_heads,
                image_size=dims.image, patch_size=dims.patch, projection_dim=32,
            ),
            text_config=LlamaConfig(
                vocab_size=len(tok), hidden_size=dims.text_hidden, intermediate_size=2 * dims.text_hidden,
                num_hidden_layers=dims.text_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            ),
            image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
            image_seq_length=(dims.image // dims.patch) ** 2,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )  # fmt: skip
        model = LlavaForConditionalGeneration(config)
        if not testbed:
            _make_image_dependent(model, seed)
        set_generation_defaults(model, tok)
        save_variant(model, processor, out_dir)

    def _config_processor(self, config: LlavaConfig) -> LlavaProcessor:
        tok = train_word_tokenizer([IMAGE_TOKEN], corpus=[":"])
        if len(tok) > config.text_config.vocab_size:
            raise ValueError("offline tokenizer larger than the config's vocabulary")
        # The offline tokenizer's ids replace the published special ids (vocab size stays published).
        config.image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config.text_config, key, getattr(tok, key))
        vc = config.vision_config
        return _processor(tok, vc.image_size, vc.patch_size)

    # -- vision path -----------------------------------------------------------------------------
    def preprocess(self, processor: Any, images: Sequence[Image.Image], img_size: int | None) -> dict[str, Tensor]:
        out = processor.image_processor(rgb(images), return_tensors="pt", **_image_kwargs(img_size))
        return {"pixel_values": out["pixel_values"]}

    def preprocess_tensors(
        self, processor: Any, images: Sequence[Tensor], img_size: int | None, device: torch.device
    ) -> dict[str, Tensor]:
        out = processor.image_processor(list(images), return_tensors="pt", device=device, **_image_kwargs(img_size))
        return {"pixel_values": out["pixel_values"]}

    def connector_module(self, model: nn.Module) -> nn.Module:
        return model.model.multi_modal_projector

    def native_img_size(self, model: nn.Module) -> int | None:
        return int(model.config.vision_config.image_size)  # CLIP runs at its configured size only

    def encode(self, vlm: VLM, pixel_inputs: Mapping[str, Tensor]) -> Captured:
        cfg = vlm.model.config
        layer, strategy = _feature_selection(cfg)
        pv = pixel_inputs["pixel_values"].to(device=vlm.device, dtype=vlm.dtype)
        grid = _grid(cfg, pv)
        with torch.no_grad():
            out = vlm.model.model.get_image_features(
                pixel_values=pv, vision_feature_layer=layer, vision_feature_select_strategy=strategy
            )
        hs = out.hidden_states
        layers = [layer] if isinstance(layer, int) else list(layer)
        feats = [hs[i][:, 1:] for i in layers]  # "default": CLS dropped, exactly as the model does
        pre = feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)
        post = list(out.pooler_output)
        n = pv.shape[0]
        return Captured(pre=list(pre.unbind(0)), post=post, pre_grid=[grid] * n, post_grid=[grid] * n)

    def apply_connector(self, vlm: VLM, pre: Sequence[Tensor], pre_grid: Sequence[tuple[int, int]]) -> list[Tensor]:
        proj = self.connector_module(vlm.model)
        d_in = proj.linear_1.in_features
        check_rows("pre", pre, len(pre_grid), [h * w for h, w in pre_grid], d_in)
        rows = [p.to(device=vlm.device, dtype=vlm.dtype) for p in pre]
        if len({r.shape[0] for r in rows}) == 1:  # same shape as encode's batch: bit-identical result
            return list(proj(torch.stack(rows)).unbind(0))
        return list(proj(torch.cat(rows)).split([r.shape[0] for r in rows]))

    # -- language path ---------------------------------------------------------------------------
    def _generation_inputs(self, vlm: VLM, images: Sequence[Image.Image], texts: list[str], img_size: int | None) -> Any:
        return vlm.processor(
            images=rgb(images), text=texts, return_tensors="pt", padding=True, **_image_kwargs(img_size)
        )

    def _post_shapes(self, vlm: VLM, inputs: Mapping[str, Any]) -> list[tuple[int, int]]:
        cfg = vlm.model.config
        h, w = _grid(cfg, inputs["pixel_values"])
        return [(h * w, cfg.text_config.hidden_size)] * inputs["pixel_values"].shape[0]


def _feature_selection(cfg: LlavaConfig) -> tuple[int | list[int], str]:
    strategy = cfg.vision_feature_select_strategy
    if strategy != "default":
        raise UsageError(
            f"llava: vision_feature_select_strategy={strategy!r} keeps CLS in the projector input; "
            "only 'default' (CLS dropped, a clean patch grid) is supported"
        )
    return cfg.vision_feature_layer, strategy


def _grid(cfg: LlavaConfig, pixel_values: Tensor) -> tuple[int, int]:
    vc = cfg.vision_config
    h, w = pixel_values.shape[-2:]
    if (h, w) != (vc.image_size, vc.image_size):
        raise UsageError(
            f"llava: the CLIP tower runs at {vc.image_size}x{vc.image_size} px only; got {h}x{w} "
            f"(use --img-size {vc.image_size} or leave it unset)"
        )
    return h // vc.patch_size, w // vc.patch_size


def _make_image_dependent(model: LlavaForConditionalGeneration, seed: int) -> None:
    """Re-initialise the tiny LM so that greedy captions depend on the image (see tests)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, TINY_LM_STD, generator=g)
        model.lm_head.weight.normal_(0.0, TINY_LM_STD, generator=g)

