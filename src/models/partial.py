"""Vision-only loading: build and load only a VLM's vision tower and connector, never its language model.

Stage 1 without ``--caption``, stage 5's re-projection through the connector and other exports run
only the vision side of a VLM; its language model is 90-95 % of the weights (LLaVA-1.5-7B: 13.2 GB of
which 0.6 GB vision + projector). :func:`load_vision_only` builds the model class on the ``meta``
device (no memory), then gives real storage only to the modules under the adapter's
``vision_prefixes`` (a declared attribute of each family adapter):

* from a checkpoint folder, only the safetensors tensors whose (renamed) key lies under a vision
  prefix are read, with ``safe_open`` (single file or sharded index); checkpoint keys are mapped onto
  the model's names with transformers' own renaming rules for the model type (legacy hub layouts such
  as ``vision_tower.*`` → ``model.vision_tower.*``);
* from ``config:<name>``, the vision-side parameters are initialised with the model's own
  ``_init_weights`` (random weights, as a full ``config:`` build).

Non-persistent buffers of the vision side (rotary frequencies, position ids) are recomputed by the
model's own ``initialize_weights``, exactly as ``from_pretrained`` does for a meta-built model. The
language-model parameters stay on ``meta``: a forward through them fails loudly instead of producing
garbage. Outputs of the vision side are bit-identical to the fully loaded model's (tests).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from vlmc.utils.cli import UsageError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class LoadReport:
    """What a vision-only load touched (for logs and the tests' "no LM parameter" checks).

    Attributes:
        tensors_read: checkpoint tensors read from disk.
        bytes_read: their total size in bytes.
        materialised: model parameters given real storage (the rest stay on ``meta``).
        materialised_bytes: their total size in bytes.
        skipped: checkpoint tensors left unread (the language model's).
        files: the safetensors files opened.
    """

    tensors_read: int = 0
    bytes_read: int = 0
    materialised: int = 0
    materialised_bytes: int = 0
    skipped: int = 0
    files: list[str] = field(default_factory=list)


def on_vision_side(name: str, prefixes: Sequence[str]) -> bool:
    """Whether the parameter / module ``name`` lies under one of the vision-side ``prefixes``."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (the index's shards, or the single file)."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / f for f in sorted(set(weight_map.values()))]
    single = folder / SINGLE_FILE
    if single.is_file():
        return [single]
    raise UsageError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (vision-only loading reads safetensors only)")


def key_renamer(model: nn.Module) -> Callable[[str], str]:
    """A function mapping checkpoint keys to the model's parameter names (transformers' own renaming rules).

    Only plain renamings are applied (the vision towers and connectors of the supported families need
    no tensor conversion); keys already in the model's layout pass through unchanged.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # a transformers without conversion mappings: checkpoint keys are the model's
        return lambda key: key
    rules: list[tuple[re.Pattern[str], str, str]] = []  # (source pattern, target, scope prefix)
    for t in get_model_conversion_mapping(model):
        if type(t) is WeightRenaming:
            prefix = getattr(t, "scope_prefix", None) or ""
            rules += [(re.compile(src), t.target_patterns[0], prefix) for src in t.source_patterns]
    names = set(dict(model.named_parameters())) | set(dict(model.named_buffers()))

    def rename(key: str) -> str:
        if key in names:
            return key
        for pattern, dst, prefix in rules:
            if prefix and not key.startswith(prefix):
                continue
            new = pattern.sub(dst, key, count=1)
            if new != key:
                key = new
                if key in names:
                    return key
        return key

    return rename


def read_vision_tensors(
    folder: Path, prefixes: Sequence[str], rename: Callable[[str], str], report: LoadReport
) -> dict[str, torch.Tensor]:
    """Model name → tensor of every checkpoint tensor on the vision side; nothing else is read."""
    out: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(folder):
        report.files.append(path.name)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                name = rename(key)
                if not on_vision_side(name, prefixes):
                    report.skipped += 1
                    continue
                t = f.get_tensor(key)
                report.tensors_read += 1
                report.bytes_read += t.numel() * t.element_size()
                out[name] = t
    return out


def build_skeleton(model_cls: type[nn.Module], config: Any, dtype: torch.dtype, **kwargs: Any) -> nn.Module:
    """The whole model on ``meta`` (no memory; weights not initialised)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights

    with torch.device("meta"), no_init_weights():
        model = model_cls._from_config(config, dtype=dtype, **kwargs)
    return model.eval()


def _vision_tensors(model: nn.Module, prefixes: Sequence[str]) -> Iterator[tuple[nn.Module, str, str, torch.Tensor, bool]]:
    """``(owner module, attribute, full name, tensor, is_parameter)`` of every vision-side tensor."""
    for mod_name, module in model.named_modules():
        for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is None:
                continue
            full = f"{mod_name}.{attr}" if mod_name else attr
            if on_vision_side(full, prefixes):
                yield module, attr, full, t, attr in module._parameters


def materialise(
    model: nn.Module,
    prefixes: Sequence[str],
    device: torch.device,
    loaded: dict[str, torch.Tensor] | None,
    report: LoadReport,
) -> None:
    """Give the vision side real storage on ``device``: loaded tensors where given, then the model's own init.

    Args:
        model: a meta skeleton from :func:`build_skeleton`.
        prefixes: the adapter's vision-side prefixes.
        device: target device.
        loaded: checkpoint tensors by model name (``None``: random init, as a ``config:`` build).
        report: counters updated in place.

    Raises:
        UsageError: when a checkpoint lacks a vision-side parameter.
    """
    from transformers.modeling_utils import PreTrainedModel

    persistent = set(model.state_dict().keys())
    missing = []
    done: dict[int, torch.Tensor] = {}  # a tensor shared by two modules is materialised once
    for module, attr, full, t, is_param in _vision_tensors(model, prefixes):
        if id(t) in done:
            _assign(module, attr, done[id(t)], is_param)
            continue
        if loaded is not None and full in loaded:
            value = loaded[full].to(device=device, dtype=t.dtype)
            value._is_hf_initialized = True  # type: ignore[attr-defined]
        elif loaded is not None and is_param and full in persistent:
            missing.append(full)
            continue
        else:
            value = torch.empty_like(t, device=device)
        done[id(t)] = _assign(module, attr, value, is_param)
        if is_param:
            report.materialised += 1
            report.materialised_bytes += value.numel() * value.element_size()
    if missing:
        raise UsageError(
            f"checkpoint lacks {len(missing)} vision-side tensor(s) of the model (first: {missing[0]}); "
            "is it the right family / a complete folder?"
        )
    if isinstance(model, PreTrainedModel):
        _initialise_rest(model, prefixes)


def _assign(module: nn.Module, attr: str, value: torch.Tensor, is_param: bool) -> torch.Tensor:
    if is_param:
        param = nn.Parameter(value, requires_grad=False)
        if getattr(value, "_is_hf_initialized", False):
            param._is_hf_initialized = True  # type: ignore[attr-defined]
        module._parameters[attr] = param
        return param
    module._buffers[attr] = value
    return value


def _initialise_rest(model: nn.Module, prefixes: Sequence[str]) -> None:
    """Run the model's own init on the vision side: recomputes buffers, fills parameters not loaded.

    Loaded tensors carry ``_is_hf_initialized`` and are left alone by transformers' init functions;
    the language model stays on ``meta``, where init is a no-op.
    """
    vision_modules = [m for n, m in model.named_modules() if n and on_vision_side(n, prefixes)]
    for m in model.modules():
        if m not in vision_modules:
            m._is_hf_initialized = True  # type: ignore[attr-defined]
        else:
            m._is_hf_initialized = False  # type: ignore[attr-defined]
    model.initialize_weights()


def parameters_off_meta(model: nn.Module) -> Iterable[str]:
    """Names of parameters with real storage (for checks and reports)."""
    return [n for n, p in model.named_parameters() if p.device.type != "meta"]


def load_vision_only(
    adapter: Any,
    source: str,
    dtype: torch.dtype,
    device: torch.device,
    attn_implementation: str | None = None,
    config_prefix: str = "config:",
) -> tuple[nn.Module, Any, LoadReport]:
    """Model (vision side real, language model on ``meta``), processor and what was read.

    Args:
        adapter: the family adapter (``model_cls``, ``vision_prefixes``, ``load_processor``,
            ``config_and_processor``).
        source: a local checkpoint folder or ``config:<name>`` (already resolved).
        dtype: parameter dtype.
        device: where the vision side goes.
        attn_implementation: passed to the model's construction (``None``: transformers' default).
        config_prefix: the ``config:`` marker.

    Raises:
        UsageError: the folder has no safetensors, or lacks a vision-side tensor.
    """
    from transformers import AutoConfig

    prefixes = adapter.vision_prefixes
    report = LoadReport()
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if source.startswith(config_prefix):
        config, processor = adapter.config_and_processor(source[len(config_prefix) :])
        loaded = None
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise UsageError(f"{adapter.name}: vision-only loading needs a local checkpoint folder, got {source!r}")
        config = AutoConfig.from_pretrained(folder)
        processor = adapter.load_processor(str(folder))
    model = build_skeleton(adapter.model_cls, config, dtype, **kwargs)
    if not source.startswith(config_prefix):
        loaded = read_vision_tensors(Path(source), prefixes, key_renamer(model), report)
    materialise(model, prefixes, device, loaded, report)
    return model, processor, report


def supported(adapter: Any, source: str, device: torch.device, config_prefix: str = "config:") -> bool:
    """Whether ``source`` can be loaded vision-only: the family declares its vision side and the source
    is ``config:`` or a local folder of safetensors (an HF id or a ``.bin`` checkpoint is loaded whole), on
    a real device (not ``meta``)."""
    if not adapter.vision_prefixes or device.type == "meta":
        return False
    if source.startswith(config_prefix):
        return True
    folder = Path(source)
    return (folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file()
