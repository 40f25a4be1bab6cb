#!/bin/bash
# Stage 1: E_pre / E_post vectors of every image (src/extract/extract_vectors.py), one array task per shard.
#
#   sbatch scripts/vec.sh                         # one job, every shard under $ROOT
#   sbatch --array=0-7%4 scripts/vec.sh           # task N -> N-th shard (sorted), 4 at a time
#   sbatch --array=3 scripts/vec.sh               # redo shard 3 only
#   ROOT=data/images MODELS=all MODEL_PATH= sbatch scripts/vec.sh --batch_size 32   # real checkpoints
#   sbatch --gres=none -c 2 scripts/vec.sh        # CPU-only cluster (or SBATCH_GRES=none)
#   bash scripts/vec.sh                           # no Slurm: every shard inline, in this shell
#
# Settings (environment, defaults in brackets): ROOT [sample/images], OUT [data/vector], MODELS [llava],
# MODEL_PATH [tiny; empty = each family's HF checkpoint], DTYPE [auto: bf16 on GPU, fp32 on CPU],
# DEVICE [auto], BATCH_SIZE [CLI default], SHARDS [all, comma list], EXTRA_ARGS (more CLI flags);
# arguments after the script name go to extract_vectors.py too. Relative paths are relative to the
# directory you submit from; the defaults live in the repo.
# Account/partition: not set here. sbatch reads SBATCH_ACCOUNT / SBATCH_PARTITION / SBATCH_GRES ... from
# your shell: `set -a; . scripts/slurm.env; set +a` before sbatch (see scripts/slurm.env.example).
# logs/ must exist in the submit directory (Slurm does not create it; without it the job fails silently).
# The job asks for one GPU; a USR1 120 s before the time limit checkpoints and requeues it, and the rerun
# resumes from the last complete chunk (--skip_existing).
#
#SBATCH --job-name=vlmc-vec
#SBATCH --array=0-0
#SBATCH --time=04:00:00
#SBATCH --cpus-per-task=4
#SBATCH --gres=gpu:1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail

# Find the repo: $VLMC_ROOT, this file's folder (plain bash), the submit dir or its parent, else the
# script path Slurm recorded for the job.
_d=${VLMC_ROOT:-$(dirname "${BASH_SOURCE[0]}")/..}
[[ -f $_d/scripts/common.sh ]] || _d=${SLURM_SUBMIT_DIR:-.}
[[ -f $_d/scripts/common.sh ]] || _d=$_d/..
[[ -f $_d/scripts/common.sh ]] || _d=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null |
  sed -n 's|^ *Command=\(.*\)/scripts/[^/]*$|\1|p' | head -n1) || true
# shellcheck source=scripts/common.sh
source "$_d/scripts/common.sh" || { echo "vec.sh: scripts/common.sh not found; export VLMC_ROOT=<repo>" >&2; exit 1; }

ROOT=${ROOT:-$VLMC_ROOT/sample/images}
OUT=${OUT:-$VLMC_ROOT/data/vector}
MODELS=${MODELS:-llava}
MODEL_PATH=${MODEL_PATH-tiny}
DTYPE=${DTYPE:-auto}
DEVICE=${DEVICE:-auto}
SHARD=$(task_shards "$ROOT" | paste -sd, -)

cmd=("$VLMC_PYTHON" "$VLMC_ROOT/src/extract/extract_vectors.py" --root "$ROOT" --out_dir "$OUT"
  --models "$MODELS" --shards "$SHARD" --dtype "$DTYPE" --device "$DEVICE" --skip_existing)
if [[ -n $MODEL_PATH ]]; then cmd+=(--model-path "$MODEL_PATH"); fi
if [[ -n ${BATCH_SIZE:-} ]]; then cmd+=(--batch_size "$BATCH_SIZE"); fi
read -r -a extra <<< "${EXTRA_ARGS:-}"
cmd+=(${extra[@]+"${extra[@]}"} "$@")

log "vec: shards $SHARD on $(hostname -s)${CUDA_VISIBLE_DEVICES:+ GPU $CUDA_VISIBLE_DEVICES}"
log "vec: ${cmd[*]}"
run_requeueable "${cmd[@]}"
log "vec: done"
