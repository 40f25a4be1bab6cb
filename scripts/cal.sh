#!/bin/bash
# Stage 3: geometry metrics of one model's stores (src/extract/extract_knn.py): kNN overlap (KNOR) pre/post
# and against reference spaces, CKA, Procrustes, distance correlations, per-image token spectra.
#
#   sbatch scripts/cal.sh llava                               # data/vector/llava vs clip:data/clip_ref
#   METRIC=cosine POOL=max sbatch scripts/cal.sh idefics2 --k 10,20
#   REF="clip:data/clip_ref/clip-l14 dino:data/clip_ref/dinov2-base" sbatch scripts/cal.sh qwen2.5vl
#   PER_SHARD=1 sbatch scripts/cal.sh llava                   # the original pipeline's protocol: neighbours within a shard
#   bash scripts/submit.sh scripts/cal.sh llava               # sbatch sized to the partition (-c 8 wanted)
#   bash scripts/cal.sh llava                                 # no Slurm: runs inline, in this shell
#
# The first argument is the model; the rest go to extract_knn.py. The store is VEC/<MODEL>, used for both
# E_pre and E_post. It writes its outputs atomically at the end, so a killed job is simply rerun.
#
#SBATCH --job-name=vlmc-cal
#SBATCH --time=02:00:00
#SBATCH --cpus-per-task=2
#SBATCH --gres=gpu:1
#SBATCH --output=logs/%x-%j.out
#VLMC --cpus-per-task=8
set -euo pipefail
# Find scripts/common.sh (under sbatch this file runs from a copy in slurmd's spool): $VLMC_ROOT, this file's
# folder, the submit dir or its parent, else the script path Slurm recorded for the job.
for _d in "${VLMC_ROOT:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/.." \
  "${SLURM_JOB_ID:+$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's|^ *Command=\(.*\)/scripts/[^/]*$|\1|p' | head -n1)}"; do
  [[ -f $_d/scripts/common.sh ]] && break; done
# shellcheck source=scripts/common.sh
source "$_d/scripts/common.sh" || { echo "${0##*/}: scripts/common.sh not found; export VLMC_ROOT=<repo>" >&2; exit 1; }

if [[ $# -gt 0 && $1 != -* ]]; then MODEL=$1; shift; fi
setting MODEL llava "the family (or the first argument)"
setting -p VEC data/vector "stage-1 store root: VEC/<MODEL>"
setting -e REF "clip:<VLMC_ROOT>/data/clip_ref" "reference spaces, space-separated LABEL:PATH (clip.sh OUT); empty = none"
setting -p OUT "data/output/knn_out/<MODEL>" "output folder"
setting POOL mean "pooling of the token matrices for kNN: mean (the stored mean), cls, max"
setting METRIC l2 "kNN metric: l2 or cosine"
setting K "" "comma list of k (empty: the CLI's default)"
setting PER_SHARD 0 "1 = neighbours within each shard only (--per_shard)"
setting SVD 1 "1 = per-image spectra in per_image.csv (--svd_per_image_csv); 0 = off"
setting DEVICE auto "auto, cpu, cuda, cuda:N"
end_settings "$@"
need_path VEC "$VEC/$MODEL" "run scripts/vec.sh first, or set VEC to the stage-1 store root"

cmd=("$VLMC_PYTHON" "$VLMC_ROOT/src/extract/extract_knn.py" --pre_pt "$VEC/$MODEL" --post_pt "$VEC/$MODEL"
  --out_dir "$OUT" --pool "$POOL" --metric "$METRIC" --device "$DEVICE")
read -r -a refs <<< "$REF"
for r in ${refs[@]+"${refs[@]}"}; do cmd+=(--ref "$r"); done
cmd_opt --k "$K"
if [[ $PER_SHARD == 1 ]]; then cmd+=(--per_shard); fi
if [[ $SVD == 1 ]]; then cmd+=(--svd_per_image_csv); fi
cmd_extra "$@"
run_stage cal "$MODEL -> $OUT" plain
