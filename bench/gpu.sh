#!/usr/bin/env bash
# Every GPU benchmark of the project at real dimensions, one family after another, then one table.
#
#   bash bench/gpu.sh                      # on a GPU machine (one H200: < 6 min)
#   VLMC_GPU_SMOKE=1 bash bench/gpu.sh     # the same script on CPU with tiny models and small sizes (~3 min)
#
# Sections (each capped by `timeout`, each writing its figures as it goes, so a run cut short keeps
# what it measured):
#   1. stage 1 per family: bench/bench_extract.py --device cuda --dtype bf16 --model-path config:<name>
#      (vision-only loading, preprocessing on the device; variants forward, bare, ours, ours_workers;
#      disk column from a raw write+fsync probe of the results folder's disk);
#   2. kNN: bench/bench_knn.py --device cuda (automatic tiles vs 256 MiB vs the GEMM floor);
#   3. stage-4 training: bench/bench_train.py --device cuda (its own table, kept verbatim).
# Results: $OUT (when set, e.g. by the device runner) or bench/results/gpu-<date>/; the table is
# printed and written to <results>/table.md. Needs neither open_clip, faiss nor bert-score.
#
# Environment:
#   OUT                 results folder (default bench/results/gpu-<UTC date>)
#   PYTHON              interpreter (default: the checkout's .venv/bin/python if usable, else python3)
#   VLMC_GPU_SMOKE=1    CPU smoke mode: tiny models, 32 images, small kNN/training sizes
#   GPU_FAMILIES        families to run (default: every registered family, python -m vlmc.models list)
#   GPU_N               images per family (default 512; qwen2.5vl a quarter: its windowed tower runs at
#                       ~60 img/s on an H200, and gets 15 s more)
#   GPU_WORKERS         DataLoader decoding workers (default: CPUs - 2, at most 12)
#   GPU_EXTRACT_LIMIT   seconds per family (default 45), GPU_KNN_LIMIT (40), GPU_TRAIN_LIMIT (40)
# Budget on one H200: 4 x 45 + 60 + 40 + 40 s + set-up ~ 5.5 min (the limits are caps, not estimates).
# On a machine without the project's wheels installed, put them in <checkout>/.whl (see
# /work/shared/GPU.md): they are installed into $HOME/site first; `vlmc` is made importable from src/.
# Fetch them on a machine with PyPI access (the GPU machine has torch 2.11 and transformers 5.17):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl transformers==5.23.0 tokenizers==0.23.3
# and carry .whl with the command (the device runner's `carry: [".whl"]`).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
SMOKE="${VLMC_GPU_SMOKE:-0}"
RESULTS="${OUT:-$REPO/bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$RESULTS" || { echo "gpu.sh: cannot create $RESULTS" >&2; exit 2; }
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif "$REPO/.venv/bin/python" -c "" 2>/dev/null; then PY="$REPO/.venv/bin/python"
else PY=python3; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLMC_LOGLEVEL="${VLMC_LOGLEVEL:-WARNING}"

