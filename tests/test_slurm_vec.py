"""scripts/vec.sh under plain bash and under a real Slurm: first with a stub python that records its
arguments (the wrapper's own mechanics), then end to end with the real stage-1 CLI on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VEC = REPO / "scripts" / "vec.sh"
SHARDS = ["s0", "s1", "s2", "s3"]

STUB = f"""#!{sys.executable}
import json, os, sys
rec = {{"argv": sys.argv[1:], "task": os.environ.get("SLURM_ARRAY_TASK_ID"), "cwd": os.getcwd()}}
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(rec) + "\\n")
"""


@pytest.fixture
def stub(tmp_path):
    """Image root with 4 (fake) shards, a stub VLMC_PYTHON, and the env to point vec.sh at them."""
    for s in SHARDS:
        (tmp_path / "img" / s).mkdir(parents=True)
        (tmp_path / "img" / s / "00001.png").write_bytes(b"")
    exe = tmp_path / "stub_python"
    exe.write_text(STUB)
    exe.chmod(0o755)
    (tmp_path / "logs").mkdir()
    env = {
        "VLMC_PYTHON": str(exe),
        "STUB_LOG": str(tmp_path / "calls.jsonl"),
        "ROOT": str(tmp_path / "img"),
        "OUT": str(tmp_path / "out"),
    }
    return tmp_path, env


def calls(tmp_path) -> list[dict]:
    f = tmp_path / "calls.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines()] if f.exists() else []


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_plain_bash_runs_every_shard_inline(stub):
    tmp_path, env = stub
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    full.update(env, EXTRA_ARGS="--batch_size 3 --max_items 5", VLMC_SLURM_ENV="/nonexistent")
    r = subprocess.run(
        ["bash", str(VEC), "--prompt", "two words"],
        env=full,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    (c,) = calls(tmp_path)
    argv = c["argv"]
    assert argv[0] == str(REPO / "src" / "extract" / "extract_vectors.py")
    assert flag(argv, "--shards") == ",".join(SHARDS)
    assert flag(argv, "--root") == env["ROOT"] and flag(argv, "--out_dir") == env["OUT"]
    # the cluster defaults: every family, each one's published checkpoint (no --model-path), --device auto
    assert flag(argv, "--model") == "all" and "--model-path" not in argv and flag(argv, "--device") == "auto"
    assert "--resume" in argv and c["task"] is None
    assert argv[-6:] == ["--batch_size", "3", "--max_items", "5", "--prompt", "two words"]


@pytest.mark.slurm
def test_sbatch_default_array_is_one_task_for_all_shards(slurm_cluster, stub):
    # Submitted from a folder outside the repo: vec.sh finds the repo through the job's Command= path.
    tmp_path, env = stub
    job_id, rc = slurm_cluster.run_sbatch(VEC, "-c", "1", env=env, cwd=tmp_path)
    log = tmp_path / "logs" / f"vlmc-vec-{job_id}_0.out"
    assert rc == 0, log.read_text() if log.exists() else slurm_cluster.logs()
    (c,) = calls(tmp_path)
    assert flag(c["argv"], "--shards") == ",".join(SHARDS) and c["task"] == "0"
    assert "vec: done" in log.read_text()


@pytest.mark.slurm
@pytest.mark.parametrize("where", ["repo", "scripts", "vlmc_root"])
def test_sbatch_array_maps_tasks_to_shards(slurm_cluster, stub, where):
    tmp_path, env = stub
    cwd = {"repo": REPO, "scripts": REPO / "scripts", "vlmc_root": tmp_path}[where]
    if where == "vlmc_root":
        env = dict(env, VLMC_ROOT=str(REPO))
    out = f"{tmp_path}/logs/%x-%A_%a.out"
    job_id, rc = slurm_cluster.run_sbatch(
        VEC, "-c", "1", f"--array=0-{len(SHARDS) - 1}", "-o", out, env=env, cwd=cwd
    )
    assert rc == 0, [p.read_text() for p in (tmp_path / "logs").iterdir()]
    got = sorted((c["task"], flag(c["argv"], "--shards")) for c in calls(tmp_path))
    assert got == [(str(i), s) for i, s in enumerate(SHARDS)]
    assert all(c["cwd"] == str(cwd) for c in calls(tmp_path))


@pytest.mark.slurm
def test_sbatch_array_larger_than_shards_fails_loudly(slurm_cluster, stub):
    tmp_path, env = stub
    job_id, rc = slurm_cluster.run_sbatch(VEC, "-c", "1", "--array=3-4", env=env, cwd=tmp_path)
    assert rc == 1
    assert [flag(c["argv"], "--shards") for c in calls(tmp_path)] == ["s3"]
    log = (tmp_path / "logs" / f"vlmc-vec-{job_id}_4.out").read_text()
    assert "array task 4 has no shard: 4 shard(s)" in log and "use --array=0-3" in log


@pytest.mark.slurm
def test_gpu_request_default_and_override(slurm_cluster, stub):
    tmp_path, env = stub
    default = slurm_cluster.sbatch(VEC, "--hold", env=env, cwd=tmp_path)
    cpu = slurm_cluster.sbatch(VEC, "--hold", "--gres=none", env=env, cwd=tmp_path)
    cpu_env = slurm_cluster.sbatch(
        VEC, "--hold", env=dict(env, SBATCH_GRES="none"), cwd=tmp_path
    )  # slurm.env way
    try:
        (d,), (c,), (e,) = slurm_cluster.jobs(default), slurm_cluster.jobs(cpu), slurm_cluster.jobs(cpu_env)
        assert d.get("TresPerNode") == "gres:gpu:1" and "TresPerNode" not in c and "TresPerNode" not in e
        assert d["JobName"] == "vlmc-vec" and d["Requeue"] == "1" and d["TimeLimit"] == "04:00:00"
        assert d["NumCPUs"] == "2", d  # what any node has: plain sbatch never pends forever on CPUs
    finally:
        slurm_cluster.run(["scancel", default, cpu, cpu_env])


# ---------------------------------------------------------------- end to end, real CLI, tiny model
def _real_cli_or_skip():
    if not (REPO / "src" / "extract" / "extract_vectors.py").exists():
        pytest.skip("src/extract/extract_vectors.py not written yet")
    try:
        from PIL import Image  # noqa: F401

        import vlmc.extract.extract_vectors  # noqa: F401
    except ImportError as e:
        pytest.skip(f"stage-1 CLI not importable: {e}")


def _images(root: Path, shards: dict[str, int]) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for shard, n in shards.items():
        (root / shard).mkdir(parents=True)
        for k in range(n):
            img = rng.integers(0, 255, (40 + k % 3, 48, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / shard / f"{k:09d}.png")


def _check_out(out: Path, shards: dict[str, int], save_every: int) -> None:
    for shard, n in shards.items():
        d = out / "llava" / shard
        manifest = json.loads((d / "manifest.json").read_text())
        assert manifest["complete"] is True, manifest
        chunks = -(-n // save_every)
        for i in range(chunks):
            assert (d / f"pre_vectors_{i:05d}.pt").is_file() and (d / f"post_vectors_{i:05d}.pt").is_file()
        assert not (d / f"pre_vectors_{chunks:05d}.pt").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_vec_sh_end_to_end_tiny_model(slurm_cluster, tmp_path):
    """`sbatch --wait scripts/vec.sh`, as users run it, on the offline tiny LLaVA: once as a 2-task array,
    once with the default single task; every shard ends with a complete manifest and its chunk files."""
    _real_cli_or_skip()
    shards = {"00000": 3, "00001": 5}
    _images(tmp_path / "img", shards)
    (tmp_path / "logs").mkdir()
    for args, out in ((["--array=0-1"], "out_array"), ([], "out_single")):
        env = {
            "ROOT": str(tmp_path / "img"),
            "OUT": str(tmp_path / out),
            "MODELS": "llava",
            "MODEL_PATH": "tiny",
            "DEVICE": "cpu",
        }
        r = slurm_cluster.run(
            ["sbatch", "--wait", "-c", "1", *args, str(VEC), "--save_every", "2", "--num_workers", "0"],
            env=env,
            cwd=tmp_path,
            check=False,
            timeout=600,
        )
        logs = "\n".join(p.read_text() for p in (tmp_path / "logs").iterdir())
        assert r.returncode == 0, (r.stderr, logs)
        _check_out(tmp_path / out, shards, 2)


@pytest.mark.slurm
@pytest.mark.slow
def test_vec_sh_usr1_requeue_resumes_real_cli(slurm_cluster, tmp_path):
    """USR1 mid-run (what --signal=B:USR1@120 sends): the stage stops, the job requeues itself, and the
    rerun finishes from the chunks already committed (--skip_existing)."""
    _real_cli_or_skip()
    shards = {"00000": 80}
    _images(tmp_path / "img", shards)
    (tmp_path / "logs").mkdir()
    out = tmp_path / "out"
    env = {"ROOT": str(tmp_path / "img"), "OUT": str(out), "DEVICE": "cpu", "MODELS": "llava", "MODEL_PATH": "tiny"}
    job = slurm_cluster.run(
        [
            "sbatch",
            "--parsable",
            "-c",
            "1",
            "--open-mode=append",
            str(VEC),
            "--save_every",
            "2",
            "--num_workers",
            "0",
            "--batch_size",
            "2",
        ],
        env=env,
        cwd=tmp_path,
    ).stdout.strip()
    deadline = time.monotonic() + 120
    while not (out / "llava" / "00000" / "pre_vectors_00001.pt").exists():
        assert time.monotonic() < deadline and slurm_cluster.state(job) in ("PENDING", "RUNNING"), (
            slurm_cluster.state(job)
        )
        time.sleep(0.05)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])
    rc = slurm_cluster.wait(job, timeout=300)
    log = (tmp_path / "logs" / f"vlmc-vec-{job}_0.out").read_text()
    assert rc == 0, log
    assert "it resumes when it starts again" in log and "restarted run #1" in log, log
    _check_out(out, shards, 2)
