#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (or reuse it), install jaxsae on every worker, stop the
# run this script started there before, and start the training on all workers, detached: it runs
# on under setsid/nohup with its PID recorded (launch/tpu_worker.sh), whatever becomes of the ssh
# session. Then follow it, fetch its logs, stop it or delete the slice with the subcommands below.
#
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --project=PROJECT --accelerator-type=v5p-64 \
#       --workdir=gs://BUCKET/runs/RUN [--version=RUNTIME] [--workers=N] [--jax=VERSION] [--dry-run] \
#       -- --config=configs/dict_16m.py [--config.FIELD=VALUE ...]
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --project=PROJECT --attach [--worker=W]
#       follows worker W's log (default 0) until the run ends; Ctrl-C detaches, the run goes on
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --project=PROJECT --logs [--workers=N]
#       prints every worker's status (running PID / exit code) and fetches logs/NAME/worker_W.log
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --project=PROJECT --stop
#       SIGTERM to the recorded training process on every worker (never any other process): the
#       run saves a checkpoint at a step all workers agree on and exits; rerunning the start resumes
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --project=PROJECT --teardown [--workers=N]
#       --stop, --logs, then deletes the slice
#
# Every gcloud command is printed before it runs; --dry-run prints them and runs nothing.
# The workdir should be a gs:// path (TensorStore and Orbax write there directly) so that all
# workers and later runs see the same checkpoints; rerunning the command resumes.
# jax[tpu] is installed at the version the project is tested with (JAX_VERSION below; --jax=).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
source "$here/common.sh"

# The jax release the test suite runs on (CPU; the TPU kernels' lowering is tested against it).
JAX_VERSION=0.10.2

name="" zone="" project="" accel="" workdir="" version="" workers="" worker=0 action=start
jax_version=$JAX_VERSION
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --accelerator-type=*) accel=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --workers=*) workers=${1#*=} ;;
    --worker=*) worker=${1#*=} ;;
    --jax=*) jax_version=${1#*=} ;;
    --dry-run) DRY_RUN=1 ;;
    --attach) action=attach ;;
    --logs) action=logs ;;
    --stop) action=stop ;;
    --teardown) action=teardown ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown flag $1 (training flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
required=(name zone project)
[ "$action" = start ] && required+=(accel workdir)
for v in "${required[@]}"; do
  [ -n "${!v}" ] || { echo "tpu_pod.sh: --${v/accel/accelerator-type} is required" >&2; exit 2; }
done
[[ "$jax_version" =~ ^[0-9]+(\.[0-9]+)*$ ]] || { echo "tpu_pod.sh: --jax=$jax_version is no version" >&2; exit 2; }

gtpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone" --project="$project")
worker_sh="bash ~/jaxsae/launch/tpu_worker.sh"

# Hosts in the slice, for fetching one log each: --workers, else from the accelerator type, else
# (the subcommands, which do not take --accelerator-type) from the slice's description.
hosts() {
  if [ -n "$workers" ]; then echo "$workers"; return; fi
  local size=${accel##*-}
  case "$accel" in
    # v4/v5p name TensorCores (2 per chip, 4 chips per host); v5e/v6e name chips (4 per host for
    # multi-host slices, one host up to 8 chips).
    v4-*|v5p-*) echo $(( (size + 7) / 8 )); return ;;
    v5litepod-*|v6e-*) if [ "$size" -le 8 ]; then echo 1; else echo $(( size / 4 )); fi; return ;;
  esac
  if [ "$DRY_RUN" = 1 ]; then echo 1; return; fi
  local n
  n=$("${gtpu[@]}" describe "$name" "${where[@]}" --format='value(networkEndpoints.len())' 2>/dev/null || true)
  echo "${n:-1}"
}

fetch_logs() {
  set +e
  run "${gtpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$worker_sh status"
  set -e
  local logdir="logs/$name" n
  n=$(hosts)
  run mkdir -p "$logdir"
  for ((w = 0; w < n; w++)); do
    run "${gtpu[@]}" scp "$name:~/jaxsae_run/train.log" "$logdir/worker_$w.log" "${where[@]}" --worker="$w" || true
  done
}

# SIGTERM to the training process tpu_worker.sh recorded on each worker (none on a fresh slice),
# waiting for it to checkpoint and exit; fails if one is still running after its timeout.
stop_run() {
  run "${gtpu[@]}" ssh "$name" "${where[@]}" --worker=all \
    --command="if [ -f ~/jaxsae/launch/tpu_worker.sh ]; then $worker_sh stop; fi"
}

case "$action" in
  attach)
    run "${gtpu[@]}" ssh "$name" "${where[@]}" --worker="$worker" --command="$worker_sh follow"
    exit 0 ;;
  logs) fetch_logs; exit 0 ;;
  stop) stop_run; exit 0 ;;
  teardown)
    set +e; stop_run; set -e
    fetch_logs
    run "${gtpu[@]}" delete "$name" "${where[@]}" --quiet
    exit 0 ;;
esac

# The TPU VM runtime image per generation (override with --version).
if [ -z "$version" ]; then
  case "$accel" in
    v4-*) version=tpu-ubuntu2204-base ;;
    v5litepod-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) echo "tpu_pod.sh: no default --version for $accel; pass one" >&2; exit 2 ;;
  esac
fi
train_cmd="cd ~/jaxsae && $worker_sh start -- python3 -m jaxsae.main --distributed --workdir=$(printf '%q' "$workdir")"
for flag in "$@"; do train_cmd+=" $(printf '%q' "$flag")"; done

# 1. The slice: reuse it if it exists (a dry run shows both commands).
show "${gtpu[@]}" describe "$name" "${where[@]}"
if [ "$DRY_RUN" = 1 ] || ! "${gtpu[@]}" describe "$name" "${where[@]}" > /dev/null 2>&1; then
  run "${gtpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accel" --version="$version"
fi

# 2. The run this script started before, if it is still going, holds the TPU (and runs the code
#    about to be replaced): stop it. Nothing else on the workers is touched.
stop_run

# 3. The project on every worker: a tarball of the working tree, then pip (jax[tpu] pinned).
tarball="${TMPDIR:-/tmp}/jaxsae-$name.tar.gz"
run tar -czf "$tarball" -C "$repo" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ .
run "${gtpu[@]}" scp "$tarball" "$name:~/jaxsae.tar.gz" "${where[@]}" --worker=all
run "${gtpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="mkdir -p ~/jaxsae && tar -xzf ~/jaxsae.tar.gz -C ~/jaxsae && pip install -q 'jax[tpu]==$jax_version' && pip install -q -e ~/jaxsae"

# 4. The run, started detached on all workers at once (JAX detects the pod); this returns at once.
run "${gtpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$train_cmd"
echo "tpu_pod.sh: started. Follow: $0 --name=$name --zone=$zone --project=$project --attach" \
     "(--logs, --stop, --teardown)"
