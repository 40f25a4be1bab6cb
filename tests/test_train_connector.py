"""Replacement-connector training (src/train/train_connector.py, src/train/connectors.py) on tiny models.

Label masking (both padding sides), injection paths (mm_encoder_outputs vs. a hook on the connector vs. the
model's own forward), connector shapes and invertibility, loss going down on tiny-llava (mlp, pixels) and
tiny-idefics2 (crossattn, from a stage-1 store), a refused empty validation set, predict / export in the
stage-1 layout, SIGKILL + --resume landing exactly on an uninterrupted run, and scripts/train.sh.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmc.data.scenes import generate_scenes
from vlmc.models.base import Correspondence
from vlmc.models.load import load_vlm
from vlmc.store.vectors import ShardReader
from vlmc.train import train_connector as tc
from vlmc.train.connectors import CONNECTORS, build_connector, load_connector, make_spec, pooled_grid

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
TRAIN_SH = REPO / "scripts" / "train.sh"
FAST = ["--num_workers", "0", "--device", "cpu", "--batch_size", "4", "--warmup_steps", "2"]
PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """16 captioned 64-px scenes in two shards, and a private tiny-model cache."""
    root = tmp_path_factory.mktemp("connector")
    old = os.environ.get("VLMC_CACHE")
    os.environ["VLMC_CACHE"] = str(root / "cache")
    generate_scenes(root / "img", 16, shards=2, size=64)
    yield root
    if old is None:
        os.environ.pop("VLMC_CACHE", None)
    else:
        os.environ["VLMC_CACHE"] = old


def _history(out: Path) -> list[dict[str, str]]:
    with open(out / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _curve(rows, col="train_loss") -> list[float]:
    return [float(r[col]) for r in rows]


# -- labels ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_build_lm_batch_supervises_exactly_caption_and_eos(side):
    # a left-padded prompt batch as the processors return it, with a per-token extra and pixels
    prompt = {
        "input_ids": torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9]]),
        "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
        "mm_token_type_ids": torch.tensor([[0, 0, 0, 1, 0], [0, 0, 1, 1, 0]]),
        "pixel_values": torch.randn(2, 3, 4, 4),
    }
    caps, eos, pad = [[11, 12, 13], [14]], 2, 0
    out = tc.build_lm_batch(prompt, caps, eos, pad, side)
    prompt_real = [[5, 6, 7], [5, 6, 7, 8, 9]]
    types_real = [[0, 1, 0], [0, 0, 1, 1, 0]]
    length = max(len(p) + len(c) + 1 for p, c in zip(prompt_real, caps, strict=True))
    assert out["input_ids"].shape == out["labels"].shape == out["mm_token_type_ids"].shape == (2, length)
    assert out["pixel_values"] is prompt["pixel_values"]
    for i in range(2):
        mask = out["attention_mask"][i].bool()
        labels = out["labels"][i]
        sup = labels != tc.IGNORE
        n_real, n_pad = len(prompt_real[i]) + len(caps[i]) + 1, length - len(prompt_real[i]) - len(caps[i]) - 1
        assert labels[sup].tolist() == caps[i] + [eos]  # exactly the caption tokens + EOS
        assert out["input_ids"][i][mask].tolist() == prompt_real[i] + caps[i] + [eos]
        assert int(mask.sum()) == n_real
        pads = slice(0, n_pad) if side == "left" else slice(length - n_pad, length)
        assert not mask[pads].any() and (labels[pads] == tc.IGNORE).all() and (out["input_ids"][i][pads] == pad).all()
        real_pos = mask.nonzero().flatten().tolist()
        assert sup.nonzero().flatten().tolist() == real_pos[len(prompt_real[i]):]  # the prompt is never supervised
        assert out["mm_token_type_ids"][i][mask].tolist() == types_real[i] + [0] * (len(caps[i]) + 1)


def _items(root: Path, shard: str, n: int) -> list[tc.Item]:
    paths = sorted((root / "img" / shard).glob("*.png"))[:n]
    return [tc.Item(shard, p.stem, str(p), p.with_suffix(".txt").read_text().strip()) for p in paths]


@pytest.mark.parametrize("family", ["llava", "qwen2.5vl"])
def test_real_processor_labels_padding_sides_and_injection_paths(env, family):
    """On the family's own processor: supervised tokens = tokenizer(caption) + EOS for left and right padding;
    both paddings give the same CE; injecting the original E_post through mm_encoder_outputs reproduces the
    model's own forward; a replacement connector gives the same CE through mm_encoder_outputs and through the
    forward hook on the connector module (Qwen: window order and a ragged 8x12 grid included)."""
    vlm = load_vlm(family, "tiny")
    items = _items(env, "00000", 3)
    wide = env / f"wide_{family}.png"
    Image.new("RGB", (96, 64), (30, 120, 200)).save(wide)
    items.append(tc.Item("x", "wide", str(wide), "one object: a small red star on the left."))
    tok = vlm.processor.tokenizer
    ctx = tc.Context(vlm, tc.Parts(1e-3, None, None), False, False, torch.bfloat16)
    results = {}
    for side in ("left", "right"):
        batch = tc.BatchMaker(vlm, PROMPT, None, side)([tc.ItemDataset(items, False)[i] for i in range(len(items))])
        lm = batch["lm"]
        for i, it in enumerate(items):
            sup = lm["labels"][i] != tc.IGNORE
            want = tok(it.caption, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert lm["labels"][i][sup].tolist() == want == lm["input_ids"][i][sup].tolist()
            assert tok.pad_token_id not in lm["input_ids"][i][lm["attention_mask"][i].bool()].tolist()
        lengths = lm["attention_mask"].sum(1)
        assert len(set(lengths.tolist())) > 1, "rows of equal length: padding untested"
        pad_first = (lm["attention_mask"][:, 0] == 0).any()
        assert bool(pad_first) == (side == "left")
        pre, post, grids = ctx.encode(batch)
        spec = make_spec("mlp", vlm.adapter.correspondence, pre[0].shape[1], post[0].shape[1], grids[0])
        torch.manual_seed(0)
        conn = build_connector(spec)
        with torch.no_grad():
            orig = ctx.forward(None, batch, "mm")
            full = tc.to_model({k: v for k, v in lm.items() if k != "labels"}, ctx.device, vlm.dtype)
            own = ctx.lm_ce(full, lm["labels"], None)
            via_mm = ctx.forward(conn, batch, "mm")
            via_hook = ctx.forward(conn, batch, "hook")
        n_sup = sum(len(tok(it.caption, add_special_tokens=False)["input_ids"]) + 1 for it in items)
        assert orig[1] == own[1] == via_mm[1] == n_sup
        torch.testing.assert_close(orig[0], own[0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(via_mm[0], via_hook[0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(via_mm[2], via_hook[2], rtol=1e-5, atol=1e-4)
        assert abs(float(via_mm[0]) - float(orig[0])) > 1e-3  # the replacement really replaced something
        results[side] = (float(orig[0]), float(via_mm[0]))
    assert results["left"] == pytest.approx(results["right"], rel=1e-5)
    if family == "qwen2.5vl":
        assert len({g for g in grids}) == 2  # ragged grids went through both paths


def test_gradients_reach_connector_only_when_frozen(env):
    vlm = load_vlm("llava", "tiny")
    ctx = tc.Context(vlm, tc.Parts(1e-3, None, None), False, False, torch.bfloat16)
    batch = tc.BatchMaker(vlm, PROMPT, None, "right")([tc.ItemDataset(_items(env, "00000", 2), False)[i] for i in range(2)])
    pre, post, grids = ctx.encode(batch)
    conn = build_connector(make_spec("mlp", vlm.adapter.correspondence, pre[0].shape[1], post[0].shape[1], grids[0]))
    ce, n, _, _ = ctx.forward(conn, batch)
    (ce / n).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conn.parameters())
    assert all(p.grad is None for p in vlm.model.parameters())
    assert {"lm", "connector", "vision"} == set(ctx.groups) and all(ctx.groups.values())


# -- connectors -----------------------------------------------------------------------------------------------


LAYOUTS = [(Correspondence("1:1"), (4, 6), 0, 16), (Correspondence("merge", 2), (4, 6), 0, 16), (Correspondence("none"), (4, 6), 5, 16)]


@pytest.mark.parametrize("ctype", sorted(CONNECTORS))
@pytest.mark.parametrize("corr,grid,n_out,d_post", LAYOUTS, ids=["1:1", "merge", "none"])
def test_connector_output_shapes_match_the_lm(ctype, corr, grid, n_out, d_post):
    torch.manual_seed(0)
    spec = make_spec(ctype, corr, 8, d_post, grid, n_out=n_out, hidden_size=16, num_heads=2)
    model = build_connector(spec)
    grids = [grid, (6, 4), grid, (2, 2)]  # ragged: other aspect ratios and sizes (resized positions)
    pre = [torch.randn(h * w, 8) for h, w in grids]
    post, zs = model.apply(pre, grids)
    for (h, w), p, z in zip(grids, post, zs, strict=True):
        want = {"1:1": h * w, "merge": h * w // 4, "none": n_out}[corr.kind]
        assert p.shape == z.shape == (want, d_post) == (spec.out_tokens((h, w)), d_post)
    # batching same-grid images is the same as running them alone
    alone, _ = model(pre[2].unsqueeze(0), grid)
    torch.testing.assert_close(alone[0], post[2], rtol=1e-5, atol=1e-5)
    assert spec.to_dict() == type(spec).from_dict(spec.to_dict()).to_dict()


def test_invertible_connector_is_invertible_where_documented():
    torch.manual_seed(0)
    spec = make_spec("invertible", Correspondence("1:1"), 6, 16, (2, 3), num_layers=4)
    model = build_connector(spec)
    with torch.no_grad():  # move away from the identity initialisation
        for p in model.core.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(3, 6, 6)
    y, logdet = model.core.flow(x)
    assert not torch.allclose(y, x) and logdet.shape == (3, 6)
    torch.testing.assert_close(model.core.inverse_flow(y), x, rtol=1e-5, atol=1e-5)
    jac = torch.autograd.functional.jacobian(lambda v: model.core.flow(v)[0], x[0, 0])
    torch.testing.assert_close(torch.logdet(jac), logdet[0, 0], rtol=1e-4, atol=1e-4)
    assert model.core.is_injective()  # D_post 16 >= D_pre 6: the whole connector can be undone
    _, z = model(x, (2, 3))
    torch.testing.assert_close(model.core.pinv_post(z, (2, 3)), x, rtol=1e-4, atol=1e-4)
    merged = build_connector(make_spec("invertible", Correspondence("merge", 2), 6, 16, (2, 2)))
    assert not merged.core.is_injective()  # 4 x 6 = 24 > 16 channels: not invertible


def test_pooled_grid_and_spec_guards():
    assert pooled_grid(64, (24, 24)) == (8, 8)
    assert pooled_grid(8, (4, 4)) == (2, 4) and pooled_grid(6, (3, 9)) == (1, 6)
    with pytest.raises(Exception, match="n_out"):
        make_spec("crossattn", Correspondence("none"), 8, 8, (2, 2))
    with pytest.raises(Exception, match="unknown connector"):
        make_spec("nope", Correspondence("1:1"), 8, 8, (2, 2))


# -- end to end -----------------------------------------------------------------------------------------------


def test_llava_mlp_loss_decreases_then_predict_and_export(env, capsys):
    out = env / "llava_mlp"
    args = ["--embed_model", "llava", "--image_dir", str(env / "img"), "--out_dir", str(out), "--connector", "mlp",
            "--epochs", "4", "--lr", "3e-3", "--val_split", "0.25", *FAST]
    assert tc.main(args) == 0
    hist = _history(out)
    cfg = json.loads((out / "config.json").read_text())
    train, val = _curve(hist), _curve(hist, "val_loss")
    print(f"\nllava mlp: val CE original {cfg['baselines']['original_val_ce']:.4f}, untrained "
          f"{cfg['baselines']['initial_val_ce']:.4f}; train CE {train}; val CE {val}")
    assert [r["epoch"] for r in hist] == ["1", "2", "3", "4"]
    assert train[-1] < train[0] and all(b <= a + 1e-6 for a, b in zip(train, train[1:], strict=False))
    assert min(val) < cfg["baselines"]["initial_val_ce"]
    split = json.loads((out / "split.json").read_text())
    assert len(split["val"]) == 4 and len(split["train"]) == 12
    ck = torch.load(out / "best_model.pt", weights_only=True)
    assert ck["meta"]["val_loss"] == pytest.approx(min(val), rel=1e-5) and ck["vlm_state"] == {}
    assert ck["meta"]["epoch"] == 1 + val.index(min(val))

    exp = env / "vec_out"
    assert tc.main(["--out_dir", str(out), "--predict", "--max_new_tokens", "5", "--export_post_vectors",
                    "--export_dir", str(exp), "--num_workers", "0", "--device", "cpu"]) == 0
    with open(out / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r.keys() for r in rows][0] >= {"key", "shard", "image_path", "caption_gt", "caption_trained"}
    assert sorted((r["shard"], r["key"]) for r in rows) == sorted(map(tuple, split["val"]))
    assert all(r["caption_trained"] and r["caption_gt"] and Path(r["image_path"]).exists() for r in rows)
    vlm = load_vlm("llava", "tiny")
    t_lm = vlm.model.config.image_seq_length
    conn, _, _ = load_connector(out)
    for shard in ("00000", "00001"):
        reader = ShardReader.open(exp / "llava_conn_mlp" / shard)
        keys, post = reader.tokens("post")
        _, pre = reader.tokens("pre")
        assert len(keys) == 8 and all(p.shape == (t_lm, vlm.model.config.text_config.hidden_size) for p in post)
        assert reader.manifest["model"] == "llava_conn_mlp" and reader.manifest["correspondence"] == "1:1"
        again, _ = conn(pre[0].float().unsqueeze(0), (4, 4))  # post really is the trained connector's output
        torch.testing.assert_close(again[0].half(), post[0], rtol=2e-3, atol=2e-3)


def test_idefics2_crossattn_from_store_loss_decreases_and_exports(env):
    from vlmc.extract.extract_vectors import main as extract

    vec = env / "vec_in"
    assert extract(["--root", str(env / "img"), "--models", "idefics2", "--model-path", "tiny", "--out_dir", str(vec),
                    "--num_workers", "0", "--save_every", "4", "--device", "cpu"]) == 0
    out = env / "idefics2_crossattn"
    args = ["--embed_model", "idefics2", "--image_dir", str(env / "img"), "--vec_dir", str(vec), "--out_dir", str(out),
            "--connector", "crossattn", "--epochs", "3", "--lr", "3e-3", "--geometry_weight", "0.1", "--val_split", "0.25",
            *FAST]
    assert tc.main(args) == 0
    hist = _history(out)
    cfg = json.loads((out / "config.json").read_text())
    train, val = _curve(hist), _curve(hist, "val_loss")
    print(f"\nidefics2 crossattn (store): val CE original {cfg['baselines']['original_val_ce']:.4f}, untrained "
          f"{cfg['baselines']['initial_val_ce']:.4f}; train CE {train}; val CE {val}; "
          f"val geometry {_curve(hist, 'val_geometry')}")
    assert train[-1] < train[0] and min(val) < cfg["baselines"]["initial_val_ce"]
    assert all(math.isfinite(g) for g in _curve(hist, "train_geometry"))
    exp = env / "vec_out"
    assert tc.main(["--out_dir", str(out), "--export_post_vectors", "--export_dir", str(exp), "--export_split", "val",
                    "--device", "cpu"]) == 0
    n_lat = load_vlm("idefics2", "tiny").model.config.perceiver_config.resampler_n_latents
    split = json.loads((out / "split.json").read_text())
    got = []
    for shard in ("00000", "00001"):
        reader = ShardReader.open(exp / "idefics2_conn_crossattn" / shard)
        keys, post = reader.tokens("post")
        src_keys, src_pre = ShardReader.open(vec / "idefics2" / shard).tokens("pre")
        _, pre = reader.tokens("pre")
        assert reader.manifest["post"]["grid"] == [n_lat, 1] and all(p.shape == (n_lat, 64) for p in post)
        for k, p in zip(keys, pre, strict=True):
            torch.testing.assert_close(p, src_pre[src_keys.index(k)])  # pre is the stored E_pre, unchanged
        got += [[shard, k] for k in keys]
    assert sorted(got) == sorted(split["val"])


def test_empty_validation_set_is_refused(env, capsys):
    out = env / "refused"
    base = ["--embed_model", "llava", "--image_dir", str(env / "img"), "--out_dir", str(out), *FAST]
    assert tc.main([*base, "--val_split", "0.01"]) == 2  # 0.01 x 16 images rounds to 0
    assert "validation set empty" in capsys.readouterr().err
    assert not (out / "split.json").exists()
    assert tc.main([*base, "--val_split", "0"]) == 2
    assert "--val_split: must be in (0, 1), got 0" in capsys.readouterr().err  # refused at parse time
    assert tc.main([*base, "--limit", "1"]) == 2  # one image cannot give a train and a val side
    assert tc.main([*base, "--freeze_lm", "--train_lm_lr", "1e-4"]) == 2


RESUME = ["--connector", "mlp", "--epochs", "3", "--batch_size", "2", "--accumulation_steps", "2", "--lr", "2e-3",
          "--warmup_steps", "3", "--save_every_steps", "1", "--num_workers", "0", "--device", "cpu", "--val_split", "0.25"]


def test_sigkill_then_resume_matches_uninterrupted_run(env):
    base = ["--embed_model", "llava", "--image_dir", str(env / "img"), *RESUME]
    ref = env / "resume_ref"
    assert tc.main([*base, "--out_dir", str(ref)]) == 0
    out = env / "resume_killed"
    cmd = [sys.executable, str(REPO / "src" / "train" / "train_connector.py"), *base, "--out_dir", str(out)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "VLMC_LOGLEVEL": "WARNING"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "last.pt never appeared"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(out / "last.pt", weights_only=True)["state"]
    assert not state["finished"], "the kill landed after training finished: the test proves nothing"
    print(f"\nkilled at epoch {state['epoch'] + 1}, batch {state['batch']}, step {state['step']}")
    assert tc.main([*base, "--out_dir", str(out), "--resume"]) == 0
    keep = ("epoch", "train_loss", "val_loss", "train_geometry", "val_geometry", "lr")
    assert [{k: r[k] for k in keep} for r in _history(out)] == [{k: r[k] for k in keep} for r in _history(ref)]
    assert torch.load(out / "last.pt", weights_only=True)["state"]["finished"]
    a, b = (torch.load(d / "best_model.pt", weights_only=True)["state_dict"] for d in (out, ref))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a resume with other settings is refused instead of mixing runs
    assert tc.main([*base, "--out_dir", str(out), "--resume", "--connector", "crossattn"]) == 2


def test_train_sh_under_plain_bash(env):
    out = env / "sh_run"
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    run_env.update(VLMC_SLURM_ENV="/nonexistent", OMP_NUM_THREADS="1", VLMC_LOGLEVEL="WARNING",
                   IMAGES=str(env / "img"), OUT=str(out), DEVICE="cpu", EPOCHS="1", CONNECTOR="invertible", PREDICT="1",
                   MODEL_PATH="tiny",
                   EXTRA_ARGS="--num_workers 0 --batch_size 8 --max_new_tokens 3")
    r = subprocess.run(["bash", str(TRAIN_SH), "llava"], env=run_env, cwd=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "--resume" in r.stderr and "--connector invertible" in r.stderr and "--model llava" in r.stderr
    assert (out / "best_model.pt").exists() and [row["epoch"] for row in _history(out)] == ["1"]
    assert (out / "captions.csv").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_train_sh_usr1_requeues_and_resumes(slurm_cluster, env):
    """`scancel --signal=USR1 --batch` (what --signal=B:USR1@120 does): train_connector saves last.pt at the next
    optimizer step and exits 75, train.sh requeues the job, and the rerun (--resume) finishes every epoch once."""
    out = env / "slurm_run"
    work = env / "slurm_cwd"
    (work / "logs").mkdir(parents=True)
    job_env = {"IMAGES": str(env / "img"), "OUT": str(out), "DEVICE": "cpu", "OMP_NUM_THREADS": "1", "MODEL_PATH": "tiny",
               "VLMC_LOGLEVEL": "INFO", "VLMC_CACHE": os.environ["VLMC_CACHE"], "EPOCHS": "12",
               "EXTRA_ARGS": "--num_workers 0 --batch_size 2 --val_split 0.25"}
    job = slurm_cluster.run(["sbatch", "--parsable", "-c", "1", "--open-mode=append", str(TRAIN_SH), "llava"],
                            env=job_env, cwd=work).stdout.strip()
    deadline = time.monotonic() + 180
    while not (out / "last.pt").exists():
        assert time.monotonic() < deadline and slurm_cluster.state(job) in ("PENDING", "RUNNING"), slurm_cluster.state(job)
        time.sleep(0.05)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])
    rc = slurm_cluster.wait(job, timeout=300)
    log = (work / "logs" / f"vlmc-train-{job}.out").read_text()
    assert rc == 0, log
    assert "it resumes when it starts again" in log and "restarted run #1" in log and "resumed from" in log, log
    assert [r["epoch"] for r in _history(out)] == [str(e) for e in range(1, 13)]
    assert torch.load(out / "last.pt", weights_only=True)["state"]["finished"]
