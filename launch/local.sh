#!/usr/bin/env bash
# N jaxsae processes on this machine, M CPU devices each, coordinator on 127.0.0.1: the multi-host
# code paths (process-local batches, process 0 writes, collectives across processes) without a pod.
#
#   launch/local.sh [--processes=N] [--devices=M] [--port=P] [--logdir=DIR] -- TRAINING FLAGS
#   launch/local.sh --processes=2 --devices=2 -- --config=configs/quickstart.py --workdir=/tmp/q2
#
# One log per process in DIR (default WORKDIR/logs). SIGINT/SIGTERM are passed to every process
# (each saves a checkpoint and exits); if one process fails the others are stopped and its log
# tail is printed. Rerunning the same command resumes from the workdir's last checkpoint.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/common.sh"

processes=2 devices=2 port="" logdir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --processes=*) processes=${1#*=} ;;
    --devices=*) devices=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --logdir=*) logdir=${1#*=} ;;
    --) shift; break ;;
    *) echo "local.sh: unknown flag $1 (training flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
workdir=$(workdir_of "$@")
[ -n "$workdir" ] || { echo "local.sh: the training flags need --workdir=DIR" >&2; exit 2; }
logdir=${logdir:-$workdir/logs}
mkdir -p "$logdir"
port=${port:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
stop_all() { for p in "${pids[@]}"; do kill -"$1" "$p" 2>/dev/null || true; done; }
trap 'stop_all TERM' TERM INT

echo "local.sh: $processes processes x $devices CPU devices, coordinator 127.0.0.1:$port, logs in $logdir"
for ((i = 0; i < processes; i++)); do
  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$devices python -m jaxsae.main \
    --coordinator_address="127.0.0.1:$port" --num_processes="$processes" --process_id="$i" \
    "$@" > "$logdir/process_$i.log" 2>&1 &
  pids+=($!)
done

status=0
for i in "${!pids[@]}"; do
  # `wait` returns early when a trapped signal arrives: wait again until the process is gone.
  while :; do
    set +e; wait "${pids[$i]}"; code=$?; set -e
    kill -0 "${pids[$i]}" 2>/dev/null || break
  done
  if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$code
    echo "local.sh: process $i exited with $code; stopping the others. Its log ends:" >&2
    tail -n 20 "$logdir/process_$i.log" >&2
    stop_all TERM
  fi
done
exit "$status"
