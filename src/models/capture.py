"""``--modules``: any module of any family, vision or language side, captured per image (VLM-Lens style).

A module is matched by Unix globs over ``model.named_modules()`` (``fnmatch``: ``*`` spans dots too, so
``model.language_model.layers.*.mlp`` takes every layer's MLP). Each matched module's output (its first
tensor for tuples and model outputs) is stored per image:

* **vision side** (it runs inside the adapter's ``encode``: vision tower, connector, their parts): the
  adapter's ``vision_module_rows`` splits the output per image: batch-first families take row ``i``;
  Qwen's flat ``(sum of tokens, D)`` sequences are split with the image grids and put in canonical
  (row-major) order exactly like E_pre / E_post (window permutation undone). Capturing the connector
  module itself gives E_post.
* **language side** (it runs only when the LM does): one forward of the captioning prompt
  (``adapter.prompt_inputs``, the exact inputs ``generate`` starts from) and the rows at the image-token
  positions, ``[T_post, D]`` per image in the order the LM consumes E_post (= canonical order).

``plan_modules`` sorts the matched modules into the two sides with one probe forward on two blank
images before any real image is read, and refuses (``UsageError``, one line) every module that cannot
be captured per image: never runs in an image forward (containers such as ``ModuleList``), runs more
than once per forward, or has no per-image / per-position output. Nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from vlmc.models.base import VLM, match_modules
from vlmc.utils.cli import UsageError

VISION, LANGUAGE = "vision", "language"
PROBE_SIDE = 64  # blank probe images' side when no --img_size is given (processors resize as they do for real ones)


@dataclass
class ModulePlan:
    """The matched modules, by side.

    Attributes:
        vision: names captured during the vision encode.
        language: names captured in a prompt forward of the language model (over the image tokens).
    """

    vision: list[str] = field(default_factory=list)
    language: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return self.vision + self.language

    def sides(self) -> dict[str, str]:
        """Module name → ``vision`` / ``language`` (recorded in the manifest)."""
        return {**dict.fromkeys(self.vision, VISION), **dict.fromkeys(self.language, LANGUAGE)}


@contextmanager
def record_calls(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, list[Any]]]:
    """Forward hooks keeping every output of each named module (``name → [output per call]``), detached."""
    calls: dict[str, list[Any]] = {n: [] for n in names}
    modules = dict(model.named_modules())

    def hook_for(name: str):
        def hook(_mod: nn.Module, _args: Any, out: Any) -> None:
            calls[name].append(first_tensor(out))

        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def first_tensor(out: Any) -> Tensor | None:
    """The first tensor of a module output (a tensor, a tuple/list, or a ``ModelOutput``), else ``None``."""
    if isinstance(out, Tensor):
        return out.detach()
    if isinstance(out, Mapping) or hasattr(out, "values"):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, Tensor):
                return item.detach()
    return None


def image_positions(vlm: VLM, input_ids: Tensor) -> Tensor:
    """Bool ``[B, L]``: where the prompt holds the image's placeholder tokens (one per E_post token)."""
    token = vlm.adapter.image_token_id(vlm)
    return input_ids == token


def language_rows(out: Tensor | None, positions: Tensor) -> list[Tensor]:
    """Per image ``out[i][positions[i]]`` of a ``[B, L, ...]`` LM-side output; ``UsageError`` otherwise."""
    b, seq = positions.shape
    if out is None or out.ndim < 2 or tuple(out.shape[:2]) != (b, seq):
        shape = None if out is None else tuple(out.shape)
        raise UsageError(f"output {shape} is not per prompt position (expected [{b}, {seq}, ...])")
    mask = positions.to(out.device)
    return [out[i][mask[i]] for i in range(b)]


def vision_captures(vlm: VLM, pixel_inputs: dict[str, Any], names: Sequence[str], n: int) -> tuple[Any, dict[str, list[Tensor]]]:
    """``(adapter.encode's Captured, name → per-image rows)`` of one batch's vision forward."""
    with record_calls(vlm.model, names) as calls:
        cap = vlm.adapter.encode(vlm, pixel_inputs)
    rows = {}
    for name in names:
        outs = calls[name]
        if len(outs) != 1:
            raise UsageError(f"module {name} ran {len(outs)} times in one vision forward (expected once)")
        rows[name] = vlm.adapter.vision_module_rows(vlm, name, outs[0], pixel_inputs, n)
    return cap, rows


