"""Every registered model family (``vlmc.models.base.families()``) against the adapter contract.

On each family's offline tiny variant (built fresh into a temporary ``VLMC_CACHE``):
* it builds and loads through ``load_vlm(name, "tiny")`` (``from_pretrained`` / ``AutoProcessor``);
* ``encode`` never touches the LM, its E_post equals the model's own ``get_image_features`` output,
  its E_pre is exactly the connector's input (up to token order), grids match the correspondence;
* ``apply_connector(E_pre)`` reproduces E_post;
* generation with the captured E_post injected gives the model's own token ids, and injecting another
  image's E_post gives that image's caption;
* the model depends on its image (distinct E_post, ≥ 2 distinct captions over 4 images);
* module globs capture one vision-tower layer and the connector.
At real published dimensions (``config:<name>``, random weights on the ``meta`` device): one
336×336 image gives the E_pre / E_post shapes of ``REAL_SHAPES`` below.

Family-specific expectations live in the tables below (or an adapter's optional ``real_shapes``
class attribute), so a newly registered family is covered by every generic test at once.
"""

from __future__ import annotations

import inspect
import os
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from torch import Tensor

from vlmc.models.base import (
    VLM,
    capture_modules,
    families,
    get_adapter,
    list_modules,
    match_modules,
)
from vlmc.models.load import load_vlm

try:
    from _models_util import shape_image, shape_images
except ImportError:
    from tests._models_util import shape_image, shape_images

torch.set_num_threads(2)

FAMILIES = families()
REAL_CONFIGS = [(f, c) for f in FAMILIES for c in sorted(get_adapter(f).real_configs)]

# The published checkpoints at 336×336, no image splitting: per image ((T_pre, D_pre), (T_post, D_post)).
REAL_SHAPES: dict[tuple[str, str], tuple[tuple[int, int], tuple[int, int]]] = {
    ("llava", "llava-1.5-7b"): ((576, 1024), (576, 4096)),
    ("idefics2", "idefics2-8b"): ((576, 1152), (64, 4096)),
    ("qwen2.5vl", "qwen2.5-vl-7b"): ((576, 1280), (144, 3584)),
    ("qwen3.5", "qwen3.5-9b"): ((400, 1152), (100, 4096)),
}
REAL_IMG = 336

# One vision-tower layer per family layout (transformers 5 module paths), for the glob-capture test.
TOWER_LAYER_GLOBS = ["model.vision_tower.*.layers.0", "model.vision_model.*.layers.0", "model.visual.blocks.0"]

# Families whose injected E_post is not the only path from the image to the LM, so injecting another
# image's E_post need not give that image's caption (the leak is documented and tested elsewhere).
INJECTION_LEAKS = {
    "qwen3vl": "deepstack='original' keeps each image's own deepstack features (tests/test_models_qwen.py)",
}

# The tiny variants must stay tiny (0.1–6 M parameters).
TINY_PARAMS = (100_000, 6_000_000)

N_IMAGES = 4
MAX_NEW = 8


def expected_real_shapes(family: str, config: str):
    adapter = get_adapter(family)
    return getattr(adapter, "real_shapes", {}).get(config) or REAL_SHAPES.get((family, config))


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """Build every tiny variant afresh (a stale ~/.cache/vlmc must not hide a builder change)."""
    old = os.environ.get("VLMC_CACHE")
    os.environ["VLMC_CACHE"] = str(tmp_path_factory.mktemp("vlmc_cache"))
    yield os.environ["VLMC_CACHE"]
    if old is None:
        os.environ.pop("VLMC_CACHE", None)
    else:
        os.environ["VLMC_CACHE"] = old


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tiny_cache):
    """(vlm, images, pixel inputs, captured) for one family's tiny variant."""
    t0 = time.perf_counter()
    vlm = load_vlm(request.param, "tiny")
    images = shape_images(N_IMAGES)
    pix = vlm.adapter.preprocess(vlm.processor, images, None)
    cap = vlm.adapter.encode(vlm, pix)
    print(f"{request.param}: tiny built+loaded+encoded in {time.perf_counter() - t0:.2f}s")
    return vlm, images, pix, cap


