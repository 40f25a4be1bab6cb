"""scripts/common.sh: repo/python discovery, slurm.env, shard mapping, and the USR1 -> checkpoint -> requeue
path, under plain bash and under a real Slurm (slurm_cluster fixture)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMON = REPO / "scripts" / "common.sh"

# A resumable "stage": chunk files 0..N-1, skipping existing ones (like --skip_existing); on USR1 (or the
# stop file) it finishes the current chunk and exits 0. Every chunk written is appended to a ledger.
STAGE = textwrap.dedent("""\
    import os, signal, sys, time
    out, n, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    stop = []
    signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
    os.makedirs(out, exist_ok=True)
    for i in range(n):
        p = os.path.join(out, f"chunk_{i}")
        if os.path.exists(p):
            continue
        time.sleep(delay)
        open(p + ".tmp", "w").write(str(i)); os.replace(p + ".tmp", p)
        open(os.path.join(out, "ledger"), "a").write(f"{i} {os.environ.get('SLURM_RESTART_COUNT', '-')}\\n")
        if stop or os.path.exists(os.environ.get("VLMC_STOP_FILE", "/nonexistent")):
            print("checkpointed at", i, flush=True)
            sys.exit(0)
    print("all done", flush=True)
""")


def bash(code: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run `code` in bash after sourcing common.sh, with Slurm variables removed (plain-bash mode)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    base["VLMC_SLURM_ENV"] = "/nonexistent"
    full = f'set -euo pipefail\nsource "{COMMON}"\n{code}'
    return subprocess.run(
        ["bash", "-c", full], env={**base, **(env or {})}, capture_output=True, text=True, timeout=60, **kw
    )


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    for shard, files in {
        "b": ["1.png"],
        "a": ["x.JPG", "x.txt"],
        "A10": ["k.webp"],
        "x y": ["z.jpeg"],
        "empty": [],
        "caps_only": ["c.txt"],
        ".hidden": ["h.png"],
    }.items():
        (root / shard).mkdir(parents=True)
        for f in files:
            (root / shard / f).write_bytes(b"not really an image")
    (root / "notes.md").write_text("a file at the top is not an image")
    return root


# ---------------------------------------------------------------- plain bash
def test_root_python_and_log():
    r = bash('echo "$VLMC_ROOT|$VLMC_PYTHON"; log hello', env={"VLMC_PYTHON": "/x/python"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{REPO}|/x/python"
    assert r.stderr.rstrip().endswith("] hello") and r.stderr.startswith("[20")
    r = bash('echo "$VLMC_PYTHON"')
    expect = REPO / ".venv" / "bin" / "python"
    assert r.stdout.strip() == (str(expect) if expect.exists() else r.stdout.strip())


def test_log_tags_slurm_task():
    r = bash("log x", env={"SLURM_JOB_ID": "12", "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": "2"})
    assert " job 10[2]] x" in r.stderr


def test_env_file_env_wins(tmp_path):
    f = tmp_path / "slurm.env"
    f.write_bytes(
        b"# comment\nSBATCH_ACCOUNT=proj1\r\nexport SBATCH_PARTITION='gpu'\nHF_HOME=\"/scratch/a b\"\n"
        b"SBATCH_QOS=\nnot a line\nSBATCH_TIMELIMIT=1:00:00   # one hour\nA=x#y\nB='q # r' # c\nSBATCH_GRES=gpu:2"
    )
    r = bash(
        'echo "$SBATCH_ACCOUNT|$SBATCH_PARTITION|$HF_HOME|${SBATCH_QOS-unset}|$SBATCH_GRES|$SBATCH_TIMELIMIT|$A|$B"',
        env={"VLMC_SLURM_ENV": str(f), "SBATCH_PARTITION": "mine"},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "proj1|mine|/scratch/a b|unset|gpu:2|1:00:00|x#y|q # r"


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"RECON_TYPE": "mlp idefics2=resnet"}, "RECON_TYPE: 'idefics2=resnet' is not TYPE or MODEL=TYPE"),
        ({"MODEL_TYPE": "resnet"}, "RECON_TYPE: 'resnet' is not TYPE"),  # the deprecated name still reaches it
        ({"TRAIN_ROOT": "{root}"}, "TRAIN_ROOT is ROOT"),
        ({"TRAIN_ROOT": "{root}/missing"}, "no shards with images under TRAIN_ROOT"),
    ],
)
def test_pipeline_refuses_bad_settings_before_any_stage(tmp_path, settings, message):
    root = tmp_path / "images" / "00000"
    root.mkdir(parents=True)
    (root / "a.png").write_bytes(b"x")
    env = {k: v.format(root=root.parent) for k, v in settings.items()}
    env.update(ROOT=str(root.parent), DATA=str(tmp_path / "data"), VLMC_PYTHON="/nonexistent/python")
    r = bash(f'bash "{REPO}/scripts/pipeline.sh" --local', env=env)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert "ERROR" in r.stderr.splitlines()[-1] and not (tmp_path / "data").exists()


def test_env_file_example_parses(tmp_path):
    text = (REPO / "scripts" / "slurm.env.example").read_text()
    f = tmp_path / "slurm.env"
    f.write_text(
        "\n".join(ln[2:] if ln.startswith("# S") or ln.startswith("# HF") else ln for ln in text.splitlines())
    )
    r = bash('echo "$SBATCH_ACCOUNT|$SBATCH_GRES|$SBATCH_TIMELIMIT|$HF_HOME"', env={"VLMC_SLURM_ENV": str(f)})
    assert r.stdout.strip() == "my_project|gpu:a100:1|08:00:00|/scratch/me/hf", r.stderr
    assert (
        bash(
            'echo "${SBATCH_ACCOUNT-unset}"',
            env={"VLMC_SLURM_ENV": str(REPO / "scripts" / "slurm.env.example")},
        ).stdout.strip()
        == "unset"
    )


def test_list_shards_matches_python(image_root):
    r = bash(f'list_shards "{image_root}"')
    assert r.returncode == 0, r.stderr
    shards = r.stdout.splitlines()
    assert shards == ["A10", "a", "b", "x y"]
    try:
        from vlmc.data.images import _layout
    except ImportError:
        pytest.skip("vlmc not importable")
    assert shards == sorted(_layout(image_root))


def test_list_shards_flat(tmp_path):
    (tmp_path / "k.png").write_bytes(b"")
    assert bash(f'list_shards "{tmp_path}"').stdout.split() == ["_root"]


@pytest.mark.parametrize(
    "env, expect",
    [
        ({}, ["A10", "a", "b", "x y"]),  # plain bash: every shard
        (
            {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "1"},
            ["A10", "a", "b", "x y"],
        ),  # --array=0-0
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4"}, ["a"]),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "1"}, ["x y"]),  # --array=3: redo one
        ({"SHARDS": "b,a", "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}, ["a"]),
    ],
)
def test_task_shards(image_root, env, expect):
    r = bash(f'task_shards "{image_root}"', env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == expect


def test_task_shards_out_of_range_and_uncovered(image_root):
    r = bash(f'task_shards "{image_root}"', env={"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "5"})
    assert r.returncode == 1 and "use --array=0-3" in r.stderr
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MAX": "1"}
    r = bash(f'task_shards "{image_root}"', env=env)
    assert r.stdout.split() == ["a"] and "WARNING: shards b x y are beyond this array" in r.stderr
    r = bash(f'task_shards "{image_root}/empty"')
    assert r.returncode == 1 and "no shard with images" in r.stderr


def test_run_requeueable_passes_exit_code():
    assert bash("run_requeueable bash -c 'exit 7'").returncode == 7
    assert bash("run_requeueable true; echo after").stdout == "after\n"


def test_usr1_after_the_stage_finished_does_not_kill_the_shell():
    """Slurm's --signal=B:USR1@T may land after the stage ended: the job must still end with its status."""
    r = bash("run_requeueable true; kill -USR1 $$; sleep 0.2; echo survived")
    assert (r.returncode, r.stdout) == (0, "survived\n"), r.stderr


