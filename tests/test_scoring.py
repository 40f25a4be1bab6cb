"""Caption scoring: CLIPScore definition, BERTScore on the real MiniLM, cross-checks, resume-safe CSV scoring."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from vlmc.eval import score_captions, score_perturb
from vlmc.eval.scoring import (
    BertScorer,
    ClipScorer,
    add_drops,
    build_scorers,
    clipscore_from_cos,
    default_bertscore_model,
    sidecar_path,
)
from vlmc.utils.cli import UsageError
from vlmc.utils.rows import done_ids, read_table, upsert_rows
from vlmc.utils.stop import StopFlag, StopRequested

WORDS = "a an the man woman dog cat is eating food piece of bread plate pasta with red sauce on white table photo".split()


def _build_tiny_clip(out: Path) -> None:
    """A 2-layer CLIPModel with seeded weights, a WordLevel tokenizer and a 32 px image processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"])
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    cfg = CLIPConfig(
        text_config={
            **small,
            "vocab_size": len(fast),
            "max_position_embeddings": 16,
            "bos_token_id": 2,
            "eos_token_id": 3,
            "pad_token_id": 0,
        },
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_clip")
    _build_tiny_clip(d)
    return d


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Shard ``00000`` with keys 000010000..000010002 (colour blocks); only the first two have a .txt caption."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs") / "00000"
    root.mkdir()
    out = {}
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        key = f"00001000{i}"
        arr = np.zeros((40, 48, 3), np.uint8)
        arr[:] = colour
        arr[5 : 15 + 8 * i, 10:30] = 255
        Image.fromarray(arr).save(root / f"{key}.png")
        out[key] = root / f"{key}.png"
    (root / "000010000.txt").write_text("a plate of pasta with red sauce\n")
    (root / "000010001.txt").write_text("a  dog on a white table")
    return out


@pytest.fixture(scope="module")
def bert() -> BertScorer:
    return BertScorer(batch_size=8)


def _args(clip_dir: Path, *extra: str) -> list[str]:
    return ["--clip_model", str(clip_dir), "--device", "cpu", "--batch_size", "4", *extra]


# -- definitions -----------------------------------------------------------------------------------


def test_clipscore_definition_and_drop_sign():
    got = clipscore_from_cos(np.array([-0.3, 0.0, 0.4, np.nan]))
    np.testing.assert_allclose(got, [0.0, 0.0, 1.0, np.nan])
    df = pd.DataFrame({"ref": ["0.8", "0.5", "nan"], "alt": [0.5, 0.9, 0.1]})
    add_drops(df, "ref", "alt", "drop")
    np.testing.assert_allclose(df["drop"], [0.3, -0.4, np.nan])  # positive = altered is worse


def test_clipscore_matches_manual_computation(clip_dir, images):
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    paths = [str(images[k]) for k in sorted(images)] + [str(images["000010000"]), "/nonexistent.png"]
    texts = ["a red plate of pasta", "a dog", "the cat is eating bread", "", "a photo"]
    scorer = ClipScorer.from_spec(str(clip_dir), "cpu", batch_size=2)
    cos = scorer.image_text_cos(paths, texts)
    score = clipscore_from_cos(cos)

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok, proc = AutoTokenizer.from_pretrained(clip_dir), CLIPImageProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        px = proc(images=[Image.open(p).convert("RGB") for p in paths[:3]], return_tensors="pt")[
            "pixel_values"
        ]
        img = model.get_image_features(pixel_values=px)
        enc = tok(texts[:3], padding=True, return_tensors="pt")
        txt = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    img = img if isinstance(img, torch.Tensor) else img.pooler_output  # transformers 5: an output object
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    manual = torch.nn.functional.cosine_similarity(img, txt, dim=-1).double().numpy()
    np.testing.assert_allclose(cos[:3], manual, atol=1e-5)
    np.testing.assert_allclose(score[:3], 2.5 * np.maximum(manual, 0), atol=1e-5)
    assert np.isnan(cos[3]) and np.isnan(cos[4])  # empty caption, missing image
    assert scorer.config["w"] == 2.5 and scorer.config["config_sha256"]


