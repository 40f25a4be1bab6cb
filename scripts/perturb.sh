#!/bin/bash
# Stage 8: captions from perturbed E_post (src/eval/eval_perturb.py), one CSV per (model, mode, level).
#
#   sbatch scripts/perturb.sh llava lowrank 0.01               # the seed's call: model, mode, level
#   sbatch scripts/perturb.sh llava mask 0,0.25,0.5,0.75        # several levels in one job
#   sbatch --array=0-3 scripts/perturb.sh llava mask 0,0.25,0.5,0.75   # task N -> N-th level
#   MODE=orthogonal LEVEL=0.5 EXTRA_ARGS=--shared_rotation sbatch scripts/perturb.sh qwen2.5vl
#   sbatch --gres=none -c 2 scripts/perturb.sh llava           # CPU-only cluster (or SBATCH_GRES=none)
#   bash scripts/perturb.sh llava mask 0.5                     # no Slurm: runs inline, in this shell
#
# Settings (environment, defaults in brackets): MODEL [1st argument, else llava], MODE [2nd argument,
# else mask], LEVEL [3rd argument, else $LEVELS, else 0.5; a comma list], VEC [data/vector], ROOT [sample/images: the
# images the store was extracted from; needed for the prompt's image tokens], OUT [data/perturb_out],
# CACHE_DIR [empty = <OUT>/cache, where caption_original is cached once per (model, image) for every
# mode and level], SEED [0], MODEL_PATH [empty = the source recorded by stage 1], DEVICE [auto],
# BATCH_SIZE, MAX_NEW_TOKENS, LIMIT [CLI defaults], SHARDS [all, comma list], EXTRA_ARGS (more CLI
# flags); arguments after the level go to eval_perturb.py too. Relative paths are relative to the
# directory you submit from.
# Account/partition: not set here. sbatch reads SBATCH_ACCOUNT / SBATCH_PARTITION / SBATCH_GRES ... from
# your shell: `set -a; . scripts/slurm.env; set +a` before sbatch (see scripts/slurm.env.example).
# logs/ must exist in the submit directory (Slurm does not create it; without it the job fails silently).
# In an array of more than one task, task N runs the N-th level of LEVEL (the tasks share the
# caption_original cache; its writes are locked). A USR1 120 s before the time limit writes the rows
# generated so far and requeues; the rerun continues them (--resume, always passed: on an empty OUT it
# starts the run; a CSV made with other settings is refused, exit 2: remove it or choose another OUT).
#
#SBATCH --job-name=vlmc-perturb
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
source "$_d/scripts/common.sh" || { echo "perturb.sh: scripts/common.sh not found; export VLMC_ROOT=<repo>" >&2; exit 1; }

if [[ $# -gt 0 && $1 != -* ]]; then MODEL=$1; shift; fi
if [[ $# -gt 0 && $1 != -* ]]; then MODE=$1; shift; fi
if [[ $# -gt 0 && $1 != --* ]]; then LEVEL=$1; shift; fi
MODEL=${MODEL:-llava}
MODE=${MODE:-mask}
LEVEL=${LEVEL:-${LEVELS:-0.5}}
VEC=${VEC:-$VLMC_ROOT/data/vector}
ROOT=${ROOT:-$VLMC_ROOT/sample/images}
OUT=${OUT:-$VLMC_ROOT/data/perturb_out}
SEED=${SEED:-0}
MODEL_PATH=${MODEL_PATH:-}
DEVICE=${DEVICE:-auto}
[[ -e $VEC ]] || die "vector store $VEC does not exist (run scripts/vec.sh first)"

# Array of more than one task: task N -> the N-th level (as task_shards does for shards).
IFS=, read -r -a levels <<< "$LEVEL"
(( ${#levels[@]} )) || die "LEVEL is empty"
id=${SLURM_ARRAY_TASK_ID:-}
if [[ -n $id && ! ( ${SLURM_ARRAY_TASK_COUNT:-1} == 1 && $id == 0 ) ]]; then
  (( id < ${#levels[@]} )) || die "array task $id has no level: ${#levels[@]} level(s) in '$LEVEL', use --array=0-$(( ${#levels[@]} - 1 ))"
  LEVEL=${levels[id]}
fi

cmd=("$VLMC_PYTHON" "$VLMC_ROOT/src/eval/eval_perturb.py" --vec_dir "$VEC" --model_name "$MODEL"
  --image_dir "$ROOT" --mode "$MODE" --level "$LEVEL" --seed "$SEED" --out_dir "$OUT" --device "$DEVICE" --resume)
if [[ -n $MODEL_PATH ]]; then cmd+=(--model_path "$MODEL_PATH"); fi
if [[ -n ${CACHE_DIR:-} ]]; then cmd+=(--cache_dir "$CACHE_DIR"); fi
if [[ -n ${BATCH_SIZE:-} ]]; then cmd+=(--batch_size "$BATCH_SIZE"); fi
if [[ -n ${MAX_NEW_TOKENS:-} ]]; then cmd+=(--max_new_tokens "$MAX_NEW_TOKENS"); fi
if [[ -n ${LIMIT:-} ]]; then cmd+=(--limit "$LIMIT"); fi
if [[ -n ${SHARDS:-} ]]; then cmd+=(--shards "$SHARDS"); fi
read -r -a extra <<< "${EXTRA_ARGS:-}"
cmd+=(${extra[@]+"${extra[@]}"} "$@")

log "perturb: $MODEL $MODE $LEVEL on $(hostname -s)${CUDA_VISIBLE_DEVICES:+ GPU $CUDA_VISIBLE_DEVICES}"
log "perturb: ${cmd[*]}"
run_requeueable "${cmd[@]}"
log "perturb: done -> $OUT"
