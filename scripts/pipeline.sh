#!/bin/bash
# The whole pipeline as one DAG: vec -> clip -> cal -> emb -> export_recon -> eval_recon -> train (connector)
# -> caption -> perturb -> score_perturb -> figures.
#
#   bash scripts/pipeline.sh                 # Slurm present: submit every stage with --dependency=afterok,
#                                            # arrays over shards, print the job ids; else run inline
#   bash scripts/pipeline.sh --local         # run every stage inline, in order, in this shell
#   bash scripts/pipeline.sh --demo          # `make demo`: inline, PROFILE=testbed (trained testbed models,
#                                            # sample/images), CPU
#   MODELS="llava qwen2.5vl" ROOT=/scratch/images VLMC_CLIP_MODEL=/models/clip-vit-large-patch14 \
#     bash scripts/pipeline.sh               # real checkpoints (the default: PROFILE=cluster)
#
# Settings (environment, defaults in brackets): PROFILE [cluster; testbed with --demo: the defaults marked
# "testbed:"], MODELS [all: every registered family (python -m vlmc.models list); testbed: TESTBED_FAMILIES of src/train/testbed.py], ROOT
# [data/images; testbed: sample/images], DATA [data: every stage writes under it], FIGURES / RESULTS [DATA/output/figures, DATA/output/results: the
# demo never writes the tracked figures/ and results/; `make figures` renders those from sample/], MODEL_PATH [empty: each
# family's published HF checkpoint; testbed: the models trained on synthetic scenes, sample/models; tiny:
# random tiny models; an HF id or folder], REF_MODEL [stage-2 reference:
# testbed-clip with MODEL_PATH=testbed, tiny-clip with tiny, else openai/clip-vit-large-patch14],
# VLMC_CLIP_MODEL [CLIPScore backbone: testbed / tiny with those MODEL_PATHs; else openai/clip-vit-base-patch32],
# VLMC_BERTSCORE_MODEL [minilm (offline) with MODEL_PATH testbed / tiny; else roberta-large, bert-score's default],
# CONNECTOR_MODEL [the first of MODELS: which model gets a replacement connector trained; empty: none],
# DEVICE [auto], RECON_TYPE [mlp idefics2=transformer: the reconstructor, a default type plus MODEL=TYPE
# exceptions; Idefics2's perceiver latents have no token correspondence to its patches, and only attention
# learns that map], TRAIN_ROOT [empty: each reconstructor trains on a seeded 90 % of ROOT and stages 5-7 use
# the rest; set: it trains on TRAIN_ROOT (extracted to DATA/vector_train) and stages 5-7 evaluate it on every
# image of ROOT; the demo generates 2000 testbed training scenes into DATA/images_train], EPOCHS [CLI default;
# demo 15; the demo also sets EMB_ARGS to --lr 1e-3 --num_layers 2], PERTURB [mask lowrank],
# EVAL_ROOT [empty: stage 3 (geometry) runs over ROOT; set: stages 1-3 also run over EVAL_ROOT (DATA/vector_eval,
# DATA/clip_ref_eval) and stage 3's knn_out comes from it, while captions stay on ROOT; the demo renders 2000
# held-out testbed scenes (keys 30000-31999, disjoint from training; captions also seen in training are counted
# in DATA/images_eval/scenes.json) into DATA/images_eval and sets K to 10,50,100 (k <= N/20)],
# MASK_LEVELS [0,0.25,0.5,0.75], LOWRANK_LEVELS [1,0.5,0.25,0.05], ORTHOGONAL_LEVELS, NOISE_LEVELS, SLURM_ARGS (extra sbatch flags for every job, e.g. "--gres=none -c 2").
# Job sizes: before submitting anything, each wrapper's wanted -c (its #VLMC line) is clamped to the partition's
# largest node and its GPU dropped (--gres=none) where the partition has none, with a log line; a -c or
# --gres in SLURM_ARGS (or SBATCH_GRES) that no node of the partition can satisfy stops here with one line.
# RECON_TYPE was MODEL_TYPE (still read, with a deprecation line).
# <WRAPPER>_ARGS: extra CLI flags for one stage only, passed as that wrapper's EXTRA_ARGS: VEC_ARGS, CLIP_ARGS,
# CAL_ARGS, EMB_ARGS, EXPORT_RECON_ARGS, EVAL_RECON_ARGS, TRAIN_ARGS, CAPTION_ARGS, PERTURB_ARGS,
# SCORE_PERTURB_ARGS (e.g. EMB_ARGS="--batch_size 16 --patience 0"). Any other wrapper setting (CLIP_MODEL,
# METRIC, ...) also reaches its stage from the environment (sbatch --export=ALL).
# Account/partition come from your environment or scripts/slurm.env (see common.sh); nothing is hard-coded.
# A failing stage stops its dependants: Slurm leaves them PENDING (DependencyNeverSatisfied) and
# --kill-on-invalid-dep=yes cancels them, so the failure shows in squeue / the stage's log.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

