#!/bin/bash
# Stage 8b: CLIPScore + BERTScore columns for every perturb_<model>_<mode>_<level>.csv (src/eval/score_perturb.py).
#
#   sbatch scripts/score_perturb.sh                        # $PERTURB_DIR [data/perturb_out], scored in place
#   sbatch scripts/score_perturb.sh data/perturb_out       # first argument: the folder of perturbation CSVs
#   OUT_DIR=data/perturb_out_scored sbatch scripts/score_perturb.sh data/perturb_out
#   CLIP_MODEL=/models/clip-vit-large-patch14 sbatch scripts/score_perturb.sh data/perturb_out --idf
#   sbatch --gres=none -c 2 scripts/score_perturb.sh       # CPU-only cluster (or SBATCH_GRES=none)
#   bash scripts/score_perturb.sh data/perturb_out         # no Slurm: inline, in this shell
#
# Settings (environment, defaults in brackets): PERTURB_DIR [data/perturb_out], OUT_DIR [empty = rewrite
# the CSVs in place], CLIP_MODEL [$VLMC_CLIP_MODEL or the CLI default openai/clip-vit-base-patch32: any
# source of the weights grammar, e.g. open_clip:NAME:PRETRAINED], BERTSCORE_MODEL [$VLMC_BERTSCORE_MODEL or roberta-large; minilm offline], DEVICE [auto], BATCH_SIZE [CLI
# default], EXTRA_ARGS (more CLI flags); arguments after the folder go to score_perturb.py too.
# Relative paths are relative to the directory you submit from.
# Account/partition: not set here. sbatch reads SBATCH_ACCOUNT / SBATCH_PARTITION / SBATCH_GRES ... from
# your shell: `set -a; . scripts/slurm.env; set +a` before sbatch (see scripts/slurm.env.example).
# logs/ must exist in the submit directory (Slurm does not create it; without it the job fails silently).
# Scoring always runs with --skip_existing: only empty score cells are computed, so a requeued or
# repeated job never scores a row twice. A USR1 120 s before the time limit makes it write what it has
# and requeue. Scores are CLIPScore = 2.5*max(cos,0) (Hessel et al.) and drops = reference - altered.
#
#SBATCH --job-name=vlmc-score-perturb
#SBATCH --time=02:00:00
#SBATCH --cpus-per-task=4
#SBATCH --gres=gpu:1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
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
source "$_d/scripts/common.sh" || { echo "score_perturb.sh: scripts/common.sh not found; export VLMC_ROOT=<repo>" >&2; exit 1; }

if [[ $# -gt 0 && $1 != -* ]]; then PERTURB_DIR=$1; shift; fi
PERTURB_DIR=${PERTURB_DIR:-data/perturb_out}
DEVICE=${DEVICE:-auto}
[[ -d $PERTURB_DIR ]] || die "perturbation folder $PERTURB_DIR does not exist (run scripts/perturb.sh first)"

cmd=("$VLMC_PYTHON" "$VLMC_ROOT/src/eval/score_perturb.py" --perturb_dir "$PERTURB_DIR" --device "$DEVICE"
  --skip_existing)
if [[ -n ${OUT_DIR:-} ]]; then cmd+=(--out_dir "$OUT_DIR"); fi
if [[ -n ${CLIP_MODEL:-} ]]; then cmd+=(--clip_model "$CLIP_MODEL"); fi
if [[ -n ${BERTSCORE_MODEL:-} ]]; then cmd+=(--bertscore_model "$BERTSCORE_MODEL"); fi
if [[ -n ${BATCH_SIZE:-} ]]; then cmd+=(--batch_size "$BATCH_SIZE"); fi
read -r -a extra <<< "${EXTRA_ARGS:-}"
cmd+=(${extra[@]+"${extra[@]}"} "$@")

log "score_perturb: $PERTURB_DIR on $(hostname -s)${CUDA_VISIBLE_DEVICES:+ GPU $CUDA_VISIBLE_DEVICES}"
log "score_perturb: ${cmd[*]}"
run_requeueable "${cmd[@]}"
log "score_perturb: done"
