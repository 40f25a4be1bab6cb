"""Stage 2 reference encoders (CLIP, SigLIP, DINOv2, any HF vision model, open_clip) as runner ``Encoder``s.

A reference encoder turns each image into ONE vector (kind ``ref``), used later as the reference
neighbourhood that E_pre / E_post kNN graphs are compared against (KNOR). Which tensor is pooled is
fixed per backend and written into every manifest (``pool_definition``); see :data:`POOL_DOC`.

Offline tiny references (seeded random weights, built once into the vlmc cache dir and then loaded
through the same ``from_pretrained(path)`` path a real checkpoint uses): ``tiny-clip`` (CLIPModel),
``tiny-dino`` (Dinov2Model), ``tiny-dino-reg`` (Dinov2WithRegistersModel, 2 register tokens).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from vlmc.data.scenes import SCENE_PIXEL_MEAN, SCENE_PIXEL_STD
from vlmc.extract.runner import Encoded
from vlmc.models.base import TinyDims
from vlmc.models.clip import hf_config, import_open_clip, load_hf, load_open_clip, pooled, testbed_clip_path
from vlmc.models.sources import OPEN_CLIP_PREFIX, OPEN_CLIP_SCHEMAS, Named, Source, resolve, source_help
from vlmc.utils.cli import UsageError

log = logging.getLogger(__name__)

MODEL_TYPES = ("auto", "clip", "siglip", "dino", "hf", "open_clip")
POOLS = ("cls", "mean")

# config.model_type values each HF reference family handles (anything else is the generic "hf" type).
HF_FAMILIES: dict[str, tuple[str, ...]] = {
    "clip": ("clip", "clip_vision_model"),
    "siglip": ("siglip", "siglip_vision_model"),
    "dino": ("dinov2", "dinov2_with_registers", "dinov3_vit"),
}

# The exact tensor behind each (model type, pool). Shown in --help and stored in every manifest.
POOL_DEFS: dict[tuple[str, str], str] = {
    ("clip", "cls"): (
        "CLIPModel.get_image_features = visual_projection(post_layernorm(CLS of the last layer)): projected, "
        "dim projection_dim (a CLIPVisionModel checkpoint without projection: post_layernorm(CLS), unprojected)"
    ),
    ("clip", "mean"): (
        "mean over the patch tokens of post_layernorm(last_hidden_state) (the same LayerNorm applied per "
        "token, as open_clip's ln_post does), CLS excluded, NOT projected: dim hidden_size"
    ),
    ("siglip", "cls"): (
        "SiglipModel.get_image_features = the attention-pooling (MAP) head over post_layernorm tokens; "
        "SigLIP has no CLS token and no projection: dim hidden_size"
    ),
    ("siglip", "mean"): "mean over all tokens of last_hidden_state (already post_layernorm; all are patches): dim hidden_size",
    ("dino", "cls"): "last_hidden_state[:, 0]: the CLS token after the final layernorm (= pooler_output), unprojected",
    ("dino", "mean"): (
        "mean of last_hidden_state[:, 1 + num_register_tokens:]: the patch tokens after the final layernorm; "
        "CLS and register tokens excluded"
    ),
    ("hf", "cls"): "the model's pooler_output (whatever the architecture defines), flattened",
    ("hf", "mean"): (
        "mean of last_hidden_state over all tokens ([B,T,D]) or all positions ([B,C,H,W]); prefix tokens "
        "(CLS/registers) are NOT excluded: use --ref_type clip|siglip|dino for those"
    ),
    ("open_clip", "cls"): (
        "model.encode_image(x) (not L2-normalised): the model's own pooled image embedding after ln_post "
        "and the projection (the CLS token for pool_type 'tok', i.e. OpenAI/LAION ViTs)"
    ),
    ("open_clip", "mean"): (
        "mean over the patch tokens of ln_post(last block output), CLS excluded, NOT projected: dim width "
        "(native open_clip ViTs without attentional pooling only; others are refused)"
    ),
}

POOL_DOC = "Pooling (--pool), exactly; vectors are stored raw, never L2-normalised:\n" + "\n".join(
    f"  {t} {p}: {d}" for (t, p), d in POOL_DEFS.items()
)


# -- offline tiny references -----------------------------------------------------------------------


@dataclass(frozen=True)
class TinyReference:
    """A buildable offline reference, shaped like a ``FamilyAdapter`` for ``vlmc.models.load.tiny_path``."""

    name: str
    build: Callable[[Path, int], None]
    tiny_version: int = 1

    def build_tiny(self, out_dir: Path, seed: int = 0) -> None:
        self.build(Path(out_dir), seed)


def _clip_tokenizer():
    from vlmc.models.tiny import train_word_tokenizer

    # CLIP's text tower pools at the first end token: every text must end with one (v1 lacked it, so
    # all texts pooled at <s> and got one embedding).
    return train_word_tokenizer([], append_eos=True)


def _build_clip(out_dir: Path, seed: int, dims: TinyDims, projection: int) -> None:
    """A small ``CLIPModel`` at ``dims`` (vision and text towers alike) with its processor, saved to ``out_dir``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from vlmc.models.tiny import seed_everything

    tok = _clip_tokenizer()
    tower = dict(hidden_size=dims.vision_hidden, intermediate_size=2 * dims.vision_hidden,
                 num_hidden_layers=dims.vision_layers, num_attention_heads=dims.vision_heads,
                 projection_dim=projection)  # fmt: skip
    vision = dict(tower, image_size=dims.image, patch_size=dims.patch)
    text = dict(tower, vocab_size=len(tok), max_position_embeddings=48, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    seed_everything(seed)
    model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=projection)).eval()
    model.save_pretrained(out_dir)
    size = {"shortest_edge": dims.image}
    crop = {"height": dims.image, "width": dims.image}
    CLIPImageProcessor(size=size, crop_size=crop, **dims.normalisation()).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


