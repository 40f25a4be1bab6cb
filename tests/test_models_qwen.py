"""Qwen-family adapters (qwen2.5vl, qwen3.5, qwen3vl): token order, splitting, window un-permutation,
connector round trip, generation (left padding, KV cache, injection) and Qwen3-VL's deepstack leak.

The order checks do not trust the adapter's index arithmetic: images are built so that every patch has
its own colour, and a *position-local* copy of the vision tower (attention and learned positions zeroed)
makes each E_pre row a function of its own patch only, so the expected canonical E_pre is computed
from the pixels alone.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from vlmc.models.base import VLM
from vlmc.models.families.qwen import DEEPSTACK_KEY, TINY_PATCH
from vlmc.models.load import load_vlm
from vlmc.utils.cli import UsageError

QWEN = ["qwen2.5vl", "qwen3.5", "qwen3vl"]
GRIDS = [(8, 12), (12, 8), (10, 10)]  # patch grids (h, w) of 64x96, 96x64 and 80x80 images
STEP = 15  # colour step between neighbouring patches


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    torch.set_num_threads(2)
    with pytest.MonkeyPatch.context() as mp:  # fresh tiny builds of this code, not a stale user cache
        mp.setenv("VLMC_CACHE", str(tmp_path_factory.mktemp("vlmc_cache")))
        yield


@pytest.fixture(scope="module")
def vlms(_env) -> dict[str, VLM]:
    return {name: load_vlm(name, "tiny") for name in QWEN}


def coded_image(h: int, w: int) -> Image.Image:
    """Patch (r, c) is a flat colour (10 + 15 r, 10 + 15 c, 128): decodable from pixel_values."""
    r = np.repeat(10 + STEP * np.arange(h), TINY_PATCH)[:, None].repeat(w * TINY_PATCH, 1)
    c = np.repeat(10 + STEP * np.arange(w), TINY_PATCH)[None, :].repeat(h * TINY_PATCH, 0)
    arr = np.stack([r, c, np.full_like(r, 128)], axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


def scenes(size: int = 64) -> list[Image.Image]:
    red = Image.new("RGB", (size, size), (220, 30, 30))
    blue = Image.new("RGB", (size, size), (30, 30, 220))
    circle = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(circle).ellipse((8, 8, size - 8, size - 8), fill=(0, 160, 0))
    ramp = np.linspace(0, 255, size)[None, :, None].repeat(size, 0).repeat(3, 2).astype(np.uint8)
    return [red, blue, circle, Image.fromarray(ramp)]


def decode_patch_coords(vlm: VLM, pixel_values: torch.Tensor) -> torch.Tensor:
    """(r, c) of every pixel_values row, read back from the patch colours (independent of any index code)."""
    ip = vlm.processor.image_processor
    mean = torch.tensor(ip.image_mean)[:, None]
    std = torch.tensor(ip.image_std)[:, None]
    rows = pixel_values.view(len(pixel_values), 3, -1)  # (C, T, p, p) flattened per row
    rgb = (rows * std + mean).mean(-1) * 255
    coords = torch.round((rgb[:, :2] - 10) / STEP).long()
    assert torch.allclose(rgb[:, :2], (10 + STEP * coords).float(), atol=0.5), "patch colours did not survive"
    return coords


def position_local(vlm: VLM) -> VLM:
    """A copy whose vision tower maps each patch on its own: attention outputs and pos_embed zeroed."""
    model = copy.deepcopy(vlm.model)
    visual = model.model.visual
    with torch.no_grad():
        for blk in visual.blocks:
            blk.attn.proj.weight.zero_()
            blk.attn.proj.bias.zero_()
        if hasattr(visual, "pos_embed"):
            visual.pos_embed.weight.zero_()
    return VLM(vlm.adapter, model, vlm.processor, vlm.source, vlm.device, vlm.dtype)


def local_features(vlm: VLM, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the position-local tower gives each pixel_values row (no attention, so no ordering at all)."""
    visual = vlm.model.model.visual
    with torch.no_grad():
        x = visual.patch_embed(pixel_values)
        for blk in visual.blocks:
            x = x + blk.mlp(blk.norm2(x))
    return x


