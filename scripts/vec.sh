#!/bin/bash
# Stage 1: E_pre / E_post vectors of every image (src/extract/extract_vectors.py), one array task per shard.
#
#   sbatch scripts/vec.sh                         # data/images, every family, published checkpoints, one job
#   sbatch --array=0-7%4 scripts/vec.sh           # task N -> N-th shard (sorted), 4 at a time
#   sbatch --array=3 scripts/vec.sh               # redo shard 3 only
#   ROOT=/scratch/imgs MODELS=llava,qwen2.5vl sbatch scripts/vec.sh --batch_size 32
#   PROFILE=testbed bash scripts/vec.sh           # the demo's: sample/images, trained testbed models
#   bash scripts/submit.sh scripts/vec.sh         # sbatch sized to the partition (-c 4 wanted, GPU if any)
#   bash scripts/vec.sh                           # no Slurm: every shard inline, in this shell
#
# Arguments after the script name go to extract_vectors.py. A USR1 120 s before the time limit checkpoints
# and requeues the job; the rerun resumes from the last complete chunk (--resume).
#
#SBATCH --job-name=vlmc-vec
#SBATCH --array=0-0
#SBATCH --time=04:00:00
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

setting -p ROOT data/images "images: <shard>/<key>.<ext> (a flat folder is one shard)" sample/images
setting -p OUT data/vector "output root: OUT/<model>/<shard>/"
setting MODELS all "families: all or a comma list of names (python -m vlmc.models list)" llava,idefics2,qwen2.5vl,qwen3.5
setting -e MODEL_PATH "" "weights: empty = each family's published HF checkpoint; an HF id, a folder, tiny, testbed, config:<name>, or per family llava=...,idefics2=..." testbed
setting DTYPE auto "compute dtype: auto = bf16 on GPU, fp32 on CPU"
setting DEVICE auto "auto, cpu, cuda, cuda:N"
setting BATCH_SIZE "" "images per forward (empty: the CLI's default)"
setting SHARDS "" "comma list of shards (empty: every shard under ROOT)"
end_settings "$@"
need_images ROOT
SHARD=$(task_shards "$ROOT" | paste -sd, -)

cmd=("$VLMC_PYTHON" "$VLMC_ROOT/src/extract/extract_vectors.py" --root "$ROOT" --out_dir "$OUT"
  --model "$MODELS" --shards "$SHARD" --dtype "$DTYPE" --device "$DEVICE" --resume)
cmd_opt --model-path "$MODEL_PATH"
cmd_opt --batch_size "$BATCH_SIZE"
cmd_extra "$@"
run_stage vec "shards $SHARD"