TINY_CLIP_DIMS = TinyDims(image=32, patch=8, vision_hidden=64, vision_layers=2, text_hidden=64, text_layers=2)
# The testbed CLIP (trained on scenes by src/train/train_testbed.py): 96 px, 6x6 patches.
TESTBED_CLIP_DIMS = TinyDims(
    image=96, patch=16, vision_hidden=96, vision_layers=3, text_hidden=96, text_layers=3,
    pixel_mean=SCENE_PIXEL_MEAN, pixel_std=SCENE_PIXEL_STD,
)  # fmt: skip


def build_tiny_clip(out_dir: Path, seed: int = 0) -> None:
    """A ~0.2 M parameter random CLIPModel (32 px, 8 px patches) with a CLIPImageProcessor and a tokenizer."""
    _build_clip(out_dir, seed, TINY_CLIP_DIMS, projection=32)


def build_testbed_clip(out_dir: Path, seed: int = 0) -> None:
    """The untrained testbed CLIPModel (96 px, 16 px patches, 3 + 3 layers, 64-d projection)."""
    _build_clip(out_dir, seed, TESTBED_CLIP_DIMS, projection=64)


def _build_tiny_dino(out_dir: Path, seed: int, registers: int) -> None:
    from transformers import (
        BitImageProcessor,
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    from vlmc.models.tiny import seed_everything

    dims = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32, patch_size=8)
    seed_everything(seed)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**dims, num_register_tokens=registers))
    else:
        model = Dinov2Model(Dinov2Config(**dims))
    model.eval().save_pretrained(out_dir)
    BitImageProcessor(  # DINOv2's own preprocessing (resize shortest edge, centre crop, ImageNet stats), scaled down
        size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_convert_rgb=True,
    ).save_pretrained(out_dir)


def build_tiny_dino(out_dir: Path, seed: int = 0) -> None:
    """A ~0.1 M parameter Dinov2Model (32 px, 8 px patches) with a BitImageProcessor."""
    _build_tiny_dino(out_dir, seed, registers=0)


def build_tiny_dino_reg(out_dir: Path, seed: int = 0) -> None:
    """As ``tiny-dino`` with 2 register tokens (Dinov2WithRegistersModel)."""
    _build_tiny_dino(out_dir, seed, registers=2)


TINY: dict[str, TinyReference] = {
    "tiny-clip": TinyReference("ref-clip", build_tiny_clip, tiny_version=2),
    "tiny-dino": TinyReference("ref-dino", build_tiny_dino),
    "tiny-dino-reg": TinyReference("ref-dino-reg", build_tiny_dino_reg),
}


TESTBED_REFERENCE = "testbed-clip"  # the CLIP trained by src/train/train_testbed.py (sample/models/clip)