class GenerateRecorder:
    """Wraps ``model.generate`` to keep what it returned (token ids), whatever the adapter does around it."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self._orig = model.generate

    def __enter__(self):
        def generate(*args, **kwargs):
            out = self._orig(*args, **kwargs)
            self.calls.append((kwargs, out.clone()))
            return out

        self.model.generate = generate
        return self

    def __exit__(self, *exc):
        del self.model.generate  # back to the class method


def own_reference_post(vlm: VLM, pix: dict[str, Tensor]) -> list[Tensor]:
    """E_post from the model's own image-feature path (the one ``generate`` uses on pixels)."""
    fn = vlm.model.model.get_image_features
    names = {n for n, p in inspect.signature(fn).parameters.items() if p.kind is not p.VAR_KEYWORD}
    kwargs = {k: v.to(vlm.device) for k, v in pix.items() if k in names}
    with torch.no_grad():
        out = fn(**kwargs, return_dict=True)
    return list(out.pooler_output)


def same_rows(a: Tensor, b: Tensor, atol: float = 1e-5) -> bool:
    """Equal as multisets of rows (token order ignored): every row has an (almost) exact twin on the other side.

    Nearest-neighbour matching both ways, not sorting: synthetic images give near-duplicate rows whose
    sort order is decided by rounding noise.
    """
    a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    if a.shape != b.shape:
        return False
    d = torch.cdist(a, b)
    return bool(d.min(1).values.max() <= atol and d.min(0).values.max() <= atol)


def connector_name(vlm: VLM) -> str:
    conn = vlm.adapter.connector_module(vlm.model)
    return next(n for n, m in vlm.model.named_modules() if m is conn)


# -- registry -------------------------------------------------------------------------------------


def test_registry_has_the_project_families():
    assert {"llava", "idefics2"} <= set(FAMILIES)
    for f in FAMILIES:
        a = get_adapter(f)
        assert a.name == f and a.default_id and a.correspondence.kind in ("1:1", "merge", "none")
        assert a.real_configs, f"{f}: no real_configs"


# -- tiny variants ------------------------------------------------------------------------------


def test_tiny_loads_offline_and_is_small(tiny):
    vlm, _, _, _ = tiny
    n = sum(p.numel() for p in vlm.model.parameters())
    assert TINY_PARAMS[0] <= n <= TINY_PARAMS[1], f"{vlm.name}: {n} parameters"
    assert not vlm.model.training
    assert os.path.isdir(vlm.source) and os.path.exists(os.path.join(vlm.source, "config.json"))
    tok = vlm.processor.tokenizer
    vocab = vlm.model.get_input_embeddings().weight.shape[0]
    assert len(tok) <= vocab, f"tokenizer ids ({len(tok)}) exceed the embedding table ({vocab})"
    assert hasattr(vlm.processor, "image_processor") and vlm.processor.chat_template


def test_encode_shapes_and_grids(tiny):
    vlm, _, _, cap = tiny
    corr = vlm.adapter.correspondence
    assert len(cap.pre) == len(cap.post) == len(cap.pre_grid) == len(cap.post_grid) == N_IMAGES
    for pre, post, (h, w), (ph, pw) in zip(cap.pre, cap.post, cap.pre_grid, cap.post_grid, strict=True):
        assert pre.ndim == post.ndim == 2
        assert pre.shape[0] == h * w and post.shape[0] == ph * pw
        if corr.kind == "1:1":
            assert (ph, pw) == (h, w)
        elif corr.kind == "merge":
            assert (ph, pw) == (h // corr.merge, w // corr.merge)
        else:
            assert pw == 1
        assert torch.isfinite(pre).all() and torch.isfinite(post).all()


def test_encode_runs_only_vision_and_connector(tiny):
    vlm, _, pix, _ = tiny

    def boom(*_a, **_k):
        raise AssertionError("encode touched the language model")

    handles = [
        vlm.model.get_input_embeddings().register_forward_pre_hook(boom),
        vlm.model.get_output_embeddings().register_forward_pre_hook(boom),
    ]
    try:
        vlm.adapter.encode(vlm, pix)
    finally:
        for h in handles:
            h.remove()


def test_post_equals_models_own_image_features(tiny):
    vlm, _, pix, cap = tiny
    ref = own_reference_post(vlm, pix)
    assert len(ref) == N_IMAGES
    for mine, theirs in zip(cap.post, ref, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)


def test_pre_is_the_connector_input(tiny):
    vlm, _, pix, cap = tiny
    seen = {}
    conn = vlm.adapter.connector_module(vlm.model)
    h = conn.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0].detach()))
    try:
        vlm.adapter.encode(vlm, pix)
    finally:
        h.remove()
    assert same_rows(seen["x"], torch.cat(cap.pre)), "E_pre is not the connector's input"


