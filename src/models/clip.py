"""One CLIP loader for stage 2's reference encoders and CLIPScore: HF folders and open_clip models.

Both callers resolve their spec with the shared weights grammar (:mod:`vlmc.models.sources`) and then
load through here: :func:`load_hf` (config, model of the class :func:`hf_model_class` picks, image
processor, optionally the tokenizer) and :func:`load_open_clip` (model, preprocessing transform,
optionally the tokenizer). Every failure is one :class:`UsageError` line naming what was asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlmc.utils.cli import UsageError


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def pooled(out: Any) -> Tensor | None:
    """A ``get_*_features`` result: a tensor (transformers 4) or an output object's ``pooler_output`` (5)."""
    return out if isinstance(out, Tensor) else getattr(out, "pooler_output", None)


def testbed_clip_path() -> str:
    """Folder of the testbed CLIP (trained on scenes by src/train/train_testbed.py): the short name ``testbed``."""
    from vlmc.models.load import TESTBED_CLIP, testbed_path

    return str(testbed_path(TESTBED_CLIP))


# -- Hugging Face ----------------------------------------------------------------------------------


@dataclass
class HFClip:
    """What :func:`load_hf` loaded (``tokenizer`` only when asked for)."""

    config: Any
    model: torch.nn.Module
    image_processor: Any
    tokenizer: Any = None


def hf_config(source: str | Path, label: str) -> Any:
    """``AutoConfig`` of an HF folder; ``UsageError`` naming ``label`` when it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except Exception as e:  # noqa: BLE001  (whatever a user's model does wrong: one line naming it)
        raise UsageError(f"cannot load model {label} ({source}): {first_line(e)}") from None


def hf_model_class(config: Any) -> type:
    """The class a reference or CLIPScore model loads as: CLIP/SigLIP classes by ``model_type``, else ``AutoModel``."""
    import transformers as T

    mt, arch = config.model_type, (getattr(config, "architectures", None) or [""])[0]
    if mt == "clip":
        return T.CLIPModel
    if mt == "clip_vision_model":
        return T.CLIPVisionModelWithProjection if arch == "CLIPVisionModelWithProjection" else T.CLIPVisionModel
    if mt == "siglip":
        return T.SiglipModel
    if mt == "siglip_vision_model":
        return T.SiglipVisionModel
    return T.AutoModel


def load_hf(source: str | Path, label: str, device: torch.device, dtype: torch.dtype | None = None,
            text: bool = False) -> HFClip:
    """An HF CLIP-like folder: config, model (eval, on ``device``), image processor, and the tokenizer with ``text``.

    Args:
        source: the resolved local folder.
        label: how errors name what was asked for (e.g. ``'--clip_model \\'x\\''``).
        device: where the model goes.
        dtype: load dtype (``None``: ``from_pretrained``'s default).
        text: also load the tokenizer.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    config = hf_config(source, label)
    cls = hf_model_class(config)
    try:
        model = cls.from_pretrained(source, **({"dtype": dtype} if dtype is not None else {}))
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"cannot load {cls.__name__} from {source} ({label}): {first_line(e)}") from None
    try:
        processor = AutoImageProcessor.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source) if text else None
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{label}: no image processor or tokenizer at {source}: {first_line(e)}") from None
    return HFClip(config, model.eval().to(device), processor, tokenizer)


# -- open_clip -------------------------------------------------------------------------------------


def import_open_clip() -> Any:
    """The ``open_clip`` module; ``UsageError`` saying how to install it when it is missing."""
    try:
        import open_clip
    except ImportError as e:
        raise UsageError(f"open_clip is not importable ({first_line(e)}); pip install open_clip_torch torchvision") from None
    return open_clip


def load_open_clip(name: str, pretrained: str | None, device: torch.device, precision: str = "fp32",
                   text: bool = False) -> tuple[torch.nn.Module, Any, Any]:
    """``(model in eval mode, preprocessing transform, tokenizer or None)`` of an open_clip model.

    Args:
        name: an open_clip architecture, or ``hf-hub:``/``local-dir:`` schema.
        pretrained: a pretrained tag or checkpoint file (``None``: the schema's own weights).
        device: where the model goes.
        precision: ``fp32``, ``fp16`` or ``bf16``.
        text: also return the tokenizer.
    """
    open_clip = import_open_clip()
    try:
        model, _, transform = open_clip.create_model_and_transforms(name, pretrained=pretrained, precision=precision,
                                                                    device=device)
        tokenizer = open_clip.get_tokenizer(name) if text else None
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot create open_clip model {name!r} (pretrained={pretrained!r}): {first_line(e)}") from None
    return model.eval(), transform, tokenizer
