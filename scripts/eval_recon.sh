#!/bin/bash
# Stage 6: score a trained reconstructor on its held-out images (src/eval/eval_recon.py): mse_pre,
# cosine_pre, reproj_mse/reproj_cosine through the model's real connector, per-patch loss maps.
#
#   sbatch scripts/eval_recon.sh llava                       # data/output/recon/llava_mlp, held-out images
#   MODEL_TYPE=linear bash scripts/eval_recon.sh llava       # no Slurm: runs inline, in this shell
#
# Settings (environment, defaults in brackets): MODEL [first argument, else llava], MODEL_TYPE [mlp],
# MODEL_DIR [data/output/recon/<MODEL>_<MODEL_TYPE>, the emb.sh OUT], VEC [empty: the store it trained on;
# another stage-1 store, e.g. of a held-out image set: its images count as held out], OUT [data/output/recon_eval/<MODEL>],
# MODEL_PATH [empty = the source recorded by stage 1], DEVICE [auto], EXTRA_ARGS (more CLI flags);
# arguments after the model name go to eval_recon.py too. Relative paths are relative to the submit dir.
# Account/partition: not set here. sbatch reads SBATCH_ACCOUNT / SBATCH_PARTITION / SBATCH_GRES ... from
# your shell: `set -a; . scripts/slurm.env; set +a` before sbatch (see scripts/slurm.env.example).
# logs/ must exist in the submit directory (Slurm does not create it; without it the job fails silently).
# A USR1 120 s before the time limit writes the rows scored so far and requeues; the rerun keeps them
# (--resume, always passed).
#
#SBATCH --job-name=vlmc-eval-recon
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
source "$_d/scripts/common.sh" || { echo "eval_recon.sh: scripts/common.sh not found; export VLMC_ROOT=<repo>" >&2; exit 1; }

if [[ $# -gt 0 && $1 != -* ]]; then MODEL=$1; shift; fi
MODEL=${MODEL:-llava}
MODEL_TYPE=${MODEL_TYPE:-mlp}
MODEL_DIR=${MODEL_DIR:-$VLMC_ROOT/data/output/recon/${MODEL}_${MODEL_TYPE}}
OUT=${OUT:-$VLMC_ROOT/data/output/recon_eval/$MODEL}
VEC=${VEC:-}
MODEL_PATH=${MODEL_PATH:-}
DEVICE=${DEVICE:-auto}
[[ -f $MODEL_DIR/best_model.pt ]] || die "no trained reconstructor in $MODEL_DIR (run scripts/emb.sh $MODEL first)"

cmd=("$VLMC_PYTHON" "$VLMC_ROOT/src/eval/eval_recon.py" --model_dir "$MODEL_DIR" --embed_model "$MODEL"
  --out_dir "$OUT" --device "$DEVICE" --resume)
if [[ -n $VEC ]]; then cmd+=(--vec_dir "$VEC"); fi
if [[ -n $MODEL_PATH ]]; then cmd+=(--model-path "$MODEL_PATH"); fi
read -r -a extra <<< "${EXTRA_ARGS:-}"
cmd+=(${extra[@]+"${extra[@]}"} "$@")

log "eval_recon: $MODEL ($MODEL_DIR) on $(hostname -s)${CUDA_VISIBLE_DEVICES:+ GPU $CUDA_VISIBLE_DEVICES}"
log "eval_recon: ${cmd[*]}"
run_requeueable "${cmd[@]}"
log "eval_recon: done -> $OUT"
