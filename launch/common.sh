# Sourced by the launch scripts: small helpers shared by all of them.

# The value of --workdir=DIR among the training flags, or empty.
workdir_of() {
  local arg
  for arg in "$@"; do
    case "$arg" in --workdir=*) echo "${arg#--workdir=}"; return ;; esac
  done
}

# Prints a command, shell-quoted, as the shell would run it.
show() { printf '+'; printf ' %q' "$@"; printf '\n'; }

# Prints a command, then runs it (or only prints it when DRY_RUN=1).
run() {
  show "$@"
  [ "${DRY_RUN:-0}" = 1 ] || "$@"
}
