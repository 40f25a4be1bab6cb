#!/bin/bash
# Stage 3: geometry metrics of one model's stores (src/extract/extract_knn.py): kNN overlap (KNOR) pre/post
# and against reference spaces, CKA, Procrustes, distance correlations, per-image token spectra.
#
#   sbatch scripts/cal.sh llava                               # data/vector/llava vs clip:data/clip_ref
#   METRIC=cosine POOL=max sbatch scripts/cal.sh idefics2 --k 10,20
#   REF="clip:data/clip_ref/clip-l14 dino:data/clip_ref/dinov2-base" sbatch scripts/cal.sh qwen2.5vl
#   PER_SHARD=1 sbatch scripts/cal.sh llava                   # the seed's protocol: neighbours within a shard
#   sbatch --gres=none -c 4 scripts/cal.sh llava              # CPU-only cluster (or SBATCH_GRES=none)
#   bash scripts/cal.sh llava                                 # no Slurm: runs inline, in this shell
#
# Settings (environment, defaults in brackets): MODEL [first argument, else llava], VEC [data/vector]
# (the store is $VEC/<MODEL>, used for both E_pre and E_post), REF [clip:data/clip_ref; space-separated
# LABEL:PATH list, empty = no reference], OUT [data/output/knn_out/<MODEL>], POOL [mean], METRIC [l2],
# K [CLI default 10,50,100], PER_SHARD [0; 1 = --per_shard], SVD [1 = --svd_per_image_csv; 0 = off],
# DEVICE [auto], EXTRA_ARGS (more CLI flags); arguments after the model name go to extract_knn.py too.
# Relative paths are relative to the directory you submit from; the defaults live in the repo.
# Account/partition: not set here. sbatch reads SBATCH_ACCOUNT / SBATCH_PARTITION / SBATCH_GRES ... from
# your shell: `set -a; . scripts/slurm.env; set +a` before sbatch (see scripts/slurm.env.example).
# logs/ must exist in the submit directory (Slurm does not create it; without it the job fails silently).
# The job asks for one GPU (kNN search and spectra run there when present). It writes its outputs
# atomically at the end, so a killed job is simply rerun (no checkpoint / requeue).
#
#SBATCH --job-name=vlmc-cal
#SBATCH --time=02:00:00
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
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
source "$_d/scripts/common.sh" || { echo "cal.sh: scripts/common.sh not found; export VLMC_ROOT=<repo>" >&2; exit 1; }

if [[ $# -gt 0 && $1 != -* ]]; then MODEL=$1; shift; fi
MODEL=${MODEL:-llava}
VEC=${VEC:-$VLMC_ROOT/data/vector}
REF=${REF-clip:$VLMC_ROOT/data/clip_ref}
OUT=${OUT:-$VLMC_ROOT/data/output/knn_out/$MODEL}
POOL=${POOL:-mean}
METRIC=${METRIC:-l2}
DEVICE=${DEVICE:-auto}
[[ -e $VEC/$MODEL ]] || die "no stage-1 store $VEC/$MODEL (run scripts/vec.sh first, or set VEC)"

cmd=("$VLMC_PYTHON" "$VLMC_ROOT/src/extract/extract_knn.py" --pre_pt "$VEC/$MODEL" --post_pt "$VEC/$MODEL"
  --out_dir "$OUT" --pool "$POOL" --metric "$METRIC" --device "$DEVICE")
read -r -a refs <<< "$REF"
for r in ${refs[@]+"${refs[@]}"}; do cmd+=(--ref "$r"); done
if [[ -n ${K:-} ]]; then cmd+=(--k "$K"); fi
if [[ ${PER_SHARD:-0} == 1 ]]; then cmd+=(--per_shard); fi
if [[ ${SVD:-1} == 1 ]]; then cmd+=(--svd_per_image_csv); fi
read -r -a extra <<< "${EXTRA_ARGS:-}"
cmd+=(${extra[@]+"${extra[@]}"} "$@")

log "cal: $MODEL on $(hostname -s)${CUDA_VISIBLE_DEVICES:+ GPU $CUDA_VISIBLE_DEVICES}"
log "cal: ${cmd[*]}"
"${cmd[@]}"
log "cal: done -> $OUT"
