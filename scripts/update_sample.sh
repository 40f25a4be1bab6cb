#!/bin/bash
# Refresh sample/ (the committed outputs `make figures` reads) from a finished pipeline run.
#
#   bash scripts/update_sample.sh [OUTPUT_DIR [SAMPLE_DIR]]    # defaults: data/output sample
#   make sample                                                # = make demo, then this
#
# Copies the stage folders the figures read (knn_out, recon_eval, captions, perturb_out without its
# caption cache; knn_root too when the run had EVAL_ROOT) and nothing else; each folder is replaced as a whole (copied beside, then renamed), so an
# interrupted run leaves the old sample. Images (sample/images) and models (sample/models) are untouched.
set -euo pipefail
case ${1:-} in -h|--help) sed -n '2,9p' "$0"; exit 0 ;; esac
src=${1:-data/output}
dst=${2:-sample}
for d in knn_out recon_eval captions perturb_out; do
  [[ -d $src/$d ]] || { echo "update_sample.sh: $src/$d missing: run the pipeline first (make demo)" >&2; exit 2; }
done
mkdir -p "$dst"
optional=()
[[ -d $src/knn_root ]] && optional=(knn_root)  # EVAL_ROOT runs: the captioned images' own geometry
for d in knn_out recon_eval captions perturb_out ${optional[@]+"${optional[@]}"}; do
  tmp=$(mktemp -d "$dst/.$d.XXXXXX")
  tar -C "$src/$d" --exclude=./cache -cf - . | tar -C "$tmp" -xf -
  chmod 755 "$tmp"
  rm -rf "$dst/.$d.old"
  if [[ -e $dst/$d ]]; then mv "$dst/$d" "$dst/.$d.old"; fi
  mv "$tmp" "$dst/$d"
  rm -rf "$dst/.$d.old"
done
echo "sample refreshed from $src: $(du -sh --exclude=images --exclude=models "$dst" | cut -f1) besides images and models"
