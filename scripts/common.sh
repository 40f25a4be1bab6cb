# shellcheck shell=bash
# Shared layer of the wrappers in scripts/: each is a valid sbatch script AND runs under plain bash.
# Sourced, never run. A wrapper finds this file with the prelude in scripts/vec.sh (under sbatch the
# wrapper itself runs from a copy in slurmd's spool, so its own path says nothing about the repo).
# Provides: VLMC_ROOT, VLMC_PYTHON (exported), log, die, load_env_file, list_shards, task_shards,
# run_requeueable. Safe under `set -euo pipefail` and bash >= 4.2.

VLMC_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export VLMC_ROOT

# log MSG...: timestamped line on stderr (= the Slurm log), tagged with job[task] under Slurm.
log() {
  local tag=${SLURM_JOB_ID:+ job ${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+[$SLURM_ARRAY_TASK_ID]}}
  printf '[%s%s] %s\n' "$(date '+%F %T')" "$tag" "$*" >&2
}
die() { log "ERROR: $*"; exit 1; }

# load_env_file FILE: KEY=VALUE lines (optional `export `, quotes, # comments; parsed, never run; no
# $-expansion). A variable already set in the environment wins; empty values are ignored.
load_env_file() {
  local line key val
  [[ -f $1 ]] || return 0
  while IFS= read -r line || [[ -n $line ]]; do
    line=${line%$'\r'}
    [[ $line =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || continue
    key=${BASH_REMATCH[2]} val=${BASH_REMATCH[3]}
    if [[ $val =~ ^\"([^\"]*)\" || $val =~ ^\'([^\']*)\' ]]; then val=${BASH_REMATCH[1]}
    else val=${val%%[[:space:]]#*}; val=${val%"${val##*[![:space:]]}"}; fi  # drop ` # comment`, blanks
    if [[ -n $val && -z ${!key+x} ]]; then export "$key=$val"; fi
  done < "$1"
}
# Site settings (SBATCH_ACCOUNT, SBATCH_PARTITION, HF_HOME, ...); see scripts/slurm.env.example.
load_env_file "${VLMC_SLURM_ENV:-$VLMC_ROOT/scripts/slurm.env}"

# Python: $VLMC_PYTHON, else the repo's .venv (activated), else python3 on PATH (conda, modules...).
if [[ -z ${VLMC_PYTHON:-} && -x $VLMC_ROOT/.venv/bin/python ]]; then
  export VIRTUAL_ENV=$VLMC_ROOT/.venv PATH=$VLMC_ROOT/.venv/bin:$PATH
  VLMC_PYTHON=$VLMC_ROOT/.venv/bin/python
fi
VLMC_PYTHON=${VLMC_PYTHON:-$(command -v python3 || echo python)}
export VLMC_PYTHON PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}; fi

# list_shards ROOT: shard names, sorted, as vlmc.data.images sees them: visible subfolders holding at
# least one image, or `_root` for a flat folder of images.
list_shards() {
  local d
  [[ -d $1 ]] || die "image root $1 is not a directory"
  if _vlmc_has_images "$1"; then echo _root; return 0; fi
  for d in "$1"/*/; do
    if _vlmc_has_images "$d"; then d=${d%/}; printf '%s\n' "${d##*/}"; fi
  done | LC_ALL=C sort
}
_vlmc_has_images() {
  local f re='\.(jpg|jpeg|png|webp|bmp|gif|tif|tiff)$'
  for f in "$1"/*; do [[ -f $f && ${f,,} =~ $re ]] && return 0; done
  return 1
}

# task_shards ROOT: the shard(s) this run handles, one per line. In a Slurm array of more than one task,
# task id N -> the N-th shard (0-based, sorted: `--array=0-7`, or `--array=3` to redo shard 3).
# Otherwise (plain bash, no array, or the default --array=0-0): every shard. $SHARDS (comma list)
# replaces the listing of ROOT.
task_shards() {
  local -a all
  if [[ -n ${SHARDS:-} ]]; then IFS=, read -r -a all <<< "$SHARDS"; else mapfile -t all < <(list_shards "$1"); fi
  (( ${#all[@]} )) || die "no shard with images under $1"
  local id=${SLURM_ARRAY_TASK_ID:-}
  if [[ -z $id || ( ${SLURM_ARRAY_TASK_COUNT:-1} == 1 && $id == 0 ) ]]; then
    printf '%s\n' "${all[@]}"; return 0
  fi
  (( id < ${#all[@]} )) || die "array task $id has no shard: ${#all[@]} shard(s) under $1, use --array=0-$(( ${#all[@]} - 1 ))"
  if [[ $id == "${SLURM_ARRAY_TASK_MAX:-}" ]] && (( id + 1 < ${#all[@]} )); then
    log "WARNING: shards ${all[*]:id+1} are beyond this array (max task $id); submit --array=0-$(( ${#all[@]} - 1 ))"
  fi
  printf '%s\n' "${all[id]}"
}

# run_requeueable CMD...: run a long stage so that Slurm's `--signal=B:USR1@120` (sent to this batch
# shell only) becomes a clean stop + requeue. On USR1 it creates $VLMC_STOP_FILE and forwards
# $VLMC_CHECKPOINT_SIGNAL (default USR1) to CMD, which should finish its current chunk and exit; after
# $VLMC_CHECKPOINT_GRACE s (default 90) CMD gets SIGTERM. Then under Slurm `scontrol requeue` (the job
# needs --requeue, and --open-mode=append so its log keeps the stopped run's lines; the rerun resumes via
# --skip_existing/--resume). Without Slurm, or if the requeue is refused, it returns 75 ("stopped early;
# rerun the same command to resume"). Else: CMD's status.
run_requeueable() {
  local rc waited grace=${VLMC_CHECKPOINT_GRACE:-90}
  export VLMC_STOP_FILE=${VLMC_STOP_FILE:-${TMPDIR:-/tmp}/vlmc-stop.${SLURM_JOB_ID:-$$}}
  rm -f "$VLMC_STOP_FILE"
  _vlmc_stop=0 _vlmc_child=
  trap _vlmc_on_usr1 USR1
  "$@" &
  _vlmc_child=$!
  if (( _vlmc_stop )); then _vlmc_on_usr1; fi  # USR1 came before the child existed
  while :; do
    rc=0; wait "$_vlmc_child" || rc=$?
    kill -0 "$_vlmc_child" 2>/dev/null || break  # it exited; otherwise `wait` was cut short by USR1
    waited=0
    while kill -0 "$_vlmc_child" 2>/dev/null && (( waited < grace * 5 )); do sleep 0.2; waited=$((waited + 1)); done
    if kill -0 "$_vlmc_child" 2>/dev/null; then log "no checkpoint after ${grace}s: SIGTERM"; kill -TERM "$_vlmc_child"; fi
  done
  # The stage is over: a USR1 from now on (Slurm's --signal=B:USR1@T landing after it finished) must not
  # kill this shell (the default action), which would turn a finished job into FAILED.
  trap '' USR1
  rm -f "$VLMC_STOP_FILE"
  (( _vlmc_stop )) || return "$rc"
  if [[ -n ${SLURM_JOB_ID:-} ]]; then
    # logged first: a successful requeue kills this shell at once
    log "stage stopped (rc=$rc); requeueing job $SLURM_JOB_ID, it resumes when it starts again"
    if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
  fi
  log "stage stopped early (rc=$rc) and not requeued: rerun the same command to resume"
  return 75
}
_vlmc_on_usr1() {
  _vlmc_stop=1
  log "USR1: asking pid $_vlmc_child to checkpoint and stop (${VLMC_CHECKPOINT_SIGNAL:-USR1}, $VLMC_STOP_FILE)"
  touch "$VLMC_STOP_FILE"
  kill -s "${VLMC_CHECKPOINT_SIGNAL:-USR1}" "$_vlmc_child" 2>/dev/null || true
}

if [[ -n ${SLURM_RESTART_COUNT:-} ]]; then log "restarted run #$SLURM_RESTART_COUNT of job ${SLURM_JOB_ID:-}"; fi