# -- BERTScore -------------------------------------------------------------------------------------


def test_bertscore_minilm_ranks_paraphrase_above_unrelated(bert):
    ref = "A man is eating food."
    f1 = bert.f1(["A man is eating a piece of bread.", "The stock market fell sharply today.", ""], [ref] * 3)
    assert f1[0] > f1[1] + 0.3
    assert np.isnan(f1[2])
    cfg = bert.config
    assert cfg["num_layers"] == 6 and cfg["idf"] is False and cfg["rescale"] is False
    assert "L6" in cfg["config_string"] and cfg["bert_score"] in cfg["config_string"]


PAIRS = [
    ("The stock market fell sharply today.", "A man is eating food."),
    ("a dog runs on the beach", "a dog is running along the sand"),
    ("A man is eating a piece of bread.", "A man is eating food."),
    ("two plates of pasta with tomato sauce", "pasta with red sauce on a white plate"),
]


def test_bertscore_agrees_with_torchmetrics_and_a_manual_reference(bert):
    """bert-score and torchmetrics agree to 1e-4 except where a token's best match is [CLS]/[SEP].

    bert-score lets the reference's special tokens take part in the greedy max (they only get weight 0);
    torchmetrics zeroes them first. A direct computation from the layer-6 embeddings reproduces each
    library exactly, so the disagreement is explained, not noise. (torchmetrics' functional form is
    called two pairs at a time: it re-indexes by the length-sort permutation instead of its inverse, which
    misaligns pairs once a call holds more than two differently-long sentences; torchmetrics issue #2728.)
    """
    from torchmetrics.functional.text.bert import bert_score as tm_bert_score
    from transformers import AutoModel, AutoTokenizer

    path = default_bertscore_model()
    p_bs, r_bs, f_bs = bert.score([c for c, _ in PAIRS], [r for _, r in PAIRS])
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def emb(s: str) -> torch.Tensor:
        with torch.no_grad():
            h = model(**tok(s, return_tensors="pt"), output_hidden_states=True).hidden_states[6][0]
        return torch.nn.functional.normalize(h, dim=-1)

    tm = {}
    for i in range(0, len(PAIRS), 2):  # two pairs per call: any permutation of 2 undoes itself (#2728)
        chunk = PAIRS[i : i + 2]
        out = tm_bert_score(
            [c for c, _ in chunk], [r for _, r in chunk], model_name_or_path=path, num_layers=6
        )
        for j in range(len(chunk)):
            tm[i + j] = tuple(float(out[k][j]) for k in ("precision", "recall", "f1"))
    agree = 0
    for i, (c, r) in enumerate(PAIRS):
        tm_p, tm_r, tm_f = tm[i]
        sim = emb(c) @ emb(r).T
        man_bs = (sim[1:-1].max(1).values.mean(), sim[:, 1:-1].max(0).values.mean())
        inner = sim[1:-1, 1:-1]
        man_tm = (inner.max(1).values.clamp(min=0).mean(), inner.max(0).values.clamp(min=0).mean())
        assert abs(p_bs[i] - float(man_bs[0])) < 1e-4 and abs(r_bs[i] - float(man_bs[1])) < 1e-4
        assert abs(tm_p - float(man_tm[0])) < 1e-4 and abs(tm_r - float(man_tm[1])) < 1e-4
        if torch.allclose(torch.stack(man_bs), torch.stack(man_tm), atol=1e-6):
            assert abs(f_bs[i] - tm_f) < 1e-4
            agree += 1
        else:
            assert abs(f_bs[i] - tm_f) < 2e-2
    assert agree >= 1


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_bertscore_baseline_rescale(tmp_path, bert):
    base = tmp_path / "baseline.tsv"
    base.write_text("LAYER,P,R,F\n" + "".join(f"{i},0.30,0.32,0.31\n" for i in range(7)))
    rescaled = BertScorer(baseline_path=str(base), batch_size=8)
    f_raw = bert.f1(["A man is eating a piece of bread."], ["A man is eating food."])
    f_res = rescaled.f1(["A man is eating a piece of bread."], ["A man is eating food."])
    np.testing.assert_allclose(f_res, (f_raw - 0.31) / (1 - 0.31), atol=1e-5)
    assert rescaled.config["rescale"] and rescaled.config["baseline_sha256"]