def test_apply_connector_reproduces_post(tiny):
    vlm, _, _, cap = tiny
    with torch.no_grad():
        again = vlm.adapter.apply_connector(vlm, cap.pre, cap.pre_grid)
    assert len(again) == N_IMAGES
    for a, b in zip(again, cap.post, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_injected_post_gives_own_tokens(tiny):
    vlm, images, _, cap = tiny
    with GenerateRecorder(vlm.model) as rec:
        own = vlm.adapter.generate(vlm, images, max_new_tokens=MAX_NEW)
        injected = vlm.adapter.generate(vlm, images, max_new_tokens=MAX_NEW, post=cap.post)
        rolled = vlm.adapter.generate(vlm, images, max_new_tokens=MAX_NEW, post=cap.post[1:] + cap.post[:1])
    assert len(rec.calls) == 3, "generate must call model.generate once per batch"
    (_, ids_own), (kw_inj, ids_inj), _ = rec.calls
    assert ids_own.shape[0] == N_IMAGES
    assert torch.equal(ids_own, ids_inj), "injected E_post did not reproduce the model's own tokens"
    assert own == injected
    assert not any(k.startswith("pixel_values") for k in kw_inj), "pixels were passed alongside the injected post"
    if vlm.name not in INJECTION_LEAKS:
        assert rolled == own[1:] + own[:1], "another image's E_post must give that image's caption"
    assert all(isinstance(c, str) and c == c.strip() for c in own)


def test_batch_equals_one_by_one(tiny):
    """Batching (left padding where token counts differ) changes neither E_post nor the captions."""
    vlm, _, _, _ = tiny
    images = [shape_image(0, 96), shape_image(1, 64, width=128), shape_image(2, 120, width=72)]
    pix = vlm.adapter.preprocess(vlm.processor, images, None)
    batch = vlm.adapter.encode(vlm, pix)
    captions = vlm.adapter.generate(vlm, images, max_new_tokens=MAX_NEW)
    for i, im in enumerate(images):
        one = vlm.adapter.encode(vlm, vlm.adapter.preprocess(vlm.processor, [im], None))
        torch.testing.assert_close(one.post[0], batch.post[i], rtol=1e-4, atol=1e-5)
        assert vlm.adapter.generate(vlm, [im], max_new_tokens=MAX_NEW) == [captions[i]]


def test_depends_on_the_image(tiny):
    vlm, images, _, cap = tiny
    post = torch.stack([p.float() for p in cap.post])
    scale = post.abs().mean()
    for i in range(N_IMAGES):
        for j in range(i + 1, N_IMAGES):
            assert (post[i] - post[j]).abs().max() > 1e-2 * scale, f"E_post of images {i} and {j} coincide"
    captions = vlm.adapter.generate(vlm, images, max_new_tokens=MAX_NEW)
    print(f"{vlm.name} captions: {captions}")
    assert len(set(captions)) >= 2, f"{vlm.name}: one caption for all images: {captions}"
    assert all(captions), "empty captions"


def test_wrong_post_shape_is_rejected(tiny):
    vlm, images, _, cap = tiny
    bad = [p[:-1] for p in cap.post]
    with pytest.raises(Exception):  # noqa: B017 - any clear error, not a silent mis-injection
        vlm.adapter.generate(vlm, images, max_new_tokens=2, post=bad)


def test_glob_capture_of_a_tower_layer_and_the_connector(tiny):
    vlm, _, pix, cap = tiny
    names = [n for n, _ in list_modules(vlm.model)]
    layer = match_modules(vlm.model, TOWER_LAYER_GLOBS)
    assert len(layer) == 1 and layer[0] in names, f"tower-layer globs matched {layer}"
    conn = connector_name(vlm)
    assert match_modules(vlm.model, [conn]) == [conn]
    with capture_modules(vlm.model, [layer[0], conn]) as store:
        vlm.adapter.encode(vlm, pix)
    assert store[layer[0]].numel() > 0 and torch.isfinite(store[layer[0]]).all()
    assert same_rows(store[conn], torch.cat(cap.post)), "connector output capture differs from E_post"


def test_img_size_resizes_to_a_square(tiny):
    vlm, _, _, cap = tiny
    if vlm.name == "llava":
        size = vlm.model.config.vision_config.image_size  # CLIP runs at its native size only
    else:
        size = 2 * vlm.model.config.vision_config.patch_size * 4
    wide = [shape_image(0, 80, width=140), shape_image(1, 50, width=30)]
    pix = vlm.adapter.preprocess(vlm.processor, wide, size)
    c = vlm.adapter.encode(vlm, pix)
    assert len({tuple(p.shape) for p in c.pre}) == 1 and c.pre_grid[0] == c.pre_grid[1]
    assert vlm.adapter.generate(vlm, wide, max_new_tokens=2, img_size=size)


# -- family specifics ---------------------------------------------------------------------------


def test_idefics2_padded_batch(tiny_cache):
    """Aspect-preserving resize pads the batch: each image keeps its valid h×w patches; same E_post."""
    vlm = load_vlm("idefics2", "tiny")
    ip = vlm.processor.image_processor
    images = [shape_image(0, 64, width=64), shape_image(1, 32, width=64), shape_image(2, 64, width=48)]
    out = ip([[im] for im in images], return_tensors="pt", size={"shortest_edge": 16, "longest_edge": 64})
    pix = {"pixel_values": out["pixel_values"], "pixel_attention_mask": out["pixel_attention_mask"]}
    cap = vlm.adapter.encode(vlm, pix)
    assert cap.pre_grid == [(4, 4), (2, 4), (4, 3)]
    assert [p.shape[0] for p in cap.pre] == [16, 8, 12]
    for mine, theirs in zip(cap.post, own_reference_post(vlm, pix), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
    with torch.no_grad():
        again = vlm.adapter.apply_connector(vlm, cap.pre, cap.pre_grid)
    for a, b in zip(again, cap.post, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the unpadded image alone gives the same E_pre as inside the padded batch
    alone = vlm.adapter.encode(vlm, {k: v[:1] for k, v in pix.items()})
    torch.testing.assert_close(alone.pre[0], cap.pre[0], rtol=1e-5, atol=1e-5)


# -- real dimensions on meta --------------------------------------------------------------------


@pytest.mark.parametrize(("family", "config"), REAL_CONFIGS, ids=[f"{f}-{c}" for f, c in REAL_CONFIGS])
def test_real_config_shapes_on_meta(family, config):
    t0 = time.perf_counter()
    vlm = load_vlm(family, f"config:{config}", dtype=torch.bfloat16, device="meta")
    assert next(vlm.model.parameters()).device.type == "meta"
    pix = vlm.adapter.preprocess(vlm.processor, [shape_image(0, 500, width=400)], REAL_IMG)
    cap = vlm.adapter.encode(vlm, pix)
    (pre,), (post,) = cap.pre, cap.post
    assert pre.device.type == "meta" and post.device.type == "meta"
    assert pre.shape[0] == cap.pre_grid[0][0] * cap.pre_grid[0][1]
    assert post.shape[0] == cap.post_grid[0][0] * cap.post_grid[0][1]
    assert post.shape[1] == vlm.model.get_input_embeddings().weight.shape[1], "E_post is not in the LM's width"
    want = expected_real_shapes(family, config)
    if want is not None:
        assert (tuple(pre.shape), tuple(post.shape)) == want
    with torch.no_grad():
        again = vlm.adapter.apply_connector(vlm, cap.pre, cap.pre_grid)
    assert tuple(again[0].shape) == tuple(post.shape)
    tok = vlm.processor.tokenizer
    assert len(tok) <= vlm.model.get_input_embeddings().weight.shape[0]
    print(f"{family} {config}: pre {tuple(pre.shape)} post {tuple(post.shape)} in {time.perf_counter() - t0:.2f}s")
