#!/bin/bash
# Stage 7: captions from the stored E_post and from reconstructed embeddings (src/eval/eval_captions.py).
#
#   sbatch scripts/caption.sh llava                         # held-out images of the llava mlp reconstructor
#   SPLIT=all sbatch scripts/caption.sh qwen2.5vl            # every image of the store
#   RECON_DIR= sbatch scripts/caption.sh idefics2            # no reconstructor: caption_post_direct only
#   SCORES=clipscore,bertscore CLIP_MODEL=/models/clip sbatch scripts/caption.sh llava --with_image_caption
#   bash scripts/caption.sh llava                            # no Slurm: runs inline, in this shell
#
# The first argument is the model; the rest go to eval_captions.py. One job per model (all its rows go to
# one CSV). RECON_TYPE was MODEL_TYPE (still read, with a deprecation line). A USR1 120 s before the time
# limit writes the rows generated so far and requeues; the rerun continues them (--resume, always passed:
# on an empty OUT it starts the run; a CSV made with other settings is refused, exit 2).
#
#SBATCH --job-name=vlmc-caption
#SBATCH --time=04:00:00
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
recon_given=${RECON_DIR+x}
setting MODEL llava "the family (or the first argument)"
setting -p VEC data/vector "stage-1 store root"
setting -p ROOT data/images "the images the store was extracted from (the prompt's image tokens)" sample/images
setting RECON_TYPE mlp "reconstructor type: names the default RECON_DIR"
setting -e -p RECON_DIR "data/output/recon/<MODEL>_<RECON_TYPE>" "reconstructor (emb.sh OUT; when absent and not set: none); empty = no caption_recon"
setting SPLIT test "test (held out: neither fitted nor selected on) or all"
setting -p OUT "data/output/captions/<MODEL>" "output folder"
setting CACHE_DIR "" "caption cache; empty = OUT/cache (perturb.sh's cache shares caption_post_direct)"
setting MODEL_PATH "" "VLM weights; empty = the source recorded by stage 1"
setting DEVICE auto "auto, cpu, cuda, cuda:N"
setting BATCH_SIZE "" "batch size (empty: the CLI's default)"
setting MAX_NEW_TOKENS "" "caption length (empty: the CLI's default)"
setting SHARDS "" "comma list of shards (empty: all)"
setting SCORES "" "comma list of clipscore, bertscore (= --with_*)"
setting CLIP_MODEL "" "CLIPScore backbone (empty: the CLI's default, which reads VLMC_CLIP_MODEL)"
end_settings "$@"
need_path VEC "$VEC" "run scripts/vec.sh first, or set VEC to the stage-1 store root"
if [[ -z $recon_given && ! -f $RECON_DIR/best_model.pt ]]; then
  log "caption: no reconstructor at $RECON_DIR (run scripts/emb.sh $MODEL first, or set RECON_DIR=): caption_post_direct only"
  RECON_DIR=
fi

cmd=("$VLMC_PYTHON" "$VLMC_ROOT/src/eval/eval_captions.py" --vec_dir "$VEC" --model "$MODEL"
  --image_dir "$ROOT" --out_dir "$OUT" --split "$SPLIT" --device "$DEVICE" --resume)
cmd_opt --recon_dir "$RECON_DIR"
cmd_opt --model_path "$MODEL_PATH"
cmd_opt --cache_dir "$CACHE_DIR"
cmd_opt --batch_size "$BATCH_SIZE"
cmd_opt --caption_max_new_tokens "$MAX_NEW_TOKENS"
cmd_opt --shards "$SHARDS"
cmd_opt --clip_model "$CLIP_MODEL"
IFS=, read -r -a scores <<< "$SCORES"
for s in ${scores[@]+"${scores[@]}"}; do
  case $s in
    clipscore|bertscore) cmd+=("--with_$s") ;;
    *) die "SCORES: unknown metric '$s' (clipscore, bertscore)" ;;
  esac
done
cmd_extra "$@"
run_stage caption "$MODEL -> $OUT"
