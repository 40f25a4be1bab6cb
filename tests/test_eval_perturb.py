"""Stage 8 (eval_perturb) on tiny LLaVA: identities at level 0, batch invariance, cache reuse, resume, stops, bad args."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlmc.data.scenes import write_scenes
from vlmc.eval import eval_perturb, evaluate, inject
from vlmc.eval.score_perturb import load_perturb_csv
from vlmc.extract import extract_vectors
from vlmc.utils.rows import read_table, write_table
from vlmc.utils.stop import StopFlag

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
N = 10  # 6 images in shard 00000, 4 in 00001 (same keys as the first 4 of 00000, different pictures)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("perturb")
    images = root / "img"
    write_scenes(images / "00000", n=6, seed=5, size=64, first_index=10000)
    write_scenes(images / "00001", n=4, seed=6, size=64, first_index=10000)
    rc = extract_vectors.main(["--root", str(images), "--out_dir", str(root / "vec"), "--models", "llava",
                               "--model-path", "tiny", "--num_workers", "0", "--device", "cpu"])  # fp16 store (default)
    assert rc == 0
    return images, root / "vec"


def run(store, out: Path, *args: str) -> int:
    images, vec = store
    return eval_perturb.main(["--vec_dir", str(vec), "--model_name", "llava", "--image_dir", str(images), "--out_dir",
                              str(out), "--device", "cpu", "--max_new_tokens", "16", "--batch_size", "4", *args])


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_level_zero_is_the_identity_and_columns_are_what_score_perturb_reads(store, tmp_path):
    assert run(store, tmp_path, "--mode", "mask", "--level", "0,1") == 0
    assert run(store, tmp_path, "--mode", "orthogonal", "--level", "0") == 0
    for name in ("perturb_llava_mask_0.csv", "perturb_llava_orthogonal_0.csv"):
        r = rows(tmp_path / name)
        assert len(r) == N and all(x["caption_perturbed"] == x["caption_original"] for x in r)
    full = rows(tmp_path / "perturb_llava_mask_1.csv")
    assert sum(x["caption_perturbed"] != x["caption_original"] for x in full) >= N // 2  # every token dropped
    assert list(full[0]) == list(eval_perturb.COLUMNS)
    assert {(x["mode"], x["level"], x["seed"]) for x in full} == {("mask", "1", "0")}
    ids = [(x["shard"], x["key"]) for x in full]
    assert ids == sorted(ids) and len(set(ids)) == N and ids[0] == ("00000", "000010000")
    load_perturb_csv(tmp_path / "perturb_llava_mask_1.csv")  # the scorer accepts it
    side = (tmp_path / "perturb_llava_mask_1.csv.run.json").read_text()
    assert '"fill": "zero"' in side and '"seed": 0' in side


def test_same_seed_and_key_same_caption_across_batch_sizes_and_shards_draw_apart(store, tmp_path):
    assert run(store, tmp_path / "b1", "--mode", "noise", "--level", "0", "--batch_size", "1") == 0
    assert run(store, tmp_path / "b3", "--mode", "noise", "--level", "0", "--batch_size", "3") == 0
    a, b = rows(tmp_path / "b1/perturb_llava_noise_0.csv"), rows(tmp_path / "b3/perturb_llava_noise_0.csv")
    assert a == b
    assert sum(x["caption_perturbed"] != x["caption_original"] for x in a) >= 1
    assert run(store, tmp_path / "s1", "--mode", "noise", "--level", "0", "--seed", "1") == 0
    c = rows(tmp_path / "s1/perturb_llava_noise_0.csv")
    assert [x["caption_original"] for x in c] == [x["caption_original"] for x in a]
    assert [x["caption_perturbed"] for x in c] != [x["caption_perturbed"] for x in a]  # another seed, other draws


def test_caption_original_generated_once_and_reused_by_later_runs(store, tmp_path):
    assert run(store, tmp_path, "--mode", "lowrank", "--level", "0.5") == 0
    cache = tmp_path / "cache" / "original_llava.csv"
    df = read_table(cache)
    assert len(df) == N and df["key"].iloc[0] == "000010000"
    df.loc[0, "caption"] = "CACHED"  # a later run must take caption_original from here, not regenerate it
    write_table(cache, df)
    assert run(store, tmp_path, "--mode", "mask", "--level", "0.3") == 0
    first = rows(tmp_path / "perturb_llava_mask_0.3.csv")[0]
    assert first["caption_original"] == "CACHED" and first["key"] == "000010000"
    assert run(store, tmp_path / "other", "--cache_dir", str(tmp_path / "cache"), "--mode", "mask", "--level", "0.3",
               "--max_new_tokens", "8") == 0  # another fingerprint: regenerated
    assert rows(tmp_path / "other/perturb_llava_mask_0.3.csv")[0]["caption_original"] != "CACHED"


def test_resume_adds_no_duplicates_and_keeps_string_keys(store, tmp_path):
    assert run(store, tmp_path, "--mode", "mask", "--level", "0.5", "--limit", "3") == 0
    path = tmp_path / "perturb_llava_mask_0.5.csv"
    assert len(rows(path)) == 3
    assert run(store, tmp_path, "--mode", "mask", "--level", "0.5", "--resume") == 0
    assert run(store, tmp_path, "--mode", "mask", "--level", "0.5", "--resume") == 0
    r = rows(path)
    assert len(r) == N and len({(x["shard"], x["key"]) for x in r}) == N
    assert "000010000" in path.read_text() and all(len(x["key"]) == 9 for x in r)
    assert path.read_text().count("key,shard,") == 1  # one header
    ref = tmp_path / "ref"
    assert run(store, ref, "--mode", "mask", "--level", "0.5") == 0
    assert r == rows(ref / "perturb_llava_mask_0.5.csv")  # resumed == uninterrupted
    assert run(store, tmp_path, "--mode", "mask", "--level", "0.5", "--resume", "--seed", "3") == 2  # other settings


def test_stop_request_checkpoints_then_resume_finishes(store, tmp_path, monkeypatch):
    stop = tmp_path / "stop"
    stop.touch()
    monkeypatch.setenv("VLMC_STOP_FILE", str(stop))
    assert run(store, tmp_path, "--mode", "noise", "--level", "10", "--batch_size", "2") == 75
    path = tmp_path / "perturb_llava_noise_10.csv"
    assert len(rows(path)) == 2  # the first batch was written before stopping
    monkeypatch.delenv("VLMC_STOP_FILE")
    assert run(store, tmp_path, "--mode", "noise", "--level", "10", "--batch_size", "2", "--resume") == 0
    assert len(rows(path)) == N


def test_the_evaluator_runs_any_condition_list_without_a_model(store, tmp_path):
    """The shared evaluator alone: a toy condition (no model), resume keeps finished rows, rows in store order."""
    images, vec = store

    class PostMean:  # a toy condition: the stored E_post's mean, read and cast by the evaluator
        columns = required = ("post_mean",)

        def values(self, cap, batch):
            return [{"post_mean": f"{float(p.mean()):.6g}"} for p in batch.posts]

    st = inject.open_vectors(vec, "llava")
    samples = inject.store_samples(st)
    vlm = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    cap = evaluate.Captioner(vlm, "", 1, 3, None, None, inject.CaptionCache(tmp_path / "cache.csv", {}, {}))
    out = evaluate.Output(tmp_path / "toy.csv", (evaluate.Identity(), PostMean()), "toy")
    index = inject.ImageIndex(images)
    with StopFlag() as stop:
        assert evaluate.evaluate(cap, index, samples[:4], out, False, 2, stop).new == 4
        res = evaluate.evaluate(cap, index, samples, out, True, 2, stop)
    assert (res.new, res.kept, res.skipped) == (N - 4, 4, 0)
    r = rows(out.path)
    assert list(r[0]) == ["key", "shard", "image_path", "post_mean"]
    assert [(x["shard"], x["key"]) for x in r] == [s.id for s in samples]
    assert r[0]["post_mean"] == f"{float(inject.PostReader().load(samples[:1], torch.float32)[0].mean()):.6g}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "mask", "--level", "2"], "mask level must be in [0, 1]"),
        (["--mode", "lowrank"], "--level is required"),
        (["--mode", "mask", "--level", "x"], "is not a number"),
        (["--mode", "mask", "--level", "0.1", "--batch_size", "0"], "--batch_size"),
        (["--mode", "mask", "--level", "0.1", "--model_name", "nosuch"], "no vector shards"),
        (["--mode", "mask", "--level", "0.1", "--image_dir", "/nonexistent"], "does not exist"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message, store, tmp_path, capfd):
    assert run(store, tmp_path, *args) == 2
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip() and "Loading weights" not in ln]
    assert len(err) == 1 and message in err[0], err


def test_cli_runs_as_a_script_and_help_states_the_image_and_deepstack_rules():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(REPO / "src/eval/eval_perturb.py"), "--help"], capture_output=True,
                         text=True, env=env, check=True).stdout
    for flag in ("--vec_dir", "--image_dir", "--model_name", "--model_path", "--mode", "--level", "--seed", "--fill",
                 "--out_dir", "--max_new_tokens", "--batch_size", "--limit", "--device", "--resume", "--shards",
                 "--deepstack"):
        assert flag in out
    assert "prompt's image tokens" in out and "leaks" in out
