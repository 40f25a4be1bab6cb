"""The test cluster itself: start/stop, sbatch --wait, arrays, failures, dependencies."""

from __future__ import annotations

import time

import pytest

try:
    from slurm_cluster import SlurmCluster, _running, parse_scontrol
except ImportError:
    from tests.slurm_cluster import SlurmCluster, _running, parse_scontrol

pytestmark = pytest.mark.slurm


def _script(path, body: str):
    path.write_text("#!/bin/bash\nset -eu\n" + body)
    return path


def test_started_fast_and_idle(slurm_cluster):
    assert slurm_cluster.start_seconds < 5, slurm_cluster.start_seconds
    out = slurm_cluster.run(["sinfo", "-h", "-N", "-o", "%T %c %G"]).stdout.split()
    assert out[0] == "idle" and int(out[1]) == slurm_cluster.cpus and out[2].startswith("gpu:")


def test_sbatch_wait_success(slurm_cluster, tmp_path):
    s = _script(tmp_path / "ok.sh", 'echo "hello $SLURM_JOB_ID from $SLURM_SUBMIT_DIR"\n')
    t0 = time.monotonic()
    r = slurm_cluster.run(["sbatch", "--wait", "-o", "out.txt", str(s)], cwd=tmp_path)
    latency = time.monotonic() - t0
    job_id = r.stdout.split()[-1]
    assert r.returncode == 0
    assert (tmp_path / "out.txt").read_text().strip() == f"hello {job_id} from {tmp_path}"
    assert latency < 30


def test_run_sbatch_returns_exit_code_and_passes_env(slurm_cluster, tmp_path):
    s = _script(tmp_path / "env.sh", 'echo "$MY_VAR" > "$SLURM_SUBMIT_DIR/var.txt"\n')
    job_id, rc = slurm_cluster.run_sbatch(s, "-o", "/dev/null", env={"MY_VAR": "x y"}, cwd=tmp_path)
    assert rc == 0 and job_id.isdigit()
    assert (tmp_path / "var.txt").read_text() == "x y\n"


def test_failure_propagates_through_sbatch_wait(slurm_cluster, tmp_path):
    s = _script(tmp_path / "bad.sh", "echo about to fail\nexit 3\n")
    r = slurm_cluster.run(["sbatch", "--wait", "-o", "bad.out", str(s)], cwd=tmp_path, check=False)
    assert r.returncode == 3, (r.stdout, r.stderr)
    _, rc = slurm_cluster.run_sbatch(s, "-o", "/dev/null", cwd=tmp_path)
    assert rc == 3


def test_array_job(slurm_cluster, tmp_path):
    s = _script(
        tmp_path / "arr.sh",
        'echo "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT" > "task_$SLURM_ARRAY_TASK_ID"\n',
    )
    r = slurm_cluster.run(["sbatch", "--wait", "--array=0-2", "-o", "arr_%A_%a.out", str(s)], cwd=tmp_path)
    assert r.returncode == 0
    assert sorted(p.read_text().strip() for p in tmp_path.glob("task_*")) == ["0/3", "1/3", "2/3"]
    assert len(list(tmp_path.glob("arr_*_*.out"))) == 3


def test_array_failure_is_max_task_exit_code(slurm_cluster, tmp_path):
    s = _script(tmp_path / "arrbad.sh", 'exit "$SLURM_ARRAY_TASK_ID"\n')
    r = slurm_cluster.run(
        ["sbatch", "--wait", "--array=0-2", "-o", "/dev/null", str(s)], cwd=tmp_path, check=False
    )
    assert r.returncode == 2
    _, rc = slurm_cluster.run_sbatch(s, "--array=0-2", "-o", "/dev/null", cwd=tmp_path)
    assert rc == 2


def test_afterok_on_failed_job_never_runs(slurm_cluster, tmp_path):
    bad = _script(tmp_path / "bad.sh", "exit 1\n")
    ok = _script(tmp_path / "ok.sh", 'touch "ran_$1"\n')
    a = slurm_cluster.sbatch(bad, "-o", "/dev/null", cwd=tmp_path)
    b = slurm_cluster.run(
        ["sbatch", "--parsable", f"--dependency=afterok:{a}", "-o", "/dev/null", str(ok), "b"], cwd=tmp_path
    ).stdout.strip()
    c = slurm_cluster.run(
        [
            "sbatch",
            "--parsable",
            f"--dependency=afterok:{a}",
            "--kill-on-invalid-dep=yes",
            "-o",
            "/dev/null",
            str(ok),
            "c",
        ],
        cwd=tmp_path,
    ).stdout.strip()
    assert slurm_cluster.wait(a, timeout=60) == 1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        (rb,), (rc_,) = slurm_cluster.jobs(b), slurm_cluster.jobs(c)
        if rb["Reason"] == "DependencyNeverSatisfied" and rc_["JobState"] == "CANCELLED":
            break
        time.sleep(0.2)
    # No accounting here: state comes from scontrol while the record lives (pending jobs never age out).
    assert (rb["JobState"], rb["Reason"]) == ("PENDING", "DependencyNeverSatisfied"), rb
    assert rc_["JobState"] == "CANCELLED", rc_
    slurm_cluster.run(["scancel", b])
    assert not (tmp_path / "ran_b").exists() and not (tmp_path / "ran_c").exists()


def test_afterok_on_success_runs(slurm_cluster, tmp_path):
    ok = _script(tmp_path / "ok.sh", 'touch "ran_$1"\n')
    a = slurm_cluster.run(
        ["sbatch", "--parsable", "-o", "/dev/null", str(ok), "a"], cwd=tmp_path
    ).stdout.strip()
    b = slurm_cluster.run(
        ["sbatch", "--parsable", f"--dependency=afterok:{a}", "-o", "/dev/null", str(ok), "b"], cwd=tmp_path
    ).stdout.strip()
    assert slurm_cluster.wait(b, timeout=60) == 0
    assert (tmp_path / "ran_a").exists() and (tmp_path / "ran_b").exists()


def test_foreign_slurm_env_is_ignored(slurm_cluster):
    # Tests run inside a real allocation, or with a user's SBATCH_PARTITION exported, still hit our cluster.
    assert not any(k.startswith(("SBATCH_", "SLURM_JOB")) for k in slurm_cluster.env)
    assert slurm_cluster.env["SLURM_CONF"] == str(slurm_cluster.conf)


def test_parse_scontrol_values_with_spaces():
    rec = parse_scontrol("JobId=5 JobName=a b Reason=None Command=/x y/run.sh WorkDir=/tmp")
    assert rec == {
        "JobId": "5",
        "JobName": "a b",
        "Reason": "None",
        "Command": "/x y/run.sh",
        "WorkDir": "/tmp",
    }


def test_second_cluster_side_by_side_and_teardown(slurm_cluster):
    """Free ports per cluster: a second one starts next to the session's; stop() ends its daemons."""
    c = SlurmCluster(gpus=0)
    try:
        c.start()
        assert c.start_seconds < 5
        pids = [int((c.base / "run" / f"{n}.pid").read_text()) for n in ("munged", "slurmctld", "slurmd")]
        assert c.run(["sinfo", "-h", "-o", "%T"]).stdout.strip() == "idle"
    finally:
        c.stop()
        c.remove()
    assert not [pid for pid in pids if _running(pid)]  # dead (perhaps a zombie until init reaps it)
    assert slurm_cluster.run(["sinfo", "-h", "-o", "%T"]).stdout.strip() in ("idle", "mixed", "allocated")