# -- CSV helpers -----------------------------------------------------------------------------------


def test_upsert_never_duplicates_and_keeps_string_keys(tmp_path):
    p = tmp_path / "c.csv"
    upsert_rows(
        p,
        [
            {"shard": "00000", "key": "000010000", "caption": "a"},
            {"shard": "1", "key": "007", "caption": "b"},
        ],
    )
    upsert_rows(
        p,
        [{"shard": "00000", "key": "000010000", "caption": "a2"}, {"shard": "1", "key": "7", "caption": "c"}],
    )
    df = read_table(p)
    assert df["key"].tolist() == ["000010000", "007", "7"]
    assert df["caption"].tolist() == ["a2", "b", "c"]
    assert done_ids(p) == {("00000", "000010000"), ("1", "007"), ("1", "7")}


# -- stage scorers end to end ----------------------------------------------------------------------


PERTURBED = {"000010000": "a dog", "000010001": "", "000010002": "the cat is eating bread"}


def _perturb_csv(path: Path, images: dict[str, Path], keys: list[str]) -> None:
    rows = [
        {
            "key": k,
            "shard": "00000",
            "image_path": str(images[k]),
            "caption_original": "a plate of pasta with red sauce",
            "caption_perturbed": PERTURBED[k],
            "mode": "mask",
            "level": "0.5",
            "seed": "0",
        }
        for k in keys
    ]
    pd.DataFrame(rows).to_csv(path, index=False)


def test_score_perturb_resume_no_duplicates_nothing_twice(tmp_path, clip_dir, images, bert):
    pdir, odir = tmp_path / "perturb", tmp_path / "scored"
    pdir.mkdir()
    src = pdir / "perturb_tiny_mask_0.5.csv"
    _perturb_csv(src, images, ["000010000", "000010001"])
    assert score_perturb.main(["--perturb_dir", str(pdir), "--out_dir", str(odir), *_args(clip_dir)]) == 0
    out = read_table(odir / src.name)
    assert out["key"].tolist() == ["000010000", "000010001"]
    num = out.apply(pd.to_numeric, errors="coerce")
    np.testing.assert_allclose(num["clipscore_drop"], num["clipscore_original"] - num["clipscore_perturbed"])
    np.testing.assert_allclose(num["clipscore_original"], 2.5 * np.maximum(num["clipcos_original"], 0))
    assert out["caption_gt"].tolist() == ["a plate of pasta with red sauce", "a dog on a white table"]
    assert out["bertscore_f1"].iloc[1] == "nan"  # empty perturbed caption: scored, undefined
    assert float(out["bertscore_f1_original_gt"].iloc[0]) > 0.99  # identical sentences
    side = json.loads(sidecar_path(odir / src.name).read_text())
    assert side["bertscore"]["num_layers"] == 6 and side["clipscore"]["w"] == 2.5

    parser = score_perturb.build_parser()
    scorers = build_scorers(parser.parse_args(_args(clip_dir)))
    dst = odir / src.name
    before = dst.read_text()
    assert score_perturb.score_file(src, dst, scorers, skip_existing=True, save_every=1000) == 0
    assert dst.read_text() == before

    # the generator resumed: one new row and one duplicate of an old row (same texts) appended
    _perturb_csv(src, images, ["000010000", "000010001", "000010002", "000010001"])
    n = score_perturb.score_file(src, dst, scorers, skip_existing=True, save_every=1)
    out2 = read_table(dst)
    assert out2["key"].tolist() == ["000010000", "000010001", "000010002"]
    assert n == 8  # one row x (3 clip + 3 bert + 2 attribute tasks), nothing else
    assert out2.iloc[:2][list(out.columns)].equals(out[list(out.columns)])
    assert out2["caption_gt"].iloc[2] == ""  # no .txt for that image
    assert out2["bertscore_f1_original_gt"].iloc[2] == "nan"

    # in place, then a changed setup refuses to mix with --skip_existing
    assert score_perturb.main(["--csv", str(dst), "--skip_existing", *_args(clip_dir)]) == 0
    assert read_table(dst).equals(out2)
    with pytest.raises(UsageError, match="different bertscore"):
        score_perturb.score_file(
            dst, dst, build_scorers(parser.parse_args(_args(clip_dir, "--bertscore_layers", "5"))), True, 1000
        )


