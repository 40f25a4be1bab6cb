"""A real single-node Slurm (munged + slurmctld + slurmd) living in a temp dir, for tests.

Used through the `slurm_cluster` session fixture (tests/conftest.py):

    def test_x(slurm_cluster, tmp_path):
        job_id, rc = slurm_cluster.run_sbatch("scripts/vec.sh", "--array=0-2", env={"OUT": ...})
        assert rc == 0

Also usable by hand, to try the sbatch wrappers against a throwaway cluster:

    eval "$(python tests/slurm_cluster.py up)"     # prints `export SLURM_CONF=...` lines
    sbatch --wait scripts/vec.sh; squeue; ...
    python tests/slurm_cluster.py down "$VLMC_TEST_SLURM_DIR"

Facts this relies on (Debian slurm-wlm 22.05): everything runs as root; the munge
socket lives in the temp dir (AuthInfo=socket=...); accounting is off (no sacct: job state comes from
`scontrol show job`, and a finished job's record is kept MinJobAge=4 s). Ports are picked free per cluster,
so several clusters (parallel test runs by different people) can share a machine.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel")
# Environment that would make our clients talk to (or submit like) another cluster, e.g. when the tests
# themselves run inside a real Slurm allocation or the user exported SBATCH_ACCOUNT.
_FOREIGN_ENV = re.compile(r"^(SLURM_|SBATCH_|SALLOC_|SRUN_|SQUEUE_|SINFO_|SCONTROL_)")
# sbatch --wait's own rule for "finished"; REQUEUE*/RESIZING/COMPLETING are not finished.
FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "OUT_OF_MEMORY",
}


def missing_binaries() -> list[str]:
    return [b for b in DAEMONS + CLIENTS if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def try_install() -> str | None:
    """apt-get install slurm-wlm munge (root only). Returns None on success, else why not."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "not root or no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0:  # package lists may be missing on a fresh machine
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, stdin=subprocess.DEVNULL)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return None if r.returncode == 0 and not missing_binaries() else f"apt-get failed: {r.stderr[-500:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    return max(kb // 1024 - 256, 100)  # a little below what slurmd measures, or the node is drained


def parse_scontrol(line: str) -> dict[str, str]:
    """One line of `scontrol -o show job` -> {key: value}; values may contain spaces."""
    return dict(re.findall(r"(\S+?)=(.*?)(?=\s+\S+?=|$)", line.strip()))


