# shellcheck shell=bash
# Shared layer of the wrappers in scripts/: each is a valid sbatch script AND runs under plain bash.
# Sourced, never run. A wrapper finds this file with the prelude in scripts/vec.sh (under sbatch the
# wrapper itself runs from a copy in slurmd's spool, so its own path says nothing about the repo).
# Provides: VLMC_ROOT, VLMC_PYTHON, PROFILE (exported), log, die, load_env_file, list_shards, task_shards,
# run_requeueable; for the wrappers' own code: setting, renamed, end_settings (--help), need_images, need_path,
# cmd_opt, cmd_extra, run_stage; for submitting: slurm_fit, slurm_partition_size (scripts/submit.sh,
# scripts/pipeline.sh). Safe under `set -euo pipefail` and bash >= 4.2.

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
# --resume). Without Slurm, or if the requeue is refused, it returns 75 ("stopped early;
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

# ---------------------------------------------------------------- settings, profiles, --help
# PROFILE picks every wrapper's defaults: `cluster` (the default: data/images, every family, each family's
# published checkpoint, --device auto) or `testbed` (the demo: sample/images and the trained testbed models).
PROFILE=${PROFILE:-cluster}
case $PROFILE in
  cluster|testbed) export PROFILE ;;
  *) die "PROFILE=$PROFILE: use cluster (data/images, published checkpoints) or testbed (sample/images, the demo's models)" ;;
esac
_vlmc_names=()
declare -A _vlmc_def _vlmc_tdef _vlmc_doc

