#!/bin/bash
# Regenerate figures/ and results/ from a stage-output tree (default: the committed sample/), offline.
#
#   bash scripts/figures.sh [IN_DIR [FIG_DIR [RESULTS_DIR]]] [--pdf]     # `make figures` = sample figures results
#   sbatch scripts/figures.sh data/output data/output/figures data/output/results   # pipeline.sh's last stage
#
# Runs src/plot/make_figures.py (every plot CLI and compute_summary: one interpreter, 2 forked workers); see its
# --help for which stage folders feed which figures. Exit status: 0 ok, 1 a step failed, 2 bad input.
# Relative paths are relative to the directory you run / submit from. Under sbatch, logs/ must exist in the
# submit directory (Slurm does not create it).
#
#SBATCH --job-name=vlmc-figures
#SBATCH --time=00:30:00
#SBATCH --cpus-per-task=2
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

# Find the repo: $VLMC_ROOT, this file's folder (plain bash), the submit dir or its parent, else the
# script path Slurm recorded for the job (under sbatch this file runs from a copy in slurmd's spool).
_d=${VLMC_ROOT:-$(dirname "${BASH_SOURCE[0]}")/..}
[[ -f $_d/scripts/common.sh ]] || _d=${SLURM_SUBMIT_DIR:-.}
[[ -f $_d/scripts/common.sh ]] || _d=$_d/..
[[ -f $_d/scripts/common.sh ]] || _d=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null |
  sed -n 's|^ *Command=\(.*\)/scripts/[^/]*$|\1|p' | head -n1) || true
# shellcheck source=scripts/common.sh
source "$_d/scripts/common.sh" || { echo "figures.sh: scripts/common.sh not found; export VLMC_ROOT=<repo>" >&2; exit 1; }

IN_DIR=${1:-sample}
FIG_DIR=${2:-figures}
RESULTS_DIR=${3:-results}
shift $(( $# < 3 ? $# : 3 ))
export MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VLMC_PYTHON" -m vlmc.plot.make_figures --in_dir "$IN_DIR" --out_dir "$FIG_DIR" --results_dir "$RESULTS_DIR" "$@"
