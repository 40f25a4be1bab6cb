"""Idefics2 (``HuggingFaceM4/idefics2-8b``): SigLIP so400m → modality MLP + perceiver resampler → Mistral-7B.

E_pre is the connector's input: the vision tower's post-layernorm ``last_hidden_state``, patch tokens
only (no CLS in SigLIP), ``[(H/p)·(W/p), 1152]`` row-major over the patch grid. Padded images (the
processor pads a batch to its largest image and sends ``pixel_attention_mask``) keep only their valid
top-left ``h×w`` patches. E_post is the perceiver's ``n_latents`` output tokens (64 real) in latent
order: there is no token correspondence (``none``; ``post_grid = (n_latents, 1)``).

The project runs Idefics2 at a fixed square size (336) with ``do_image_splitting=False``: one
sub-image per image, 576 patches. ``encode`` runs ``vision_model`` and ``connector`` directly, which
is what ``Idefics2Model.get_image_features`` does, minus two things it cannot afford: that method drops
all-zero "padding images" by boolean indexing (silently misaligning a batch, and impossible on the
``meta`` device) and keeps only the pooled output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import (
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    Idefics2ImageProcessor,
    Idefics2Processor,
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
    stack_or_pad,
)
from vlmc.models.tiny import seed_everything, train_word_tokenizer
from vlmc.utils.cli import UsageError

IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
END_OF_UTTERANCE = "<end_of_utterance>"
SPECIAL_TOKENS = [IMAGE_TOKEN, FAKE_TOKEN, END_OF_UTTERANCE]

# HuggingFaceM4/idefics2-8b's template: "User:<image>{prompt}<end_of_utterance>\nAssistant:"
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}"
    "{%- if message['content'] is string -%}{{ ': ' + message['content'] }}"
    "{%- else -%}"
    "{{ ':' if message['content'][0]['type'] == 'image' else ': ' }}"
    "{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'text' -%}{{ c['text'] }}{%- elif c['type'] == 'image' -%}{{ '<image>' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<end_of_utterance>' }}{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)

# Tiny variant: 64 px, patch 16 → 16 patches → 8 latents. Testbed (trained on scenes): 96 px → 36
# patches → 16 latents.
TINY_DIMS = TinyDims(image=64, patch=16, vision_hidden=64, vision_layers=2, text_hidden=64, text_layers=2, latents=8)
TESTBED_DIMS = TinyDims(
    image=96, patch=16, vision_hidden=96, vision_layers=4, text_hidden=128, text_layers=3, latents=16,
    pixel_mean=SCENE_PIXEL_MEAN, pixel_std=SCENE_PIXEL_STD,
)  # fmt: skip
# Tiny init (_distinct_latents, _widen_lm_init): distinct small perceiver latents, a wider LM init.
TINY_LATENT_STD, TINY_LM_STD = 0.02, 0.2
# Testbed init (_strong_positions): the perceiver has no positional input of its own, so the layout reaches
# E_post only through the vision embeddings' position table. At its default std (0.02, vs ~0.3 for the
# patch embeddings) the trained testbed lost position entirely (held-out position accuracy 0.16, a linear
# probe of E_post 0.08 = chance); at std 1.0 a probe reads position off E_post perfectly after 800 steps.
TESTBED_POSITION_STD = 1.0
# The project's fixed input size for real Idefics2 checkpoints.
REAL_IMAGE = 336


def idefics2_8b() -> Idefics2Config:
    """HuggingFaceM4/idefics2-8b: SigLIP so400m (1152-d, 27 layers, patch 14), 64-latent perceiver, Mistral-7B."""
    return Idefics2Config(
        vision_config=dict(
            hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
            image_size=980, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        ),
        perceiver_config=dict(
            hidden_size=4096, hidden_act="silu", resampler_n_latents=64, resampler_depth=3,
            resampler_n_heads=16, resampler_head_dim=96, num_key_value_heads=4, rms_norm_eps=1e-5,
        ),
        text_config=dict(
            model_type="mistral", vocab_size=32003, hidden_size=4096, intermediate_size=14336,
            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
            max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        image_token_id=32001,
        tie_word_embeddings=False,
    )


def _processor(tokenizer: Any, image_size: int, n_latents: int, **norm: Any) -> Idefics2Processor:
    image_processor = Idefics2ImageProcessor(
        do_image_splitting=False, size={"height": image_size, "width": image_size}, **norm
    )
    return Idefics2Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=n_latents, chat_template=CHAT_TEMPLATE
    )


def _image_kwargs(img_size: int | None) -> dict[str, Any]:
    """``img_size`` → square resize (the project's fixed-size policy); None → the processor's own size rule."""
    kw: dict[str, Any] = {"do_image_splitting": False}
    if img_size:
        kw["size"] = {"height": img_size, "width": img_size}
    return kw


@register
class Idefics2Adapter(HFAdapter):
    name = "idefics2"
    default_id = "HuggingFaceM4/idefics2-8b"
    correspondence = Correspondence("none")
    real_configs = {"idefics2-8b": idefics2_8b}
    real_shapes = {"idefics2-8b": ((576, 1152), (64, 4096))}
    label, color, display_rank = "Idefics2", "#ff7f0e", 1
    model_cls = Idefics2ForConditionalGeneration
    vision_prefixes = ("model.vision_model", "model.connector")
    pixel_keys = ("pixel_values", "pixel_attention_mask")
    tiny_version = 2  # v2: left-padding tokenizer

    # -- weights ---------------------------------------------------------------------------------
    def build_tiny(self, out_dir: Path, seed: int = 0) -> None:
        self._build(out_dir, seed, TINY_DIMS, testbed=False)

    def build_testbed(self, out_dir: Path, seed: int = 0) -> None:
        self._build(out_dir, seed, TESTBED_DIMS, testbed=True)

    def _build(self, out_dir: Path, seed: int, dims: TinyDims, testbed: bool) -> None:
        """A small Idefics2 at ``dims``: random tiny (image-dependent init) or testbed (to train)."""
        seed_everything(seed)
        tok = train_word_tokenizer(SPECIAL_TOKENS, corpus=[":"])
        pad_left_by_default(tok)
        processor = _processor(tok, dims.image, dims.latents, **dims.normalisation())
        ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        config = Idefics2Config(
            vision_config=dict(
                hidden_size=dims.vision_hidden, intermediate_size=2 * dims.vision_hidden,
                num_hidden_layers=dims.vision_layers, num_attention_heads=dims.vision_heads,
                image_size=dims.image, patch_size=dims.patch,
            ),
            perceiver_config=dict(
                hidden_size=dims.text_hidden, resampler_n_latents=dims.latents, resampler_depth=2,
                resampler_n_heads=4, resampler_head_dim=dims.text_hidden // 4, num_key_value_heads=2,
                rms_norm_eps=1e-5,
            ),
            text_config=dict(
                model_type="mistral", vocab_size=len(tok), hidden_size=dims.text_hidden,
                intermediate_size=2 * dims.text_hidden, num_hidden_layers=dims.text_layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, sliding_window=None,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            ),
            image_token_id=ids[IMAGE_TOKEN],
            tie_word_embeddings=False,
        )  # fmt: skip
        model = Idefics2ForConditionalGeneration(config)
        _distinct_latents(model, seed)
        if testbed:
            _strong_positions(model, seed)
        else:
            _widen_lm_init(model, seed)
        set_generation_defaults(model, tok, [tok.eos_token_id, ids[END_OF_UTTERANCE]])
        save_variant(model, processor, out_dir)

    def _config_processor(self, config: Idefics2Config) -> Idefics2Processor:
        tok = train_word_tokenizer(SPECIAL_TOKENS, corpus=[":"])
        if len(tok) > config.text_config.vocab_size:
            raise ValueError("offline tokenizer larger than the config's vocabulary")
        # The offline tokenizer's ids replace the published special ids (vocab size stays published).
        config.image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config.text_config, key, getattr(tok, key))
        return _processor(tok, REAL_IMAGE, config.perceiver_config.resampler_n_latents)

    def _after_load(self, model: nn.Module | None, processor: Any) -> None:
        # The hub processor splits every image into 4 crops + the whole; the project never does.
        processor.image_processor.do_image_splitting = False

    # -- vision path -----------------------------------------------------------------------------
    def preprocess(self, processor: Any, images: Sequence[Image.Image], img_size: int | None) -> dict[str, Tensor]:
        out = processor.image_processor([[im] for im in rgb(images)], return_tensors="pt", **_image_kwargs(img_size))
        return {"pixel_values": out["pixel_values"], "pixel_attention_mask": out["pixel_attention_mask"]}

    def preprocess_tensors(
        self, processor: Any, images: Sequence[Tensor], img_size: int | None, device: torch.device
    ) -> dict[str, Tensor]:
        out = processor.image_processor([[t] for t in images], return_tensors="pt", device=device, **_image_kwargs(img_size))
        return {"pixel_values": out["pixel_values"], "pixel_attention_mask": out["pixel_attention_mask"]}

    def connector_module(self, model: nn.Module) -> nn.Module:
        return model.model.connector

    def encode(self, vlm: VLM, pixel_inputs: Mapping[str, Tensor]) -> Captured:
        inner = vlm.model.model
        pv, patch_mask, grids = _patches(vlm.model.config, pixel_inputs)
        full = tuple(patch_mask.shape[1:])
        pv = pv.to(device=vlm.device, dtype=vlm.dtype)
        mask = patch_mask.to(vlm.device)
        b = pv.shape[0]
        with torch.no_grad():
            hs = inner.vision_model(pixel_values=pv, patch_attention_mask=mask).last_hidden_state
            post = inner.connector(hs, attention_mask=mask.view(b, -1))
        if all(g == full for g in grids):
            pre = list(hs.unbind(0))
        else:  # padded images: keep each image's valid top-left h×w patches, row-major
            hs4 = hs.view(b, full[0], full[1], hs.shape[-1])
            pre = [hs4[i, :h, :w].reshape(h * w, -1) for i, (h, w) in enumerate(grids)]
        n_lat = post.shape[1]
        return Captured(pre=pre, post=list(post.unbind(0)), pre_grid=grids, post_grid=[(n_lat, 1)] * b)

    def apply_connector(self, vlm: VLM, pre: Sequence[Tensor], pre_grid: Sequence[tuple[int, int]]) -> list[Tensor]:
        connector = self.connector_module(vlm.model)
        d_in = vlm.model.config.vision_config.hidden_size
        check_rows("pre", pre, len(pre_grid), [h * w for h, w in pre_grid], d_in)
        # Ragged E_pre is padded at the end with a mask: the perceiver has no positional information,
        # so this equals encode's grid-padded batch up to float rounding (bit-identical when unpadded).
        x, mask = stack_or_pad([p.to(device=vlm.device, dtype=vlm.dtype) for p in pre])
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return list(connector(x, attention_mask=mask).unbind(0))

    # -- language path ---------------------------------------------------------------------------
    def _generation_inputs(self, vlm: VLM, images: Sequence[Image.Image], texts: list[str], img_size: int | None) -> Any:
        return vlm.processor(
            images=[[im] for im in rgb(images)], text=texts, return_tensors="pt", padding=True,
            **_image_kwargs(img_size),
        )

    def _post_shapes(self, vlm: VLM, inputs: Mapping[str, Any]) -> list[tuple[int, int]]:
        cfg = vlm.model.config
        n = inputs["input_ids"].shape[0]
        return [(cfg.perceiver_config.resampler_n_latents, cfg.text_config.hidden_size)] * n


def _patches(cfg: Idefics2Config, pixel_inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
    """Pixels ``[B, 3, H, W]``, the bool patch mask ``[B, H/p, W/p]`` and each image's valid ``(h, w)`` grid.

    Same rule as ``Idefics2Model.get_image_features``: a patch is valid when all its pixels are. The
    mask is reduced where it lives (no host copy of a GPU mask); only ``3·B`` integers come back to
    the host. A mask on the ``meta`` device has no values: every patch is then taken as valid.
    """
    pv = pixel_inputs["pixel_values"]
    pam = pixel_inputs.get("pixel_attention_mask")
    if pv.ndim == 5:
        if pv.shape[1] != 1:
            raise UsageError(
                f"idefics2: got {pv.shape[1]} sub-images per image; the project runs with do_image_splitting=False"
            )
        pv = pv[:, 0]
        pam = pam[:, 0] if pam is not None else None
    b, _, h, w = pv.shape
    p = cfg.vision_config.patch_size
    full = (h // p, w // p)
    if pam is None or pam.device.type == "meta":
        return pv, torch.ones((b, *full), dtype=torch.bool, device=pv.device), [full] * b
    patch_mask = pam.unfold(1, p, p).unfold(2, p, p).sum(dim=(-1, -2)) == p * p
    stats = torch.stack(
        [patch_mask[:, :, 0].sum(1), patch_mask[:, 0, :].sum(1), patch_mask.flatten(1).sum(1)], dim=1
    ).tolist()
    if any(r * c != n for r, c, n in stats):
        raise UsageError("idefics2: pixel_attention_mask is not a top-left rectangle per image")
    return pv, patch_mask, [(int(r), int(c)) for r, c, _ in stats]


def _distinct_latents(model: Idefics2ForConditionalGeneration, seed: int) -> None:
    """Small distinct random perceiver latents.

    At the default init the latents are all ones: every latent is the same vector and dominates the
    residual stream, so E_post barely sees the image, and training cannot tell them apart.
    """
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        lat = model.model.connector.perceiver_resampler.latents
        lat.copy_(torch.randn(lat.shape, generator=g) * TINY_LATENT_STD)


def _strong_positions(model: Idefics2ForConditionalGeneration, seed: int) -> None:
    """Testbed only: vision position embeddings at :data:`TESTBED_POSITION_STD`, comparable to the patches'."""
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        model.model.vision_model.embeddings.position_embedding.weight.normal_(0.0, TESTBED_POSITION_STD, generator=g)


def _widen_lm_init(model: Idefics2ForConditionalGeneration, seed: int) -> None:
    """Random tiny variant only: a wider LM init, so greedy captions move with the image tokens."""
    g = torch.Generator().manual_seed(seed + 1)
    torch.randn(model.model.connector.perceiver_resampler.latents.shape, generator=g)  # same stream as before
    with torch.no_grad():
        for p in model.model.text_model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, TINY_LM_STD, generator=g)
        model.lm_head.weight.normal_(0.0, TINY_LM_STD, generator=g)
