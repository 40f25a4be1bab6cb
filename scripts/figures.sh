#!/bin/bash
# Regenerate figures/ and results/ from a stage-output tree (default: the committed sample/), offline.
#
#   bash scripts/figures.sh [IN_DIR [FIG_DIR [RESULTS_DIR]]] [--pdf]     # `make figures` = sample figures results
#
# Runs src/plot/make_figures.py (every plot CLI and compute_summary: one interpreter, 2 forked workers); see its
# --help for which stage folders feed which figures. Exit status: 0 ok, 1 a step failed, 2 bad input.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
IN_DIR=${1:-sample}
FIG_DIR=${2:-figures}
RESULTS_DIR=${3:-results}
shift $(( $# < 3 ? $# : 3 ))
export MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VLMC_PYTHON" -m vlmc.plot.make_figures --in_dir "$IN_DIR" --out_dir "$FIG_DIR" --results_dir "$RESULTS_DIR" "$@"
