#!/bin/bash
# Train a replacement connector (src/train/train_connector.py) between one model's frozen vision tower and LM.
#
#   sbatch scripts/train.sh llava                                   # mlp connector on data/images (+ captions)
#   CONNECTOR=crossattn sbatch scripts/train.sh idefics2 --epochs 10
#   VEC=data/vector CONNECTOR=invertible sbatch scripts/train.sh qwen2.5vl   # E_pre from the stage-1 store
#   PREDICT=1 EXPORT=1 sbatch scripts/train.sh llava                # then caption val images, export E_post
#   MODEL_PATH=llava-hf/llava-1.5-7b-hf sbatch scripts/train.sh llava
#   bash scripts/submit.sh scripts/train.sh llava                   # sbatch sized to the partition (-c 8 wanted)
#   bash scripts/train.sh llava                                     # no Slurm: runs inline, in this shell
#
# The first argument is the model; the rest go to train_connector.py (every step). After training:
# PREDICT=1 writes OUT/captions.csv for the val images; EXPORT=1 writes E_post in the stage-1 layout to
# EXPORT_DIR/<MODEL>_conn_<CONNECTOR>/ (both resume where a stopped run left off). A USR1 120 s before the
# time limit makes train_connector save last.pt at the next optimizer step, the job is requeued, and the
# rerun continues from last.pt (--resume, always passed: on an empty OUT it starts the run).
#
#SBATCH --job-name=vlmc-train
#SBATCH --time=12:00:00
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
setting MODEL llava "the family (or the first argument)"
setting MODEL_PATH "" "VLM weights; empty = the family's published HF checkpoint (train_connector.py's own default is tiny)" testbed
setting -p IMAGES data/images "images + <key>.txt captions: <shard>/<key>.<ext>" sample/images
setting VEC "" "stage-1 store root to read E_pre from; empty = run the vision tower"
setting CONNECTOR mlp "replacement connector: mlp, crossattn, invertible, ... (train_connector.py --help)"
setting -p OUT "data/output/connector/<MODEL>_<CONNECTOR>" "run folder"
setting DEVICE auto "auto, cpu, cuda, cuda:N"
setting AMP "" "1 = --amp --amp_dtype bf16; 0 = off; empty = 1 when a GPU is allocated"
setting BATCH_SIZE "" "batch size (empty: the CLI's default)"
setting EPOCHS "" "epochs (empty: the CLI's default)"
setting PREDICT 0 "1 = then caption the val images (OUT/captions.csv)"
setting EXPORT 0 "1 = then export E_post in the stage-1 layout"
setting -p EXPORT_DIR data/vector "EXPORT=1 writes EXPORT_DIR/<MODEL>_conn_<CONNECTOR>/"
end_settings "$@"
need_images IMAGES
if [[ -z $MODEL_PATH ]]; then  # the family's published checkpoint, by its adapter's HF id
  MODEL_PATH=$("$VLMC_PYTHON" -c 'import sys
from vlmc.models.base import get_adapter
try:
    print(get_adapter(sys.argv[1]).default_id)
except Exception as e:
    sys.exit(f"train: {e}")' "$MODEL") || exit 2
fi
if [[ -z $AMP ]]; then if [[ -n ${CUDA_VISIBLE_DEVICES:-} && $DEVICE != cpu ]]; then AMP=1; else AMP=0; fi; fi

py=("$VLMC_PYTHON" "$VLMC_ROOT/src/train/train_connector.py")
cmd=("${py[@]}" --model "$MODEL" --image_dir "$IMAGES" --connector "$CONNECTOR" --out_dir "$OUT"
  --device "$DEVICE" --resume)
cmd_opt --model-path "$MODEL_PATH"
cmd_opt --vec_dir "$VEC"
if [[ $AMP == 1 ]]; then cmd+=(--amp --amp_dtype bf16); fi
cmd_opt --batch_size "$BATCH_SIZE"
cmd_opt --epochs "$EPOCHS"
cmd_extra "$@"
run_stage train "$MODEL ($CONNECTOR connector) -> $OUT"

# Inference steps read the run's config.json (model, data, prompt); they resume too.
cmd=("${py[@]}" --out_dir "$OUT" --device "$DEVICE")
cmd_opt --batch_size "$BATCH_SIZE"
cmd_extra "$@"
infer=("${cmd[@]}")
if [[ $PREDICT == 1 ]]; then cmd=("${infer[@]}" --predict --resume); run_stage train "captions -> $OUT/captions.csv"; fi
if [[ $EXPORT == 1 ]]; then
  cmd=("${infer[@]}" --export_post_vectors --export_dir "$EXPORT_DIR" --resume)
  run_stage train "export -> $EXPORT_DIR/${MODEL}_conn_${CONNECTOR}"
fi
