"""train_recon end to end on synthetic stores: baselines, best checkpoint, split, schedule, strings, guards."""

from __future__ import annotations

import csv
import json
import math
import time

import pytest
import torch

from vlmc.models.reconstructors import load_reconstructor
from vlmc.store.normalization import Standardizer, load_stats
from vlmc.store.reader import index_samples, open_store
from vlmc.store.split import apply_split, load_split
from vlmc.train import train_recon
from vlmc.train.loop import Loop, lr_factor, steps_per_epoch
from vlmc.train.train_recon import evaluate_loss, main

try:  # tests/ on sys.path (pytest's default rootdir-less import) or the repo root (python -m pytest)
    from synthetic_store import synthetic_connector, write_synthetic_store
except ImportError:
    from tests.synthetic_store import synthetic_connector, write_synthetic_store

torch.set_num_threads(1)
FAST = ["--num_workers", "0", "--batch_size", "4", "--warmup_steps", "2"]


def _keys(n, start=10000):
    return [f"{i:09d}" for i in range(start, start + n)]


def _store(tmp_path, kind="gelu", n=48, corr="1:1", grid=(4, 4), d_pre=8, d_post=12, name="st"):
    shards = {"00000": _keys(n // 2), "00001": _keys(n - n // 2)}  # keys repeat across shards
    f = synthetic_connector(kind, d_pre, d_post)
    return write_synthetic_store(tmp_path / name, f, corr, grid, d_pre, shards, save_every=8)


def _train(store, out, *extra):
    rc = main(["--vec_dir", str(store), "--out_dir", str(out), *FAST, *extra])
    assert rc == 0
    return out


def _history(out):
    with open(out / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _val_loss(out):
    return torch.load(out / "best_model.pt", weights_only=True)["meta"]["val_loss"]


def _val_cosine(store, out):
    """Mean per-token cosine of Ê_pre vs E_pre over the held-out images, in the original space."""
    model, spec, meta = load_reconstructor(out)
    std = Standardizer(load_stats(out / "normalization.safetensors"), torch.device("cpu"), meta["normalize"])
    val = apply_split(index_samples(open_store(store)), load_split(out / "split.json"), "val")
    cos = []
    for s in val:
        post = torch.load(s.post_file, weights_only=True)["vecs"][s.row][None]
        pre = torch.load(s.pre_file, weights_only=True)["vecs"][s.row][None]
        with torch.no_grad():
            rec = std.pre_out(model(std.post_in(post), s.pre_grid, s.post_grid))
        cos.append(torch.nn.functional.cosine_similarity(rec, pre.float(), dim=-1).mean())
    return float(torch.stack(cos).mean())


def test_linear_recovers_a_linear_connector(tmp_path):
    store = _store(tmp_path, "linear")
    out = _train(store, tmp_path / "lin", "--model_type", "linear")
    assert _val_cosine(store, out) > 0.999
    assert len(_history(out)) == 1


def test_mlp_beats_linear_on_a_nonlinear_connector(tmp_path):
    store = _store(tmp_path, "gelu", n=64)
    lin = _train(store, tmp_path / "lin", "--model_type", "linear")
    mlp = _train(store, tmp_path / "mlp", "--model_type", "mlp", "--hidden_size", "64", "--epochs", "8", "--lr", "3e-3")
    assert json.loads((lin / "split.json").read_text()) == json.loads((mlp / "split.json").read_text())
    assert _val_loss(mlp) < 0.9 * _val_loss(lin)


@pytest.mark.parametrize(("corr", "kind", "grid"), [("merge 2x2", "merge", (4, 4)), ("none", "perceiver", (4, 4))])
def test_transformer_trains_on_merge_and_perceiver_stores(tmp_path, corr, kind, grid):
    store = _store(tmp_path, kind, n=24, corr=corr, grid=grid)
    out = _train(store, tmp_path / "tr", "--model_type", "transformer", "--hidden_size", "16", "--num_heads", "2",
                 "--epochs", "2")
    model, spec, _ = load_reconstructor(out)
    assert spec.t_pre == 16 and spec.t_post == 4 and spec.kind == corr.split()[0]
    assert len(_history(out)) == 2 and math.isfinite(_val_loss(out))


def test_history_seconds_count_each_epoch_once(tmp_path, monkeypatch):
    """Each training step takes >= 20 ms here, so the epochs dominate the run: their ``seconds`` add up to
    at least the steps' time and at most the wall time between config.json (written just before the first
    epoch) and the last history.csv write. Training time counted twice would exceed that window."""
    step = Loop._micro_step

    def slow_step(self, batch):
        time.sleep(0.02)
        return step(self, batch)

    monkeypatch.setattr(Loop, "_micro_step", slow_step)
    out = _train(_store(tmp_path, "gelu", n=32), tmp_path / "o", "--model_type", "mlp", "--hidden_size", "16",
                 "--no-init_linear", "--epochs", "3", "--batch_size", "1")
    hist = _history(out)
    n_steps = 3 * len(load_split(out / "split.json")["train"])  # batch 1: one step per image
    window = ((out / "history.csv").stat().st_mtime_ns - (out / "config.json").stat().st_mtime_ns) / 1e9
    assert 0.02 * n_steps <= sum(float(r["seconds"]) for r in hist) <= window, (hist, window)


def test_best_checkpoint_is_the_best_epoch_not_the_last(tmp_path):
    store = _store(tmp_path, "gelu", n=24)
    out = _train(store, tmp_path / "ov", "--model_type", "mlp", "--hidden_size", "128", "--num_layers", "3",
                 "--no-init_linear", "--no-skip", "--train_split", "0.1", "--epochs", "10", "--lr", "2e-2",
                 "--warmup_steps", "0", "--batch_size", "2", "--patience", "0")
    hist = _history(out)
    vals = [float(r["val_loss"]) for r in hist]
    best_epoch = vals.index(min(vals)) + 1
    assert best_epoch < len(vals) and vals[-1] > min(vals) * 1.05  # it overfits, so the test can fail
    model, _, meta = load_reconstructor(out)
    assert meta["epoch"] == best_epoch
    std = Standardizer(load_stats(out / "normalization.safetensors"), torch.device("cpu"))
    val = apply_split(index_samples(open_store(store)), load_split(out / "split.json"), "val")
    again = evaluate_loss(model, val, std, torch.device("cpu"), 4)
    assert again == pytest.approx(min(vals), rel=1e-5)


def test_held_out_images_never_reach_training(tmp_path, monkeypatch):
    store = _store(tmp_path, "gelu", n=32)
    seen: dict[str, list] = {"train": [], "stats": [], "selection": []}
    real_loader, real_stats = train_recon.make_loader, train_recon.compute_stats

    def spy_loader(samples, batch_size, shuffle, *a, **kw):
        if shuffle:
            seen["train"] += [s.id for s in samples]
        return real_loader(samples, batch_size, shuffle, *a, **kw)

    def spy_stats(samples, *a, **kw):
        seen["stats"] += [s.id for s in samples]
        return real_stats(samples, *a, **kw)

    real_eval = train_recon.evaluate_loss

    def spy_eval(model, samples, *a, **kw):
        seen["selection"] += [s.id for s in samples]
        return real_eval(model, samples, *a, **kw)

    monkeypatch.setattr(train_recon, "make_loader", spy_loader)
    monkeypatch.setattr(train_recon, "compute_stats", spy_stats)
    monkeypatch.setattr(train_recon, "evaluate_loss", spy_eval)
    out = _train(store, tmp_path / "o", "--model_type", "mlp", "--hidden_size", "16", "--epochs", "1")
    split = json.loads((out / "split.json").read_text())
    train, val, test = ({tuple(x) for x in split[p]} for p in ("train", "val", "test"))
    assert val and test and not (train & val or train & test or val & test) and len(train | val | test) == 32
    assert set(seen["train"]) == train and set(seen["stats"]) == train
    assert set(seen["selection"]) == val  # the best epoch is chosen on val; test is never looked at


def test_lr_schedule_counts_optimizer_steps_with_accumulation(tmp_path):
    assert lr_factor(0, 4, 10) == 0.25 and lr_factor(3, 4, 10) == 1.0 and lr_factor(10, 4, 10) == 0.0
    assert steps_per_epoch(7, 3) == 3
    store = _store(tmp_path, "gelu", n=32)  # 28 train images / batch 4 = 7 micro-batches per epoch
    out = _train(store, tmp_path / "o", "--model_type", "mlp", "--hidden_size", "16", "--epochs", "2",
                 "--accumulation_steps", "3", "--train_split", "0.875", "--warmup_steps", "2", "--patience", "0")
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["state"]["step"] == 6 and last["scheduler"]["last_epoch"] == 6
    lrs = [float(r["lr"]) for r in _history(out)]
    assert lrs[0] == pytest.approx(3e-4 * lr_factor(3, 2, 6)) and lrs[-1] == 0.0  # cosine reaches 0 at the end


def test_keys_stay_strings_through_split_and_history(tmp_path):
    store = write_synthetic_store(tmp_path / "st", synthetic_connector("linear", 4, 6), "1:1", (2, 2), 4,
                                  {"00000": ["000010000", "0012", "7", "000010003", "10", "010"]}, save_every=4)
    out = _train(store, tmp_path / "o", "--model_type", "linear", "--train_split", "0.5")
    split = json.loads((out / "split.json").read_text())
    keys = sorted(k for part in split.values() for _, k in part)
    assert keys == sorted(["000010000", "0012", "7", "000010003", "10", "010"])


def test_guards_fresh_run_resume_mismatch_and_eval_only(tmp_path):
    store = _store(tmp_path, "linear", n=16)
    out = _train(store, tmp_path / "o", "--model_type", "linear")
    assert main(["--vec_dir", str(store), "--out_dir", str(out), *FAST, "--model_type", "linear"]) == 2
    assert main(["--vec_dir", str(store), "--out_dir", str(out), *FAST, "--model_type", "mlp", "--resume"]) == 2
    stats = (out / "normalization.safetensors").read_bytes()
    assert main(["--vec_dir", str(store), "--out_dir", str(out), *FAST, "--eval_only"]) == 0
    assert main(["--vec_dir", str(store), "--out_dir", str(out), *FAST, "--model_type", "linear", "--resume"]) == 0
    assert (out / "normalization.safetensors").read_bytes() == stats
    result = json.loads((out / "eval_only.json").read_text())
    assert result["val_loss"] == pytest.approx(_val_loss(out), rel=1e-6) and not math.isnan(result["val_loss"])
    _train(store, out, "--model_type", "linear", "--overwrite", "--seed", "3")
    assert json.loads((out / "config.json").read_text())["args"]["seed"] == 3
