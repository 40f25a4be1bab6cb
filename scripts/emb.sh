#!/bin/bash
# Stage 4: train an E_post -> E_pre reconstructor (src/train/train_recon.py) for one model.
#
#   sbatch scripts/emb.sh llava                              # mlp reconstructor on data/vector/llava
#   RECON_TYPE=linear sbatch scripts/emb.sh qwen2.5vl        # the closed-form baseline
#   RECON_TYPE=transformer sbatch scripts/emb.sh idefics2 --epochs 30 --batch_size 16
#   bash scripts/submit.sh scripts/emb.sh llava              # sbatch sized to the partition (-c 8 wanted)
#   bash scripts/emb.sh llava                                # no Slurm: runs inline, in this shell
#
# The first argument is the model; the rest go to train_recon.py. RECON_TYPE was MODEL_TYPE (still read,
# with a deprecation line). A USR1 120 s before the time limit makes train_recon save last.pt at the next
# optimizer step, the job is requeued, and the rerun continues from last.pt (--resume, always passed: on an
# empty OUT it starts the run).
#
#SBATCH --job-name=vlmc-emb
#SBATCH --time=08:00:00
#SBATCH --cpus-per-task=2
#SBATCH --gres=gpu:1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
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
renamed MODEL_TYPE RECON_TYPE
setting MODEL llava "the family (or the first argument)"
setting -p VEC data/vector "stage-1 store root it trains on: VEC/<MODEL>"
setting RECON_TYPE mlp "reconstructor: linear, mlp, transformer"
setting -p OUT "data/output/recon/<MODEL>_<RECON_TYPE>" "run folder (best_model.pt, last.pt, split.json, history.csv)"
setting DEVICE auto "auto, cpu, cuda, cuda:N"
setting AMP "" "1 = --amp --amp_dtype bf16; 0 = off; empty = 1 when a GPU is allocated"
setting BATCH_SIZE "" "batch size (empty: the CLI's default)"
setting EPOCHS "" "epochs (empty: the CLI's default)"
end_settings "$@"
need_path VEC "$VEC" "run scripts/vec.sh first, or set VEC to the stage-1 store root"
if [[ -z $AMP ]]; then if [[ -n ${CUDA_VISIBLE_DEVICES:-} && $DEVICE != cpu ]]; then AMP=1; else AMP=0; fi; fi

cmd=("$VLMC_PYTHON" "$VLMC_ROOT/src/train/train_recon.py" --vec_dir "$VEC" --model "$MODEL"
  --recon_type "$RECON_TYPE" --out_dir "$OUT" --device "$DEVICE" --resume)
if [[ $AMP == 1 ]]; then cmd+=(--amp --amp_dtype bf16); fi
cmd_opt --batch_size "$BATCH_SIZE"
cmd_opt --epochs "$EPOCHS"
cmd_extra "$@"
run_stage emb "$MODEL ($RECON_TYPE) -> $OUT"
