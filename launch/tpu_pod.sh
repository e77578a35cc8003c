#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (or reuse it), install jaxsae on every worker, stop stale
# runs, start the same training command on all workers, fetch one log per worker, optionally delete.
#
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --project=PROJECT --accelerator-type=v5p-64 \
#       --workdir=gs://BUCKET/runs/RUN [--version=RUNTIME] [--workers=N] [--dry-run] [--teardown] \
#       -- --config=configs/dict_16m.py [--config.FIELD=VALUE ...]
#
# Every gcloud command is printed before it runs; --dry-run prints them and runs nothing.
# The workdir should be a gs:// path (TensorStore and Orbax write there directly) so that all
# workers and later runs see the same checkpoints; rerunning the command resumes.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
source "$here/common.sh"

name="" zone="" project="" accel="" workdir="" version="" workers="" teardown=0
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
    --dry-run) DRY_RUN=1 ;;
    --teardown) teardown=1 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown flag $1 (training flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
for v in name zone project accel workdir; do
  [ -n "${!v}" ] || { echo "tpu_pod.sh: --${v/accel/accelerator-type} is required" >&2; exit 2; }
done
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
# Hosts in the slice: v4/v5p name TensorCores (2 per chip, 4 chips per host); v5e/v6e name chips
# (4 per host for multi-host slices, one host up to 8 chips).
if [ -z "$workers" ]; then
  size=${accel##*-}
  case "$accel" in
    v4-*|v5p-*) workers=$(( (size + 7) / 8 )) ;;
    v5litepod-*|v6e-*) if [ "$size" -le 8 ]; then workers=1; else workers=$(( size / 4 )); fi ;;
  esac
fi

gtpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone" --project="$project")
remote_log="jaxsae_train.log"
train_cmd="set -o pipefail; cd ~/jaxsae && python3 -m jaxsae.main --distributed --workdir=$(printf '%q' "$workdir")"
for flag in "$@"; do train_cmd+=" $(printf '%q' "$flag")"; done
train_cmd+=" 2>&1 | tee ~/$remote_log"

# 1. The slice: reuse it if it exists (a dry run shows both commands).
show "${gtpu[@]}" describe "$name" "${where[@]}"
if [ "$DRY_RUN" = 1 ] || ! "${gtpu[@]}" describe "$name" "${where[@]}" > /dev/null 2>&1; then
  run "${gtpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accel" --version="$version"
fi

# 2. The project on every worker: a tarball of the working tree, then pip.
tarball="${TMPDIR:-/tmp}/jaxsae-$name.tar.gz"
run tar -czf "$tarball" -C "$repo" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ .
run "${gtpu[@]}" scp "$tarball" "$name:~/jaxsae.tar.gz" "${where[@]}" --worker=all
run "${gtpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="mkdir -p ~/jaxsae && tar -xzf ~/jaxsae.tar.gz -C ~/jaxsae && pip install -q -U 'jax[tpu]' && pip install -q -e ~/jaxsae"

# 3. Stale processes from an earlier launch hold the TPU: stop them.
run "${gtpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="pkill -f jaxsae.main || true"

# 4. The run, on all workers at once (JAX detects the pod). A failure still fetches the logs.
set +e
run "${gtpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$train_cmd"
status=$?
set -e

# 5. One log per worker.
logdir="logs/$name"
run mkdir -p "$logdir"
for ((w = 0; w < ${workers:-1}; w++)); do
  run "${gtpu[@]}" scp "$name:~/$remote_log" "$logdir/worker_$w.log" "${where[@]}" --worker="$w"
done

# 6. Optional teardown.
if [ "$teardown" = 1 ]; then
  run "${gtpu[@]}" delete "$name" "${where[@]}" --quiet
fi
exit "$status"