class SlurmCluster:
    def __init__(self, base: str | os.PathLike | None = None, cpus: int | None = None, gpus: int = 2):
        if base is None:  # short: the munge socket path must fit a sun_path (108 bytes)
            tmp = tempfile.gettempdir()
            base = tempfile.mkdtemp(prefix="vlmc-slurm-", dir=tmp if len(tmp) < 60 else "/tmp")
        self.base = Path(base)
        # the CPUs this process may use (not `nproc`, which honours OMP_NUM_THREADS and would make the
        # node single-CPU, serialising every job, whenever the tests run with OMP_NUM_THREADS=1)
        self.cpus = cpus or len(os.sched_getaffinity(0)) or 1
        self.gpus = gpus  # fake GPUs (GRES on plain files) so `#SBATCH --gres=gpu:1` scripts run on CPU
        self.node = socket.gethostname().split(".")[0]
        self.user = pwd.getpwuid(os.geteuid()).pw_name  # root here; a non-root user runs only its own jobs
        self.conf = self.base / "slurm.conf"
        self.partition = "debug"
        self.env: dict[str, str] = {}
        self.start_seconds: float | None = None

    # ------------------------------------------------------------------ lifecycle
    def _write_conf(self) -> None:
        b = self.base
        for d in ("state", "spool", "log", "munge", "run"):
            (b / d).mkdir(parents=True, exist_ok=True)
        os.chmod(b, 0o700)
        os.chmod(b / "munge", 0o700)
        key = b / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        conf = f"""\
ClusterName=vlmctest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={self.user}
SlurmdUser={self.user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={b}/munge/munge.socket,cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=4
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
KillWait=5
InactiveLimit=0
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool
SlurmctldPidFile={b}/run/slurmctld.pid
SlurmdPidFile={b}/run/slurmd.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
GresTypes=gpu
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_mem_mb()} {f"Gres=gpu:{self.gpus} " if self.gpus else ""}State=UNKNOWN
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        self.conf.write_text(conf)
        # slurmd drops file-less GPUs, so point the fake ones at plain files (task/none: nothing is enforced)
        for i in range(self.gpus):
            (b / "run" / f"fakegpu{i}").touch()
        gres = f"NodeName={self.node} Name=gpu File={b}/run/fakegpu[0-{self.gpus - 1}]\n" if self.gpus else ""
        (b / "gres.conf").write_text(gres)
        (b / "slurm.env").write_text(
            "# empty on purpose: tests must not pick up a user's scripts/slurm.env\n"
        )
        env = {k: v for k, v in os.environ.items() if not _FOREIGN_ENV.match(k)}
        env["SLURM_CONF"] = str(self.conf)
        env["VLMC_SLURM_ENV"] = str(b / "slurm.env")
        env["VLMC_TEST_SLURM_DIR"] = str(b)
        if "/usr/sbin" not in env.get("PATH", "").split(":"):
            env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin"
        self.env = env

    def start(self, timeout: float = 30.0) -> SlurmCluster:
        t0 = time.monotonic()
        self._write_conf()
        b = self.base
        self._spawn(
            [
                "munged",
                "--force",
                f"--key-file={b}/munge/munge.key",
                f"--socket={b}/munge/munge.socket",
                f"--pid-file={b}/run/munged.pid",
                f"--log-file={b}/log/munged.log",
                f"--seed-file={b}/munge/munged.seed",
            ]
        )
        self._spawn(["slurmctld", "-f", str(self.conf)])
        self._spawn(["slurmd", "-f", str(self.conf), "-N", self.node])
        while True:
            r = self.run(["sinfo", "-h", "-o", "%T"], check=False)
            if r.returncode == 0 and r.stdout.strip() == "idle":
                break
            bad = r.returncode == 0 and any(w in r.stdout for w in ("inval", "drain"))
            if bad or time.monotonic() - t0 > timeout:
                self.stop()
                raise RuntimeError(
                    f"Slurm node not idle after {time.monotonic() - t0:.1f}s (sinfo: {r.stdout!r} {r.stderr!r});"
                    f"\n{self.logs()}"
                )
            time.sleep(0.05)
        self.start_seconds = time.monotonic() - t0
        return self

    def _spawn(self, cmd: list[str]) -> None:
        # All three daemonize; the parent returns once the child is up (or fails with a message).
        r = subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30
        )
        if r.returncode != 0:
            self.stop()
            raise RuntimeError(f"{' '.join(cmd)} failed (rc={r.returncode}): {r.stderr}\n{self.logs()}")

    def stop(self) -> None:
        """Cancel jobs, then stop the daemons by their pid files (never by name)."""
        run = self.base / "run"
        if (run / "slurmctld.pid").exists():
            ids = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10).stdout.split()
            if ids:
                self.run(["scancel", *ids], check=False, timeout=10)
                end = time.monotonic() + 10
                while (
                    time.monotonic() < end
                    and self.run(["squeue", "-h", "-t", "R,CG"], check=False, timeout=10).stdout.strip()
                ):
                    time.sleep(0.2)
        pids = []
        for name in ("slurmd", "slurmctld", "munged"):
            pidfile = run / f"{name}.pid"
            try:
                pids.append(int(pidfile.read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                continue
            pidfile.unlink(missing_ok=True)
        _terminate(pids)  # all at once: each takes 1.5-2 s to exit on SIGTERM

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def logs(self, tail: int = 40) -> str:
        out = []
        for f in sorted((self.base / "log").glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"==> {f} <==\n" + "\n".join(lines))
        return "\n".join(out)

    # ------------------------------------------------------------------ clients
    def run(
        self, cmd: list[str], env: dict | None = None, check: bool = True, timeout: float = 60, **kw
    ) -> subprocess.CompletedProcess:
        """Run a command against this cluster (our SLURM_CONF; foreign SLURM_*/SBATCH_* removed)."""
        full = dict(self.env, **(env or {}))
        r = subprocess.run(
            cmd, env=full, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout, **kw
        )
        if check and r.returncode != 0:
            raise RuntimeError(f"{cmd} failed (rc={r.returncode}):\nstdout: {r.stdout}\nstderr: {r.stderr}")
        return r

    def sbatch(
        self,
        script: str | os.PathLike,
        *args: str,
        env: dict | None = None,
        cwd: str | os.PathLike | None = None,
    ) -> str:
        """Submit without waiting; returns the job id (the array's id for an array job)."""
        r = self.run(["sbatch", "--parsable", *args, str(script)], env=env, cwd=cwd)
        return r.stdout.strip().split(";")[0]

    def run_sbatch(
        self,
        script: str | os.PathLike,
        *args: str,
        env: dict | None = None,
        wait: bool = True,
        cwd: str | os.PathLike | None = None,
        timeout: float = 300,
    ) -> tuple[str, int | None]:
        """Submit `script` with sbatch options `args`; with wait=True return (job_id, rc) once every task has
        finished, rc computed as `sbatch --wait` does (max over array tasks; 128+signal when killed). Polls
        scontrol every 0.1 s instead of sbatch --wait's fixed 2 s sleeps. wait=False returns (job_id, None)."""
        job_id = self.sbatch(script, *args, env=env, cwd=cwd)
        return job_id, (self.wait(job_id, timeout) if wait else None)

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job` records for a job (all tasks of an array); [] once purged or unknown."""
        r = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        return [parse_scontrol(ln) for ln in r.stdout.splitlines() if ln.strip().startswith("JobId=")]

    def state(self, job_id: str) -> str:
        recs = self.jobs(job_id)
        return ",".join(sorted({r["JobState"] for r in recs})) if recs else "PURGED"

    def wait(self, job_id: str, timeout: float = 300) -> int:
        end = time.monotonic() + timeout
        while True:
            recs = self.jobs(job_id)
            if not recs:
                raise RuntimeError(f"job {job_id} vanished before we saw it finish (MinJobAge too short?)")
            if all(r["JobState"] in FINISHED for r in recs):
                return max(_exit_code(r) for r in recs)
            if time.monotonic() > end:
                states = [(r["JobId"], r["JobState"], r.get("Reason")) for r in recs]
                raise TimeoutError(f"job {job_id} not finished after {timeout}s: {states}")
            time.sleep(0.1)


def _exit_code(rec: dict[str, str]) -> int:
    code, sig = (int(x) for x in rec.get("ExitCode", "0:0").split(":"))
    if code == 0 and sig == 0 and rec["JobState"] != "COMPLETED":
        return 1  # e.g. cancelled while pending
    return code if code or not sig else 128 + sig


def _running(pid: int) -> bool:
    """Alive and not a zombie (in a container without a reaping init, dead daemons stay zombies)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _terminate(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after `grace` seconds."""
    alive = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            alive.append(pid)
        except ProcessLookupError:
            pass
    end = time.monotonic() + grace
    while alive:
        alive = [pid for pid in alive if _running(pid)]
        if time.monotonic() > end:
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.05)


def main(argv: list[str]) -> int:
    if len(argv) >= 1 and argv[0] == "up":
        if missing_binaries() and (why := try_install()):
            print(f"cannot install Slurm: {why}", file=sys.stderr)
            return 1
        c = SlurmCluster(argv[1] if len(argv) > 1 else None).start()
        print(
            f"# started in {c.start_seconds:.2f}s; stop with: python {__file__} down {c.base}",
            file=sys.stderr,
        )
        for k in ("SLURM_CONF", "VLMC_SLURM_ENV", "VLMC_TEST_SLURM_DIR"):
            print(f"export {k}={c.env[k]}")
        print("export PATH=$PATH:/usr/sbin")
        return 0
    if len(argv) == 2 and argv[0] == "down":
        c = SlurmCluster(argv[1])
        c.env = dict(os.environ, SLURM_CONF=str(c.conf))
        c.stop()
        c.remove()
        return 0
    print("usage: slurm_cluster.py up [DIR] | down DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