def _start_usr1_case(tmp_path, n=50, delay=0.1, extra=""):
    out = tmp_path / "chunks"
    (tmp_path / "stage.py").write_text(STAGE)
    code = f'{extra}\nrun_requeueable "{sys.executable}" "{tmp_path}/stage.py" "{out}" {n} {delay}'
    p = subprocess.Popen(
        ["bash", "-c", f'set -euo pipefail\nsource "{COMMON}"\n{code}'],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
    )
    deadline = time.monotonic() + 20
    while not (out / "chunk_1").exists():
        assert time.monotonic() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.02)
    return p, out


def test_usr1_checkpoints_child_plain_bash(tmp_path):
    p, out = _start_usr1_case(tmp_path)
    t0 = time.monotonic()
    p.send_signal(signal.SIGUSR1)
    stdout, stderr = p.communicate(timeout=30)
    assert p.returncode == 75, stderr  # stopped early, not requeued (no Slurm)
    assert time.monotonic() - t0 < 3  # returns as soon as the child exits, not after the grace period
    assert "checkpointed at" in stdout and "rerun the same command to resume" in stderr
    done = len(list(out.glob("chunk_*")))
    assert 2 <= done < 50
    assert not any(out.glob("*.tmp"))


def test_usr1_child_ignoring_it_gets_sigterm_after_grace(tmp_path):
    (tmp_path / "deaf.py").write_text(
        "import signal, time\nsignal.signal(signal.SIGUSR1, signal.SIG_IGN)\n"
        "open(__file__ + '.started', 'w').close()\ntime.sleep(60)\n"
    )
    p = subprocess.Popen(
        [
            "bash",
            "-c",
            f'source "{COMMON}"; VLMC_CHECKPOINT_GRACE=1 run_requeueable '
            f'"{sys.executable}" "{tmp_path}/deaf.py"',
        ],
        text=True,
        stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
    )
    while not (tmp_path / "deaf.py.started").exists():
        time.sleep(0.02)
    p.send_signal(signal.SIGUSR1)
    _, stderr = p.communicate(timeout=20)
    assert p.returncode == 75 and "no checkpoint after 1s: SIGTERM" in stderr