def tiny_reference_path(model_id: str, seed: int = 0) -> Path:
    """Folder of an offline tiny reference, built on first use (atomic: safe for concurrent array jobs)."""
    from vlmc.models.load import tiny_path

    return tiny_path(TINY[model_id], seed=seed)  # type: ignore[arg-type]  (duck-typed adapter)


# -- encoders --------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class ReferenceEncoder:
    """Base class: one pooled vector per image (kind ``ref``); subclasses implement ``_embed``."""

    backend: str = ""

    def __init__(self, model_id: str, model_type: str, pool: str, device: torch.device, dtype: torch.dtype) -> None:
        self.model_id = model_id
        self.model_type = model_type
        self.pool = pool
        self.device = device
        self.dtype = dtype
        self.dim: int | None = None

    # runner Encoder protocol
    def meta(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "backend": self.backend,
            "model_type": self.model_type,
            "pool": self.pool,
            "pool_definition": POOL_DEFS[(self.model_type, self.pool)],
            "compute_dtype": _dtype_name(self.dtype),
            "normalized": False,
            "ref": {"tokens": None, "dim": self.dim},
            "kinds": ["ref"],
            **self._model_meta(),
        }

    def preprocess(self, images: list[Image.Image]) -> dict[str, Any]:
        raise NotImplementedError

    def encode(self, inputs: dict[str, Any], images: list[Image.Image]) -> Encoded:
        x = inputs["pixel_values"].to(self.device, self.dtype)
        vecs = self._embed(x).float()
        if vecs.dim() != 2 or vecs.shape[0] != len(images):
            raise RuntimeError(f"reference embedding has shape {tuple(vecs.shape)}, expected [{len(images)}, D]")
        if self.dim is not None and vecs.shape[1] != self.dim:
            raise RuntimeError(f"reference dim changed from {self.dim} to {vecs.shape[1]}")
        return Encoded(vectors={"ref": list(vecs)}, shapes={"ref": {"tokens": None, "dim": vecs.shape[1]}})

    def _embed(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _model_meta(self) -> dict[str, Any]:
        return {}

    def probe(self) -> int:
        """Encode one synthetic image: checks the pooling works for this model and fixes ``dim``."""
        img = Image.new("RGB", (48, 40))
        img.putdata([(x * 5 % 256, y * 6 % 256, (x + y) * 3 % 256) for y in range(40) for x in range(48)])
        with torch.inference_mode():
            enc = self.encode(self.preprocess([img]), [img])
        self.dim = int(enc.vectors["ref"][0].shape[0])
        return self.dim


class HFReferenceEncoder(ReferenceEncoder):
    """A transformers vision model loaded with ``from_pretrained(source)``, preprocessed by its image processor."""

    backend = "hf"

    def __init__(self, model_id: str, source: str, model_type: str, pool: str, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__(model_id, model_type, pool, device, dtype)
        self.source = source
        hf = load_hf(source, repr(model_id), device, dtype)
        config, self.model, self.processor = hf.config, hf.model, hf.image_processor
        self.hf_model_type = config.model_type
        self.num_prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)  # dino: CLS + registers
        self.revision: str | None = None  # the commit hash of an HF id (set by load_reference)
        self.random_weights = False

    def _model_meta(self) -> dict[str, Any]:
        return {"source": self.source, "revision": self.revision, "model_class": type(self.model).__name__,
                "hf_model_type": self.hf_model_type, "pretrained": None, "random_weights": self.random_weights}

    def preprocess(self, images: list[Image.Image]) -> dict[str, Any]:
        out = self.processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"]}

    def _embed(self, x: Tensor) -> Tensor:
        m, t, pool = self.model, self.model_type, self.pool
        if t == "clip":
            vision = m.vision_model
            if pool == "mean":
                h = vision(pixel_values=x).last_hidden_state
                return vision.post_layernorm(h[:, 1:]).float().mean(1)
            if hasattr(m, "get_image_features"):  # CLIPModel
                return pooled(m.get_image_features(pixel_values=x))
            out = m(pixel_values=x)
            return out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output
        if t == "siglip":
            vision = m.vision_model
            if pool == "mean":
                return vision(pixel_values=x).last_hidden_state.float().mean(1)
            out = m.get_image_features(pixel_values=x) if hasattr(m, "get_image_features") else vision(pixel_values=x)
            feats = pooled(out)
            if feats is None:
                raise UsageError(f"{self.model_id}: this SigLIP has no pooling head (vision_use_head=False); use --pool mean")
            return feats
        out = m(pixel_values=x)
        h = out.last_hidden_state
        if t == "dino":
            return h[:, 0] if pool == "cls" else h[:, self.num_prefix:].float().mean(1)
        # generic AutoModel
        if pool == "cls":
            feats = getattr(out, "pooler_output", None)
            if feats is None:
                raise UsageError(f"{self.model_id}: {type(m).__name__} returns no pooler_output; use --pool mean")
            return feats.flatten(1)
        if h.dim() == 4:  # conv nets: [B, C, H, W]
            return h.float().mean((2, 3))
        return h.float().mean(1)


class OpenClipReferenceEncoder(ReferenceEncoder):
    """An open_clip model: ``create_model_and_transforms(name, pretrained=tag_or_file)``."""

    backend = "open_clip"

    def __init__(self, model_id: str, name: str, pretrained: str | None, pool: str, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__(model_id, "open_clip", pool, device, dtype)
        open_clip = import_open_clip()
        schema = name.split(":", 1)[0] if name.startswith(("hf-hub:", "local-dir:")) else None
        if not name:
            raise UsageError("open_clip model name is empty (use --model_id open_clip:<name>, e.g. open_clip:ViT-B-32)")
        if schema is None and name.replace("/", "-") not in open_clip.list_models():
            raise UsageError(f"open_clip has no model config {name!r} (see open_clip.list_models())")
        if schema == "local-dir" and not Path(name.split(":", 1)[1]).is_dir():
            raise UsageError(f"open_clip local-dir {name.split(':', 1)[1]} does not exist")
        if schema is None and not pretrained:
            raise UsageError(
                f"open_clip model {name!r} needs --pretrained TAG|FILE or open_clip:{name}:<pretrained> "
                "(random weights are never a reference)"
            )
        if pretrained and schema is None and (os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))):
            if not Path(pretrained).is_file():
                raise UsageError(f"open_clip checkpoint {pretrained} does not exist")
            pretrained = str(Path(pretrained).resolve())
        precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        model, transform, _ = load_open_clip(name, pretrained if schema is None else None, device, precision)
        self.name, self.pretrained = name, pretrained
        self.model = model
        self.transform = transform
        visual = model.visual
        self.visual_class = type(visual).__name__
        if pool == "mean" and (not hasattr(visual, "forward_intermediates") or getattr(visual, "attn_pool", None) is not None
                               or not hasattr(visual, "ln_post") or not hasattr(visual, "class_embedding")):
            raise UsageError(
                f"--pool mean is not supported for open_clip {name} (vision tower {self.visual_class}): "
                "only native ViTs without attentional pooling expose their patch tokens; use --pool cls"
            )

    def _model_meta(self) -> dict[str, Any]:
        return {"source": self.name, "pretrained": self.pretrained, "revision": None,
                "model_class": f"{type(self.model).__name__}/{self.visual_class}", "hf_model_type": None}

    def preprocess(self, images: list[Image.Image]) -> dict[str, Any]:
        return {"pixel_values": torch.stack([self.transform(im) for im in images])}

    def _embed(self, x: Tensor) -> Tensor:
        if self.pool == "cls":
            return self.model.encode_image(x, normalize=False)
        out = self.model.visual.forward_intermediates(
            x, indices=1, normalize_intermediates=True, intermediates_only=True, output_fmt="NLC"
        )
        return out["image_intermediates"][-1].float().mean(1)  # ln_post(last block)[:, 1:] (CLS dropped)