mode=auto
for a in "$@"; do
  case $a in
    --local) mode=local ;;
    --demo) mode=local; DEMO=1; export PROFILE=testbed ;;
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
    *) die "unknown argument $a (see --help)" ;;
  esac
done
if [[ $mode == auto ]]; then
  if command -v sbatch >/dev/null && scontrol ping >/dev/null 2>&1; then mode=slurm; else mode=local; fi
fi

# Relative paths you give are relative to where you run this; the defaults live in the repository.
abspath() { if [[ $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }
if [[ $PROFILE == testbed ]]; then root_default=$VLMC_ROOT/sample/images; else root_default=$VLMC_ROOT/data/images; fi
ROOT=$(abspath "${ROOT:-$root_default}")
DATA=$(abspath "${DATA:-$VLMC_ROOT/data}")
FIGURES=$(abspath "${FIGURES:-$DATA/output/figures}")  # the tracked figures/ and results/ are written only by
RESULTS=$(abspath "${RESULTS:-$DATA/output/results}")  # `make figures` / `make sample` (from sample/)
export ROOT DEVICE=${DEVICE:-auto}
if [[ $PROFILE == testbed ]]; then export MODEL_PATH=${MODEL_PATH-testbed}; else export MODEL_PATH=${MODEL_PATH-}; fi
case $MODEL_PATH in
  testbed) ref_default=testbed-clip; export VLMC_CLIP_MODEL=${VLMC_CLIP_MODEL:-testbed} VLMC_BERTSCORE_MODEL=${VLMC_BERTSCORE_MODEL:-minilm} ;;
  tiny) ref_default=tiny-clip; export VLMC_CLIP_MODEL=${VLMC_CLIP_MODEL:-tiny} VLMC_BERTSCORE_MODEL=${VLMC_BERTSCORE_MODEL:-minilm} ;;
  *) ref_default=openai/clip-vit-large-patch14 ;;
esac
REF_MODEL=${REF_MODEL:-$ref_default}
if [[ $PROFILE == testbed && -z ${MODELS:-} ]]; then  # the committed testbed's families, in their order
  MODELS=$("$VLMC_PYTHON" -c 'from vlmc.train.testbed import TESTBED_FAMILIES; print(*TESTBED_FAMILIES)') ||
    die "cannot list the testbed families with $VLMC_PYTHON: set MODELS"
