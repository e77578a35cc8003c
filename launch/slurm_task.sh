#!/usr/bin/env bash
# One task of a SLURM job step: srun starts one per GPU. JAX reads the coordinator, process count
# and rank from SLURM's variables (--distributed); this task's log is WORKDIR/logs/task_<rank>.log.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/common.sh"
: "${SLURM_PROCID:?slurm_task.sh runs under srun (see slurm_gpu.sbatch)}"
workdir=$(workdir_of "$@")
[ -n "$workdir" ] || { echo "slurm_task.sh: the training flags need --workdir=DIR" >&2; exit 2; }
logdir=${JAXSAE_LOGDIR:-$workdir/logs}
mkdir -p "$logdir"
cd "$here/.."
exec python -m jaxsae.main --distributed "$@" > "$logdir/task_$SLURM_PROCID.log" 2>&1