def merge_canonical(vlm: VLM, pre: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """E_post row-major over (h/2, w/2) from canonical E_pre: merger of patches (2R..2R+1, 2C..2C+1)."""
    d = pre.shape[-1]
    blocks = pre.view(h // 2, 2, w // 2, 2, d).permute(0, 2, 1, 3, 4).reshape(-1, d)  # 4 rows per block
    with torch.no_grad():
        return vlm.model.model.visual.merger(blocks)


@pytest.mark.parametrize("name", QWEN)
def test_canonical_order_with_position_local_tower(vlms, name):
    vlm = position_local(vlms[name])
    images = [coded_image(h, w) for h, w in GRIDS]
    px = vlm.adapter.preprocess(vlm.processor, images, None)
    assert px["image_grid_thw"].tolist() == [[1, h, w] for h, w in GRIDS]
    cap = vlm.adapter.encode(vlm, px)
    assert cap.pre_grid == GRIDS
    assert cap.post_grid == [(h // 2, w // 2) for h, w in GRIDS]

    coords = decode_patch_coords(vlm, px["pixel_values"])
    feats = local_features(vlm, px["pixel_values"].float())
    offset = 0
    for i, (h, w) in enumerate(GRIDS):
        rc = coords[offset : offset + h * w]
        canon = rc[:, 0] * w + rc[:, 1]
        assert sorted(canon.tolist()) == list(range(h * w)), "each patch once per image"
        expected = torch.empty_like(feats[: h * w])
        expected[canon] = feats[offset : offset + h * w]
        torch.testing.assert_close(cap.pre[i], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(cap.post[i], merge_canonical(vlm, cap.pre[i], h, w), rtol=0, atol=1e-5)
        # the processor's own order is NOT canonical (else this test would prove nothing)
        assert not torch.equal(canon, torch.arange(h * w))
        offset += h * w


@pytest.mark.parametrize("name", QWEN)
def test_batch_split_matches_single_images(vlms, name):
    vlm = vlms[name]
    images = [coded_image(h, w) for h, w in GRIDS]
    cap = vlm.adapter.encode(vlm, vlm.adapter.preprocess(vlm.processor, images, None))
    for i, im in enumerate(images):
        one = vlm.adapter.encode(vlm, vlm.adapter.preprocess(vlm.processor, [im], None))
        torch.testing.assert_close(cap.pre[i], one.pre[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(cap.post[i], one.post[0], rtol=0, atol=1e-5)
        h, w = GRIDS[i]
        # post is the model's own spatial order and the 2x2 merge of canonical pre (real, non-local tower)
        torch.testing.assert_close(cap.post[i], merge_canonical(vlm, cap.pre[i], h, w), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", QWEN)
def test_post_is_models_image_features_and_connector_round_trip(vlms, name):
    vlm = vlms[name]
    px = vlm.adapter.preprocess(vlm.processor, [coded_image(h, w) for h, w in GRIDS], None)
    cap = vlm.adapter.encode(vlm, px)
    with torch.no_grad():
        own = vlm.model.model.get_image_features(px["pixel_values"], px["image_grid_thw"])
    for mine, theirs in zip(cap.post, own.pooler_output, strict=True):
        assert torch.equal(mine, theirs)
    again = vlm.adapter.apply_connector(vlm, cap.pre, cap.pre_grid)
    for a, b in zip(again, cap.post, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with pytest.raises(UsageError, match="grid"):
        vlm.adapter.apply_connector(vlm, [cap.pre[0][:-4]], [cap.pre_grid[0]])


@pytest.mark.parametrize("name", QWEN)
def test_tower_grid_inputs_computed_once_per_batch_shape_and_exact(vlms, name, monkeypatch):
    """encode hands the tower its grid-derived inputs (position ids, segments, windows, taps) from a cache
    keyed on the batch's grids: the helpers run once per batch shape, and E_post stays bit-identical to
    the model's own ``get_image_features`` (which computes them itself) batch after batch."""
    from vlmc.models.families import qwen

    vlm = vlms[name]
    qwen._TOWER_INPUTS.pop(vlm.model.model.visual, None)
    calls = []
    own = qwen.get_vision_position_ids
    monkeypatch.setattr(qwen, "get_vision_position_ids", lambda *a, **k: calls.append(1) or own(*a, **k))
    images = [coded_image(h, w) for h, w in GRIDS]
    for batch, expected_calls in ((images, 1), (images, 1), (images[::-1], 2), (images, 2)):
        px = vlm.adapter.preprocess(vlm.processor, batch, None)
        cap = vlm.adapter.encode(vlm, px)
        assert len(calls) == expected_calls
        with torch.no_grad():
            theirs = vlm.model.model.get_image_features(px["pixel_values"], px["image_grid_thw"]).pooler_output
        for mine, ref in zip(cap.post, theirs, strict=True):
            assert torch.equal(mine, ref)


def brute_force_window_index(grids, window_blocks):
    """Merge-block ids (global, processor order) sorted by (image, window row, window col, row, col)."""
    order, offset = [], 0
    for h, w in grids:
        hh, ww = h // 2, w // 2
        keys = [(R // window_blocks, C // window_blocks, R, C) for R in range(hh) for C in range(ww)]
        order += [offset + R * ww + C for _, _, R, C in sorted(keys)]
        offset += hh * ww
    return torch.tensor(order)


def test_qwen25_window_unpermutation_is_real_and_independent(vlms):
    vlm = vlms["qwen2.5vl"]
    visual = vlm.model.model.visual
    cfg = visual.config
    assert set(cfg.fullatt_block_indexes) != set(range(cfg.depth)), "tiny must have windowed layers"
    window_blocks = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
    grid_thw = torch.tensor([[1, h, w] for h, w in GRIDS])
    expected = brute_force_window_index(GRIDS, window_blocks)
    from transformers.vision_utils import get_vision_window_index

    model_index, _ = get_vision_window_index(
        grid_thw, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size
    )
    assert torch.equal(model_index, expected)
    assert not torch.equal(expected, torch.arange(len(expected))), "window permutation must be non-trivial"

    # adapter's vectorised gather index vs a per-token loop over (image, r, c)
    pre_index, post_perm = vlm.adapter.token_orders(vlm, {"image_grid_thw": grid_thw})
    row_of_block = {int(b): j for j, b in enumerate(expected)}
    loop, patch_offset, block_offset = [], 0, 0
    for h, w in GRIDS:
        for r in range(h):
            for c in range(w):
                block = block_offset + (r // 2) * (w // 2) + c // 2
                loop.append(row_of_block[block] * 4 + (r % 2) * 2 + c % 2)
        patch_offset += h * w
        block_offset += h * w // 4
    assert torch.equal(pre_index, torch.tensor(loop))
    assert torch.equal(post_perm, torch.argsort(expected))


def greedy_no_cache(vlm: VLM, images, max_new_tokens: int) -> list[str]:
    """Reference decoding: full forward every step (no KV cache), M-RoPE positions recomputed each time."""
    inputs = vlm.adapter.prompt_inputs(vlm, images)
    ids, mask, mm = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    tok = vlm.processor.tokenizer
    for _ in range(max_new_tokens):
        vlm.model.model.rope_deltas = None
        with torch.no_grad():
            logits = vlm.model(
                input_ids=ids,
                attention_mask=mask,
                mm_token_type_ids=mm,
                pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"],
                use_cache=False,
            ).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        ids, mask, mm = (
            torch.cat([ids, nxt], 1),
            torch.cat([mask, torch.ones_like(nxt)], 1),
            torch.cat([mm, torch.zeros_like(nxt)], 1),
        )
    vlm.model.model.rope_deltas = None
    out = []
    for row in ids[:, inputs["input_ids"].shape[1] :].tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        out.append(tok.decode(row, skip_special_tokens=True).strip())
    return out


@pytest.mark.parametrize("name", QWEN)
def test_generation_padding_cache_and_injection(vlms, name):
    vlm = vlms[name]
    images = [coded_image(h, w) for h, w in GRIDS] + scenes()[:1]
    own = vlm.adapter.generate(vlm, images, max_new_tokens=8)
    assert own == [vlm.adapter.generate(vlm, [im], max_new_tokens=8)[0] for im in images], "left padding"
    assert own == greedy_no_cache(vlm, images, 8), "KV cache / M-RoPE positions"
    cap = vlm.adapter.encode(vlm, vlm.adapter.preprocess(vlm.processor, images, None))
    kwargs = {"deepstack": "original"} if name == "qwen3vl" else {}
    assert vlm.adapter.generate(vlm, images, max_new_tokens=8, post=cap.post, **kwargs) == own
    # fixed img_size: the same resize in preprocess and generate, so stored E_post fits the prompt
    cap64 = vlm.adapter.encode(vlm, vlm.adapter.preprocess(vlm.processor, images, 64))
    assert cap64.pre_grid == [(8, 8)] * len(images)
    own64 = vlm.adapter.generate(vlm, images, max_new_tokens=8, img_size=64)
    assert (
        vlm.adapter.generate(vlm, images, max_new_tokens=8, post=cap64.post, img_size=64, **kwargs) == own64
    )
    with pytest.raises(UsageError, match="post"):
        vlm.adapter.generate(vlm, images[:1], max_new_tokens=2, post=[cap.post[2]])  # 25 tokens for 24
    with pytest.raises(UsageError, match="post"):
        vlm.adapter.generate(vlm, images[:1], max_new_tokens=2, post=[cap.post[0][:, :-1]])  # wrong dim
    if name != "qwen3vl":
        with pytest.raises(TypeError, match="deepstack"):
            vlm.adapter.generate(vlm, images[:1], max_new_tokens=2, post=cap.post[:1], deepstack="zero")


@pytest.mark.parametrize("name", QWEN)
def test_tiny_depends_on_image(vlms, name):
    vlm = vlms[name]
    images = scenes()
    cap = vlm.adapter.encode(vlm, vlm.adapter.preprocess(vlm.processor, images, None))
    for i in range(len(images)):
        for j in range(i):
            assert (cap.post[i] - cap.post[j]).abs().max() > 1e-2
    captions = vlm.adapter.generate(vlm, images, max_new_tokens=8)
    assert len(set(captions)) == len(images), captions
    assert all(captions), captions


@pytest.mark.parametrize("name", QWEN)
def test_tiny_processor_round_trip(vlms, name):
    vlm = vlms[name]
    tok = vlm.processor.tokenizer
    assert tok.padding_side == "left"
    assert tok.unk_token_id not in tok("describe the image in one sentence.")["input_ids"]
    assert vlm.processor.image_token_id == vlm.model.config.image_token_id
    assert type(vlm.processor).__name__ == (
        "Qwen2_5_VLProcessor" if name == "qwen2.5vl" else "Qwen3VLProcessor"
    )
    # fixed size: non-square input resized to img_size, rounded to patch * merge
    px = vlm.adapter.preprocess(vlm.processor, [coded_image(8, 12)], 64)
    assert px["image_grid_thw"].tolist() == [[1, 8, 8]]


def first_logits(vlm: VLM, image, post=None, deepstack=None) -> torch.Tensor:
    inputs = vlm.adapter.prompt_inputs(vlm, [image])
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                  mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"])  # fmt: skip
    if post is None:
        kwargs["pixel_values"] = inputs["pixel_values"]
    else:
        kwargs["mm_encoder_outputs"] = vlm.adapter.injected_outputs(vlm, inputs, post, deepstack=deepstack)
    vlm.model.model.rope_deltas = None
    with torch.no_grad():
        return vlm.model(**kwargs).logits[0, -1]


def test_qwen3vl_deepstack_leak_and_replacement(vlms):
    vlm = vlms["qwen3vl"]
    a, b, c = scenes()[:3]
    cap_b = vlm.adapter.encode(vlm, vlm.adapter.preprocess(vlm.processor, [b], None))
    ds_b = [
        cap_b.modules[DEEPSTACK_KEY.format(k)]
        for k in range(len(vlm.model.config.vision_config.deepstack_visual_indexes))
    ]
    assert all(x[0].shape == cap_b.post[0].shape for x in ds_b)
    with torch.no_grad():
        own = vlm.model.model.get_image_features(*vlm.adapter.preprocess(vlm.processor, [b], None).values())
    for level, feats in zip(ds_b, own.deepstack_features, strict=True):
        assert torch.equal(level[0], feats[0])

    own_b = first_logits(vlm, b)
    # full replacement (post + deepstack of B) with A's pixels only as the prompt layout: exactly B
    torch.testing.assert_close(first_logits(vlm, a, cap_b.post, ds_b), own_b, rtol=0, atol=1e-5)
    assert vlm.adapter.generate(
        vlm, [a], max_new_tokens=8, post=cap_b.post, deepstack=ds_b
    ) == vlm.adapter.generate(vlm, [b], max_new_tokens=8)
    # the limitation, measured: replacing only E_post keeps A's deepstack features → A leaks in
    leak = (first_logits(vlm, a, cap_b.post, "original") - own_b).abs().max()
    assert leak > 1e-3, f"expected the original image to leak through deepstack, logit change {leak:.2e}"
    # deepstack='zero': nothing of the pixel image reaches the LM
    torch.testing.assert_close(
        first_logits(vlm, a, cap_b.post, "zero"), first_logits(vlm, c, cap_b.post, "zero"), rtol=0, atol=0
    )
    with pytest.raises(UsageError, match="deepstack"):
        vlm.adapter.generate(vlm, [a], max_new_tokens=2, post=cap_b.post, deepstack="bogus")


REAL = [
    ("qwen2.5vl", "qwen2.5-vl-7b", (24, 24), 1280, 3584),
    ("qwen3.5", "qwen3.5-9b", (20, 20), 1152, 4096),
    ("qwen3vl", "qwen3-vl-8b", (20, 20), 1152, 4096),
]


@pytest.mark.parametrize(("name", "config", "grid", "d_pre", "d_post"), REAL)
def test_real_config_shapes_on_meta(_env, name, config, grid, d_pre, d_post):
    vlm = load_vlm(name, f"config:{config}", dtype=torch.bfloat16, device="meta")
    assert vlm.processor.image_token_id == vlm.model.config.image_token_id
    px = vlm.adapter.preprocess(
        vlm.processor, [Image.new("RGB", (336, 336)), Image.new("RGB", (500, 300))], 336
    )
    assert px["image_grid_thw"].tolist() == [[1, *grid]] * 2
    cap = vlm.adapter.encode(vlm, px)
    h, w = grid
    assert [tuple(x.shape) for x in cap.pre] == [(h * w, d_pre)] * 2
    assert [tuple(x.shape) for x in cap.post] == [(h * w // 4, d_post)] * 2
    assert [tuple(x.shape) for x in vlm.adapter.apply_connector(vlm, cap.pre, cap.pre_grid)] == [
        (h * w // 4, d_post)
    ] * 2
