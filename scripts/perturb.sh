#!/bin/bash
# Stage 8: captions from perturbed E_post (src/eval/eval_perturb.py), one CSV per (model, mode, level).
#
#   sbatch scripts/perturb.sh llava lowrank 0.01               # the original pipeline's call: model, mode, level
#   sbatch scripts/perturb.sh llava mask 0,0.25,0.5,0.75        # several levels in one job
#   sbatch --array=0-3 scripts/perturb.sh llava mask 0,0.25,0.5,0.75   # task N -> N-th level
#   MODE=orthogonal LEVEL=0.5 EXTRA_ARGS=--shared_rotation sbatch scripts/perturb.sh qwen2.5vl
#   bash scripts/perturb.sh llava mask 0.5                     # no Slurm: runs inline, in this shell
#
# Arguments: model, mode, level (each optional, in that order); the rest go to eval_perturb.py. In an array
# of more than one task, task N runs the N-th level of LEVEL (the tasks share the caption_original cache;
# its writes are locked). A USR1 120 s before the time limit writes the rows generated so far and requeues;
# the rerun continues them (--resume, always passed; a CSV made with other settings is refused, exit 2).
#
#SBATCH --job-name=vlmc-perturb
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

if [[ $# -gt 0 && $1 != -* ]]; then MODEL=$1; shift; fi
if [[ $# -gt 0 && $1 != -* ]]; then MODE=$1; shift; fi
if [[ $# -gt 0 && $1 != --* ]]; then LEVEL=$1; shift; fi
setting MODEL llava "the family (or the 1st argument)"
setting MODE mask "mask, lowrank, orthogonal, noise (or the 2nd argument)"
setting LEVEL "${LEVELS:-0.5}" "comma list of levels (or the 3rd argument; LEVELS also read)"
setting -p VEC data/vector "stage-1 store root"
setting -p ROOT data/images "the images the store was extracted from (the prompt's image tokens)" sample/images
setting -p OUT data/output/perturb_out "output folder: OUT/perturb_<model>_<mode>_<level>.csv"
setting CACHE_DIR "" "caption_original cache; empty = OUT/cache (one per (model, image), every mode and level)"
setting SEED 0 "perturbation seed"
setting MODEL_PATH "" "VLM weights; empty = the source recorded by stage 1"
setting DEVICE auto "auto, cpu, cuda, cuda:N"
setting BATCH_SIZE "" "batch size (empty: the CLI's default)"
setting MAX_NEW_TOKENS "" "caption length (empty: the CLI's default)"
setting LIMIT "" "at most this many images (empty: the CLI's default)"
setting SHARDS "" "comma list of shards (empty: all)"
end_settings "$@"
need_path VEC "$VEC" "run scripts/vec.sh first, or set VEC to the stage-1 store root"

# Array of more than one task: task N -> the N-th level (as task_shards does for shards).
IFS=, read -r -a levels <<< "$LEVEL"
(( ${#levels[@]} )) || die "LEVEL is empty"
id=${SLURM_ARRAY_TASK_ID:-}
if [[ -n $id && ! ( ${SLURM_ARRAY_TASK_COUNT:-1} == 1 && $id == 0 ) ]]; then
  (( id < ${#levels[@]} )) || die "array task $id has no level: ${#levels[@]} level(s) in '$LEVEL', use --array=0-$(( ${#levels[@]} - 1 ))"
  LEVEL=${levels[id]}
fi

cmd=("$VLMC_PYTHON" "$VLMC_ROOT/src/eval/eval_perturb.py" --vec_dir "$VEC" --model "$MODEL"
  --image_dir "$ROOT" --mode "$MODE" --level "$LEVEL" --seed "$SEED" --out_dir "$OUT" --device "$DEVICE" --resume)
cmd_opt --model_path "$MODEL_PATH"
cmd_opt --cache_dir "$CACHE_DIR"
cmd_opt --batch_size "$BATCH_SIZE"
cmd_opt --max_new_tokens "$MAX_NEW_TOKENS"
cmd_opt --limit "$LIMIT"
cmd_opt --shards "$SHARDS"
cmd_extra "$@"
run_stage perturb "$MODEL $MODE $LEVEL -> $OUT"
