"""The model-family adapter contract: everything downstream asks an adapter, never an if/elif on names.

A *family* (``llava``, ``idefics2``, ``qwen2.5vl``, ``qwen3.5``, ...) is one ``FamilyAdapter`` subclass
registered with ``@register``, in one module that discovery imports (``src/models/families/`` or a folder
on ``$VLMC_FAMILY_PATH``: :mod:`vlmc.models.families`). It knows how to

* resolve a *source* string into weights: an HF id, a local folder, ``tiny`` (an offline tiny
  variant built from the family's transformers config with seeded weights, saved to a folder and
  loaded through the same ``from_pretrained`` path) or ``config:<name>`` (real published dimensions,
  random weights, no download);
* run only the vision tower and the connector and return E_pre / E_post **per image, in canonical
  spatial order** (row-major over the patch grid; CLS dropped exactly as the model does);
* apply the model's real connector to a given E_pre (for reconstructed vectors);
* generate captions from images, optionally with a replacement E_post injected.

Token order conventions (the on-disk contract relies on them):
    E_pre[i]  is [T_pre, D_pre], row-major over the pre grid ``pre_grid`` (h, w).
    E_post[i] is [T_post, D_post], row-major over ``post_grid`` (h', w') when the family has a
    spatial correspondence (``1:1`` or ``merge``), else in the connector's own latent order.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from PIL import Image
from torch import Tensor, nn

from vlmc.utils.cli import UsageError

CorrespondenceKind = Literal["1:1", "merge", "none"]
RealShapes = tuple[tuple[int, int], tuple[int, int]]  # ((T_pre, D_pre), (T_post, D_post)) of one image

# Side (px) of the square image ``FamilyAdapter.real_shapes`` are published for.
REAL_SHAPES_IMG_SIZE = 336


@dataclass(frozen=True)
class TinyDims:
    """Dimensions of an offline small variant (the random ``tiny`` one or the trained testbed one).

    Attributes:
        image: input side in pixels (Qwen: the side of the largest image, ``max_pixels = image**2``).
        patch: vision patch side in pixels.
        vision_hidden: vision tower width (heads: ``vision_hidden // 16``; MLP: 2x width).
        vision_layers: vision tower depth.
        text_hidden: LM width (4 heads, 2 KV heads; MLP: 2x width).
        text_layers: LM depth.
        latents: Idefics2 perceiver latents (other families ignore it).
        pixel_mean: image-processor normalisation mean for every channel (``None``: the family's default).
        pixel_std: image-processor normalisation std for every channel (``None``: the family's default).
    """

    image: int
    patch: int
    vision_hidden: int
    vision_layers: int
    text_hidden: int
    text_layers: int
    latents: int = 8
    pixel_mean: float | None = None
    pixel_std: float | None = None

    @property
    def vision_heads(self) -> int:
        return max(1, self.vision_hidden // 16)

    def normalisation(self) -> dict[str, list[float]]:
        """``image_mean`` / ``image_std`` image-processor kwargs (empty: keep the processor's defaults)."""
        if self.pixel_mean is None or self.pixel_std is None:
            return {}
        return {"image_mean": [self.pixel_mean] * 3, "image_std": [self.pixel_std] * 3}



@dataclass(frozen=True)
class Correspondence:
    """How pre tokens map onto post tokens.

    Attributes:
        kind: ``1:1`` (post token i comes from pre token i), ``merge`` (post token (r, c) comes from
            the ``merge x merge`` block of pre tokens at rows r*merge.., cols c*merge..), or ``none``
            (no token correspondence, e.g. a perceiver resampler's learned latents).
        merge: side of the merged block (2 for Qwen's 2x2 patch merger); 1 otherwise.
    """

    kind: CorrespondenceKind
    merge: int = 1

    def __str__(self) -> str:
        return {"1:1": "1:1", "none": "none"}.get(self.kind, f"merge {self.merge}x{self.merge}")


@dataclass
class Captured:
    """E_pre / E_post of a batch, one tensor per image (token counts may differ between images).

    Attributes:
        pre: per image ``[T_pre_i, D_pre]`` in canonical spatial order.
        post: per image ``[T_post_i, D_post]``.
        pre_grid: per image ``(h, w)`` of the pre token grid (``h * w == T_pre_i``).
        post_grid: per image ``(h, w)`` of the post grid, or ``(T_post_i, 1)`` without correspondence.
        modules: optional extra captures from ``--modules`` globs: module name → per-image tensors.
    """

    pre: list[Tensor]
    post: list[Tensor]
    pre_grid: list[tuple[int, int]]
    post_grid: list[tuple[int, int]]
    modules: dict[str, list[Tensor]] = field(default_factory=dict)


@dataclass
class VLM:
    """A loaded model with its processor and the adapter that drives it.

    With ``vision_only`` only the vision tower and connector hold weights (``vlmc.models.partial``):
    ``encode`` / ``apply_connector`` work, generation does not.
    """

    adapter: FamilyAdapter
    model: nn.Module
    processor: Any
    source: str
    device: torch.device
    dtype: torch.dtype
    vision_only: bool = False  # only the vision tower + connector hold weights (the LM is on ``meta``)
    revision: str | None = None  # the commit hash of an HF id

    @property
    def name(self) -> str:
        return self.adapter.name


class FamilyAdapter:
    """Base class of a model family. Subclasses set the class attributes and implement the hooks.

    A family is one module (see :mod:`vlmc.models.families`): everything the stages, the tests and the
    figures need to know about it is on its adapter. The public protocol is the class attributes below
    and the methods of this class; code outside ``vlmc.models`` never calls an adapter's ``_private``
    helpers or asks ``hasattr``.

    Class attributes:
        name: registry name (``llava``).
        default_id: the HF id used when no source is given.
        correspondence: pre→post token correspondence.
        real_configs: ``config:<name>`` → zero-argument callable building the published config.
        real_shapes: ``config`` name → the published per-image ``((T_pre, D_pre), (T_post, D_post))`` of
            one :data:`REAL_SHAPES_IMG_SIZE`-px square image (no image splitting); the generic tests
            check ``config:<name>`` against it. Configs without an entry are checked for consistency only.
        default_prompt: the captioning instruction.
        vision_prefixes: parameter-name prefixes of the vision tower and the connector (everything
            ``encode`` / ``apply_connector`` run); vision-only loading (``vlmc.models.partial``)
            materialises these and leaves the rest (the language model) on ``meta``. Empty: the
            family cannot load its vision side alone.
        pixel_keys: the ``prompt_inputs`` entries that carry pixels; dropped from the LM inputs when a
            replacement E_post is injected (``injected_outputs``), so the image reaches the LM only
            through it.
        deepstack_default: families whose LM also reads *deepstack* features from intermediate vision
            layers (Qwen3-VL): the mode ``generate`` / ``injected_outputs`` use when given none
            (``"original"``: the images' own; ``"zero"``). ``None``: the family has no deepstack path
            (``has_deepstack`` is false and a ``deepstack`` argument is a ``TypeError``).
        tiny_version: bumped when ``build_tiny`` changes, so cached tiny variants are rebuilt.
        label: display name in figures and tables (``""``: the registry name).
        color: fixed figure colour (``None``: a stable pick from a spare palette).
        display_rank: position among the families in figures and tables (``None``: after the ranked
            ones, alphabetically).
    """

    name: ClassVar[str]
    default_id: ClassVar[str]
    correspondence: ClassVar[Correspondence]
    real_configs: ClassVar[dict[str, Callable[[], Any]]] = {}
    real_shapes: ClassVar[dict[str, RealShapes]] = {}
    default_prompt: ClassVar[str] = "Describe the image in one sentence."
    vision_prefixes: ClassVar[tuple[str, ...]] = ()
    pixel_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)
    deepstack_default: ClassVar[str | None] = None
    tiny_version: ClassVar[int] = 1
    label: ClassVar[str] = ""
    color: ClassVar[str | None] = None
    display_rank: ClassVar[int | None] = None

    @property
    def has_deepstack(self) -> bool:
        """Whether the LM also reads deepstack features next to E_post (see ``deepstack_default``)."""
        return self.deepstack_default is not None

    def _refuse_deepstack(self, deepstack: Any) -> None:
        """A ``deepstack`` value for a family without deepstack features is a caller's mistake."""
        if deepstack is not None and not self.has_deepstack:
            raise TypeError(f"{self.name} has no deepstack features; got deepstack={deepstack!r}")

    @property
    def builds_testbed(self) -> bool:
        """Whether the family implements ``build_testbed`` (a variant small enough to train on scenes)."""
        return type(self).build_testbed is not FamilyAdapter.build_testbed

    @property
    def display_label(self) -> str:
        """``label``, or the registry name when the family sets none."""
        return self.label or self.name

    # -- weights ---------------------------------------------------------------------------------
    def build_tiny(self, out_dir: Path, seed: int = 0) -> None:
        """Build the offline tiny variant (model + processor) and ``save_pretrained`` it to ``out_dir``."""
        raise NotImplementedError

    def build_testbed(self, out_dir: Path, seed: int = 0) -> None:
        """Save an *untrained* testbed variant (default init) to ``out_dir`` for ``src/train/train_testbed.py``."""
        raise NotImplementedError

    def load_pretrained(
        self, path: str, dtype: torch.dtype, device: torch.device, attn_implementation: str | None = None
    ) -> tuple[nn.Module, Any]:
        """``from_pretrained(path)`` of model and processor (a local folder or an HF id).

        ``attn_implementation`` goes to ``from_pretrained`` (``None``: transformers' default).
        """
        raise NotImplementedError

    def build_from_config(
        self, config_name: str, dtype: torch.dtype, device: torch.device, attn_implementation: str | None = None
    ) -> tuple[nn.Module, Any]:
        """Model at real published dimensions with random weights (``device='meta'`` allowed) + an offline processor."""
        raise NotImplementedError

    def load_processor(self, path: str) -> Any:
        """The processor of a checkpoint folder alone (vision-only loading)."""
        raise NotImplementedError

    def config_and_processor(self, config_name: str) -> tuple[Any, Any]:
        """The published config of ``config:<config_name>`` and its offline processor (vision-only loading)."""
        raise NotImplementedError

    # -- vision path -----------------------------------------------------------------------------
    def preprocess(self, processor: Any, images: Sequence[Image.Image], img_size: int | None) -> dict[str, Tensor]:
        """Pixel inputs for ``images`` only (no text): what ``encode`` needs."""
        raise NotImplementedError

    def image_tensors(self, images: Sequence[Image.Image], img_size: int | None) -> list[Tensor]:
        """Worker side of device preprocessing: decoded images → uint8 ``[3, H, W]`` tensors.

        Only what ``preprocess`` does with PIL before the model's image processor (RGB conversion,
        a family's own PIL resize) happens here; the processor itself runs in ``preprocess_tensors``.
        """
        raise NotImplementedError

    def preprocess_tensors(
        self, processor: Any, images: Sequence[Tensor], img_size: int | None, device: torch.device
    ) -> dict[str, Tensor]:
        """The model's own image processor over ``image_tensors`` output, batched on ``device``.

        Bit-identical to ``preprocess`` on the same images (tests); the results stay on ``device``.
        """
        raise NotImplementedError

    def encode(self, vlm: VLM, pixel_inputs: dict[str, Tensor]) -> Captured:
        """Run vision tower + connector only (never the LM); E_pre/E_post per image, canonical order."""
        raise NotImplementedError

    def connector_module(self, model: nn.Module) -> nn.Module:
        """The connector ``nn.Module`` (for ``--list-modules``, training and hooks)."""
        raise NotImplementedError

    def apply_connector(self, vlm: VLM, pre: Sequence[Tensor], pre_grid: Sequence[tuple[int, int]]) -> list[Tensor]:
        """The model's real connector applied to E_pre given in canonical order; E_post in canonical order."""
        raise NotImplementedError

    def vision_module_rows(
        self, vlm: VLM, name: str, out: Tensor | None, pixel_inputs: dict[str, Tensor], n: int
    ) -> list[Tensor]:
        """Per-image rows of module ``name``'s output captured during ``encode`` (``--modules``).

        Default: a batch-first output (``[n, ...]``), row ``i`` per image. Families whose tower runs
        on flat token sequences (Qwen) split them per image and restore canonical order.

        Raises:
            UsageError: the output is not per image.
        """
        if out is None or out.ndim < 1 or out.shape[0] != n:
            shape = None if out is None else tuple(out.shape)
            raise UsageError(f"module {name} output {shape} is not per image (first dim != batch {n})")
        return list(out.unbind(0))

    def image_token_id(self, vlm: VLM) -> int:
        """The prompt token the LM replaces by E_post (one per E_post token): ``config.image_token_id``."""
        token = getattr(vlm.model.config, "image_token_id", None)
        if token is None:
            raise UsageError(f"{self.name}: the model config names no image_token_id")
        return int(token)

    def native_img_size(self, model: nn.Module) -> int | None:
        """The only square side (px) the vision tower accepts, or ``None`` when any patch-divisible size works.

        Default ``None``; fixed-resolution towers (LLaVA's CLIP) return their configured size.
        """
        return None

    def token_orders(self, vlm: VLM, inputs: Mapping[str, Any]) -> tuple[Tensor, Tensor | None] | None:
        """How the connector's own token order relates to canonical order for a batch of ``inputs``.

        Args:
            vlm: the loaded model.
            inputs: ``prompt_inputs`` / ``preprocess`` output of the batch.

        Returns:
            ``None`` (default) when the connector sees ``[B, T_pre, D_pre]`` rows in canonical order;
            else ``(pre_index, post_perm)`` cpu tensors for a connector that runs on one flat token
            sequence: ``flat[pre_index]`` is E_pre of all images concatenated in canonical order, and
            ``merged[post_perm]`` (``post_perm`` ``None``: identity) puts its output in canonical order.
        """
        return None

    # -- language path ---------------------------------------------------------------------------
    def prompt_inputs(
        self, vlm: VLM, images: Sequence[Image.Image], prompt: str | None = None, img_size: int | None = None
    ) -> dict[str, Tensor]:
        """The exact model inputs ``generate`` starts from, on the cpu (callers move them to the model).

        Chat-templated prompt rows (left padded, image tokens expanded) plus pixel inputs
        (``pixel_keys``): training on ``prompt_inputs`` followed by caption ids teaches the model the
        sequences greedy decoding continues.
        """
        raise NotImplementedError

    def injected_outputs(
        self, vlm: VLM, inputs: Mapping[str, Any], post: Sequence[Tensor], deepstack: str | None = None
    ) -> dict[str, Any]:
        """The ``mm_encoder_outputs`` argument that makes the LM read ``post`` as the images' features.

        Used by ``generate`` and for training a replacement connector through the LM (the tensors keep
        their autograd graph). Remove ``pixel_keys`` from the LM inputs that go with it.

        Args:
            vlm: the loaded model.
            inputs: the batch's ``prompt_inputs`` (image grids, for families that need them).
            post: per-image E_post in canonical order (``encode``'s shapes).
            deepstack: ``"original"`` / ``"zero"`` for families with ``has_deepstack`` (``None``:
                ``deepstack_default``); a ``TypeError`` for the others.
        """
        raise NotImplementedError

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
        """Greedy captions for a batch (left padding, KV cache).

        With ``post`` the model's own E_post is replaced by the given per-image tensors (canonical
        order, same shapes as ``encode`` returns), so stored / reconstructed / perturbed embeddings
        can be decoded. Without it the model captions the images itself. ``deepstack``: see
        ``injected_outputs`` (only with ``post``).
        """
        raise NotImplementedError


_REGISTRY: dict[str, FamilyAdapter] = {}


def register(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Class decorator: add a family adapter to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"family {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def get_adapter(name: str) -> FamilyAdapter:
    """The adapter registered as ``name``; a ``UsageError`` listing the known names otherwise."""
    _import_families()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def families() -> list[str]:
    """Registered family names, sorted."""
    _import_families()
    return sorted(_REGISTRY)


def display_order(names: Iterable[str]) -> list[str]:
    """Distinct ``names`` as figures and tables show them: families by ``display_rank``, then the rest
    (unranked families, other models such as a reference CLIP) alphabetically."""
    _import_families()

    def key(name: str) -> tuple[int, int, str]:
        adapter = _REGISTRY.get(name)
        rank = None if adapter is None else adapter.display_rank
        return (1, 0, name) if rank is None else (0, rank, name)

    return sorted(set(names), key=key)


def _import_families() -> None:
    """Import every family module (built-in and ``$VLMC_FAMILY_PATH``: :func:`vlmc.models.families.discover`)."""
    from vlmc.models.families import discover

    discover()


def tiny_cache_dir() -> Path:
    """Where offline tiny variants are built (``$VLMC_CACHE`` or ``~/.cache/vlmc``)."""
    return Path(os.environ.get("VLMC_CACHE", Path.home() / ".cache" / "vlmc"))


# -- module capture by glob (VLM-Lens style) ------------------------------------------------------


def list_modules(model: nn.Module) -> list[tuple[str, str]]:
    """``(name, class name)`` of every named module."""
    return [(n, type(m).__name__) for n, m in model.named_modules() if n]


def match_modules(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of modules matching any Unix glob in ``patterns`` (``*`` spans dots too)."""
    names = [n for n, _ in model.named_modules() if n]
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


@contextmanager
def capture_modules(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Forward hooks storing each named module's output tensor (first tensor of tuples/ModelOutputs)."""
    store: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    handles = []

    def hook_for(name: str):
        def hook(_mod: nn.Module, _args: Any, out: Any) -> None:
            store[name] = _first_tensor(out).detach()

        return hook

    for n in names:
        handles.append(modules[n].register_forward_hook(hook_for(n)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "values"):
        out = list(out.values())
    for item in out:
        if isinstance(item, Tensor):
            return item
    raise TypeError(f"module output of type {type(out).__name__} holds no tensor")
