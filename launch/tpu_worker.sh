#!/usr/bin/env bash
# One worker's side of launch/tpu_pod.sh: runs a jaxsae training detached from the ssh session that
# starts it, records its PID, and follows, checks and stops only that process.
#
#   launch/tpu_worker.sh start -- python3 -m jaxsae.main --distributed --workdir=... FLAGS
#   launch/tpu_worker.sh status            # "running PID", "exited CODE" or "no run"; 0 if running
#   launch/tpu_worker.sh log [N]           # the last N (default 100) lines of the run's log
#   launch/tpu_worker.sh follow            # tail -F the log until the run exits (Ctrl-C detaches)
#   launch/tpu_worker.sh stop [SECONDS]    # SIGTERM (the run saves a checkpoint), wait (600 s)
#
# The run's files are in $JAXSAE_RUN_DIR (default ~/jaxsae_run): train.log, pid (the training
# process), ident (its start time, so that a recycled PID is never signalled),
# exit_code once it has ended. The run is started under setsid and nohup with no terminal: closing
# or losing the ssh connection does not reach it.
set -euo pipefail
run_dir=${JAXSAE_RUN_DIR:-$HOME/jaxsae_run}
cmd=${1:-}
shift || true

# The start time of a live process (field 22 of /proc/PID/stat, in clock ticks since boot), or
# nothing: with the PID it names one process, never a later one given the same PID.
ident_of() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  echo "${stat##*) }" | awk '{print $20}'
}

# The recorded PID if that very process (same start time) is still alive.
live_pid() {
  [ -f "$run_dir/pid" ] && [ -f "$run_dir/ident" ] || return 1
  local pid
  pid=$(cat "$run_dir/pid")
  [ -n "$pid" ] && [ "$(ident_of "$pid")" = "$(cat "$run_dir/ident")" ] || return 1
  echo "$pid"
}

case "$cmd" in
  start)
    [ "${1:-}" = "--" ] && shift
    [ $# -gt 0 ] || { echo "tpu_worker.sh start: no command (start -- python3 -m jaxsae.main ...)" >&2; exit 2; }
    if pid=$(live_pid); then
      echo "tpu_worker.sh: a run is already going (PID $pid); stop it first" >&2
      exit 3
    fi
    mkdir -p "$run_dir"
    rm -f "$run_dir/pid" "$run_dir/ident" "$run_dir/exit_code"
    # The wrapper (its own session, no terminal, SIGHUP ignored) starts the run, records its PID and
    # identity, waits for it and records its exit status.
    nohup setsid bash -c '
      dir=$1; shift
      "$@" >> "$dir/train.log" 2>&1 < /dev/null &
      child=$!
      echo "$child" > "$dir/pid.tmp" && mv "$dir/pid.tmp" "$dir/pid"
      wait "$child"
      echo $? > "$dir/exit_code"' _ "$run_dir" "$@" < /dev/null > /dev/null 2>&1 &
    for _ in $(seq 100); do [ -f "$run_dir/pid" ] && break; sleep 0.1; done
    [ -f "$run_dir/pid" ] || { echo "tpu_worker.sh: the run did not start" >&2; exit 1; }
    pid=$(cat "$run_dir/pid")
    ident=$(ident_of "$pid")
    if [ -z "$ident" ]; then
      echo "tpu_worker.sh: the run (PID $pid) ended at once; its log ends:" >&2
      tail -n 20 "$run_dir/train.log" >&2 || true
      exit 1
    fi
    echo "$ident" > "$run_dir/ident"
    echo "started PID $pid on $(hostname), log $run_dir/train.log"
    ;;
  status)
    if pid=$(live_pid); then
      echo "running PID $pid on $(hostname)"
      exit 0
    elif [ -f "$run_dir/exit_code" ]; then
      echo "exited $(cat "$run_dir/exit_code") on $(hostname)"
    else
      echo "no run on $(hostname)"
    fi
    exit 3
    ;;
  log)
    tail -n "${1:-100}" "$run_dir/train.log"
    ;;
  follow)
    if pid=$(live_pid); then
      tail -n 50 --pid="$pid" -F "$run_dir/train.log"
    else
      tail -n 50 "$run_dir/train.log"
    fi
    ;;
  stop)
    timeout=${1:-600}
    if ! pid=$(live_pid); then
      echo "no run to stop on $(hostname)"
      exit 0
    fi
    case "$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null)" in
      *jaxsae.main*) ;;
      *) echo "tpu_worker.sh: PID $pid is not a jaxsae run; not stopping it" >&2; exit 1 ;;
    esac
    echo "stopping PID $pid on $(hostname) (SIGTERM: it saves a checkpoint and exits)"
    kill -TERM "$pid"
    for ((i = 0; i < timeout * 10; i++)); do
      live_pid > /dev/null || { echo "stopped PID $pid"; exit 0; }
      sleep 0.1
    done
    echo "tpu_worker.sh: PID $pid still running after ${timeout}s" >&2
    exit 1
    ;;
  *)
    echo "usage: tpu_worker.sh start -- COMMAND... | status | log [N] | follow | stop [SECONDS]" >&2
    exit 2
    ;;
esac