# ---------------------------------------------------------------- under Slurm
JOB = """#!/bin/bash
#SBATCH --requeue
set -euo pipefail
source "$VLMC_ROOT/scripts/common.sh"
run_requeueable "{py}" "{stage}" "{out}" {n} {delay}
log "job finished"
"""


@pytest.mark.slurm
def test_usr1_under_slurm_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    """`scancel --signal=USR1 --batch` is what `--signal=B:USR1@T` does at T s before the time limit."""
    out = tmp_path / "chunks"
    (tmp_path / "stage.py").write_text(STAGE)
    job = tmp_path / "job.sh"
    job.write_text(JOB.format(py=sys.executable, stage=tmp_path / "stage.py", out=out, n=30, delay=0.1))
    job_id = slurm_cluster.sbatch(
        job, "-o", "job.log", "--open-mode=append", cwd=tmp_path, env={"VLMC_ROOT": str(REPO)}
    )
    deadline = time.monotonic() + 60
    while not (out / "chunk_2").exists():
        assert time.monotonic() < deadline, (slurm_cluster.state(job_id), slurm_cluster.logs())
        time.sleep(0.05)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job_id])
    assert slurm_cluster.wait(job_id, timeout=90) == 0
    log = (tmp_path / "job.log").read_text()
    assert "it resumes when it starts again" in log and "restarted run #1" in log and "job finished" in log, log
    ledger = [ln.split() for ln in (out / "ledger").read_text().splitlines()]
    assert sorted(int(i) for i, _ in ledger) == list(range(30)), "every chunk written exactly once"
    first_run = [i for i, restart in ledger if restart in ("-", "0")]
    assert 3 <= len(first_run) < 30 and any(r == "1" for _, r in ledger)


@pytest.mark.slurm
@pytest.mark.slow
def test_time_limit_signal_requeues(slurm_cluster, tmp_path):
    """The real thing: --time=1 --signal=B:USR1@55. slurmctld checks time limits every ~30 s, so the
    signal arrives 5-35 s after the start, then the requeued run (5 s later) finishes the work."""
    out = tmp_path / "chunks"
    (tmp_path / "stage.py").write_text(STAGE)
    job = tmp_path / "job.sh"
    job.write_text(JOB.format(py=sys.executable, stage=tmp_path / "stage.py", out=out, n=100, delay=0.45))
    job_id, rc = slurm_cluster.run_sbatch(
        job,
        "--time=1",
        "--signal=B:USR1@55",
        "-o",
        "job.log",
        "--open-mode=append",
        cwd=tmp_path,
        env={"VLMC_ROOT": str(REPO)},
        timeout=150,
    )
    log = (tmp_path / "job.log").read_text()
    assert rc == 0, log
    assert "USR1: asking pid" in log and "restarted run #1" in log and "job finished" in log, log
    assert len(list(out.glob("chunk_*"))) == 100
