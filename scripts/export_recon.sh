#!/bin/bash
# Stage 5: export reconstructed vectors (src/train/export_recon.py) in the stage-1 layout:
# Ê_pre = reconstructor(E_post) and Ê_post = the model's own connector(Ê_pre), as model <MODEL>_recon.
#
#   sbatch scripts/export_recon.sh llava                     # held-out (test) images of the llava mlp run
#   SPLIT=all sbatch scripts/export_recon.sh qwen2.5vl       # every image of the store
#   RECON_TYPE=linear bash scripts/export_recon.sh llava     # no Slurm: runs inline, in this shell
#
# The first argument is the model; the rest go to export_recon.py. RECON_TYPE was MODEL_TYPE (still read,
# with a deprecation line). A USR1 120 s before the time limit stops after the current chunk and requeues;
# the rerun keeps every committed chunk (--resume, always passed).
#
#SBATCH --job-name=vlmc-export-recon
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

if [[ $# -gt 0 && $1 != -* ]]; then MODEL=$1; shift; fi
renamed MODEL_TYPE RECON_TYPE
setting MODEL llava "the family (or the first argument)"
setting RECON_TYPE mlp "reconstructor type: names the default MODEL_DIR"
setting -p MODEL_DIR "data/output/recon/<MODEL>_<RECON_TYPE>" "the trained reconstructor (emb.sh OUT)"
setting VEC "" "stage-1 store root; empty = the store it trained on (another store: all its images are held out)"
setting -p OUT_BASE data/vector_recon "output root: OUT_BASE/<MODEL>_recon/<shard>/"
setting SPLIT test "test (held out: neither fitted nor selected on), val, train or all"
setting MODEL_PATH "" "VLM weights for the re-projection; empty = the source recorded by stage 1"
setting DEVICE auto "auto, cpu, cuda, cuda:N"
setting BATCH_SIZE "" "batch size (empty: the CLI's default)"
end_settings "$@"
need_path MODEL_DIR "$MODEL_DIR/best_model.pt" "run scripts/emb.sh $MODEL first, or set MODEL_DIR"

cmd=("$VLMC_PYTHON" "$VLMC_ROOT/src/train/export_recon.py" --model_dir "$MODEL_DIR" --model "$MODEL"
  --out_dir "$OUT_BASE" --split "$SPLIT" --device "$DEVICE" --resume)
cmd_opt --vec_dir "$VEC"
cmd_opt --model-path "$MODEL_PATH"
cmd_opt --batch_size "$BATCH_SIZE"
cmd_extra "$@"
run_stage export_recon "$MODEL ($MODEL_DIR, $SPLIT) -> $OUT_BASE/${MODEL}_recon"