fi
PERTURB=${PERTURB:-mask lowrank}
# levels per perturbation (each mode's own scale; see eval_perturb.py --help)
levels_for() {
  case $1 in
    mask) echo "${MASK_LEVELS:-0,0.25,0.5,0.75}" ;;
    lowrank) echo "${LOWRANK_LEVELS:-1,0.5,0.25,0.05}" ;;
    orthogonal) echo "${ORTHOGONAL_LEVELS:-0,0.25,0.5,1}" ;;
    noise) echo "${NOISE_LEVELS:-40,20,10,0}" ;;
    *) die "unknown perturbation $1" ;;
  esac
}
renamed MODEL_TYPE RECON_TYPE
unset MODEL_TYPE  # the wrappers get RECON_TYPE / REF_TYPE explicitly; an exported MODEL_TYPE only confuses them
RECON_TYPE=${RECON_TYPE:-mlp idefics2=transformer}
for w in $RECON_TYPE; do
  [[ ${w#*=} =~ ^(linear|mlp|transformer)$ ]] || die "RECON_TYPE: '$w' is not TYPE or MODEL=TYPE (linear, mlp, transformer)"
done
# recon_type MODEL: its reconstructor type under RECON_TYPE
recon_type() {
  local w t=mlp
  for w in $RECON_TYPE; do
    case $w in
      "$1"=*) echo "${w#*=}"; return ;;
      *=*) ;;
      *) t=$w ;;
    esac
  done
  echo "$t"
}
if [[ -n ${DEMO:-} ]]; then
  export DEVICE=cpu EPOCHS=${EPOCHS:-15} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  # CPU-sized reconstructors: idefics2's transformer gets 2 blocks (mlp: 2 layers, its default) and a higher lr
  EMB_ARGS=${EMB_ARGS---lr 1e-3 --num_layers 2}
  # the reconstructors learn from testbed training scenes; every sample image is held out from them
  TRAIN_ROOT=${TRAIN_ROOT-$DATA/images_train}
  if [[ $TRAIN_ROOT == "$DATA/images_train" && ! -f $TRAIN_ROOT/00000/000001999.txt ]]; then
    log "== scenes: 2000 testbed training scenes -> $TRAIN_ROOT"
    "$VLMC_PYTHON" "$VLMC_ROOT/src/data/scenes.py" --out_dir "$TRAIN_ROOT" --n 2000 --seed 0 --workers 0
  fi
fi
# geometry at a meaningful N: the demo's stages 1-3 also run over 2000 held-out evaluation scenes
if [[ -n ${DEMO:-} ]]; then
  EVAL_ROOT=${EVAL_ROOT-$DATA/images_eval}
  export K=${K:-10,50,100}
  if [[ $EVAL_ROOT == "$DATA/images_eval" && ! -f $EVAL_ROOT/scenes.json ]]; then
    log "== scenes: 2000 held-out evaluation scenes -> $EVAL_ROOT"
    "$VLMC_PYTHON" "$VLMC_ROOT/src/data/scenes.py" --out_dir "$EVAL_ROOT" --n 2000 --seed 0 --first-index 30000 \
      --count-seen 8000 --workers 0 --no-progress
  fi
fi
EVAL_ROOT=${EVAL_ROOT:+$(abspath "$EVAL_ROOT")}
GEOM_VEC=$DATA/vector${EVAL_ROOT:+_eval} GEOM_REF=$DATA/clip_ref${EVAL_ROOT:+_eval}  # what stage 3 reads
TRAIN_ROOT=${TRAIN_ROOT:+$(abspath "$TRAIN_ROOT")}
[[ $TRAIN_ROOT != "$ROOT" ]] || die "TRAIN_ROOT is ROOT ($ROOT): leave TRAIN_ROOT empty to train on a seeded split of ROOT"
TRAIN_VEC=$DATA/vector${TRAIN_ROOT:+_train}  # the store the reconstructors train on
cd "$VLMC_ROOT"
mkdir -p logs  # the wrappers' #SBATCH --output=logs/... is relative to the submit directory: the repo

