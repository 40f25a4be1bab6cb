#!/bin/bash
# Stage 7: captions from the stored E_post and from reconstructed embeddings (src/eval/eval_captions.py).
#
#   sbatch scripts/caption.sh llava                         # held-out images of the llava mlp reconstructor
#   SPLIT=all sbatch scripts/caption.sh qwen2.5vl            # every image of the store
#   RECON_DIR= sbatch scripts/caption.sh idefics2            # no reconstructor: caption_post_direct only
#   SCORES=clipscore,bertscore CLIP_MODEL=/models/clip sbatch scripts/caption.sh llava --with_image_caption
#   sbatch --gres=none -c 2 scripts/caption.sh llava         # CPU-only cluster (or SBATCH_GRES=none)
#   bash scripts/caption.sh llava                            # no Slurm: runs inline, in this shell
#
# Settings (environment, defaults in brackets): MODEL [first argument, else llava], VEC [data/vector],
# ROOT [sample/images: the images the store was extracted from; needed for the prompt's image tokens],
# MODEL_TYPE [mlp], RECON_DIR [data/output/recon/<MODEL>_<MODEL_TYPE> (the emb.sh OUT) when it exists;
# empty = no caption_recon], SPLIT [test: images neither fitted nor selected on], OUT [data/output/captions/<MODEL>], CACHE_DIR [empty =
# <OUT>/cache; point it at perturb.sh's cache to share caption_post_direct = caption_original],
# MODEL_PATH [empty = the source recorded by stage 1], DEVICE [auto], BATCH_SIZE, MAX_NEW_TOKENS
# [CLI defaults], SHARDS [all, comma list], SCORES [empty; comma list of clipscore,bertscore = --with_*],
# CLIP_MODEL [$VLMC_CLIP_MODEL or the CLI default], EXTRA_ARGS (more CLI flags); arguments after the
# model name go to eval_captions.py too. Relative paths are relative to the directory you submit from.
# Account/partition: not set here. sbatch reads SBATCH_ACCOUNT / SBATCH_PARTITION / SBATCH_GRES ... from
# your shell: `set -a; . scripts/slurm.env; set +a` before sbatch (see scripts/slurm.env.example).
# logs/ must exist in the submit directory (Slurm does not create it; without it the job fails silently).
# One job per model (all its rows go to one CSV). A USR1 120 s before the time limit writes the rows
# generated so far and requeues; the rerun continues them (--resume, always passed: on an empty OUT it
# starts the run; a CSV made with other settings is refused, exit 2: remove it or choose another OUT).
#
#SBATCH --job-name=vlmc-caption
#SBATCH --time=04:00:00
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
source "$_d/scripts/common.sh" || { echo "caption.sh: scripts/common.sh not found; export VLMC_ROOT=<repo>" >&2; exit 1; }

if [[ $# -gt 0 && $1 != -* ]]; then MODEL=$1; shift; fi
MODEL=${MODEL:-llava}
VEC=${VEC:-$VLMC_ROOT/data/vector}
ROOT=${ROOT:-$VLMC_ROOT/sample/images}
MODEL_TYPE=${MODEL_TYPE:-mlp}
if [[ -z ${RECON_DIR+x} ]]; then
  RECON_DIR=$VLMC_ROOT/data/output/recon/${MODEL}_${MODEL_TYPE}
  if [[ ! -f $RECON_DIR/best_model.pt ]]; then
    log "caption: no reconstructor at $RECON_DIR (run scripts/emb.sh $MODEL first, or set RECON_DIR=): caption_post_direct only"
    RECON_DIR=
  fi
fi
SPLIT=${SPLIT:-test}
OUT=${OUT:-$VLMC_ROOT/data/output/captions/$MODEL}
MODEL_PATH=${MODEL_PATH:-}
DEVICE=${DEVICE:-auto}
[[ -e $VEC ]] || die "vector store $VEC does not exist (run scripts/vec.sh first)"

cmd=("$VLMC_PYTHON" "$VLMC_ROOT/src/eval/eval_captions.py" --vec_dir "$VEC" --embed_model "$MODEL"
  --image_dir "$ROOT" --out_dir "$OUT" --split "$SPLIT" --device "$DEVICE" --resume)
if [[ -n $RECON_DIR ]]; then cmd+=(--recon_dir "$RECON_DIR"); fi
if [[ -n $MODEL_PATH ]]; then cmd+=(--model_path "$MODEL_PATH"); fi
if [[ -n ${CACHE_DIR:-} ]]; then cmd+=(--cache_dir "$CACHE_DIR"); fi
if [[ -n ${BATCH_SIZE:-} ]]; then cmd+=(--batch_size "$BATCH_SIZE"); fi
if [[ -n ${MAX_NEW_TOKENS:-} ]]; then cmd+=(--caption_max_new_tokens "$MAX_NEW_TOKENS"); fi
if [[ -n ${SHARDS:-} ]]; then cmd+=(--shards "$SHARDS"); fi
if [[ -n ${CLIP_MODEL:-} ]]; then cmd+=(--clip_model "$CLIP_MODEL"); fi
IFS=, read -r -a scores <<< "${SCORES:-}"
for s in ${scores[@]+"${scores[@]}"}; do
  case $s in
    clipscore|bertscore) cmd+=("--with_$s") ;;
    *) die "SCORES: unknown metric '$s' (clipscore, bertscore)" ;;
  esac
done
read -r -a extra <<< "${EXTRA_ARGS:-}"
cmd+=(${extra[@]+"${extra[@]}"} "$@")

log "caption: $MODEL on $(hostname -s)${CUDA_VISIBLE_DEVICES:+ GPU $CUDA_VISIBLE_DEVICES}"
log "caption: ${cmd[*]}"
run_requeueable "${cmd[@]}"
log "caption: done -> $OUT"
