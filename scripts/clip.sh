#!/bin/bash
# Stage 2: reference embeddings (CLIP / SigLIP / DINOv2 / open_clip) of every image
# (src/extract/extract_clip.py), one array task per shard.
#
#   sbatch scripts/clip.sh                        # one job, every shard under $ROOT, offline tiny CLIP
#   sbatch --array=0-7%4 scripts/clip.sh          # task N -> N-th shard (sorted), 4 at a time
#   sbatch --array=3 scripts/clip.sh              # redo shard 3 only
#   MODEL_ID=openai/clip-vit-large-patch14 OUT=data/clip_ref/clip-l14 sbatch --array=0-7 scripts/clip.sh
#   MODEL_ID=facebook/dinov2-base POOL=mean OUT=data/clip_ref/dinov2-base sbatch scripts/clip.sh
#   MODEL_ID=open_clip:ViT-B-32 PRETRAINED=laion2b_s34b_b79k OUT=data/clip_ref/oc-b32 sbatch scripts/clip.sh
#   sbatch --gres=none -c 2 scripts/clip.sh       # CPU-only cluster (or SBATCH_GRES=none)
#   bash scripts/clip.sh                          # no Slurm: every shard inline, in this shell
#
# Settings (environment, defaults in brackets): ROOT [sample/images], OUT [data/clip_ref; one reference
# model per OUT], MODEL_ID [tiny-clip; also testbed-clip, tiny-dino, tiny-dino-reg, an HF id or folder, open_clip:<name>],
# MODEL_TYPE [auto], POOL [cls; see `extract_clip.py --help` for the exact tensor per backend],
# PRETRAINED [open_clip only: tag or checkpoint file], DTYPE [auto: bf16 on GPU, fp32 on CPU],
# DEVICE [auto], BATCH_SIZE [CLI default], SHARDS [all, comma list], EXTRA_ARGS (more CLI flags);
# arguments after the script name go to extract_clip.py too. Relative paths are relative to the
# directory you submit from; the defaults live in the repo.
# Account/partition: not set here. sbatch reads SBATCH_ACCOUNT / SBATCH_PARTITION / SBATCH_GRES ... from
# your shell: `set -a; . scripts/slurm.env; set +a` before sbatch (see scripts/slurm.env.example).
# logs/ must exist in the submit directory (Slurm does not create it; without it the job fails silently).
# The job asks for one GPU; a USR1 120 s before the time limit checkpoints and requeues it, and the rerun
# resumes from the last complete chunk (--skip_existing).
#
#SBATCH --job-name=vlmc-clip
#SBATCH --array=0-0
#SBATCH --time=02:00:00
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
source "$_d/scripts/common.sh" || { echo "clip.sh: scripts/common.sh not found; export VLMC_ROOT=<repo>" >&2; exit 1; }

ROOT=${ROOT:-$VLMC_ROOT/sample/images}
OUT=${OUT:-$VLMC_ROOT/data/clip_ref}
MODEL_ID=${MODEL_ID:-tiny-clip}
MODEL_TYPE=${MODEL_TYPE:-auto}
POOL=${POOL:-cls}
DTYPE=${DTYPE:-auto}
DEVICE=${DEVICE:-auto}
SHARD=$(task_shards "$ROOT" | paste -sd, -)

cmd=("$VLMC_PYTHON" "$VLMC_ROOT/src/extract/extract_clip.py" --root "$ROOT" --out_dir "$OUT"
  --model_id "$MODEL_ID" --model_type "$MODEL_TYPE" --pool "$POOL" --shards "$SHARD" --dtype "$DTYPE"
  --device "$DEVICE" --skip_existing)
if [[ -n ${PRETRAINED:-} ]]; then cmd+=(--pretrained "$PRETRAINED"); fi
if [[ -n ${BATCH_SIZE:-} ]]; then cmd+=(--batch_size "$BATCH_SIZE"); fi
read -r -a extra <<< "${EXTRA_ARGS:-}"
cmd+=(${extra[@]+"${extra[@]}"} "$@")

log "clip: shards $SHARD on $(hostname -s)${CUDA_VISIBLE_DEVICES:+ GPU $CUDA_VISIBLE_DEVICES}"
log "clip: ${cmd[*]}"
run_requeueable "${cmd[@]}"
log "clip: done"