# -- environment: carried wheels, an importable vlmc ------------------------------------------------
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$HOME/site" "$REPO"/.whl/*.whl \
    || { echo "gpu.sh: installing .whl/*.whl failed" >&2; exit 2; }
  export PYTHONPATH="$HOME/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import vlmc" 2>/dev/null; then
  PKG="$(mktemp -d)"; ln -s "$REPO/src" "$PKG/vlmc"
  export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import vlmc, torch, transformers; print('vlmc', vlmc.__path__[0], 'torch', torch.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" | tee "$RESULTS/env.txt" \
  || { echo "gpu.sh: vlmc/torch/transformers do not import" >&2; exit 2; }

FAMILIES="${GPU_FAMILIES:-$("$PY" -m vlmc.models list --display-order)}"
declare -A CONFIG=()  # each family's first published config (python -m vlmc.models list --long)
while IFS=$'\t' read -r fam _ _ configs; do
  first=${configs%%,*}; CONFIG[$fam]=${first#config:}
done < <("$PY" -m vlmc.models list --long)
NCPU="$(nproc)"
if [[ "$SMOKE" == 1 ]]; then
  DEVICE=cpu; DTYPE=fp32; N="${GPU_N:-32}"; BATCH=8; WORKERS="${GPU_WORKERS:-1}"; IMG=""; REPEATS=1
  KNN=(--n 2000 --d 64 --k 10)
  TRAIN=(--grid 4 --d_pre 16 --d_post 32 --n 32 --batch_size 8 --steps 2 --workers 0 --model_types mlp)
  LIMIT_X="${GPU_EXTRACT_LIMIT:-120}"; LIMIT_KT=120
else
  DEVICE=cuda; DTYPE=bf16; N="${GPU_N:-512}"; BATCH=32; IMG=336; REPEATS=2
  WORKERS="${GPU_WORKERS:-$(( NCPU > 14 ? 12 : (NCPU > 2 ? NCPU - 2 : 1) ))}"
  KNN=(--n 200000 --d 4096 --k 100); TRAIN=(--grid 24 --d_pre 1024 --d_post 4096 --n 256 --batch_size 32)
  LIMIT_X="${GPU_EXTRACT_LIMIT:-45}"; LIMIT_KT=40
fi
LIMIT_K="${GPU_KNN_LIMIT:-$LIMIT_KT}"; LIMIT_T="${GPU_TRAIN_LIMIT:-$LIMIT_KT}"
echo "gpu.sh: device=$DEVICE dtype=$DTYPE n=$N batch=$BATCH workers=$WORKERS results=$RESULTS" | tee -a "$RESULTS/env.txt"

# -- 1. stage 1, one process per family (one failing family leaves the others' figures) ------------
IMAGES="$RESULTS/images"
"$PY" src/data/scenes.py --out "$IMAGES" --n "$N" --size "${IMG:-224}" --workers 0 --no-progress >/dev/null \
  || { echo "gpu.sh: writing the benchmark images failed" >&2; exit 1; }
for fam in $FAMILIES; do
  src="tiny"; [[ "$SMOKE" == 1 ]] || src="config:${CONFIG[$fam]}"
  n="$N"; limit="$LIMIT_X"
  if [[ "$fam" == qwen2.5vl && "$SMOKE" != 1 ]]; then n=$(( N / 4 )); limit=$(( LIMIT_X + 15 )); fi
  args=(--models "$fam" --model-path "$src" --device "$DEVICE" --dtype "$DTYPE" --n "$n" --batch_size "$BATCH"
        --num_workers "$WORKERS" --threads 0 --repeats "$REPEATS" --new_tokens 0 --save_every 256
        --variants forward,bare,ours,ours_workers --preprocess device --image_root "$IMAGES" --tmp_dir "$RESULTS"
        --json "$RESULTS/extract_$fam.json")
  [[ -n "$IMG" ]] && args+=(--img_size "$IMG")
  echo "== stage 1: $fam ($src)"
  timeout "$limit" "$PY" bench/bench_extract.py "${args[@]}" >"$RESULTS/extract_$fam.txt" 2>"$RESULTS/extract_$fam.log"
  rc=$?; [[ $rc == 0 ]] || echo "   $fam: exit $rc (see $RESULTS/extract_$fam.log)"
done
rm -rf "$IMAGES"

# -- 2. kNN -----------------------------------------------------------------------------------------
echo "== kNN"
timeout "$LIMIT_K" "$PY" bench/bench_knn.py --device "$DEVICE" "${KNN[@]}" --repeats 1 \
  --methods floor,torch,torch256 --json "$RESULTS/knn.json" >"$RESULTS/knn.txt" 2>"$RESULTS/knn.log" \
  || echo "   kNN: exit $? (see $RESULTS/knn.log)"

# -- 3. stage-4 training loader ---------------------------------------------------------------------
echo "== stage 4"
timeout "$LIMIT_T" "$PY" bench/bench_train.py --device "$DEVICE" "${TRAIN[@]}" >"$RESULTS/train.txt" 2>"$RESULTS/train.log" \
  || echo "   stage 4: exit $? (see $RESULTS/train.log)"

# -- the table --------------------------------------------------------------------------------------
{
  "$PY" bench/gpu_table.py "$RESULTS" --families "$(echo $FAMILIES | tr ' ' ',')"
  if [[ -s "$RESULTS/train.txt" ]]; then echo; echo "stage 4 (bench/bench_train.py)"; cat "$RESULTS/train.txt"; fi
} | tee "$RESULTS/table.md"
