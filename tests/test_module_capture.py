"""``--modules`` over every registered family: vision and language modules, per image, aligned, or refused.

* the connector module's capture IS E_post (bit-identical) and, for merge families, the tower's last
  block IS E_pre: the per-image split and the window un-permutation of flat Qwen sequences are exact;
* a language-model layer's capture equals that layer's output at the image-token positions of a
  batch-1 forward of the same prompt with ``output_hidden_states`` (images of different sizes in one
  batch, so a misaligned split or left padding would show);
* modules that cannot be captured per image stop the run at start with one line, never dropped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmc.extract.vectors import VLMEncoder
from vlmc.models.base import families
from vlmc.models.capture import LANGUAGE, VISION, image_positions, plan_modules
from vlmc.models.families.common import to_model
from vlmc.models.load import load_vlm
from vlmc.store.vectors import ShardReader
from vlmc.utils.cli import UsageError

try:
    from _models_util import shape_image
except ImportError:
    from tests._models_util import shape_image

REPO = Path(__file__).resolve().parents[1]
LM_LAYER_GLOBS = ["*language_model.layers.0", "*text_model.layers.0"]  # transformers 5 paths of every family
TOWER_BLOCKS = ["model.visual.blocks.*"]  # Qwen towers (flat sequences); batch-first towers: a layer's mlp
TOWER_LAYER_MLP = ["model.vision_tower.encoder.layers.0.mlp", "model.vision_model.encoder.layers.0.mlp"]


def images():
    return [shape_image(0, 96), shape_image(1, 80, width=140), shape_image(2, 64)]


@pytest.fixture(scope="module", params=families())
def vlm(request):
    return load_vlm(request.param, "tiny")


def _name_of(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def test_vision_and_language_modules_per_image(vlm):
    conn = _name_of(vlm.model, vlm.adapter.connector_module(vlm.model))
    enc = VLMEncoder(vlm, None, [conn, *LM_LAYER_GLOBS, *TOWER_BLOCKS, *TOWER_LAYER_MLP])
    sides = enc.plan.sides()
    assert sides[conn] == VISION
    lm_layer = [n for n, s in sides.items() if s == LANGUAGE]
    assert len(lm_layer) == 1, sides
    tower = [n for n, s in sides.items() if s == VISION and n != conn and re.search(r"(blocks\.\d+|mlp)$", n)]
    assert tower, f"no vision-tower module planned: {sides}"
    ims = images()
    with torch.inference_mode():
        out = enc.encode(enc.preprocess(ims), ims)
    pre, post = out.vectors["pre"], out.vectors["post"]
    # the connector's capture is E_post, image by image
    for a, b in zip(out.vectors[conn], post, strict=True):
        assert torch.equal(a, b)
    # tower modules: one row set per image; merge families' last block is E_pre (window order undone)
    for name in tower:
        assert len(out.vectors[name]) == len(ims)
    if vlm.adapter.correspondence.kind == "merge":
        blocks = {int(m.group(1)): n for n in tower if (m := re.search(r"blocks\.(\d+)$", n))}
        last = blocks[max(blocks)]
        for a, b in zip(out.vectors[last], pre, strict=True):
            assert torch.equal(a, b), f"{last} is not E_pre in canonical order"
    # the LM layer at the image positions = a batch-1 forward's hidden state after that layer
    cap = out.vectors[lm_layer[0]]
    for i, im in enumerate(ims):
        assert cap[i].shape == (post[i].shape[0], vlm.model.config.get_text_config().hidden_size)
        inputs = to_model(vlm.adapter.prompt_inputs(vlm, [im], enc.prompt), vlm.device, vlm.dtype)
        with torch.no_grad():
            hs = vlm.model(**inputs, output_hidden_states=True, use_cache=False).hidden_states[1]
        ref = hs[0][image_positions(vlm, inputs["input_ids"])[0]]
        torch.testing.assert_close(cap[i], ref, atol=2e-4, rtol=2e-4)
    # different images give different LM rows (the capture follows the image, not the prompt)
    assert not torch.allclose(cap[0][:4], cap[2][:4])


def test_uncapturable_modules_are_refused_at_start(vlm):
    lm = _name_of(vlm.model, vlm.model.get_decoder())
    with pytest.raises(UsageError, match=r"cannot capture 1 matched module.*never runs") as e:
        plan_modules(vlm, [f"{lm}.layers"], None, None)  # a ModuleList: no forward of its own
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="no module matches"):
        plan_modules(vlm, ["no.such.module*"], None, None)


def test_qwen_tower_parts_not_per_image_are_refused():
    vlm = load_vlm("qwen2.5vl", "tiny")
    ims = images()[:2]
    pix = vlm.adapter.preprocess(vlm.processor, ims, None)
    n_patches = int(pix["image_grid_thw"].prod(-1).sum())
    for rows in (n_patches + 1, len(ims)):  # neither the batch's patches nor its merged tokens
        with pytest.raises(UsageError, match=r"model.visual.x output .* is not per image"):
            vlm.adapter.vision_module_rows(vlm, "model.visual.x", torch.zeros(rows, 8), pix, len(ims))
    with pytest.raises(UsageError, match=r"model.visual.blocks: never runs"):
        plan_modules(vlm, ["model.visual.blocks", "model.visual.blocks.0"], None, None)
    plan = plan_modules(vlm, ["model.visual.patch_embed", "model.visual.merger.ln_q", "model.visual.merger.mlp"],
                        None, None)
    assert plan.vision == ["model.visual.patch_embed", "model.visual.merger.ln_q", "model.visual.merger.mlp"]
    assert not plan.language


@pytest.mark.slow
def test_cli_stores_vision_and_language_modules(tmp_path):
    from vlmc.data.scenes import write_scenes

    write_scenes(tmp_path / "img" / "00000", n=3, size=64)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, str(REPO / "src/extract/extract_vectors.py"), "--root", str(tmp_path / "img"),
           "--out_dir", str(tmp_path / "out"), "--models", "qwen2.5vl", "--model-path", "tiny", "--num_workers", "0",
           "--batch_size", "2", "--save_every", "2"]
    proc = subprocess.run([*cli, "--modules", "model.visual.blocks.3", "*language_model.layers.1"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    d = tmp_path / "out" / "qwen2.5vl" / "00000"
    m = json.loads((d / "manifest.json").read_text())
    names = ["model.visual.blocks.3", "model.language_model.layers.1"]
    assert m["modules"] == names and m["kinds"] == ["pre", "post", *names]
    assert m["module_sides"] == dict(zip(names, [VISION, LANGUAGE], strict=True)) and m["prompt"]
    r = ShardReader.open(d)
    _, pre = r.tokens("pre")
    _, post = r.tokens("post")
    keys, block = r.tokens(names[0])
    _, lm = r.tokens(names[1])
    assert len(keys) == 3 and len(m["chunks"]) == 2 and all(n in c["files"] for c in m["chunks"] for n in names)
    for b, p in zip(block, pre, strict=True):  # the last block is E_pre (the same fp16 values)
        assert torch.equal(b, p)
    for x, p in zip(lm, post, strict=True):
        assert x.shape == (p.shape[0], 64)
    bad = subprocess.run([*cli, "--modules", "model.language_model.layers"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    err = [line for line in bad.stderr.splitlines() if "error:" in line]
    assert len(err) == 1 and "never runs" in err[0] and "Traceback" not in bad.stderr


def test_output_head_is_captured_over_image_positions():
    """The LM's output head is a language-side module too: full logits at the image positions (the prompt
    forward computes last-position logits only when the head is not asked for)."""
    vlm = load_vlm("llava", "tiny")
    enc = VLMEncoder(vlm, None, ["lm_head"])
    assert enc.plan.language == ["lm_head"]
    ims = images()[:2]
    with torch.inference_mode():
        out = enc.encode(enc.preprocess(ims), ims)
    vocab = vlm.model.get_output_embeddings().weight.shape[0]
    assert [tuple(t.shape) for t in out.vectors["lm_head"]] == [(p.shape[0], vocab) for p in out.vectors["post"]]
