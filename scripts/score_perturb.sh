#!/bin/bash
# Stage 8b: CLIPScore + BERTScore columns for every perturb_<model>_<mode>_<level>.csv (src/eval/score_perturb.py).
#
#   sbatch scripts/score_perturb.sh                          # PERTURB_DIR, scored in place
#   sbatch scripts/score_perturb.sh data/output/perturb_out  # first argument: the folder of perturbation CSVs
#   OUT_DIR=data/output/perturb_out_scored sbatch scripts/score_perturb.sh data/output/perturb_out
#   CLIP_MODEL=/models/clip-vit-large-patch14 sbatch scripts/score_perturb.sh data/output/perturb_out --idf
#   bash scripts/score_perturb.sh data/output/perturb_out    # no Slurm: inline, in this shell
#
# The first argument is the folder; the rest go to score_perturb.py. Scoring always runs with
# --resume: only empty score cells are computed, so a requeued or repeated job never scores a row
# twice. A USR1 120 s before the time limit makes it write what it has and requeue. Scores are
# CLIPScore = 2.5*max(cos,0) (Hessel et al.) and drops = reference - altered.
#
#SBATCH --job-name=vlmc-score-perturb
#SBATCH --time=02:00:00
#SBATCH --cpus-per-task=2
#SBATCH --gres=gpu:1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --output=logs/%x-%j.out
#VLMC --cpus-per-task=4
set -euo pipefail
# Find scripts/common.sh (under sbatch this file runs from a copy in slurmd's spool): $VLMC_ROOT, this file's
# folder, the submit dir or its parent, else the script path Slurm recorded for the job.
for _d in "${VLMC_ROOT:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/.." \
  "${SLURM_JOB_ID:+$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's|^ *Command=\(.*\)/scripts/[^/]*$|\1|p' | head -n1)}"; do
  [[ -f $_d/scripts/common.sh ]] && break; done
# shellcheck source=scripts/common.sh
source "$_d/scripts/common.sh" || { echo "${0##*/}: scripts/common.sh not found; export VLMC_ROOT=<repo>" >&2; exit 1; }

if [[ $# -gt 0 && $1 != -* ]]; then PERTURB_DIR=$1; shift; fi
setting -p PERTURB_DIR data/output/perturb_out "folder of perturbation CSVs (perturb.sh OUT; or the first argument)"
setting OUT_DIR "" "where scored CSVs go; empty = rewrite them in place"
setting CLIP_MODEL "" "CLIPScore backbone (empty: the CLI's default, which reads VLMC_CLIP_MODEL)"
setting BERTSCORE_MODEL "" "BERTScore backbone (empty: the CLI's default)"
setting DEVICE auto "auto, cpu, cuda, cuda:N"
setting BATCH_SIZE "" "batch size (empty: the CLI's default)"
end_settings "$@"
[[ -d $PERTURB_DIR ]] || die "PERTURB_DIR=$PERTURB_DIR does not exist: run scripts/perturb.sh first, or set PERTURB_DIR"

cmd=("$VLMC_PYTHON" "$VLMC_ROOT/src/eval/score_perturb.py" --perturb_dir "$PERTURB_DIR" --device "$DEVICE"
  --resume)
cmd_opt --out_dir "$OUT_DIR"
cmd_opt --clip_model "$CLIP_MODEL"
cmd_opt --bertscore_model "$BERTSCORE_MODEL"
cmd_opt --batch_size "$BATCH_SIZE"
cmd_extra "$@"
run_stage score_perturb "$PERTURB_DIR"
