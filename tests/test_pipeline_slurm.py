"""scripts/pipeline.sh under a real single-node Slurm (slurm_cluster fixture): the whole DAG, end to end.

Two DAGs are submitted side by side and followed to the end once, for every test of this module:

- ``full``: the pipeline on its default models (the trained testbed), one family (llava), an image root of three shards
  of two captioned images each, and a TRAIN_ROOT of two shards of three other images for the reconstructor,
  small settings. Every job must complete and every stage leave its outputs. Its emb job gets ``scancel --signal=USR1 --batch`` (what ``--signal=B:USR1@120`` sends
  before a time limit) while train_recon is mid-training: it must requeue itself, finish exactly where
  an uninterrupted emb run ends, and its dependants must run after it.
- ``failing``: one shard, and ``METRIC=manhattan`` (cal.sh's own setting, read by no other stage):
  cal must fail with the CLI's message in its log, and none of its dependants may ever start.

Job records are kept only MinJobAge=4 s after a job ends (no accounting), so the follower polls
``scontrol show job`` every 0.3 s and keeps the last record seen of every job / array task.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

try:
    from slurm_cluster import FINISHED, parse_scontrol
except ImportError:
    from tests.slurm_cluster import FINISHED, parse_scontrol

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PIPELINE, EMB = REPO / "scripts" / "pipeline.sh", REPO / "scripts" / "emb.sh"
SAMPLE = REPO / "sample" / "images"
SHARDS = {"00000": ["000010000", "000010001"], "00001": ["000010012", "000010013"], "photos": ["astronaut", "brick"]}
TRAIN_SHARDS = {"00000": ["000010002", "000010003", "000010004"], "00001": ["000010014", "000010015", "000010016"]}
# vec-train-llava (TRAIN_ROOT) runs beside vec-llava: the stages are submitted in this order, each after the
# previous one except that pair
STAGES = ["vec-llava", "vec-train-llava", "clip", "cal-llava", "emb-llava", "export-llava", "eval-recon-llava", "train-llava",
          "caption-llava", "perturb-llava-mask", "score-perturb", "figures"]
EMB_EPOCHS = 60  # ~6 s of training after ~6 s of imports: room to land USR1 mid-run
EMB_ARGS = f"--epochs {EMB_EPOCHS} --batch_size 1 --patience 0 --num_workers 0"
RECON = Path("output") / "recon" / "llava_mlp"
TIMEOUT = 900


@dataclass
class DagRun:
    """One pipeline.sh submission: its folder, `<stage> <jobid>` lines and the last record of each job."""

    base: Path
    ids: dict[str, str]
    records: dict[str, dict[str, str]] = field(default_factory=dict)  # JobId -> last `scontrol show job` record
    restarts: dict[str, int] = field(default_factory=dict)  # stage -> most restarts seen
    signalled: bool = False

    @property
    def data(self) -> Path:
        return self.base / "data"

    def tasks(self, stage: str) -> list[dict[str, str]]:
        """Last records of a stage's job (every task of an array), by task id."""
        jid = self.ids[stage]
        recs = [r for r in self.records.values() if jid in (r.get("ArrayJobId"), r["JobId"])]
        return sorted(recs, key=lambda r: r.get("ArrayTaskId", ""))

    def state(self, stage: str) -> str:
        return ",".join(sorted({r["JobState"] for r in self.tasks(stage)})) or "UNSEEN"

    def log(self, rec: dict[str, str]) -> str:
        """The job's output file (SLURM_ARGS sends every job's to base/logs/<name>-<JobId>.out)."""
        path = self.base / "logs" / f"{rec['JobName']}-{rec['JobId']}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def stage_log(self, stage: str) -> str:
        return "\n".join(self.log(r) for r in self.tasks(stage))

    def done(self) -> bool:
        return all(self.tasks(s) and all(r["JobState"] in FINISHED for r in self.tasks(s)) for s in self.ids)

    def summary(self) -> str:
        return "\n".join(f"{s} {self.ids[s]}: {self.state(s)} restarts={self.restarts.get(s)}" for s in self.ids)