# -- loading ---------------------------------------------------------------------------------------


def detect_model_type(hf_model_type: str) -> str:
    """``config.model_type`` → reference type (``clip``, ``siglip``, ``dino``; else ``hf``)."""
    for family, types in HF_FAMILIES.items():
        if hf_model_type in types:
            return family
    return "hf"


DEFAULT_REFERENCE = "openai/clip-vit-large-patch14"  # the seed pipeline's stage-2 reference


def reference_names() -> dict[str, Named]:
    """Stage 2's short names: the tiny references (random weights), the testbed CLIP, and the aliases
    ``tiny`` (= ``tiny-clip``) and ``testbed`` (= ``testbed-clip``) of the shared grammar."""

    names = {k: Named(functools.partial(lambda k: str(tiny_reference_path(k)), k), random_weights=True) for k in TINY}
    names["tiny"] = names["tiny-clip"]
    names[TESTBED_REFERENCE] = names["testbed"] = Named(testbed_clip_path)
    return names


REFERENCE_SOURCE_HELP = source_help(list(reference_names()), open_clip=True)


def resolve_hf_source(model_id: str, revision: str | None = None) -> Source:
    """A short name, a local folder or an HF id (through the HF cache) → its :class:`Source`."""
    return resolve(model_id, "--model_id", reference_names(), revision=revision)