@torch.no_grad()
def language_captures(
    vlm: VLM, images: Sequence[Image.Image], names: Sequence[str], prompt: str | None, img_size: int | None
) -> dict[str, list[Tensor]]:
    """name → per-image rows at the image-token positions of one forward of the captioning prompt."""
    from vlmc.models.families.common import to_model

    inputs = to_model(vlm.adapter.prompt_inputs(vlm, images, prompt, img_size), vlm.device, vlm.dtype)
    with record_calls(vlm.model, names) as calls:
        prompt_forward(vlm, inputs, names)
    positions = image_positions(vlm, inputs["input_ids"])
    rows = {}
    for name in names:
        outs = calls[name]
        if len(outs) != 1:
            raise UsageError(f"module {name} ran {len(outs)} times in one prompt forward (expected once)")
        rows[name] = language_rows(outs[0], positions)
    return rows


def prompt_forward(vlm: VLM, inputs: dict[str, Any], names: Sequence[str]) -> None:
    """One forward of the prompt, no KV cache; logits only for the last position unless the output head is
    captured (all-position logits of a 150k-word vocabulary would dwarf everything else at real scale)."""
    head = vlm.model.get_output_embeddings()
    head_name = next((n for n, m in vlm.model.named_modules() if m is head), None) if head is not None else None
    wants_head = head_name is not None and any(n == head_name or n.startswith(head_name + ".") for n in names)
    vlm.model(**inputs, use_cache=False, **({} if wants_head else {"logits_to_keep": 1}))


def plan_modules(vlm: VLM, patterns: Sequence[str], img_size: int | None, prompt: str | None) -> ModulePlan:
    """Match ``patterns`` and sort the modules into vision / language side with a probe on two blank images.

    Raises:
        UsageError: no module matches, or some matched module cannot be captured per image (one line
            naming them and why).
    """
    names = match_modules(vlm.model, patterns)
    if not names:
        raise UsageError(f"{vlm.name}: no module matches {' '.join(patterns)} (see --list-modules)")
    side = img_size or PROBE_SIDE
    images = [Image.new("RGB", (side, side), (128, 128, 128)), Image.new("RGB", (side, side), (200, 60, 60))]
    pix = vlm.adapter.preprocess(vlm.processor, images, img_size)
    pix = {k: v.to(vlm.device) if isinstance(v, Tensor) else v for k, v in pix.items()}
    bad: dict[str, str] = {}
    plan = ModulePlan()
    with torch.no_grad(), record_calls(vlm.model, names) as calls:
        cap = vlm.adapter.encode(vlm, pix)
    for name in names:
        outs = calls[name]
        if not outs:
            continue
        try:
            if len(outs) != 1:
                raise UsageError(f"runs {len(outs)} times per vision forward")
            rows = vlm.adapter.vision_module_rows(vlm, name, outs[0], pix, len(images))
            if len(rows) != len(images):
                raise UsageError(f"{len(rows)} rows for {len(images)} images")
            plan.vision.append(name)
        except UsageError as e:
            bad[name] = str(e)
    rest = [n for n in names if n not in plan.vision and n not in bad]
    if rest:
        _probe_language(vlm, images, rest, prompt, img_size, cap, plan, bad)
    if bad:
        shown = "; ".join(f"{n}: {why}" for n, why in list(bad.items())[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise UsageError(f"{vlm.name}: cannot capture {len(bad)} matched module(s) per image: {shown}{more}; "
                         "narrow --modules (see --list-modules)")
    return plan


def _probe_language(
    vlm: VLM, images: list[Image.Image], names: list[str], prompt: str | None, img_size: int | None,
    cap: Any, plan: ModulePlan, bad: dict[str, str],
) -> None:
    """Language-side part of ``plan_modules``: one prompt forward, each module must fire once, per position."""
    from vlmc.models.families.common import to_model

    inputs = to_model(vlm.adapter.prompt_inputs(vlm, images, prompt, img_size), vlm.device, vlm.dtype)
    with torch.no_grad(), record_calls(vlm.model, names) as calls:
        prompt_forward(vlm, inputs, names)
    positions = image_positions(vlm, inputs["input_ids"])
    counts = positions.sum(1).tolist()
    want = [p.shape[0] for p in cap.post]
    if counts != want:  # the adapter's prompt and its E_post disagree: no module could be aligned
        raise UsageError(f"{vlm.name}: the prompt holds {counts} image tokens for E_post of {want} tokens")
    for name in names:
        outs = calls[name]
        if not outs:
            bad[name] = "never runs in an image or prompt forward (a container such as ModuleList?)"
        elif len(outs) != 1:
            bad[name] = f"runs {len(outs)} times per prompt forward"
        else:
            try:
                language_rows(outs[0], positions)
                plan.language.append(name)
            except UsageError as e:
                bad[name] = str(e)