def test_score_perturb_rescores_changed_caption(tmp_path, clip_dir, images, bert):
    pdir = tmp_path / "p"
    pdir.mkdir()
    src = pdir / "perturb_tiny_noise_10.csv"
    _perturb_csv(src, images, ["000010000"])
    scorers = build_scorers(
        score_perturb.build_parser().parse_args(_args(clip_dir, "--metrics", "clipscore"))
    )
    dst = tmp_path / "out.csv"
    assert score_perturb.score_file(src, dst, scorers, False, 1000) == 3
    df = read_table(src)
    df.loc[0, "caption_perturbed"] = "a man is eating food"
    df.to_csv(src, index=False)
    assert score_perturb.score_file(src, dst, scorers, True, 1000) == 3  # carried scores no longer match
    assert "bertscore_f1" not in read_table(dst).columns


def test_score_captions_columns_and_drops(tmp_path, clip_dir, images, bert):
    src = tmp_path / "captions_tiny.csv"
    pd.DataFrame(
        [
            {
                "key": "000010000",
                "shard": "00000",
                "image_path": str(images["000010000"]),
                "caption_gt": "a plate of pasta with red sauce",
                "caption_post_direct": "a plate of pasta",
                "caption_recon": "a dog on a table",
                "reproj_mse_recon": "0.5",
            },
            {
                "key": "000010001",
                "shard": "00000",
                "image_path": str(images["000010001"]),
                "caption_gt": "a dog on a white table",
                "caption_post_direct": "a dog on a white table",
                "caption_recon": "a dog on a white table",
                "reproj_mse_recon": "0.1",
            },
        ]
    ).to_csv(src, index=False)
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")  # not a caption CSV: skipped
    assert score_captions.main(["--caption_dir", str(tmp_path), *_args(clip_dir)]) == 0
    out = read_table(src)
    assert out["key"].tolist() == ["000010000", "000010001"] and out["reproj_mse_recon"].tolist() == [
        "0.5",
        "0.1",
    ]
    for col in [
        "clipscore_gt",
        "clipcos_post_direct",
        "clipscore_recon",
        "bertscore_f1_post_direct",
        "bertscore_f1_recon",
        "bertscore_f1_recon_vs_post_direct",
        "clipscore_drop",
        "bertscore_drop",
    ]:
        assert col in out.columns, col
    num = out.apply(pd.to_numeric, errors="coerce")
    np.testing.assert_allclose(num["clipscore_drop"], num["clipscore_post_direct"] - num["clipscore_recon"])
    np.testing.assert_allclose(
        num["bertscore_drop"], num["bertscore_f1_post_direct"] - num["bertscore_f1_recon"]
    )
    assert num["bertscore_drop"].iloc[0] > 0.1  # recon caption is worse → positive drop
    assert (
        abs(num["bertscore_drop"].iloc[1]) < 1e-6 and num["bertscore_f1_recon_vs_post_direct"].iloc[1] > 0.99
    )
    assert not (tmp_path / "notes.csv.scores.json").exists()