# setting [-e] [-p] NAME DEFAULT DOC [TESTBED_DEFAULT]: declare one environment setting of this wrapper.
# NAME keeps a value from the environment; unset or empty takes the default (PROFILE=testbed: the 4th
# argument when given). -e: an empty value is kept (DOC says what it means). -p: a relative default is a path
# in the repository. `<VAR>` in a default is replaced by $VAR (e.g. data/output/knn_out/<MODEL>).
setting() {
  local keep_empty=0 path=0
  while [[ $1 == -? ]]; do case $1 in -e) keep_empty=1 ;; -p) path=1 ;; esac; shift; done
  local name=$1 def=$2 tdef=${4-$2} v
  _vlmc_names+=("$name") _vlmc_def[$name]=$def _vlmc_tdef[$name]=$tdef _vlmc_doc[$name]=$3
  [[ $PROFILE == testbed ]] && def=$tdef
  while [[ $def =~ \<([A-Z_]+)\> ]]; do v=${BASH_REMATCH[1]}; def=${def//<$v>/${!v-}}; done
  if (( path )) && [[ -n $def && $def != /* ]]; then def=$VLMC_ROOT/$def; fi
  if [[ -z ${!name+x} ]] || { (( ! keep_empty )) && [[ -z ${!name} ]]; }; then printf -v "$name" '%s' "$def"; fi
}

# renamed OLD NEW: OLD is the deprecated name of setting NEW; used (with a log line) when NEW is not set.
renamed() {
  if [[ -n ${!1+x} && -z ${!2+x} ]]; then
    log "$1 is deprecated: use $2 (same meaning; the old name clashed between wrappers under --export=ALL)"
    printf -v "$2" '%s' "${!1}"
  fi
}

# end_settings ARGS...: after the last `setting`; -h/--help among ARGS prints this wrapper's help, exit 0.
end_settings() {
  local a
  for a in "$@"; do [[ $a == -h || $a == --help ]] && { wrapper_help; exit 0; }; done
  return 0
}

# wrapper_help: the wrapper's header comment, its settings with their defaults, what it asks Slurm for.
# VLMC_HELP_FORMAT=md prints the settings as rows of docs/cluster.md's table instead.
wrapper_help() {
  local n w=${0##*/}
  if [[ ${VLMC_HELP_FORMAT:-} == md ]]; then
    local doc
    for n in "${_vlmc_names[@]}"; do
      doc=$(sed 's/</\&lt;/g; s/>/\&gt;/g' <<< "${_vlmc_doc[$n]}")
      printf '| %s | `%s` | `%s` | `%s` | %s |\n' "$w" "$n" "$(_vlmc_show "${_vlmc_def[$n]}")" \
        "$(_vlmc_show "${_vlmc_tdef[$n]}")" "$doc"
    done
    return 0
  fi
  sed -n '2,/^[^#]\|^#SBATCH/{/^#SBATCH/d;/^[^#]/d;s/^# \{0,1\}//;p}' "$0"
  echo "Settings (environment variables; defaults for PROFILE=$PROFILE, relative ones in the repository):"
  for n in "${_vlmc_names[@]}"; do
    local d=${_vlmc_def[$n]}; [[ $PROFILE == testbed ]] && d=${_vlmc_tdef[$n]}
    printf '  %-15s [%s] %s\n' "$n" "$(_vlmc_show "$d")" "${_vlmc_doc[$n]}"
  done
  cat <<HELP
  PROFILE         [cluster] cluster: data/images, every family, published checkpoints; testbed: the demo's
  EXTRA_ARGS      [empty] more CLI flags (split on spaces); arguments after the wrapper's own go to the CLI too
  VLMC_PYTHON     [the repo's .venv, else python3] the interpreter; VLMC_SLURM_ENV [scripts/slurm.env]: site settings
Slurm: $(slurm_asks "$0")
  Plain \`sbatch $w\` gets the #SBATCH lines, sized for any node; \`bash scripts/submit.sh [sbatch options] $w\`
  asks for the wanted size, clamped to the partition's largest node (--gres=none where it has no GPU).
  Account/partition/GPU type: SBATCH_ACCOUNT, SBATCH_PARTITION, SBATCH_GRES from your shell or scripts/slurm.env.
  Job logs go to logs/ of the submit directory (plain sbatch needs it to exist). Without Slurm: bash $w.
HELP
}
_vlmc_show() { local s=${1#"$VLMC_ROOT/"}; s=${s//<VLMC_ROOT>\//}; echo "${s:-empty}"; }

# slurm_asks SCRIPT: one line: what SCRIPT's #SBATCH header asks for, and the size submit.sh wants.
slurm_asks() {
  local c g t want
  c=$(sed -n 's/^#SBATCH --cpus-per-task=\([0-9]*\).*/\1/p' "$1")
  g=$(sed -n 's/^#SBATCH --gres=\(\S*\).*/\1/p' "$1")
  t=$(sed -n 's/^#SBATCH --time=\(\S*\).*/\1/p' "$1")
  want=$(sed -n 's/^#VLMC --cpus-per-task=\([0-9]*\).*/\1/p' "$1")
  echo "-c ${c:-1}${g:+, --gres=$g}${t:+, --time=$t}; submit.sh / pipeline.sh ask -c ${want:-${c:-1}}"
}

# need_images VAR: the folder named by $VAR holds images (<shard>/<key>.<ext> or flat), else one line naming VAR.
need_images() {
  local d=${!1}
  [[ -d $d ]] || die "$1=$d does not exist: set $1 to your image folder (<shard>/<key>.<ext>), or PROFILE=testbed for the demo's sample/images"
  [[ -n $(list_shards "$d") ]] || die "$1=$d holds no images (<shard>/<key>.<ext>): set $1 to your image folder"
}
# need_path VAR PATH HOW: PATH (from setting VAR) exists, else one line saying how to make it or what to set.
need_path() { [[ -e $2 ]] || die "$2 does not exist ($1): $3"; }

# cmd_opt FLAG VALUE: append `FLAG VALUE` to the array `cmd` when VALUE is not empty.
cmd_opt() { if [[ -n $2 ]]; then cmd+=("$1" "$2"); fi; }
# cmd_extra ARGS...: append $EXTRA_ARGS (split on spaces) and ARGS to `cmd`.
cmd_extra() {
  local -a extra
  read -r -a extra <<< "${EXTRA_ARGS:-}"
  cmd+=(${extra[@]+"${extra[@]}"} "$@")
}
# run_stage NAME WHAT [plain]: log, run "${cmd[@]}" (requeueable unless `plain`), log done.
run_stage() {
  log "$1: $2 on $(hostname -s)${CUDA_VISIBLE_DEVICES:+ GPU $CUDA_VISIBLE_DEVICES}"
  log "$1: ${cmd[*]}"
  if [[ ${3:-} == plain ]]; then "${cmd[@]}"; else run_requeueable "${cmd[@]}"; fi
  log "$1: done"
}

# ---------------------------------------------------------------- sizing jobs to the cluster
# slurm_fit SCRIPT LABEL [SBATCH_OPTIONS...]: the options that make SCRIPT's job fit the target partition, in
# the array VLMC_FIT. CPUs: the options' -c, else SCRIPT's `#VLMC --cpus-per-task` (what it wants), else its
# #SBATCH line; more than the partition's largest node (sinfo, and its MaxCPUsPerNode) is clamped with a log
# line, or refused (die) when LABEL (the options' source, e.g. SLURM_ARGS) asked for it. GPUs: a GPU gres on
# a partition without GPU nodes becomes --gres=none with a log line, refused likewise when asked for.
# Partition: the options' -p, else $SBATCH_PARTITION, else the default one. Without sinfo: no change.
slurm_fit() {
  local script=$1 label=$2 w=${1##*/}; shift 2
  local cpus="" gres="" part=${SBATCH_PARTITION:-} ucpus=0 ugres=0 a label_g=""
  while (($#)); do
    a=$1; shift
    case $a in
      -c|--cpus-per-task) cpus=${1:-}; ucpus=1; shift ;;
      -c*) cpus=${a#-c}; ucpus=1 ;;
      --cpus-per-task=*) cpus=${a#*=}; ucpus=1 ;;
      --gres) gres=${1:-}; ugres=1; shift ;;
      --gres=*) gres=${a#*=}; ugres=1 ;;
      -p|--partition) part=${1:-}; shift ;;
      -p*) part=${a#-p} ;;
      --partition=*) part=${a#*=} ;;
    esac
  done
  if [[ -n ${SBATCH_GRES:-} && $ugres == 0 ]]; then gres=$SBATCH_GRES; ugres=1; label_g=SBATCH_GRES; fi
  [[ -n $cpus ]] || cpus=$(sed -n 's/^#VLMC --cpus-per-task=\([0-9]*\).*/\1/p' "$script")
  [[ -n $cpus ]] || cpus=$(sed -n 's/^#SBATCH --cpus-per-task=\([0-9]*\).*/\1/p' "$script")
  [[ -n $gres || $ugres == 1 ]] || gres=$(sed -n 's/^#SBATCH --gres=\(\S*\).*/\1/p' "$script")
  [[ $cpus =~ ^[0-9]+$ ]] || die "$label: -c '$cpus' is not a number of CPUs"
  VLMC_FIT=(--cpus-per-task="$cpus")
  command -v sinfo >/dev/null || { log "$w: no sinfo here: submitted unchecked with -c $cpus"; return 0; }
  slurm_partition_size "$part"
  local max=$VLMC_PART_CPUS
  if (( cpus > max )); then
    (( ucpus )) && die "$label asks -c $cpus for $w, but the largest node of partition $VLMC_PART has $max CPUs: ask for at most -c $max"
    log "$w: wants -c $cpus; partition $VLMC_PART's largest node has $max CPUs: -c $max"
    VLMC_FIT=(--cpus-per-task="$max")
  fi
  if [[ $gres == *gpu* ]] && (( ! VLMC_PART_GPUS )); then
    (( ugres )) && die "${label_g:-$label} asks --gres=$gres for $w, but partition $VLMC_PART has no GPU node: use --gres=none (or another partition)"
    log "$w: partition $VLMC_PART has no GPU: --gres=none (the stage runs on CPU)"
    VLMC_FIT+=(--gres=none)
  fi
}

# slurm_partition_size [PARTITION]: VLMC_PART (the partition; empty = the default one), VLMC_PART_CPUS (CPUs
# of its largest node, capped by MaxCPUsPerNode), VLMC_PART_GPUS (GPUs of its largest GPU node; 0 = none).
# Dies with one line when the partition does not exist. Cached per partition.
slurm_partition_size() {
  local part=${1:-} line c g n maxc=0 maxg=0 lim
  if [[ -z $part ]]; then
    part=$(sinfo -h -o '%P' 2>/dev/null | sed -n 's/\*$//p' | head -n1)
    [[ -n $part ]] || die "no default Slurm partition (sinfo): set SBATCH_PARTITION"
  fi
  if [[ ${_vlmc_part_key:-} == "$part" ]]; then VLMC_PART=$part; return 0; fi
  local out
  out=$(sinfo -h -N -p "$part" -o '%c %G' 2>/dev/null) || true
  [[ -n $out ]] || die "Slurm partition '$part' not found or has no nodes (sinfo -p $part): set SBATCH_PARTITION"
  while read -r c g; do
    (( c > maxc )) && maxc=$c
    n=0
    if [[ $g =~ (^|,)gpu(:[^:,\(]+)?:([0-9]+) ]]; then n=${BASH_REMATCH[3]}; fi
    (( n > maxg )) && maxg=$n
  done <<< "$out"
  lim=$(scontrol -o show partition "$part" 2>/dev/null | sed -n 's/.*MaxCPUsPerNode=\([0-9][0-9]*\).*/\1/p')
  if [[ -n $lim ]] && (( lim < maxc )); then maxc=$lim; fi
  VLMC_PART=$part VLMC_PART_CPUS=$maxc VLMC_PART_GPUS=$maxg _vlmc_part_key=$part
}