# ---------------------------------------------------------------- submitting and following the DAGs
def _image_root(root: Path, shards: dict[str, list[str]]) -> Path:
    """Shards of captioned images copied from the committed sample."""
    for shard, keys in shards.items():
        (root / shard).mkdir(parents=True)
        for key in keys:
            for f in (SAMPLE / shard).glob(f"{key}.*"):
                shutil.copy(f, root / shard / f.name)
    return root


def _settings(base: Path, root: Path) -> dict[str, str]:
    """The pipeline's knobs for a small, fast CPU run, everything under `base`."""
    return {
        "MODELS": "llava", "ROOT": str(root), "DATA": str(base / "data"), "FIGURES": str(base / "figures"),
        "RESULTS": str(base / "results"), "EPOCHS": "1", "PERTURB": "mask", "MASK_LEVELS": "0,0.5",
        "DEVICE": "cpu", "OMP_NUM_THREADS": "1", "EMB_ARGS": EMB_ARGS, "PROFILE": "testbed",
    }


def _submit(cluster, base: Path, root: Path, resources: str = "--gres=none -c 1", **extra: str) -> DagRun:
    """Run pipeline.sh (Slurm auto-detected), every job's log in base/logs; parse its `<stage> <id>` lines."""
    (base / "logs").mkdir(parents=True)
    env = {**_settings(base, root), "SLURM_ARGS": f"{resources} --output={base}/logs/%x-%j.out", **extra}
    r = cluster.run(["bash", str(PIPELINE)], env=env, cwd=base, check=False, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "submitted; follow with: squeue -u" in r.stderr, r.stderr
    lines = [ln.split() for ln in r.stdout.splitlines()]
    assert all(len(ln) == 2 and ln[1].isdigit() for ln in lines), r.stdout
    return DagRun(base, dict(lines))


def _poll(cluster, runs: list[DagRun]) -> None:
    """Record the current state of every job of `runs` (keeping the records of jobs already purged)."""
    out = cluster.run(["scontrol", "-o", "show", "job"], check=False).stdout
    for rec in (parse_scontrol(ln) for ln in out.splitlines() if ln.startswith("JobId=")):
        for run in runs:
            for stage, jid in run.ids.items():
                if jid in (rec.get("ArrayJobId"), rec["JobId"]):
                    run.records[rec["JobId"]] = rec
                    run.restarts[stage] = max(run.restarts.get(stage, 0), int(rec.get("Restarts", "0")))


def _usr1_mid_emb(cluster, run: DagRun) -> None:
    """Once emb is RUNNING and has saved its first epoch's last.pt: USR1 to its batch shell, once."""
    if not run.signalled and run.state("emb-llava") == "RUNNING" and (run.data / RECON / "last.pt").exists():
        cluster.run(["scancel", "--signal=USR1", "--batch", run.ids["emb-llava"]])
        run.signalled = True


def _follow(cluster, full: DagRun, failing: DagRun) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        _poll(cluster, [full, failing])
        _usr1_mid_emb(cluster, full)
        if full.done() and failing.done():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"DAGs not finished after {TIMEOUT}s\n{full.summary()}\n--\n{failing.summary()}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def dags(slurm_cluster, tmp_path_factory):
    """(full, failing): both DAGs submitted and followed until every job of both has finished."""
    t0 = time.monotonic()
    tmp = tmp_path_factory.mktemp("pipeline")
    full = _submit(slurm_cluster, tmp / "full", _image_root(tmp / "images", SHARDS),
                   TRAIN_ROOT=str(_image_root(tmp / "train_images", TRAIN_SHARDS)))
    one_shard = _image_root(tmp / "images1", {"00000": SHARDS["00000"]})
    # no resource settings: pipeline.sh sizes each job to the node (wanted -c clamped, the fake GPUs kept)
    failing = _submit(slurm_cluster, tmp / "failing", one_shard, resources="", METRIC="manhattan")
    _follow(slurm_cluster, full, failing)
    print(f"\nboth DAGs finished in {time.monotonic() - t0:.0f}s")
    return full, failing


# ---------------------------------------------------------------- 1. the whole DAG completes
def _manifest_complete(path: Path) -> bool:
    return path.is_file() and json.loads(path.read_text()).get("complete") is True


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_stage_submitted_in_order_and_completed(dags):
    full, _ = dags
    assert list(full.ids) == STAGES and len(set(full.ids.values())) == len(STAGES)
    for stage in STAGES:
        recs = full.tasks(stage)
        assert recs and all(r["JobState"] == "COMPLETED" and r["ExitCode"] == "0:0" for r in recs), (
            stage, [(r["JobId"], r["JobState"], r["ExitCode"]) for r in recs], full.stage_log(stage))
        assert full.restarts[stage] == int(stage == "emb-llava"), full.summary()  # only the signalled job requeued


def test_each_stage_started_after_the_previous_one_ended(dags):
    """--dependency=afterok on the whole previous stage (every task of an array)."""
    full, _ = dags
    for prev, stage in itertools.pairwise(STAGES):
        if stage == "vec-train-llava":
            continue  # submitted in the same fan-out as vec-llava
        before = ["vec-llava", prev] if prev == "vec-train-llava" else [prev]  # clip waits for both
        prev_end = max(r["EndTime"] for p in before for r in full.tasks(p))
        assert all(r["StartTime"] >= prev_end for r in full.tasks(stage)), (prev, stage, full.tasks(stage))


def test_every_stage_left_its_outputs(dags):
    full, _ = dags
    d, out = full.data, full.data / "output"
    for shard in SHARDS:
        assert _manifest_complete(d / "vector" / "llava" / shard / "manifest.json"), shard
        assert _manifest_complete(d / "clip_ref" / shard / "manifest.json"), shard
        assert _manifest_complete(d / "vector" / "llava_conn_mlp" / shard / "manifest.json"), shard
    for shard in TRAIN_SHARDS:  # the reconstructor learnt from TRAIN_ROOT's own store
        assert _manifest_complete(d / "vector_train" / "llava" / shard / "manifest.json"), shard
    assert json.loads((d / RECON / "config.json").read_text())["store"]["shard_dirs"][0]["pre"].startswith(
        str(d / "vector_train"))
    assert list((out / "knn_out" / "llava").glob("overlap_*.json")), sorted((out / "knn_out").rglob("*"))
    assert (out / "knn_out" / "llava" / "per_image.csv").is_file()
    assert len(_csv_rows(d / RECON / "history.csv")) == EMB_EPOCHS and (d / RECON / "best_model.pt").is_file()
    assert list((d / "vector_recon" / "llava_recon").glob("*/pre_vectors_*.pt"))
    assert json.loads((out / "recon_eval" / "llava" / "summary.json").read_text())["n"] == 6  # every ROOT image
    assert (out / "connector" / "llava_mlp" / "best_model.pt").is_file()
    captions = _csv_rows(out / "captions" / "llava" / "captions_llava.csv")
    assert len(captions) == 6 and all(r["caption_post_direct"] and r["clipscore_drop"] for r in captions), captions
    assert {r["split"] for r in captions} == {"test"}  # none of ROOT's images trained the reconstructor
    for level in ("0", "0.5"):
        rows = _csv_rows(out / "perturb_out" / f"perturb_llava_mask_{level}.csv")
        assert len(rows) == 6 and all(r["caption_perturbed"] and r["clipscore_drop"] for r in rows), rows[:1]
    assert list((full.base / "figures").rglob("*.png")), "no figure"
    assert [p for p in (full.base / "results").rglob("*") if p.is_file()], "no results"


# ---------------------------------------------------------------- 2. arrays over shards
@pytest.mark.parametrize("stage", ["vec-llava", "clip"])
def test_array_runs_one_task_per_shard(dags, stage):
    full, _ = dags
    recs = full.tasks(stage)
    assert [r["ArrayTaskId"] for r in recs] == ["0", "1", "2"], recs
    assert all(r["ArrayJobId"] == full.ids[stage] and r["JobState"] == "COMPLETED" for r in recs)
    name = stage.split("-")[0]
    handled = [re.findall(rf"{name}: shards (\S+) on", full.log(r)) for r in recs]
    assert handled == [[s] for s in sorted(SHARDS)], handled  # task N -> the N-th shard, and only it


# ---------------------------------------------------------------- 3. USR1 mid-stage: requeue, same result
def _history(out: Path) -> list[tuple[str, ...]]:
    return [(r["epoch"], r["train_loss"], r["val_loss"], r["lr"]) for r in _csv_rows(out / "history.csv")]


def _uninterrupted_emb(full: DagRun, out: Path) -> None:
    """emb.sh under plain bash, same settings and store as the DAG's emb job: the reference run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(VEC=str(full.data / "vector_train"), OUT=str(out), MODEL_TYPE="mlp", DEVICE="cpu", EPOCHS="1",
               EXTRA_ARGS=EMB_ARGS, OMP_NUM_THREADS="1", VLMC_SLURM_ENV="/nonexistent")
    r = subprocess.run(["bash", str(EMB), "llava"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_usr1_requeues_emb_mid_run_and_matches_an_uninterrupted_run(dags, tmp_path):
    full, _ = dags
    log = full.stage_log("emb-llava")
    assert full.signalled, "emb finished before it could be signalled"
    assert full.state("emb-llava") == "COMPLETED" and full.restarts["emb-llava"] == 1, (full.summary(), log)
    for line in ("USR1: asking pid", "received SIGUSR1", "requeueing job", "restarted run #1", "emb: done"):
        assert line in log, (line, log)
    resumed = re.search(r"resumed from \S+: epoch (\d+)", log)
    assert resumed and 1 < int(resumed[1]) <= EMB_EPOCHS, log  # stopped mid-training, not before or after
    _uninterrupted_emb(full, tmp_path / "ref")
    assert _history(full.data / RECON) == _history(tmp_path / "ref")
    got, ref = (torch.load(d / "best_model.pt", weights_only=True) for d in (full.data / RECON, tmp_path / "ref"))
    assert got["state_dict"].keys() == ref["state_dict"].keys()
    assert all(torch.equal(v, ref["state_dict"][k]) for k, v in got["state_dict"].items())
    assert (got["meta"]["epoch"], got["meta"]["val_loss"]) == (ref["meta"]["epoch"], ref["meta"]["val_loss"])


def test_requeued_job_dependants_waited_for_its_rerun(dags):
    full, _ = dags
    (emb,) = full.tasks("emb-llava")
    for stage in ("export-llava", "eval-recon-llava", "train-llava"):
        (rec,) = full.tasks(stage)
        assert rec["JobState"] == "COMPLETED" and rec["StartTime"] >= emb["EndTime"], (stage, rec, emb)
    assert "export_recon: done" in full.stage_log("export-llava")


# ---------------------------------------------------------------- 4. a failing stage stops its dependants
def test_failing_stage_is_visible_and_its_dependants_never_start(dags):
    _, failing = dags
    assert [failing.state(s) for s in ("vec-llava", "clip")] == ["COMPLETED", "COMPLETED"], failing.summary()
    # submitted with no resource settings: each job asked for what the wrapper wants, clamped to the node
    cpus = max(int(r["NumCPUs"]) for s in ("vec-llava", "clip", "cal-llava") for r in failing.tasks(s))
    assert cpus == min(4, len(os.sched_getaffinity(0))), failing.summary()
    (cal,) = failing.tasks("cal-llava")
    assert cal["JobState"] == "FAILED" and cal["ExitCode"] == "2:0", cal
    assert "argument --metric: invalid choice: 'manhattan'" in failing.log(cal), failing.log(cal)
    for stage in STAGES[STAGES.index("emb-llava"):]:
        (rec,) = failing.tasks(stage)
        fields = {k: rec[k] for k in ("JobState", "Reason", "StartTime", "EndTime")}
        assert (rec["JobState"], rec["Reason"]) == ("CANCELLED", "DependencyNeverSatisfied"), (stage, fields)
        assert rec["StartTime"] in ("Unknown", rec["EndTime"]) and not failing.log(rec), (stage, fields)  # never ran
    (emb,) = failing.tasks("emb-llava")
    assert emb["Dependency"] == f"afterok:{cal['JobId']}(failed)", emb
    assert not (failing.data / "output" / "knn_out").exists() and not (failing.data / "output" / "recon").exists()
