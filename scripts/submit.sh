#!/bin/bash
# Submit one wrapper sized to the cluster: `sbatch` with the wrapper's wanted CPUs (its `#VLMC` line) and
# GPU, clamped to the target partition's largest node and --gres=none where the partition has no GPU, each
# change logged; an option you give that no node can satisfy is refused with one line. Creates logs/.
#
#   bash scripts/submit.sh scripts/vec.sh                       # = sbatch -c <fit> scripts/vec.sh
#   bash scripts/submit.sh --array=0-7%4 scripts/vec.sh --batch_size 32
#   bash scripts/submit.sh --wait -p gpu scripts/cal.sh llava  # sbatch options before the script, its args after
#   SLURM_ARGS="-c 4" bash scripts/submit.sh scripts/emb.sh llava
#
# Options before the script go to sbatch (after SLURM_ARGS, so they win); arguments after it go to the script.
# The partition is -p / SBATCH_PARTITION / the default one; SBATCH_ACCOUNT etc. come from your shell or
# scripts/slurm.env (loaded here, so they reach sbatch). Exit status: sbatch's; 1 when refused.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

opts=() script=""
read -r -a opts <<< "${SLURM_ARGS:-}"
while (($#)); do
  case $1 in
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *.sh) script=$1; shift; break ;;
    *) opts+=("$1"); shift ;;
  esac
done
[[ -n $script ]] || die "no wrapper script given: bash scripts/submit.sh [sbatch options] scripts/<stage>.sh [args] (see --help)"
[[ -f $script ]] || die "wrapper $script not found"
[[ ${script##*/} != pipeline.sh ]] || die "pipeline.sh submits (and sizes) its own jobs: run bash scripts/pipeline.sh"
command -v sbatch >/dev/null || die "sbatch not found: no Slurm here; run the wrapper with bash instead (bash $script)"
slurm_fit "$script" "your sbatch options / SLURM_ARGS" ${opts[@]+"${opts[@]}"}
mkdir -p logs
log "sbatch ${VLMC_FIT[*]} ${opts[*]} $script $*"
exec sbatch "${VLMC_FIT[@]}" ${opts[@]+"${opts[@]}"} "$script" "$@"
