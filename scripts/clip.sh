#!/bin/bash
# Stage 2: reference embeddings (CLIP / SigLIP / DINOv2 / open_clip) of every image
# (src/extract/extract_clip.py), one array task per shard.
#
#   sbatch scripts/clip.sh                        # data/images, openai/clip-vit-large-patch14, one job
#   sbatch --array=0-7%4 scripts/clip.sh          # task N -> N-th shard (sorted), 4 at a time
#   REF_MODEL=facebook/dinov2-base REF_POOL=mean OUT=data/clip_ref/dinov2-base sbatch scripts/clip.sh
#   REF_MODEL=open_clip:ViT-B-32 PRETRAINED=laion2b_s34b_b79k OUT=data/clip_ref/oc-b32 sbatch scripts/clip.sh
#   bash scripts/submit.sh scripts/clip.sh        # sbatch sized to the partition
#   bash scripts/clip.sh                          # no Slurm: every shard inline, in this shell
#
# One reference model per OUT. Arguments after the script name go to extract_clip.py. REF_MODEL, REF_TYPE
# and REF_POOL were MODEL_ID, MODEL_TYPE and POOL (MODEL_ID still works; MODEL_TYPE, the reconstructor's type
# in emb.sh, and POOL, cal.sh's kNN pooling, are ignored here with a log line). A USR1 120 s before the time limit checkpoints and requeues the job; the
# rerun resumes from the last complete chunk (--resume).
#
#SBATCH --job-name=vlmc-clip
#SBATCH --array=0-0
#SBATCH --time=02:00:00
#SBATCH --cpus-per-task=2
#SBATCH --gres=gpu:1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --output=logs/%x-%A_%a.out
#VLMC --cpus-per-task=4
set -euo pipefail
# Find scripts/common.sh (under sbatch this file runs from a copy in slurmd's spool): $VLMC_ROOT, this file's
# folder, the submit dir or its parent, else the script path Slurm recorded for the job.
for _d in "${VLMC_ROOT:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/.." \
  "${SLURM_JOB_ID:+$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's|^ *Command=\(.*\)/scripts/[^/]*$|\1|p' | head -n1)}"; do
  [[ -f $_d/scripts/common.sh ]] && break; done
# shellcheck source=scripts/common.sh
source "$_d/scripts/common.sh" || { echo "${0##*/}: scripts/common.sh not found; export VLMC_ROOT=<repo>" >&2; exit 1; }

renamed MODEL_ID REF_MODEL
if [[ -n ${MODEL_TYPE:-} && -z ${REF_TYPE+x} ]]; then
  log "clip: MODEL_TYPE=$MODEL_TYPE ignored (the reconstructor's type in emb.sh); the reference backend is REF_TYPE"
fi
if [[ -n ${POOL:-} && -z ${REF_POOL+x} ]]; then
  log "clip: POOL=$POOL ignored (cal.sh's kNN pooling); the reference pooling is REF_POOL"
fi
setting -p ROOT data/images "images: <shard>/<key>.<ext>" sample/images
setting -p OUT data/clip_ref "output folder: OUT/<shard>/ref_vectors_*.pt (one reference model per OUT)"
setting REF_MODEL openai/clip-vit-large-patch14 "reference model: an HF id or folder, open_clip:<name>, tiny-clip, tiny-dino, testbed-clip" testbed-clip
setting REF_TYPE auto "pooling rule: auto, clip, siglip, dino, hf, open_clip (extract_clip.py --ref_type)"
setting REF_POOL cls "cls or mean (exact tensor per backend: extract_clip.py --help)"
setting PRETRAINED "" "open_clip only: pretrained tag or checkpoint file"
setting DTYPE auto "compute dtype: auto = bf16 on GPU, fp32 on CPU"
setting DEVICE auto "auto, cpu, cuda, cuda:N"
setting BATCH_SIZE "" "images per forward (empty: the CLI's default)"
setting SHARDS "" "comma list of shards (empty: every shard under ROOT)"
end_settings "$@"
need_images ROOT
SHARD=$(task_shards "$ROOT" | paste -sd, -)

cmd=("$VLMC_PYTHON" "$VLMC_ROOT/src/extract/extract_clip.py" --root "$ROOT" --out_dir "$OUT"
  --model_id "$REF_MODEL" --ref_type "$REF_TYPE" --pool "$REF_POOL" --shards "$SHARD" --dtype "$DTYPE"
  --device "$DEVICE" --resume)
cmd_opt --pretrained "$PRETRAINED"
cmd_opt --batch_size "$BATCH_SIZE"
cmd_extra "$@"
run_stage clip "shards $SHARD"
