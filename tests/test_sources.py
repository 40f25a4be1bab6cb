"""The weights grammar (src/models/sources.py): HF ids through a local HF cache (offline), --revision and the
commit in every manifest, typos and bad sources refused in one line, and stages 1-8 on DEFAULT sources."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

try:  # the hf_cache session fixture itself comes from conftest.py
    from hf_cache import BERT_ID, CLIP_IDS
except ImportError:
    from tests.hf_cache import BERT_ID, CLIP_IDS

from vlmc.data.scenes import write_scenes
from vlmc.eval import eval_captions, eval_perturb, eval_recon, score_perturb
from vlmc.eval.scoring import BertScorer, ClipScorer
from vlmc.extract import extract_clip, extract_knn, extract_vectors
from vlmc.models.base import families, get_adapter
from vlmc.models.sources import Named, resolve
from vlmc.train import export_recon, train_recon
from vlmc.utils.cli import UsageError

torch.set_num_threads(1)
LLAVA = "llava-hf/llava-1.5-7b-hf"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src_images")
    write_scenes(root / "00000", n=6, seed=3, size=64, first_index=10000)
    return root


def one_line_error(capfd) -> str:
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0], err
    return err[0]


def vec(images: Path, out: Path, *args: str) -> int:
    return extract_vectors.main(["--root", str(images), "--out_dir", str(out), "--num_workers", "0", "--device", "cpu",
                                 "--max_items", "2", *args])


def no_network(monkeypatch) -> None:
    """Any hub access fails the test (the typo path must never reach it)."""
    import huggingface_hub

    def boom(*a, **k):
        raise AssertionError("the network / hub was touched")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")


# -- sources a user can mistype ------------------------------------------------------------------


def test_typo_is_refused_at_once_with_the_closest_name(images, tmp_path, monkeypatch, capfd):
    no_network(monkeypatch)
    assert vec(images, tmp_path, "--models", "llava", "--model-path", "testbd") == 2
    line = one_line_error(capfd)
    assert "'testbd'" in line and "did you mean 'testbed'" in line and "tiny" in line
    assert extract_clip.main(["--root", str(images), "--out_dir", str(tmp_path / "r"), "--model_id", "tiny-clp"]) == 2
    assert "did you mean 'tiny-clip'" in one_line_error(capfd)
    assert "did you mean 'testbed'" in usage_error(ClipScorer.from_spec, "tesbed")
    assert "did you mean 'roberta-large'" in usage_error(BertScorer, "roberta-lage")


def usage_error(fn, *args) -> str:
    """The one-line ``UsageError`` message of ``fn(*args)`` (entry_point prints it and exits 2)."""
    with pytest.raises(UsageError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_resolver_kinds_and_errors(tmp_path):
    named = {"tiny": Named(lambda: str(tmp_path), random_weights=True)}
    assert resolve("tiny", "--x", named).random_weights
    with pytest.raises(UsageError, match=r"--x 'open_clip:ViT-B-32': .*needs a pretrained tag"):
        resolve("open_clip:ViT-B-32", "--x", named, open_clip=True)
    src = resolve("open_clip:ViT-B-32:openai", "--x", named, open_clip=True)
    assert (src.name, src.pretrained) == ("ViT-B-32", "openai")
    with pytest.raises(UsageError, match="open_clip models are not accepted"):
        resolve("open_clip:ViT-B-32:openai", "--x", named)
    with pytest.raises(UsageError, match="is for VLMs only"):
        resolve("config:llava-1.5-7b", "--x", named)
    with pytest.raises(UsageError, match="local folder does not exist"):
        resolve("./no/such/dir", "--x", named)
    with pytest.raises(UsageError, match="HF ids .* only"):
        resolve("tiny", "--x", named, revision="main")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="has no weights"):
        resolve(str(tmp_path / "w"), "--x", named)


def test_hub_errors_become_one_line_naming_the_id():
    import httpx
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    from vlmc.models.sources import _hub_error

    resp = httpx.Response(401, request=httpx.Request("GET", "https://huggingface.co/api/models/x/y"))
    assert "gated repository" in _hub_error(GatedRepoError("gated", response=resp), "meta/x", None)
    assert "no such repository" in _hub_error(RepositoryNotFoundError("nf", response=resp), "x/y", None)
    assert "no revision 'v9'" in _hub_error(RevisionNotFoundError("nf", response=resp), "x/y", "v9")


def test_help_lists_the_grammar_from_one_place():
    from vlmc.eval import eval_captions as ec
    from vlmc.eval import score_captions

    texts = [extract_vectors.build_parser().format_help(), ec.build_parser().format_help()]
    for t in texts:
        t = " ".join(t.split())
        assert "testbed" in t and "config:<name>" in t and "HF_HUB_OFFLINE" in t and "org/name[@REVISION]" in t
    ref = " ".join(extract_clip.build_parser().format_help().split())
    assert "open_clip:<name>:<pretrained" in ref and "tiny-dino" in ref and "HF_HUB_OFFLINE" in ref
    sc = " ".join(score_captions.build_parser().format_help().split())
    assert "minilm" in sc and "openai/clip-vit-base-patch32" in sc and "roberta-large" in sc


# -- the local Hugging Face cache ----------------------------------------------------------------


def test_bad_sources_offline_one_line_exit_2(hf_cache, images, tmp_path, monkeypatch, capfd):
    hf_cache.activate(monkeypatch)
    assert vec(images, tmp_path, "--models", "llava", "--model-path", "nobody/no-such-model") == 2
    line = one_line_error(capfd)
    assert "'nobody/no-such-model'" in line and "not in the Hugging Face cache" in line and "HF_HUB_OFFLINE=1" in line
    assert vec(images, tmp_path, "--models", "llava", "--revision", "f" * 40) == 2
    assert LLAVA in one_line_error(capfd)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert vec(images, tmp_path, "--models", "llava", "--model-path", str(empty)) == 2
    assert "has no weights" in one_line_error(capfd)
    assert "needs a pretrained tag" in usage_error(ClipScorer.from_spec, "open_clip:ViT-B-32")
    assert "'nobody/clip': no such local folder, and not in the Hugging Face cache" in usage_error(ClipScorer.from_spec, "nobody/clip")
    msg = usage_error(BertScorer, "bert-base-uncased")
    assert "'bert-base-uncased'" in msg and "not in the Hugging Face cache" in msg
    broken = tmp_path / "broken_bert"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert", "num_hidden_layers": 2}')
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert f"'{broken}'" in usage_error(BertScorer, str(broken))


def test_hf_id_revision_pins_and_is_recorded(hf_cache, images, tmp_path, monkeypatch):
    hf_cache.activate(monkeypatch)
    sha = hf_cache.commits[LLAVA]
    assert vec(images, tmp_path / "a", "--models", "llava", "--model-path", LLAVA, "--revision", sha) == 0
    assert vec(images, tmp_path / "b", "--models", "llava", "--model-path", f"{LLAVA}@{sha}") == 0
    for d in ("a", "b"):
        m = json.loads((tmp_path / d / "llava" / "00000" / "manifest.json").read_text())
        assert (m["source"], m["revision"]) == (LLAVA, sha)


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_stages_1_to_8_on_default_sources_from_the_hf_cache(hf_cache, images, tmp_path, monkeypatch):
    """No --model-path, --model_id, --clip_model or --bertscore_model anywhere: every id resolves offline."""
    hf_cache.activate(monkeypatch)
    c = hf_cache.commits
    dev = ("--device", "cpu")
    # 1: every registered family from its published id
    assert extract_vectors.main(["--root", str(images), "--out_dir", str(tmp_path / "vec"), "--num_workers", "0",
                                 *dev]) == 0
    for fam in families():
        m = json.loads((tmp_path / "vec" / fam / "00000" / "manifest.json").read_text())
        default_id = get_adapter(fam).default_id
        assert (m["source"], m["revision"], m["complete"]) == (default_id, c[default_id], True), fam
    # 2: the original pipeline's reference, openai/clip-vit-large-patch14
    assert extract_clip.main(["--root", str(images), "--out_dir", str(tmp_path / "ref"), "--num_workers", "0",
                              *dev]) == 0
    m = json.loads((tmp_path / "ref" / "00000" / "manifest.json").read_text())
    assert (m["model"], m["source"], m["revision"], m["random_weights"]) == (CLIP_IDS[1], CLIP_IDS[1], c[CLIP_IDS[1]],
                                                                            False)
    # 3: geometry against the reference
    v = str(tmp_path / "vec" / "llava")
    assert extract_knn.main(["--pre_pt", v, "--post_pt", v, "--ref", f"clip:{tmp_path / 'ref'}", "--out_dir",
                             str(tmp_path / "knn"), "--k", "2", *dev]) == 0
    # 4-6: reconstructor, export through the real connector (stage 1's commit), evaluation
    recon = tmp_path / "recon"
    assert train_recon.main(["--vec_dir", str(tmp_path / "vec"), "--embed_model", "llava", "--out_dir", str(recon),
                             "--hidden_size", "16", "--epochs", "1", "--num_workers", "0", "--batch_size", "2",
                             "--train_split", "0.5", *dev]) == 0
    assert export_recon.main(["--model_dir", str(recon), "--out_base", str(tmp_path / "exp"), "--num_workers", "0",
                              *dev]) == 0
    exported = next((tmp_path / "exp").rglob("manifest.json"))
    m = json.loads(exported.read_text())
    assert (m["source"], m["revision"]) == (LLAVA, c[LLAVA])
    assert eval_recon.main(["--model_dir", str(recon), "--out_dir", str(tmp_path / "ev"), "--num_workers", "0",
                            *dev]) == 0
    # 7: captions scored with the DEFAULT scorers: Hessel et al.'s CLIP and bert-score's roberta-large
    cap = tmp_path / "cap"
    assert eval_captions.main(["--recon_dir", str(recon), "--image_dir", str(images), "--out_dir", str(cap),
                               "--caption_max_new_tokens", "6", "--with_clipscore", "--with_bertscore", *dev]) == 0
    side = json.loads((cap / "captions_llava.csv.scores.json").read_text())
    assert (side["clipscore"]["source"], side["clipscore"]["revision"]) == (CLIP_IDS[0], c[CLIP_IDS[0]])
    assert side["clipscore"]["random_weights"] is False
    b = side["bertscore"]
    assert (b["model"], b["revision"], b["num_layers"]) == (BERT_ID, c[BERT_ID], 17)
    assert all(x["clipscore_post_direct"] and x["bertscore_f1_post_direct"] for x in rows(cap / "captions_llava.csv"))
    # 8: perturbation captions from the store's own source, then scores with the default scorers
    pert = tmp_path / "pert"
    assert eval_perturb.main(["--vec_dir", str(tmp_path / "vec"), "--model_name", "llava", "--image_dir", str(images),
                              "--out_dir", str(pert), "--mode", "mask", "--level", "0.5", "--max_new_tokens", "6",
                              *dev]) == 0
    assert score_perturb.main(["--perturb_dir", str(pert), *dev]) == 0
    side = json.loads(next(pert.rglob("*.scores.json")).read_text())
    assert side["clipscore"]["revision"] == c[CLIP_IDS[0]] and side["bertscore"]["revision"] == c[BERT_ID]


def test_tiny_clip_scores_only_by_name_and_the_sidecar_says_so(hf_cache, tmp_path, monkeypatch):
    hf_cache.activate(monkeypatch)
    assert ClipScorer.from_spec(None).config["source"] == CLIP_IDS[0]
    cfg = ClipScorer.from_spec("tiny").config
    assert cfg["random_weights"] is True and cfg["revision"] is None