def test_cli_errors_are_one_line(tmp_path, capsys, clip_dir):
    assert score_perturb.main(["--perturb_dir", str(tmp_path / "nope")]) == 2
    assert score_captions.main(["--csv", str(tmp_path / "missing.csv")]) == 2
    (tmp_path / "perturb_x.csv").write_text("key,caption_original\n1,a\n")
    assert (
        score_perturb.main(["--perturb_dir", str(tmp_path), "--clip_model", str(tmp_path), "--device", "cpu"])
        == 2
    )
    assert (
        score_perturb.main(["--perturb_dir", str(tmp_path), *_args(clip_dir, "--metrics", "clipscore")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all("error:" in line for line in err), err
    assert "missing column(s) image_path, caption_perturbed" in err[-1]


def test_idf_and_stage_flags(bert):
    import argparse

    refs = ["A man is eating food.", "A dog runs on the beach.", "A man is reading a book."]
    cands = ["A man is eating a piece of bread.", "A dog is running on sand.", "A woman reads."]
    idf = BertScorer(idf=True, batch_size=8)
    f_idf, f_plain = idf.f1(cands, refs), bert.f1(cands, refs)
    assert np.isfinite(f_idf).all() and not np.allclose(f_idf, f_plain)
    assert idf.config["idf"] is True and "idf=True" in idf.config["config_string"]

    # a caption stage with its own --batch_size/--device adds the scoring flags without conflicts
    p = argparse.ArgumentParser()
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    from vlmc.eval.scoring import add_scoring_args

    add_scoring_args(p, standalone=False)
    scorers = build_scorers(p.parse_args(["--score_batch_size", "3"]), metrics=["bertscore"])
    assert scorers.clip is None and scorers.bert.batch_size == 3


def test_stop_request_writes_progress_then_resumes(tmp_path, clip_dir, images):
    src = tmp_path / "perturb_tiny_mask_0.3.csv"
    _perturb_csv(src, images, ["000010000", "000010001", "000010002"])
    scorers = build_scorers(
        score_perturb.build_parser().parse_args(_args(clip_dir, "--metrics", "clipscore"))
    )
    dst = tmp_path / "out.csv"
    with StopFlag() as stop, pytest.raises(StopRequested):
        stop.signum = signal.SIGUSR1  # as if Slurm's USR1 arrived
        score_perturb.score_file(src, dst, scorers, skip_existing=True, save_every=1)
    assert read_table(dst)["clipscore_original"].tolist()[1:] == ["", ""]  # first chunk written, rest pending
    # a fresh run (no active stop flag) continues
    assert score_perturb.score_file(src, dst, scorers, skip_existing=True, save_every=1) == 2 * 3


def test_attribute_task_scores_scene_references_only():
    """attr_acc: exact on a scene caption, partial credit per attribute, NaN where the reference is no scene."""
    from vlmc.eval.scoring import AttrTask, Scorers, run_task

    truth = "two objects: a large red circle at the top left and a small blue square in the center."
    wrong_colour = "two objects: a large red circle at the top left and a small green square in the center."
    df = pd.DataFrame({"cand": [truth, wrong_colour, "a dog"], "ref": [truth, truth, "a dog on a table"]})
    task = AttrTask("x", "cand", "ref")
    assert Scorers(None, None).config["attributes"] is None
    values = run_task(df, np.arange(3), task, Scorers(None, None, attributes=True))["attr_acc_x"]
    assert values[0] == 1.0
    assert values[1] == pytest.approx((1 + 0.5 + 1 + 1 + 1) / 5)  # colour right for 1 of 2 objects
    assert np.isnan(values[2])
