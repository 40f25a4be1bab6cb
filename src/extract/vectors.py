"""Stage 1 encoder: a VLM's vision tower + connector as a runner ``Encoder`` (E_pre, E_post per image)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from vlmc.extract.runner import Encoded
from vlmc.models.base import VLM, Captured
from vlmc.models.capture import ModulePlan, language_captures, plan_modules, vision_captures
from vlmc.utils.cli import UsageError


class VLMEncoder:
    """Captures E_pre/E_post (and optional ``--modules`` outputs and captions) for a batch.

    Args:
        vlm: the loaded model (with its language model when ``caption`` or a language-side module is wanted).
        img_size: square resize, or ``None`` for the processor's own size.
        modules: Unix globs of extra modules whose outputs are stored too, vision or language side
            (``vlmc.models.capture``; a module that cannot be captured per image raises ``UsageError`` here).
        caption: also generate a caption per image (runs the LM).
        prompt: caption instruction (``None`` → the family's default).
        max_new_tokens: caption length limit.
        preprocess_on: ``workers`` (the DataLoader workers run the model's image processor, on CPU) or
            ``device`` (workers only decode to uint8 tensors; the processor runs batched on the
            model's device in ``encode``: bit-identical inputs, no CPU-bound preprocessing).
    """

    def __init__(
        self,
        vlm: VLM,
        img_size: int | None = None,
        modules: Sequence[str] = (),
        caption: bool = False,
        prompt: str | None = None,
        max_new_tokens: int = 32,
        preprocess_on: str = "workers",
    ) -> None:
        if preprocess_on not in PREPROCESS_ON:
            raise UsageError(f"unknown preprocess location {preprocess_on!r}; choose one of {', '.join(PREPROCESS_ON)}")
        self.vlm = vlm
        self.preprocess_on = preprocess_on
        self.img_size = img_size
        self.caption = caption
        self.prompt = prompt or vlm.adapter.default_prompt
        self.max_new_tokens = max_new_tokens
        # matched, probed and sorted into vision / language side now: what cannot be captured stops the run here
        self.plan = plan_modules(vlm, modules, img_size, self.prompt) if modules else ModulePlan()
        self.module_names = self.plan.names

    def meta(self) -> dict[str, Any]:
        vlm = self.vlm
        return {
            "model": vlm.name,
            "family": vlm.adapter.name,
            "source": vlm.source,
            "revision": vlm.revision,  # the commit hash of an HF id (None for local / tiny / config: weights)
            "model_class": type(vlm.model).__name__,
            "compute_dtype": str(vlm.dtype).replace("torch.", ""),
            "pool": "mean",
            "correspondence": str(vlm.adapter.correspondence),
            "prompt": self.prompt if self.caption or self.plan.language else None,
            "img_size": self.img_size,
            "modules": self.module_names,
            "module_sides": self.plan.sides(),
            "kinds": ["pre", "post", *self.module_names],
        }

    @property
    def needs_images(self) -> bool:
        """Captions and language-side modules need the decoded images in ``encode`` (shipped from the workers)."""
        return self.caption or bool(self.plan.language)

    def preprocess(self, images: list[Image.Image]) -> dict[str, Any]:
        if self.preprocess_on == "device":
            return {UINT8_KEY: self.vlm.adapter.image_tensors(images, self.img_size)}
        return self.vlm.adapter.preprocess(self.vlm.processor, images, self.img_size)

    def encode(self, inputs: dict[str, Any], images: list[Image.Image | None]) -> Encoded:
        vlm = self.vlm
        if UINT8_KEY in inputs:
            inputs = device_inputs(vlm, inputs[UINT8_KEY], self.img_size)
        inputs = {k: v.to(vlm.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        if self.plan.vision:
            cap, mods = vision_captures(vlm, inputs, self.plan.vision, len(images))
        else:  # no hooks to place: skip the walk over every module of the model
            cap, mods = vlm.adapter.encode(vlm, inputs), {}
        if self.plan.language:
            mods.update(language_captures(vlm, images, self.plan.language, self.prompt, self.img_size))
        enc = Encoded(
            vectors={"pre": cap.pre, "post": cap.post},
            extras={"pre": {"grids": cap.pre_grid}, "post": {"grids": cap.post_grid}},
            shapes=shape_meta(cap),
        )
        for name in self.module_names:  # every planned module, every batch: none is ever dropped
            enc.vectors[name] = mods[name]
        if self.caption:
            enc.extras["post"]["captions"] = vlm.adapter.generate(
                vlm, images, self.prompt, self.max_new_tokens, img_size=self.img_size
            )
        return enc


PREPROCESS_ON = ("workers", "device")
UINT8_KEY = "images_uint8"


def device_inputs(vlm: VLM, images: list[torch.Tensor], img_size: int | None) -> dict[str, Any]:
    """uint8 ``[3, H, W]`` tensors from the workers → the model's inputs, preprocessed on ``vlm.device``."""
    non_blocking = vlm.device.type == "cuda"
    on_device = [t.to(vlm.device, non_blocking=non_blocking) for t in images]
    return vlm.adapter.preprocess_tensors(vlm.processor, on_device, img_size, vlm.device)


def resolve_preprocess_on(name: str, device: torch.device) -> str:
    """``--preprocess auto`` → ``device`` on an accelerator, ``workers`` on CPU (faster there: measured)."""
    if name == "auto":
        return "workers" if device.type == "cpu" else "device"
    if name not in PREPROCESS_ON:
        raise UsageError(f"unknown --preprocess {name!r}; choose auto, {', '.join(PREPROCESS_ON)}")
    return name


def shape_meta(cap: Captured) -> dict[str, Any]:
    """``pre``/``post`` manifest entries (tokens, dim, grid); tokens/grid ``None`` when images differ."""

    def one(vecs: list[torch.Tensor], grids: list[tuple[int, int]]) -> dict[str, Any]:
        same = len({tuple(v.shape) for v in vecs}) == 1
        return {"tokens": vecs[0].shape[0] if same else None, "dim": vecs[0].shape[1], "grid": list(grids[0]) if same else None}

    return {"pre": one(cap.pre, cap.pre_grid), "post": one(cap.post, cap.post_grid)}
