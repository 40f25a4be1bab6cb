"""scripts/emb.sh and scripts/export_recon.sh under plain bash, and emb.sh's USR1 → last.pt → requeue → resume
under a real Slurm (slurm_cluster fixture)."""

from __future__ import annotations

import csv
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from vlmc.store.vectors import ShardReader

try:  # tests/ on sys.path (pytest's default rootdir-less import) or the repo root (python -m pytest)
    from synthetic_store import synthetic_connector, write_synthetic_store
except ImportError:
    from tests.synthetic_store import synthetic_connector, write_synthetic_store

REPO = Path(__file__).resolve().parents[1]
EMB, EXPORT = REPO / "scripts" / "emb.sh", REPO / "scripts" / "export_recon.sh"


def _store(root: Path, n: int) -> Path:
    write_synthetic_store(root / "vec" / "synth", synthetic_connector("gelu", 8, 12), "1:1", (4, 4), 8,
                          {"00000": [f"{i:09d}" for i in range(n)]}, save_every=32)
    return root / "vec"


def _plain_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(VLMC_SLURM_ENV="/nonexistent", OMP_NUM_THREADS="1", VLMC_LOGLEVEL="WARNING", **extra)
    return env


def _epochs(out: Path) -> list[str]:
    with open(out / "history.csv", newline="") as f:
        return [r["epoch"] for r in csv.DictReader(f)]


def test_emb_then_export_under_plain_bash(tmp_path):
    vec = _store(tmp_path, 24)
    out = tmp_path / "recon"
    env = _plain_env(VEC=str(vec), OUT=str(out), RECON_TYPE="linear", DEVICE="cpu", EXTRA_ARGS="--num_workers 0")
    r = subprocess.run(["bash", str(EMB), "synth"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (out / "best_model.pt").exists() and "--resume" in r.stderr and "--model synth" in r.stderr
    env = _plain_env(MODEL_DIR=str(out), OUT_BASE=str(tmp_path / "vr"), DEVICE="cpu")
    r = subprocess.run(["bash", str(EXPORT), "synth", "--no_reproj", "--num_workers", "0"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    keys, pre = ShardReader.open(tmp_path / "vr" / "synth_recon" / "00000").tokens("pre")
    assert keys and pre[0].shape == (16, 8)
    r = subprocess.run(["bash", str(EXPORT), "nosuchmodel"], env=env | {"MODEL_DIR": str(tmp_path / "none")},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "best_model.pt does not exist (MODEL_DIR): run scripts/emb.sh" in r.stderr


@pytest.mark.slurm
@pytest.mark.slow
def test_emb_sh_usr1_requeues_and_resumes_from_last_pt(slurm_cluster, tmp_path):
    """`scancel --signal=USR1 --batch` (what --signal=B:USR1@120 does): train_recon saves last.pt and exits,
    the job requeues itself, and the rerun (--resume) finishes every epoch exactly once."""
    vec = _store(tmp_path, 160)
    out = tmp_path / "recon"
    (tmp_path / "logs").mkdir()
    env = {"VEC": str(vec), "OUT": str(out), "RECON_TYPE": "transformer", "DEVICE": "cpu", "OMP_NUM_THREADS": "1",
           "VLMC_LOGLEVEL": "INFO",
           "EXTRA_ARGS": "--hidden_size 32 --num_heads 2 --epochs 6 --batch_size 2 --num_workers 0 --patience 0"}
    job = slurm_cluster.run(["sbatch", "--parsable", "-c", "1", "--open-mode=append", str(EMB), "synth"],
                            env=env, cwd=tmp_path).stdout.strip()
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists():
        assert time.monotonic() < deadline and slurm_cluster.state(job) in ("PENDING", "RUNNING"), slurm_cluster.state(job)
        time.sleep(0.05)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])
    rc = slurm_cluster.wait(job, timeout=300)
    log = (tmp_path / "logs" / f"vlmc-emb-{job}.out").read_text()
    assert rc == 0, log
    assert "it resumes when it starts again" in log and "restarted run #1" in log and "resumed from" in log, log
    assert _epochs(out) == [str(e) for e in range(1, 7)]
    assert torch.load(out / "last.pt", weights_only=True)["state"]["finished"]