def load_reference(
    model_id: str,
    model_type: str = "auto",
    pool: str = "cls",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    pretrained: str | None = None,
    revision: str | None = None,
) -> ReferenceEncoder:
    """Build the reference encoder for ``model_id`` and probe it once (fixes ``dim``; checks ``pool``).

    Args:
        model_id: ``tiny-clip`` | ``tiny-dino`` | ``tiny-dino-reg``, an HF id or local folder, or
            ``open_clip:<name>`` (``<name>`` a built-in open_clip architecture, ``hf-hub:org/repo`` or
            ``local-dir:/path``).
        model_type: ``auto`` (from ``config.model_type`` / the ``open_clip:`` prefix), ``clip``,
            ``siglip``, ``dino``, ``hf`` (generic AutoModel rule) or ``open_clip``.
        pool: ``cls`` or ``mean`` (see :data:`POOL_DEFS`).
        device: where the model runs.
        dtype: compute dtype.
        pretrained: open_clip only: a pretrained tag or a checkpoint file (or ``open_clip:<name>:<pretrained>``).
        revision: branch, tag or commit of an HF id; the manifest records the resolved commit.

    Raises:
        UsageError: unknown type or pool, model not found, type mismatch, unsupported pooling.
    """
    if model_type not in MODEL_TYPES:
        raise UsageError(f"unknown --ref_type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    if pool not in POOLS:
        raise UsageError(f"unknown --pool {pool!r}; choose one of {', '.join(POOLS)}")
    device = torch.device(device)
    is_oc = model_id.startswith(OPEN_CLIP_PREFIX)
    if is_oc or model_type == "open_clip":
        if model_type not in ("auto", "open_clip"):
            raise UsageError(f"--ref_type {model_type} conflicts with the open_clip model {model_id!r}")
        if revision:
            raise UsageError("--revision is for HF ids only (open_clip pins its weights by the pretrained tag)")
        name = model_id[len(OPEN_CLIP_PREFIX):] if is_oc else model_id
        if is_oc and ":" in name and not name.startswith(OPEN_CLIP_SCHEMAS):  # open_clip:<name>:<pretrained>
            name, tag = name.split(":", 1)
            if pretrained and pretrained != tag:
                raise UsageError(f"--model_id {model_id!r} names pretrained {tag!r} but --pretrained is {pretrained!r}")
            pretrained = tag
        enc: ReferenceEncoder = OpenClipReferenceEncoder(model_id, name, pretrained, pool, device, dtype)
    else:
        if pretrained:
            raise UsageError("--pretrained is for open_clip models only (HF models load their weights from --model_id)")
        src = resolve_hf_source(model_id, revision)
        source = str(src.path)
        hf_type = hf_config(source, repr(model_id)).model_type
        detected = detect_model_type(hf_type)
        if model_type not in ("auto", "hf") and model_type != detected:
            raise UsageError(
                f"--ref_type {model_type} does not fit {model_id} (config.model_type={hf_type!r}, "
                f"handled as {detected!r}); use --ref_type auto or hf"
            )
        kind = detected if model_type == "auto" else model_type
        enc = HFReferenceEncoder(model_id, source, kind, pool, device, dtype)
        enc.revision = src.commit
        if src.kind == "hub":
            enc.source = str(src.repo_id)  # the manifest names the id (and the commit), not the cache folder
        enc.random_weights = src.random_weights
    enc.probe()
    log.info("reference %s: %s, %s pool, dim %d (%s)", model_id, enc.backend, pool, enc.dim, POOL_DEFS[(enc.model_type, pool)])
    return enc
