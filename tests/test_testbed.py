"""The calibrated testbed: training plumbing on every family, and the committed models' quality."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlmc.data.scenes import attribute_scores, is_scene_caption
from vlmc.models import load as model_load
from vlmc.models.base import get_adapter
from vlmc.models.load import TESTBED_CLIP, default_testbed_dir, load_vlm
from vlmc.train import train_testbed
from vlmc.train.testbed import (
    HELD_OUT_FIRST,
    IGNORE,
    TESTBED_FAMILIES,
    TrainConfig,
    caption_examples,
    collate_captions,
    derangement,
    recipe,
    scene_items,
    split_of,
    train_vlm,
    true_vs_shuffled,
)
from vlmc.utils.cli import UsageError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_SCENES = sorted((ROOT / "sample/images/00000").glob("*.png")) + sorted(
    (ROOT / "sample/images/00001").glob("*.png")
)


@pytest.fixture(scope="module")
def items():
    return scene_items(6, 0, workers=1)


def test_split_is_by_key_index():
    assert split_of(0) == split_of(HELD_OUT_FIRST - 1) == "train"
    assert split_of(HELD_OUT_FIRST) == "held_out"
    with pytest.raises(ValueError, match="held-out boundary"):
        scene_items(2, HELD_OUT_FIRST - 1)


def test_sample_scenes_are_held_out():
    keys = [int(p.stem) for p in SAMPLE_SCENES]
    assert keys and min(keys) >= HELD_OUT_FIRST


def test_parallel_rendering_matches_serial():
    a, b = scene_items(130, 0, workers=1), scene_items(130, 0, workers=2)
    assert [x.key for x in a] == [x.key for x in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("family", [f for f in train_testbed.TRAINABLE if f != TESTBED_CLIP])
def test_labels_cover_exactly_the_caption_after_the_generation_prompt(family, items, tmp_path):
    """Training rows = the prompt row generate() builds + caption + end token; only the answer is labelled."""
    get_adapter(family).build_testbed(tmp_path, seed=0)
    vlm = load_vlm(family, str(tmp_path))
    examples = caption_examples(vlm, items[:2], vlm.adapter.default_prompt)
    batch = collate_captions(examples, vlm.processor.tokenizer.pad_token_id)
    prompt = vlm.adapter.prompt_inputs(vlm, [items[0].image])
    n = examples[0].n_prompt
    assert torch.equal(batch["input_ids"][0, :n], prompt["input_ids"][0])
    labels = batch["labels"][0]
    assert (labels[:n] == IGNORE).all()
    answer = labels[labels != IGNORE]
    text = vlm.processor.tokenizer.decode(answer, skip_special_tokens=True)
    assert attribute_scores(text, items[0].scene)["mean"] == 1.0
    eos = vlm.model.generation_config.eos_token_id
    assert answer[-1].item() in (eos if isinstance(eos, list) else [eos])
    loss = vlm.model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0


def test_training_is_seeded_and_lowers_the_loss(items, tmp_path):
    """Same seed → bit-identical weights; the loss falls on a handful of scenes."""
    weights = []
    for run in range(2):
        get_adapter("llava").build_testbed(tmp_path / str(run), seed=0)
        vlm = load_vlm("llava", str(tmp_path / str(run)))
        curve = train_vlm(vlm, items, TrainConfig(n_train=6, steps=12, batch_size=3, warmup=2, log_every=4))
        weights.append({k: v.clone() for k, v in vlm.model.state_dict().items()})
        assert curve[-1] < curve[0]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_recipe_layers_defaults_model_recipe_and_flags():
    assert recipe("llava") == TrainConfig()
    assert recipe("qwen2.5vl").lr == 1e-3 and recipe("qwen2.5vl").steps == TrainConfig().steps
    assert recipe("qwen2.5vl", lr=5e-3, steps=None).lr == 5e-3  # a flag beats the recipe; None = not given
    assert recipe("llava", steps=7).steps == 7


def test_derangement_has_no_fixed_point():
    for n in (2, 3, 10):
        perm = derangement(n, seed=n)
        assert sorted(perm.tolist()) == list(range(n))
        assert (perm != torch.arange(n)).all()


def test_is_scene_caption():
    assert is_scene_caption("two objects: a large red circle at the top left and a small blue square in the center.")
    assert not is_scene_caption("a cat sitting on a mat.")
    assert not is_scene_caption("two objects: a red circle.")
    assert not is_scene_caption("")


def test_missing_testbed_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("VLMC_TESTBED", str(tmp_path))
    with pytest.raises(UsageError, match="train with python src/train/train_testbed.py"):
        model_load.testbed_path("llava")
    with pytest.raises(UsageError, match="no trained testbed model"):
        load_vlm("llava", "testbed")


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert train_testbed.main(["--models", "llava,gpt", "--out", str(tmp_path)]) == 2
    assert "unknown testbed model(s) gpt" in capsys.readouterr().err
    assert train_testbed.main(["--n_train", "20000", "--out", str(tmp_path)]) == 2


def test_cli_trains_and_reports(tmp_path):
    """A few steps end to end: folders load with from_pretrained and the report says what was trained."""
    argv = ["--models", "llava,clip", "--out", str(tmp_path), "--n_train", "8", "--steps", "2", "--batch_size", "4",
            "--n_eval", "4"]  # fmt: skip
    assert train_testbed.main(argv) == 0
    report = json.loads((tmp_path / "testbed.json").read_text())
    assert set(report["models"]) == {"llava", "clip"}
    assert report["models"]["llava"]["bytes"] > 0 and report["models"]["llava"]["config"]["steps"] == 2
    assert load_vlm("llava", str(tmp_path / "llava")).model.training is False
    # a second schedule on top of the first; the report keeps both
    assert train_testbed.main([*argv[:1], "llava", *argv[2:], "--continue"]) == 0
    entry = json.loads((tmp_path / "testbed.json").read_text())["models"]["llava"]
    assert entry["continues"]["config"]["steps"] == 2 and "held_out_attribute_accuracy" in entry["continues"]
    assert train_testbed.main(["--models", "qwen3vl", "--out", str(tmp_path), "--continue"]) == 2


# -- the committed, trained testbed (sample/models) -------------------------------------------------


def _committed() -> dict:
    path = default_testbed_dir() / train_testbed.REPORT
    if not path.exists():
        pytest.fail(f"{path} missing: the trained testbed must be committed (python src/train/train_testbed.py)")
    return json.loads(path.read_text())


@pytest.mark.parametrize("family", TESTBED_FAMILIES)
def test_committed_family_captions_held_out_scenes(family):
    """On the sample's held-out scenes (seeds 0 and 1) each model scores what its report says (±0.1) and
    ≥ 0.9 (the testbed's quality bar); the report's parameter count is the weights', and they are <= 8 MB."""
    from PIL import Image

    from vlmc.eval.scoring import gt_caption_for

    vlm = load_vlm(family, "testbed")
    images = [Image.open(p).convert("RGB") for p in SAMPLE_SCENES]
    captions = vlm.adapter.generate(vlm, images)
    acc = np.mean([attribute_scores(c, gt_caption_for(str(p)))["mean"] for c, p in zip(captions, SAMPLE_SCENES, strict=True)])
    entry = _committed()["models"][family]
    assert abs(acc - entry["held_out_attribute_accuracy"]["mean"]) <= 0.1, (family, acc, captions[:3])
    assert acc >= 0.9 and entry["held_out_attribute_accuracy"]["mean"] >= 0.9, (family, acc)
    weights = load_file(model_load.testbed_path(family) / "model.safetensors")
    assert sum(t.numel() for t in weights.values()) == entry["params"]
    assert entry["bytes"] <= 8 * 2**20


def test_committed_clip_prefers_true_captions():
    """The testbed CLIP ranks an image's true caption above a shuffled one on ≥ 95% of held-out scenes."""
    from transformers import AutoProcessor, CLIPModel

    path = model_load.testbed_path(TESTBED_CLIP)
    model, processor = CLIPModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    held_out = scene_items(100, HELD_OUT_FIRST + 20_000, workers=1)
    assert true_vs_shuffled(model, processor, held_out) >= 0.95
    assert _committed()["models"][TESTBED_CLIP]["held_out_true_beats_shuffled"] >= 0.95


# -- what the committed demo run (sample/, `make sample`) shows on the testbed ------------------------

SAMPLE = ROOT / "sample"


def _scene_rows(df):
    return df[df["attr_acc_original" if "attr_acc_original" in df else "attr_acc_post_direct"].notna()]


@pytest.mark.parametrize("mode", ["mask", "lowrank"])
def test_demo_perturbations_degrade_scene_captions_monotonically(mode):
    """Stage 8 on the testbed: attribute accuracy and CLIPScore fall with the level (rises ≤ noise)."""
    from vlmc.plot.data import read_perturb

    df = _scene_rows(read_perturb(SAMPLE / "perturb_out", mode))
    assert set(TESTBED_FAMILIES) <= set(df["model"]), sorted(df["model"].unique())
    for model, g in df.groupby("model"):
        # stronger perturbation = higher mask probability, lower retained rank fraction
        by_level = g.groupby("level")[["attr_acc_perturbed", "clipscore_perturbed"]].mean()
        by_level = by_level.sort_index(ascending=(mode == "mask"))
        for col, noise, span in (("attr_acc_perturbed", 0.05, 0.2), ("clipscore_perturbed", 0.05, 0.05)):
            v = by_level[col].to_numpy()
            assert (np.diff(v) <= noise).all(), (model, col, v)
            assert v[0] - v[-1] >= span, (model, col, v)


def test_demo_reconstructed_captions_keep_most_of_the_accuracy():
    """Stage 7: the reconstructors learnt from testbed training scenes (the demo's TRAIN_ROOT), so every sample
    image is held out from them; captions from Ê_post = connector(reconstructor(E_post)) keep ≥ 0.8 of the
    model's own accuracy for every family (idefics2 through its transformer reconstructor)."""
    from vlmc.plot.data import read_captions

    df = _scene_rows(read_captions(SAMPLE / "captions"))
    assert set(TESTBED_FAMILIES) <= set(df["model"])
    for model, g in df.groupby("model"):
        assert len(g) >= 40 and g["split"].isin(["test", "val"]).all(), (model, len(g))  # every sample scene, all held out
        own, recon = g["attr_acc_post_direct"].mean(), g["attr_acc_recon"].mean()
        assert own >= 0.9 and recon / own >= 0.8, (model, own, recon)


def test_demo_geometry_differs_between_families():
    """Stage 3: pre→post KNOR@10 and the post effective rank are not the same number for every family."""
    from vlmc.plot.data import load_knn

    runs = load_knn(SAMPLE / "knn_out")
    assert set(TESTBED_FAMILIES) <= set(runs)
    knor = [runs[m].per_image["pre_post_knor10"].mean() for m in TESTBED_FAMILIES]
    erank = [runs[m].per_image["post_effective_rank_norm_min_t1_d"].mean() for m in TESTBED_FAMILIES]
    assert max(knor) - min(knor) >= 0.05 and max(erank) - min(erank) >= 0.05, (knor, erank)
