#!/bin/bash
# Stage 4: train an E_post -> E_pre reconstructor (src/train/train_recon.py) for one model.
#
#   sbatch scripts/emb.sh llava                              # mlp reconstructor on data/vector/llava
#   MODEL_TYPE=linear sbatch scripts/emb.sh qwen2.5vl        # the closed-form baseline
#   MODEL_TYPE=transformer sbatch scripts/emb.sh idefics2 --epochs 30 --batch_size 16
#   sbatch --gres=none -c 2 scripts/emb.sh llava             # CPU-only cluster (or SBATCH_GRES=none)
#   bash scripts/emb.sh llava                                # no Slurm: runs inline, in this shell
#
# Settings (environment, defaults in brackets): MODEL [first argument, else llava], VEC [data/vector],
# MODEL_TYPE [mlp], OUT [data/output/recon/<MODEL>_<MODEL_TYPE>], DEVICE [auto], AMP [1 on a GPU: --amp,
# bf16; 0 = off], BATCH_SIZE, EPOCHS [CLI defaults], EXTRA_ARGS (more CLI flags); arguments after the
# model name go to train_recon.py too. Relative paths are relative to the directory you submit from;
# the defaults live in the repo.
# Account/partition: not set here. sbatch reads SBATCH_ACCOUNT / SBATCH_PARTITION / SBATCH_GRES ... from
# your shell: `set -a; . scripts/slurm.env; set +a` before sbatch (see scripts/slurm.env.example).
# logs/ must exist in the submit directory (Slurm does not create it; without it the job fails silently).
# The job asks for one GPU; a USR1 120 s before the time limit makes train_recon save last.pt at the next
# optimizer step, the job is requeued, and the rerun continues from last.pt (--resume, always passed: on
# an empty OUT it starts the run).
#
#SBATCH --job-name=vlmc-emb
#SBATCH --time=08:00:00
#SBATCH --cpus-per-task=8
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
source "$_d/scripts/common.sh" || { echo "emb.sh: scripts/common.sh not found; export VLMC_ROOT=<repo>" >&2; exit 1; }

if [[ $# -gt 0 && $1 != -* ]]; then MODEL=$1; shift; fi
MODEL=${MODEL:-llava}
VEC=${VEC:-$VLMC_ROOT/data/vector}
MODEL_TYPE=${MODEL_TYPE:-mlp}
OUT=${OUT:-$VLMC_ROOT/data/output/recon/${MODEL}_${MODEL_TYPE}}
DEVICE=${DEVICE:-auto}
if [[ -z ${AMP:-} ]]; then
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} && $DEVICE != cpu ]]; then AMP=1; else AMP=0; fi
fi

cmd=("$VLMC_PYTHON" "$VLMC_ROOT/src/train/train_recon.py" --vec_dir "$VEC" --embed_model "$MODEL"
  --model_type "$MODEL_TYPE" --out_dir "$OUT" --device "$DEVICE" --resume)
if [[ $AMP == 1 ]]; then cmd+=(--amp --amp_dtype bf16); fi
if [[ -n ${BATCH_SIZE:-} ]]; then cmd+=(--batch_size "$BATCH_SIZE"); fi
if [[ -n ${EPOCHS:-} ]]; then cmd+=(--epochs "$EPOCHS"); fi
read -r -a extra <<< "${EXTRA_ARGS:-}"
cmd+=(${extra[@]+"${extra[@]}"} "$@")

log "emb: $MODEL ($MODEL_TYPE) on $(hostname -s)${CUDA_VISIBLE_DEVICES:+ GPU $CUDA_VISIBLE_DEVICES}"
log "emb: ${cmd[*]}"
run_requeueable "${cmd[@]}"
log "emb: done -> $OUT"
