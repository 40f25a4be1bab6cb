#!/bin/bash
# Train a replacement connector (src/train/train_connector.py) between one model's frozen vision tower and LM.
#
#   sbatch scripts/train.sh llava                                   # mlp connector on data/images (+ captions)
#   CONNECTOR=crossattn sbatch scripts/train.sh idefics2 --epochs 10
#   VEC=data/vector CONNECTOR=invertible sbatch scripts/train.sh qwen2.5vl   # E_pre from the stage-1 store
#   PREDICT=1 EXPORT=1 sbatch scripts/train.sh llava                # then caption val images, export E_post
#   MODEL_PATH=llava-hf/llava-1.5-7b-hf sbatch scripts/train.sh llava
#   sbatch --gres=none -c 2 scripts/train.sh llava                  # CPU-only cluster (or SBATCH_GRES=none)
#   bash scripts/train.sh llava                                     # no Slurm: runs inline, in this shell
#
# Settings (environment, defaults in brackets): MODEL [first argument, else llava], MODEL_PATH [the CLI's:
# tiny], IMAGES [data/images: <shard>/<key>.<ext> + <key>.txt captions], VEC [unset: run the vision tower;
# set: read E_pre from <VEC>/<MODEL>], CONNECTOR [mlp], OUT [data/output/connector/<MODEL>_<CONNECTOR>],
# DEVICE [auto], AMP [1 on a GPU: --amp, bf16; 0 = off], BATCH_SIZE, EPOCHS [CLI defaults], EXTRA_ARGS (more
# CLI flags); arguments after the model name go to train_connector.py too (every step). After training:
# PREDICT=1 writes OUT/captions.csv for the val images; EXPORT=1 writes E_post in the stage-1 layout to
# EXPORT_DIR [data/vector]/<MODEL>_conn_<CONNECTOR>/ (both resume where a stopped run left off).
# Relative paths are relative to the directory you submit from; the defaults live in the repo.
# Account/partition: not set here. sbatch reads SBATCH_ACCOUNT / SBATCH_PARTITION / SBATCH_GRES ... from
# your shell: `set -a; . scripts/slurm.env; set +a` before sbatch (see scripts/slurm.env.example).
# logs/ must exist in the submit directory (Slurm does not create it; without it the job fails silently).
# The job asks for one GPU; a USR1 120 s before the time limit makes train_connector save last.pt at the
# next optimizer step, the job is requeued, and the rerun continues from last.pt (--resume, always passed:
# on an empty OUT it starts the run).
#
#SBATCH --job-name=vlmc-train
#SBATCH --time=12:00:00
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
  sed -n 's|^ *Command=\(.*\)/scripts/[^/]*$|\1|p')
# shellcheck source=scripts/common.sh
source "$_d/scripts/common.sh" || { echo "train.sh: scripts/common.sh not found; export VLMC_ROOT=<repo>" >&2; exit 1; }

if [[ $# -gt 0 && $1 != -* ]]; then MODEL=$1; shift; fi
MODEL=${MODEL:-llava}
IMAGES=${IMAGES:-$VLMC_ROOT/data/images}
CONNECTOR=${CONNECTOR:-mlp}
OUT=${OUT:-$VLMC_ROOT/data/output/connector/${MODEL}_${CONNECTOR}}
DEVICE=${DEVICE:-auto}
EXPORT_DIR=${EXPORT_DIR:-$VLMC_ROOT/data/vector}
if [[ -z ${AMP:-} ]]; then
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} && $DEVICE != cpu ]]; then AMP=1; else AMP=0; fi
fi

py=("$VLMC_PYTHON" "$VLMC_ROOT/src/train/train_connector.py")
cmd=("${py[@]}" --embed_model "$MODEL" --image_dir "$IMAGES" --connector "$CONNECTOR" --out_dir "$OUT"
  --device "$DEVICE" --resume)
if [[ -n ${MODEL_PATH:-} ]]; then cmd+=(--model-path "$MODEL_PATH"); fi
if [[ -n ${VEC:-} ]]; then cmd+=(--vec_dir "$VEC"); fi
if [[ $AMP == 1 ]]; then cmd+=(--amp --amp_dtype bf16); fi
if [[ -n ${BATCH_SIZE:-} ]]; then cmd+=(--batch_size "$BATCH_SIZE"); fi
if [[ -n ${EPOCHS:-} ]]; then cmd+=(--epochs "$EPOCHS"); fi
read -r -a extra <<< "${EXTRA_ARGS:-}"
cmd+=(${extra[@]+"${extra[@]}"} "$@")

log "train: $MODEL ($CONNECTOR connector) on $(hostname -s)${CUDA_VISIBLE_DEVICES:+ GPU $CUDA_VISIBLE_DEVICES}"
log "train: ${cmd[*]}"
run_requeueable "${cmd[@]}"
log "train: done -> $OUT"

# Inference steps read the run's config.json (model, data, prompt); they resume too.
infer=("${py[@]}" --out_dir "$OUT" --device "$DEVICE")
if [[ -n ${BATCH_SIZE:-} ]]; then infer+=(--batch_size "$BATCH_SIZE"); fi
infer+=(${extra[@]+"${extra[@]}"} "$@")
if [[ ${PREDICT:-0} == 1 ]]; then
  log "train: captions -> $OUT/captions.csv"
  run_requeueable "${infer[@]}" --predict --resume
fi
if [[ ${EXPORT:-0} == 1 ]]; then
  log "train: export -> $EXPORT_DIR/${MODEL}_conn_${CONNECTOR}"
  run_requeueable "${infer[@]}" --export_post_vectors --export_dir "$EXPORT_DIR" --resume
fi
