#!/bin/bash
# Regenerate figures/ and results/ from a stage-output tree (default: the committed sample/), offline.
#
#   bash scripts/figures.sh [IN_DIR [FIG_DIR [RESULTS_DIR]]] [--pdf]     # `make figures` = sample figures results
#   sbatch scripts/figures.sh data/output data/output/figures data/output/results   # pipeline.sh's last stage
#
# Runs src/plot/make_figures.py (every plot CLI and compute_summary: one interpreter, 2 forked workers); see its
# --help for which stage folders feed which figures. The three folders are the first three arguments (or
# the settings below); the rest go to make_figures.py. Exit status: 0 ok, 1 a step failed, 2 bad input.
#
#SBATCH --job-name=vlmc-figures
#SBATCH --time=00:30:00
#SBATCH --cpus-per-task=2
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
# Find scripts/common.sh (under sbatch this file runs from a copy in slurmd's spool): $VLMC_ROOT, this file's
# folder, the submit dir or its parent, else the script path Slurm recorded for the job.
for _d in "${VLMC_ROOT:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/.." \
  "${SLURM_JOB_ID:+$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's|^ *Command=\(.*\)/scripts/[^/]*$|\1|p' | head -n1)}"; do
  [[ -f $_d/scripts/common.sh ]] && break; done
# shellcheck source=scripts/common.sh
source "$_d/scripts/common.sh" || { echo "${0##*/}: scripts/common.sh not found; export VLMC_ROOT=<repo>" >&2; exit 1; }

for v in IN_DIR FIG_DIR RESULTS_DIR; do
  if [[ $# -gt 0 && $1 != -* ]]; then printf -v "$v" '%s' "$1"; shift; fi
done
setting IN_DIR sample "stage-output tree (1st argument; relative to where you run it)"
setting FIG_DIR figures "figures folder (2nd argument)"
setting RESULTS_DIR results "tables folder (3rd argument)"
end_settings "$@"
export MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VLMC_PYTHON" -m vlmc.plot.make_figures --in_dir "$IN_DIR" --out_dir "$FIG_DIR" --results_dir "$RESULTS_DIR" "$@"