last=""  # job id(s) the next stage depends on
# stage NAME SCRIPT [ENV=VALUE...] -- [ARGS...]: run inline, or submit after the previous stage.
stage() {
  local name=$1 script=$2; shift 2
  local -a envs=() args=()
  while (($#)) && [[ $1 != -- ]]; do envs+=("$1"); shift; done
  (($#)) && shift
  args=("$@")
  local knob=${script%.sh}
  knob=${knob^^}_ARGS  # e.g. EMB_ARGS -> emb.sh's EXTRA_ARGS
  if [[ -n ${!knob:-} ]]; then envs+=("EXTRA_ARGS=${!knob}"); fi
  if [[ $mode == local ]]; then
    log "== $name"
    env "${envs[@]}" bash "scripts/$script" "${args[@]}"
    return
  fi
  local -a dep=() fit=()
  [[ -n $last ]] && dep=(--dependency="afterok:$last" --kill-on-invalid-dep=yes)
  read -r -a fit <<< "${fits[$script]}"
  local id
  id=$(env "${envs[@]}" sbatch --parsable --export=ALL "${dep[@]}" "${fit[@]}" ${slurm_args[@]+"${slurm_args[@]}"} \
       ${ARRAY:+--array="$ARRAY"} \
       --job-name="vlmc-$name" "scripts/$script" "${args[@]}")
  id=${id%%;*}
  echo "$name $id"
  stage_ids+=("$id")
}

need_images ROOT
# Size every wrapper's job to the partition before submitting any (a refusal leaves nothing half-submitted).
declare -A fits=()
if [[ $mode == slurm ]]; then
  read -r -a slurm_args <<< "${SLURM_ARGS:-}"
  for w in vec clip cal emb export_recon eval_recon train caption perturb score_perturb figures; do
    slurm_fit "scripts/$w.sh" SLURM_ARGS ${slurm_args[@]+"${slurm_args[@]}"}
    fits[$w.sh]=${VLMC_FIT[*]}
  done
fi

mapfile -t shards < <(list_shards "$ROOT")
nsh=${#shards[@]}
((nsh)) || die "no shards with images under $ROOT"
if [[ -n $EVAL_ROOT ]]; then
  mapfile -t eval_shards < <(list_shards "$EVAL_ROOT")
  ((${#eval_shards[@]})) || die "no shards with images under EVAL_ROOT $EVAL_ROOT"
fi
if [[ -n $TRAIN_ROOT ]]; then
  mapfile -t train_shards < <(list_shards "$TRAIN_ROOT")
  ((${#train_shards[@]})) || die "no shards with images under TRAIN_ROOT $TRAIN_ROOT"
fi
if [[ ${MODELS:-all} == all ]]; then  # every registered family
  MODELS=$("$VLMC_PYTHON" -m vlmc.models list) ||
    die "cannot list the model families with $VLMC_PYTHON: set MODELS"
fi
read -r -a models <<< "$MODELS"
CONNECTOR_MODEL=${CONNECTOR_MODEL-${models[0]}}

# Stages that fan out over models run side by side; the next stage waits for all of them.
fan_out() {
  local -a ids=()
  stage_ids=()
  "$@"
  # a stage that submitted nothing (e.g. CONNECTOR_MODEL empty) leaves the dependency as it was
  if [[ $mode == slurm && ${#stage_ids[@]} -gt 0 ]]; then ids=("${stage_ids[@]}"); last=$(IFS=:; echo "${ids[*]}"); fi
}

vec_stage() {
  local m
  for m in "${models[@]}"; do
    ARRAY=0-$((nsh - 1)) stage "vec-$m" vec.sh MODELS="$m" OUT="$DATA/vector"
    if [[ -n $TRAIN_ROOT ]]; then
      ARRAY=0-$((${#train_shards[@]} - 1)) stage "vec-train-$m" vec.sh MODELS="$m" ROOT="$TRAIN_ROOT" OUT="$TRAIN_VEC"
    fi
    if [[ -n $EVAL_ROOT ]]; then
      ARRAY=0-$((${#eval_shards[@]} - 1)) stage "vec-eval-$m" vec.sh MODELS="$m" ROOT="$EVAL_ROOT" OUT="$GEOM_VEC"
    fi
  done
}
clip_stage() {
  ARRAY=0-$((nsh - 1)) stage clip clip.sh REF_MODEL="$REF_MODEL" REF_TYPE=auto OUT="$DATA/clip_ref"
  if [[ -n $EVAL_ROOT ]]; then
    ARRAY=0-$((${#eval_shards[@]} - 1)) stage clip-eval clip.sh REF_MODEL="$REF_MODEL" REF_TYPE=auto ROOT="$EVAL_ROOT" \
      OUT="$GEOM_REF"
  fi
}
cal_stage() {
  local m
  for m in "${models[@]}"; do
    stage "cal-$m" cal.sh VEC="$GEOM_VEC" REF="clip:$GEOM_REF" OUT="$DATA/output/knn_out/$m" -- "$m"
    if [[ -n $EVAL_ROOT ]]; then  # per-image spectra of ROOT's images too, for the erank-vs-CLIPScore figure
      stage "cal-root-$m" cal.sh VEC="$DATA/vector" REF="clip:$DATA/clip_ref" OUT="$DATA/output/knn_root/$m" -- "$m"
    fi
  done
}
# Stages 4-7 name a model's reconstructor folder <model>_<type>; 5-7 read the evaluation store (DATA/vector),
# whose images the reconstructor did not train on unless they are in its split's train part.
recon_dir() { echo "$DATA/output/recon/${1}_$(recon_type "$1")"; }
emb_stage() {
  local m
  for m in "${models[@]}"; do
    stage "emb-$m" emb.sh MODEL="$m" VEC="$TRAIN_VEC" RECON_TYPE="$(recon_type "$m")" OUT="$(recon_dir "$m")" -- "$m"
  done
}
export_stage() {
  local m
  for m in "${models[@]}"; do
    stage "export-$m" export_recon.sh MODEL="$m" VEC="$DATA/vector" MODEL_DIR="$(recon_dir "$m")" \
      OUT_BASE="$DATA/vector_recon" -- "$m"
  done
}
eval_recon_stage() {
  local m
  for m in "${models[@]}"; do
    stage "eval-recon-$m" eval_recon.sh MODEL="$m" VEC="$DATA/vector" MODEL_DIR="$(recon_dir "$m")" \
      OUT="$DATA/output/recon_eval/$m" -- "$m"
  done
}
# Replacement-connector training (modular-connector experiment) for $CONNECTOR_MODEL (empty: none).
train_stage() {
  local m=$CONNECTOR_MODEL
  [[ -n $m ]] || return 0
  stage "train-$m" train.sh MODEL="$m" IMAGES="$ROOT" VEC="$DATA/vector" CONNECTOR=mlp \
    OUT="$DATA/output/connector/${m}_mlp" PREDICT=1 EXPORT=1 EXPORT_DIR="$DATA/vector" -- "$m"
}
caption_stage() {
  local m
  for m in "${models[@]}"; do
    stage "caption-$m" caption.sh MODEL="$m" VEC="$DATA/vector" RECON_DIR="$(recon_dir "$m")" OUT="$DATA/output/captions/$m" \
      CACHE_DIR="$DATA/output/perturb_out/cache" SCORES=clipscore,bertscore -- "$m"
  done
}
perturb_stage() {
  local m p
  for m in "${models[@]}"; do
    for p in $PERTURB; do
      stage "perturb-$m-$p" perturb.sh MODEL="$m" VEC="$DATA/vector" OUT="$DATA/output/perturb_out" -- "$m" "$p" "$(levels_for "$p")"
    done
  done
}
score_stage() { stage score-perturb score_perturb.sh PERTURB_DIR="$DATA/output/perturb_out" -- "$DATA/output/perturb_out"; }
figures_stage() {
  stage figures figures.sh -- "$DATA/output" "$FIGURES" "$RESULTS"
}

stage_ids=()
fan_out vec_stage
fan_out clip_stage
fan_out cal_stage
fan_out emb_stage
fan_out export_stage
fan_out eval_recon_stage
fan_out train_stage
fan_out caption_stage
fan_out perturb_stage
fan_out score_stage
fan_out figures_stage
if [[ $mode == slurm ]]; then log "submitted; follow with: squeue -u ${USER:-$(id -un)}"; else log "pipeline done; outputs under $DATA/"; fi
