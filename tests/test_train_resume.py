"""Kill / preempt a training subprocess, resume from last.pt, and land exactly where an uninterrupted run does."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from vlmc.train.train_recon import main
from vlmc.utils.stop import EXIT_PREEMPTED

try:  # tests/ on sys.path (pytest's default rootdir-less import) or the repo root (python -m pytest)
    from synthetic_store import synthetic_connector, write_synthetic_store
except ImportError:
    from tests.synthetic_store import synthetic_connector, write_synthetic_store

torch.set_num_threads(1)
EPOCHS = 5
ARGS = ["--model_type", "transformer", "--hidden_size", "32", "--num_heads", "2", "--num_layers", "2",
        "--epochs", str(EPOCHS), "--batch_size", "2", "--num_workers", "0", "--lr", "1e-3", "--warmup_steps", "5",
        "--patience", "0", "--accumulation_steps", "2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A store and an uninterrupted run on it (in-process, one thread)."""
    root = tmp_path_factory.mktemp("resume")
    store = write_synthetic_store(root / "st", synthetic_connector("gelu", 8, 12), "1:1", (4, 4), 8,
                                  {"00000": [f"{i:09d}" for i in range(160)]}, save_every=32)
    out = root / "ref"
    assert main(["--vec_dir", str(store), "--out_dir", str(out), *ARGS]) == 0
    return store, _history(out)


def _history(out):
    with open(out / "history.csv", newline="") as f:
        return [(r["epoch"], r["train_loss"], r["val_loss"], r["lr"]) for r in csv.DictReader(f)]


def _start(store, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "VLMC_LOGLEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "vlmc.train.train_recon", "--vec_dir", str(store), "--out_dir", str(out), *ARGS]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(path, proc, timeout=60.0):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.01)


def test_sigkill_after_first_epoch_then_resume_matches(reference, tmp_path):
    store, ref = reference
    out = tmp_path / "o"
    proc = _start(store, out)
    _wait_for(out / "last.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _history(out)
    assert 1 <= len(done) < EPOCHS, "the kill landed after training finished: the test proves nothing"
    assert main(["--vec_dir", str(store), "--out_dir", str(out), *ARGS, "--resume"]) == 0
    assert _history(out) == ref  # every epoch once, same losses as the uninterrupted run
    assert torch.load(out / "last.pt", weights_only=True)["state"]["finished"]


def test_sigusr1_saves_mid_epoch_exits_75_and_resumes_exactly(reference, tmp_path):
    store, ref = reference
    out = tmp_path / "o"
    proc = _start(store, out)
    _wait_for(out / "last.pt", proc)
    time.sleep(0.15)  # into epoch 2
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == EXIT_PREEMPTED, proc.stdout.read().decode()
    state = torch.load(out / "last.pt", weights_only=True)["state"]
    assert not state["finished"] and state["step"] > 0
    print("preempted at", {k: state[k] for k in ("epoch", "batch", "step")})
    assert main(["--vec_dir", str(store), "--out_dir", str(out), *ARGS, "--resume"]) == 0
    assert _history(out) == ref
