"""Every Slurm wrapper in scripts/: --help with its settings and defaults, docs/cluster.md generated from it,
the cluster defaults (data/images, every family, published checkpoints) or one line naming what to set,
renamed settings, and job sizes fitted to the partition (stub sinfo here; the real single-node Slurm below).

Regenerate docs/cluster.md's settings table after changing a wrapper's settings:
    PYTHONPATH=$PWD/.pypath .venv/bin/python tests/test_slurm_wrappers.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
# the sbatch wrappers (each declares its settings with `setting` in common.sh)
WRAPPERS = ["vec.sh", "clip.sh", "cal.sh", "emb.sh", "export_recon.sh", "eval_recon.sh", "train.sh", "caption.sh",
            "perturb.sh", "score_perturb.sh", "figures.sh"]
DOC = REPO / "docs" / "cluster.md"
BEGIN, END = "<!-- settings:begin (generated: python tests/test_slurm_wrappers.py) -->", "<!-- settings:end -->"


def plain_env(**extra: str) -> dict[str, str]:
    """The caller's environment without Slurm's, no site file, and no wrapper setting leaking in."""
    drop = ("SLURM_", "SBATCH_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    for k in ("ROOT", "OUT", "MODELS", "MODEL_PATH", "MODEL_TYPE", "RECON_TYPE", "PROFILE", "VEC", "IMAGES",
              "SLURM_ARGS", "DEVICE", "DATA", "MODEL_ID", "REF_MODEL", "REF_TYPE", "POOL", "REF_POOL"):
        env.pop(k, None)
    env.update(VLMC_SLURM_ENV="/nonexistent", **extra)
    return env


def bash(args: list[str], env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *map(str, args)], env=env or plain_env(), cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def md_rows(wrapper: str, **env: str) -> list[list[str]]:
    r = bash([SCRIPTS / wrapper, "--help"], env=plain_env(VLMC_HELP_FORMAT="md", **env))
    assert r.returncode == 0, r.stderr
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in r.stdout.splitlines()]


def asks(wrapper: str) -> tuple[str, str, str, str]:
    """(#SBATCH -c, --gres, --time, the -c submit.sh / pipeline.sh want) of a wrapper's header."""
    text = (SCRIPTS / wrapper).read_text()

    def one(pattern: str, default: str) -> str:
        m = re.search(pattern, text, re.M)
        return m[1] if m else default

    c = one(r"^#SBATCH --cpus-per-task=(\d+)$", "1")
    return c, one(r"^#SBATCH --gres=(\S+)$", "none"), one(r"^#SBATCH --time=(\S+)$", "-"), \
        one(r"^#VLMC --cpus-per-task=(\d+)$", c)


def render_table() -> str:
    """docs/cluster.md's generated block: what each wrapper asks Slurm for, and every wrapper's settings with
    both profiles' defaults."""
    lines = ["| wrapper | plain `sbatch`: -c | --gres | --time | `submit.sh` / `pipeline.sh`: -c (clamped) |",
             "|---|---|---|---|---|"]
    lines += ["| {} | {} | {} | {} | {} |".format(w, *asks(w)) for w in WRAPPERS]
    lines += ["", "| wrapper | setting | default (PROFILE=cluster) | PROFILE=testbed | meaning |", "|---|---|---|---|---|"]
    for w in WRAPPERS:
        r = bash([SCRIPTS / w, "--help"], env=plain_env(VLMC_HELP_FORMAT="md"))
        lines += r.stdout.splitlines()
    return "\n".join(lines)


# ---------------------------------------------------------------- --help
@pytest.mark.parametrize("wrapper", [*WRAPPERS, "submit.sh", "pipeline.sh"])
def test_help_exits_0_without_data(wrapper, tmp_path):
    """--help needs nothing: no data/, no store (cal.sh --help used to stop at 'no stage-1 store')."""
    r = bash([SCRIPTS / wrapper, "--help"], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() and not r.stderr, r.stderr
    if wrapper in WRAPPERS:
        names = [row[1].strip("`") for row in md_rows(wrapper)]
        assert names, "no settings declared"
        for name in names:
            assert re.search(rf"^  {name} +\[", r.stdout, re.M), (name, r.stdout)
        assert "Slurm: -c 2" in r.stdout and "PROFILE" in r.stdout


def test_help_shows_each_profiles_defaults():
    cluster = bash([SCRIPTS / "vec.sh", "--help"]).stdout
    testbed = bash([SCRIPTS / "vec.sh", "--help"], env=plain_env(PROFILE="testbed")).stdout
    assert re.search(r"ROOT +\[data/images\]", cluster) and re.search(r"MODEL_PATH +\[empty\]", cluster)
    assert re.search(r"MODELS +\[all\]", cluster)
    assert re.search(r"ROOT +\[sample/images\]", testbed) and re.search(r"MODEL_PATH +\[testbed\]", testbed)
    assert "submit.sh / pipeline.sh ask -c 4" in cluster and "--gres=gpu:1" in cluster


def test_bad_profile_is_one_line():
    r = bash([SCRIPTS / "vec.sh"], env=plain_env(PROFILE="demo"))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "PROFILE=demo" in r.stderr


def test_docs_cluster_md_table_is_generated_from_the_wrappers():
    text = DOC.read_text()
    assert BEGIN in text and END in text
    got = text.split(BEGIN)[1].split(END)[0].strip()
    assert got == render_table(), "docs/cluster.md is stale: run `python tests/test_slurm_wrappers.py`"


# ---------------------------------------------------------------- cluster defaults, one line when input is missing
def _repo_copy(tmp_path: Path) -> Path:
    """A checkout with scripts/ only: no data/, no .venv (the wrappers stop before any Python)."""
    repo = tmp_path / "repo"
    shutil.copytree(SCRIPTS, repo / "scripts")
    (repo / "logs").mkdir()
    return repo


@pytest.mark.parametrize(
    ("wrapper", "args", "var"),
    [("vec.sh", [], "ROOT"), ("clip.sh", [], "ROOT"), ("cal.sh", ["llava"], "VEC"), ("emb.sh", [], "VEC"),
     ("export_recon.sh", [], "MODEL_DIR"), ("eval_recon.sh", [], "MODEL_DIR"), ("train.sh", [], "IMAGES"),
     ("caption.sh", [], "VEC"), ("perturb.sh", [], "VEC"), ("score_perturb.sh", [], "PERTURB_DIR"),
     ("pipeline.sh", ["--local"], "ROOT")],
)
def test_missing_default_input_stops_with_one_line_naming_the_setting(tmp_path, wrapper, args, var):
    repo = _repo_copy(tmp_path)
    r = bash([repo / "scripts" / wrapper, *args], cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    (line,) = r.stderr.splitlines()
    assert "ERROR" in line and (f"({var})" in line or f"{var}=" in line), line
    assert str(repo / "data") in line  # the cluster default: data/ in the repository


STUB = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


@pytest.fixture
def stub(tmp_path):
    """A stub VLMC_PYTHON recording its argv, and one shard of one (empty) image."""
    (tmp_path / "img" / "s0").mkdir(parents=True)
    (tmp_path / "img" / "s0" / "a.png").write_bytes(b"")
    exe = tmp_path / "python"
    exe.write_text(STUB)
    exe.chmod(0o755)
    return tmp_path, {"VLMC_PYTHON": str(exe), "STUB_LOG": str(tmp_path / "calls.jsonl")}


def calls(tmp_path: Path) -> list[list[str]]:
    return [json.loads(ln) for ln in (tmp_path / "calls.jsonl").read_text().splitlines()]


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_vec_cluster_defaults_pass_no_model_path(stub):
    tmp_path, env = stub
    r = bash([SCRIPTS / "vec.sh"], env=plain_env(ROOT=str(tmp_path / "img"), **env), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (argv,) = calls(tmp_path)
    assert flag(argv, "--model") == "all" and "--model-path" not in argv and "--model_path" not in argv
    assert flag(argv, "--device") == "auto" and flag(argv, "--out_dir") == str(REPO / "data" / "vector")


def test_train_cluster_default_is_the_published_checkpoint(stub):
    """train_connector.py's own default is the random tiny model: the wrapper passes the family's HF id."""
    tmp_path, env = stub
    real = f"{sys.executable}"
    shim = tmp_path / "shim"  # `-c` snippets go to the real interpreter, stage CLIs to the recording stub
    shim.write_text(f'#!/bin/bash\nif [[ $1 == -c ]]; then exec "{real}" "$@"; fi\nexec "{env["VLMC_PYTHON"]}" "$@"\n')
    shim.chmod(0o755)
    r = bash([SCRIPTS / "train.sh", "idefics2"],
             env=plain_env(IMAGES=str(tmp_path / "img"), OUT=str(tmp_path / "o"), **dict(env, VLMC_PYTHON=str(shim))))
    assert r.returncode == 0, r.stderr
    (argv,) = calls(tmp_path)
    assert flag(argv, "--model-path") == "HuggingFaceM4/idefics2-8b"
    r = bash([SCRIPTS / "train.sh", "nosuch"], env=plain_env(IMAGES=str(tmp_path / "img"), VLMC_PYTHON=str(shim)))
    assert r.returncode == 2 and r.stderr.strip().startswith("train: unknown model 'nosuch'"), r.stderr


def test_vec_testbed_profile(stub):
    tmp_path, env = stub
    r = bash([SCRIPTS / "vec.sh"], env=plain_env(PROFILE="testbed", OUT=str(tmp_path / "o"), **env), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (argv,) = calls(tmp_path)
    assert flag(argv, "--root") == str(REPO / "sample" / "images") and flag(argv, "--model-path") == "testbed"


def test_renamed_settings(stub, tmp_path):
    tmp, env = stub
    (tmp / "recon").mkdir()
    (tmp / "recon" / "best_model.pt").write_bytes(b"")
    # emb/eval_recon: MODEL_TYPE still works, with a deprecation line; RECON_TYPE wins over it
    r = bash([SCRIPTS / "emb.sh", "llava"], env=plain_env(VEC=str(tmp), OUT=str(tmp / "o"), MODEL_TYPE="linear", **env))
    assert r.returncode == 0 and "MODEL_TYPE is deprecated" in r.stderr and "use RECON_TYPE" in r.stderr, r.stderr
    r = bash([SCRIPTS / "eval_recon.sh"], env=plain_env(MODEL_DIR=str(tmp / "recon"), MODEL_TYPE="mlp",
                                                        RECON_TYPE="transformer", OUT=str(tmp / "e"), **env))
    assert r.returncode == 0 and "deprecated" not in r.stderr, r.stderr
    # clip.sh: the reconstructor's MODEL_TYPE (exported by pipeline.sh / --export=ALL) must not reach the backend
    r = bash([SCRIPTS / "clip.sh"], env=plain_env(ROOT=str(tmp / "img"), OUT=str(tmp / "c"), MODEL_TYPE="mlp",
                                                  MODEL_ID="tiny-clip", POOL="max", **env))
    assert r.returncode == 0 and "MODEL_ID is deprecated" in r.stderr and "MODEL_TYPE=mlp ignored" in r.stderr
    assert "POOL=max ignored (cal.sh's kNN pooling)" in r.stderr
    emb, _, clip = calls(tmp)
    assert flag(emb, "--recon_type") == "linear" and flag(clip, "--ref_type") == "auto"
    assert flag(clip, "--pool") == "cls"
    assert flag(clip, "--model_id") == "tiny-clip"


def test_pipeline_resolves_every_family_by_default(stub):
    tmp_path, env = stub
    code = 'source scripts/common.sh; MODELS=$("$VLMC_PYTHON" -c "from vlmc.models.base import families; ' \
           'print(*families())"); echo "$MODELS"'
    r = subprocess.run(["bash", "-c", code], cwd=REPO, env=plain_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert {"llava", "idefics2", "qwen2.5vl", "qwen3.5"} <= set(r.stdout.split())


# A stub interpreter for a whole pipeline run: records argv, and leaves what the next stage checks for.
PIPE_STUB = f"""#!{sys.executable}
import json, os, sys
from pathlib import Path
a = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(a) + "\\n")
get = lambda k: a[a.index(k) + 1] if k in a else None
script = Path(a[0]).name if a else ""
if script == "scenes.py":
    d = Path(get("--out_dir")) / "00000"; d.mkdir(parents=True); (d / "000001999.png").write_bytes(b""); (d / "000001999.txt").write_text("x")
elif script == "extract_vectors.py":
    for m in get("--model").split(","): (Path(get("--out_dir")) / m).mkdir(parents=True, exist_ok=True)
elif script == "train_recon.py":
    Path(get("--out_dir")).mkdir(parents=True, exist_ok=True); (Path(get("--out_dir")) / "best_model.pt").write_bytes(b"")
elif get("--out_dir"):
    Path(get("--out_dir")).mkdir(parents=True, exist_ok=True)
"""


def _pipeline_calls(tmp_path: Path, *args: str, **env: str) -> dict[str, list[list[str]]]:
    exe = tmp_path / "python"
    exe.write_text(PIPE_STUB)
    exe.chmod(0o755)
    e = plain_env(VLMC_PYTHON=str(exe), STUB_LOG=str(tmp_path / "calls.jsonl"), DATA=str(tmp_path / "data"),
                  FIGURES=str(tmp_path / "fig"), RESULTS=str(tmp_path / "res"), **env)
    r = bash([SCRIPTS / "pipeline.sh", "--local", *args], env=e, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    by: dict[str, list[list[str]]] = {}
    for argv in calls(tmp_path):
        by.setdefault(Path(argv[0]).name if argv[0].endswith(".py") else argv[1], []).append(argv)
    return by


def test_pipeline_cluster_profile_runs_every_stage_on_published_checkpoints(tmp_path):
    (tmp_path / "img" / "s0").mkdir(parents=True)
    (tmp_path / "img" / "s0" / "a.png").write_bytes(b"")
    by = _pipeline_calls(tmp_path, ROOT=str(tmp_path / "img"), MODELS="llava qwen3.5", PERTURB="mask")
    assert [flag(a, "--model") for a in by["extract_vectors.py"]] == ["llava", "qwen3.5"]
    assert all("--model-path" not in a and flag(a, "--root") == str(tmp_path / "img") for a in by["extract_vectors.py"])
    (clip,) = by["extract_clip.py"]
    assert flag(clip, "--model_id") == "openai/clip-vit-large-patch14" and flag(clip, "--ref_type") == "auto"
    assert [flag(a, "--recon_type") for a in by["train_recon.py"]] == ["mlp", "mlp"]
    assert all(flag(a, "--image_dir") == str(tmp_path / "img") for a in by["eval_captions.py"] + by["eval_perturb.py"])
    assert len(by["extract_knn.py"]) == 2 and len(by["eval_recon.py"]) == 2 and "vlmc.plot.make_figures" in by


def test_pipeline_demo_keeps_the_testbed_profile(tmp_path):
    by = _pipeline_calls(tmp_path, "--demo", MODELS="idefics2", PERTURB="mask", MODEL_TYPE="linear idefics2=transformer")
    roots = {flag(a, "--root"): a for a in by["extract_vectors.py"]}  # the sample, the training and evaluation scenes
    assert set(roots) == {str(REPO / "sample" / "images"), str(tmp_path / "data" / "images_train"),
                          str(tmp_path / "data" / "images_eval")}
    assert all(flag(a, "--model-path") == "testbed" for a in roots.values())
    assert flag(by["extract_clip.py"][0], "--model_id") == "testbed-clip"
    assert [flag(a, "--recon_type") for a in by["train_recon.py"]] == ["transformer"]  # MODEL_TYPE, deprecated


# ---------------------------------------------------------------- sizing: stub sinfo / scontrol
FAKE_SINFO = textwrap.dedent("""\
    #!/bin/bash
    # fake sinfo: partitions from $FAKE_NODES = "part:cpus:gres;part:cpus:gres"; the first is the default
    if [[ " $* " == *" -o %P "* ]]; then
      first=1
      IFS=';' read -r -a ns <<< "$FAKE_NODES"
      for n in "${ns[@]}"; do p=${n%%:*}; [[ $first == 1 ]] && echo "$p*" || echo "$p"; first=0; done | sort -u
      exit 0
    fi
    part=""; while (($#)); do [[ $1 == -p ]] && part=$2; shift; done
    IFS=';' read -r -a ns <<< "$FAKE_NODES"
    for n in "${ns[@]}"; do IFS=: read -r p c g <<< "$n"; [[ $p == "$part" ]] && echo "$c $g"; done
    exit 0
""")
FAKE_SCONTROL = '#!/bin/bash\necho "PartitionName=$4 MaxCPUsPerNode=${FAKE_MAXCPUS:-UNLIMITED} State=UP"\n'


def fit(tmp_path: Path, nodes: str, *opts: str, script: str = "cal.sh", **env: str) -> subprocess.CompletedProcess:
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    for name, text in (("sinfo", FAKE_SINFO), ("scontrol", FAKE_SCONTROL)):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    code = f'source "{SCRIPTS}/common.sh"; slurm_fit "{SCRIPTS}/{script}" SLURM_ARGS "$@"; echo "${{VLMC_FIT[*]}}"'
    e = plain_env(PATH=f"{bin_}:{os.environ['PATH']}", FAKE_NODES=nodes, **env)
    return subprocess.run(["bash", "-c", code, "fit", *opts], env=e, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("nodes", "opts", "env", "want", "logged"),
    [
        ("gpu:16:gpu:a100:4(S:0-1);cpu:64:(null)", [], {}, "--cpus-per-task=8", None),  # fits: wanted size
        ("small:2:gpu:2", [], {}, "--cpus-per-task=2", "wants -c 8; partition small's largest node has 2 CPUs"),
        ("cpu:64:(null)", [], {}, "--cpus-per-task=8 --gres=none", "partition cpu has no GPU: --gres=none"),
        ("gpu:16:gpu:1;cpu:4:(null)", ["-p", "cpu"], {}, "--cpus-per-task=4 --gres=none", "has 4 CPUs: -c 4"),
        ("gpu:16:gpu:1;cpu:4:(null)", [], {"SBATCH_PARTITION": "cpu"}, "--cpus-per-task=4 --gres=none", "cpu has no GPU"),
        ("gpu:16:gpu:1", ["-c", "3"], {}, "--cpus-per-task=3", None),  # the user's -c wins when it fits
        ("gpu:16:gpu:1", [], {"FAKE_MAXCPUS": "6"}, "--cpus-per-task=6", "has 6 CPUs"),  # MaxCPUsPerNode
    ],
)
def test_slurm_fit_clamps_to_the_partition(tmp_path, nodes, opts, env, want, logged):
    r = fit(tmp_path, nodes, *opts, **env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want
    if logged:
        assert logged in r.stderr
    else:
        assert not r.stderr


@pytest.mark.parametrize(
    ("nodes", "opts", "env", "message"),
    [
        ("small:2:gpu:2", ["-c", "4"], {}, "SLURM_ARGS asks -c 4 for cal.sh, but the largest node of partition small has 2"),
        ("small:2:gpu:2", ["--cpus-per-task=9"], {}, "ask for at most -c 2"),
        ("cpu:8:(null)", ["--gres=gpu:1"], {}, "SLURM_ARGS asks --gres=gpu:1 for cal.sh, but partition cpu has no GPU"),
        ("cpu:8:(null)", [], {"SBATCH_GRES": "gpu:a100:1"}, "SBATCH_GRES asks --gres=gpu:a100:1"),
        ("gpu:8:gpu:1", ["-p", "nosuch"], {}, "Slurm partition 'nosuch' not found"),
        ("gpu:8:gpu:1", ["-c", "many"], {}, "-c 'many' is not a number"),
    ],
)
def test_slurm_fit_refuses_what_no_node_has(tmp_path, nodes, opts, env, message):
    r = fit(tmp_path, nodes, *opts, **env)
    assert r.returncode == 1 and not r.stdout
    (line,) = r.stderr.splitlines()
    assert message in line and "ERROR" in line, line


def test_slurm_fit_cpu_only_wrapper_keeps_no_gres(tmp_path):
    r = fit(tmp_path, "cpu:64:(null)", script="figures.sh")
    assert r.returncode == 0 and r.stdout.strip() == "--cpus-per-task=2" and not r.stderr, r.stderr


def test_every_wrapper_header_fits_any_node():
    """Plain `sbatch scripts/X.sh` gets the #SBATCH lines: -c 2 at most, so no job pends forever on 2-CPU nodes."""
    for w in WRAPPERS:
        text = (SCRIPTS / w).read_text()
        (c,) = re.findall(r"^#SBATCH --cpus-per-task=(\d+)$", text, re.M)
        assert int(c) <= 2, w
        want = re.findall(r"^#VLMC --cpus-per-task=(\d+)$", text, re.M)
        assert len(want) <= 1 and all(int(x) >= int(c) for x in want), w


# ---------------------------------------------------------------- the real single-node Slurm
@pytest.mark.slurm
def test_real_partition_size_is_read(slurm_cluster):
    code = f'source "{SCRIPTS}/common.sh"; slurm_partition_size; echo "$VLMC_PART $VLMC_PART_CPUS $VLMC_PART_GPUS"'
    r = slurm_cluster.run(["bash", "-c", code], env={"VLMC_SLURM_ENV": "/nonexistent"})
    assert r.stdout.split() == [slurm_cluster.partition, str(slurm_cluster.cpus), str(slurm_cluster.gpus)], r.stderr


@pytest.mark.slurm
def test_bare_sbatch_wait_without_data_fails_fast_with_one_line(slurm_cluster, tmp_path):
    """`sbatch --wait scripts/vec.sh` with no settings, in a checkout without data/images: the job starts (its
    #SBATCH asks what the node has) and stops with one line naming ROOT; sbatch --wait returns its failure."""
    repo = _repo_copy(tmp_path)
    r = slurm_cluster.run(["sbatch", "--wait", "scripts/vec.sh"], cwd=repo, check=False, timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    (log,) = (repo / "logs").iterdir()
    errors = [ln for ln in log.read_text().splitlines() if "ERROR" in ln]
    assert len(errors) == 1 and f"ROOT={repo}/data/images does not exist: set ROOT" in errors[0], log.read_text()


@pytest.mark.slurm
def test_submit_sh_clamps_to_the_node_and_refuses_too_big(slurm_cluster, tmp_path):
    (tmp_path / "vec").mkdir()
    r = slurm_cluster.run(["bash", str(SCRIPTS / "submit.sh"), "--hold", "--parsable", str(SCRIPTS / "cal.sh"),
                           "llava"], cwd=tmp_path, env={"VEC": str(tmp_path / "vec")}, check=False)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    try:
        (rec,) = slurm_cluster.jobs(job)
        assert rec["NumCPUs"] == str(min(8, slurm_cluster.cpus)) and rec["JobState"] == "PENDING", rec
        if slurm_cluster.cpus < 8:
            assert f"cal.sh: wants -c 8; partition debug's largest node has {slurm_cluster.cpus} CPUs" in r.stderr
        assert (tmp_path / "logs").is_dir()  # submit.sh makes the log folder plain sbatch needs
    finally:
        slurm_cluster.run(["scancel", job])
    n = slurm_cluster.cpus + 1
    r = slurm_cluster.run(["bash", str(SCRIPTS / "submit.sh"), "-c", str(n), str(SCRIPTS / "vec.sh")],
                          cwd=tmp_path, check=False)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and f"asks -c {n} for vec.sh" in r.stderr


@pytest.mark.slurm
def test_pipeline_sizes_every_job_before_submitting(slurm_cluster, tmp_path):
    """No resource settings: every job of the DAG fits the node (held, then cancelled); an impossible -c in
    SLURM_ARGS stops pipeline.sh before it submits anything."""
    (tmp_path / "img" / "00000").mkdir(parents=True)
    (tmp_path / "img" / "00000" / "a.png").write_bytes(b"")
    env = {"ROOT": str(tmp_path / "img"), "DATA": str(tmp_path / "data"), "MODELS": "llava", "PERTURB": "mask",
           "SLURM_ARGS": f"--hold --output={tmp_path}/%x-%j.out", "VLMC_SLURM_ENV": "/nonexistent"}
    before = set(slurm_cluster.run(["squeue", "-h", "-o", "%i"]).stdout.split())
    r = slurm_cluster.run(["bash", str(SCRIPTS / "pipeline.sh")], env=env, cwd=tmp_path, check=False)
    ids = [ln.split()[1] for ln in r.stdout.splitlines()]
    try:
        assert r.returncode == 0 and len(ids) == 11, (r.stdout, r.stderr)
        for job in ids:
            for rec in slurm_cluster.jobs(job):
                assert int(rec["NumCPUs"]) <= slurm_cluster.cpus and rec["JobState"] == "PENDING", rec
    finally:
        if ids:
            slurm_cluster.run(["scancel", *ids])
    r = slurm_cluster.run(["bash", str(SCRIPTS / "pipeline.sh")], env=dict(env, SLURM_ARGS="-c 999"), cwd=tmp_path,
                          check=False)
    assert r.returncode == 1 and "SLURM_ARGS asks -c 999" in r.stderr.splitlines()[-1], r.stderr
    assert not r.stdout and set(slurm_cluster.run(["squeue", "-h", "-o", "%i"]).stdout.split()) <= before


def main() -> int:
    """Rewrite docs/cluster.md's generated settings table."""
    text = DOC.read_text()
    head, rest = text.split(BEGIN)
    DOC.write_text(f"{head}{BEGIN}\n{render_table()}\n{END}{rest.split(END, 1)[1]}")
    print(f"{DOC} updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
