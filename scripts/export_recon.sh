#!/bin/bash
# Stage 5: export reconstructed vectors (src/train/export_recon.py) in the stage-1 layout:
# Ê_pre = reconstructor(E_post) and Ê_post = the model's own connector(Ê_pre), as model <MODEL>_recon.
#
#   sbatch scripts/export_recon.sh llava                     # held-out (test) images of the llava mlp run
#   SPLIT=all sbatch scripts/export_recon.sh qwen2.5vl       # every image of the store
#   MODEL_TYPE=linear bash scripts/export_recon.sh llava     # no Slurm: runs inline, in this shell
#
# Settings (environment, defaults in brackets): MODEL [first argument, else llava], MODEL_TYPE [mlp],
# MODEL_DIR [data/output/recon/<MODEL>_<MODEL_TYPE>, the emb.sh OUT], VEC [empty: the store it trained on;
# another stage-1 store, e.g. of a held-out image set: its images count as held out], OUT_BASE [data/vector_recon],
# SPLIT [test: images neither fitted nor selected on], MODEL_PATH [empty = the source recorded by stage 1; 'tiny', a folder or an HF id],
# DEVICE [auto], BATCH_SIZE [CLI default], EXTRA_ARGS (more CLI flags); arguments after the model name
# go to export_recon.py too. Relative paths are relative to the directory you submit from.
# Account/partition: not set here. sbatch reads SBATCH_ACCOUNT / SBATCH_PARTITION / SBATCH_GRES ... from
# your shell: `set -a; . scripts/slurm.env; set +a` before sbatch (see scripts/slurm.env.example).
# logs/ must exist in the submit directory (Slurm does not create it; without it the job fails silently).
# A USR1 120 s before the time limit stops after the current chunk and requeues; the rerun keeps every
# committed chunk (--skip_existing, always passed).
#
#SBATCH --job-name=vlmc-export-recon
#SBATCH --time=02:00:00
#SBATCH --cpus-per-task=4
#SBATCH --gres=gpu:1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

# Find the repo: $VLMC_ROOT, this file's folder (plain bash), the submit dir or its parent, else the
# script path Slurm recorded for the job.
_d=${VLMC_ROOT:-$(dirname "${BASH_SOURCE[0]}")/..}
[[ -f $_d/scripts/common.sh ]] || _d=${SLURM_SUBMIT_DIR:-.}
[[ -f $_d/scripts/common.sh ]] || _d=$_d/..
[[ -f $_d/scripts/common.sh ]] || _d=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null |
  sed -n 's|^ *Command=\(.*\)/scripts/[^/]*$|\1|p' | head -n1) || true
# shellcheck source=scripts/common.sh
source "$_d/scripts/common.sh" || { echo "export_recon.sh: scripts/common.sh not found; export VLMC_ROOT=<repo>" >&2; exit 1; }

if [[ $# -gt 0 && $1 != -* ]]; then MODEL=$1; shift; fi
MODEL=${MODEL:-llava}
MODEL_TYPE=${MODEL_TYPE:-mlp}
MODEL_DIR=${MODEL_DIR:-$VLMC_ROOT/data/output/recon/${MODEL}_${MODEL_TYPE}}
OUT_BASE=${OUT_BASE:-$VLMC_ROOT/data/vector_recon}
SPLIT=${SPLIT:-test}
VEC=${VEC:-}
MODEL_PATH=${MODEL_PATH:-}
DEVICE=${DEVICE:-auto}
[[ -f $MODEL_DIR/best_model.pt ]] || die "no trained reconstructor in $MODEL_DIR (run scripts/emb.sh $MODEL first)"

cmd=("$VLMC_PYTHON" "$VLMC_ROOT/src/train/export_recon.py" --model_dir "$MODEL_DIR" --embed_model "$MODEL"
  --out_base "$OUT_BASE" --split "$SPLIT" --device "$DEVICE" --skip_existing)
if [[ -n $VEC ]]; then cmd+=(--vec_dir "$VEC"); fi
if [[ -n $MODEL_PATH ]]; then cmd+=(--model-path "$MODEL_PATH"); fi
if [[ -n ${BATCH_SIZE:-} ]]; then cmd+=(--batch_size "$BATCH_SIZE"); fi
read -r -a extra <<< "${EXTRA_ARGS:-}"
cmd+=(${extra[@]+"${extra[@]}"} "$@")

log "export_recon: $MODEL ($MODEL_DIR, $SPLIT) on $(hostname -s)${CUDA_VISIBLE_DEVICES:+ GPU $CUDA_VISIBLE_DEVICES}"
log "export_recon: ${cmd[*]}"
run_requeueable "${cmd[@]}"
log "export_recon: done -> $OUT_BASE/${MODEL}_recon"
