"""Command-line entry: python -m jaxsae.main --config=configs/quickstart.py --workdir=DIR

  --dry_run: check everything a run checks before it compiles and print what it would do.

Config fields are overridden by name: --config.sae.n=65536 --config.train.steps=100.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics, checkpoints.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False,
                             "Check the config, mesh, data, memory plan and workdir, print the "
                             "automatic choices, and exit without training or writing.")
flags.mark_flags_as_required(["config"])
# Multi-process runs (jaxsae/distributed.py); each falls back to JAX_COORDINATOR_ADDRESS,
# JAX_NUM_PROCESSES, JAX_PROCESS_ID.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0's coordinator, e.g. 10.0.0.1:1234.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, 0..num_processes-1.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Let JAX detect the cluster (TPU pod, SLURM, Open MPI, k8s).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value and not _DRY_RUN.value:
    raise app.UsageError("--workdir is required (but with --dry_run)")
  try:
    config = _CONFIG.value
    config.keys()   # a --config file that failed to load raises here, on first use
  except OSError as e:   # one line: the file and why, not ml_collections' traceback
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    print(f"jaxsae: error: --config={path}: cannot load it "
          f"({str(e).strip().splitlines()[-1].strip()})", file=sys.stderr)
    sys.exit(1)
  from jaxsae import distributed
  try:  # before anything touches a device
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           auto=_DISTRIBUTED.value)
  except distributed.DistributedError as e:
    print(f"jaxsae: error: {e}", file=sys.stderr)
    sys.exit(1)
  from jaxsae import train  # after flag parsing: importing JAX first would slow --help
  from jaxsae.checkpoint import CheckpointError
  from jaxsae.config_check import ConfigError
  from jaxsae.data import DataError
  from jaxsae.mesh import MeshError
  try:
    if _DRY_RUN.value:
      from jaxsae import dry_run
      print(dry_run.describe(config, _WORKDIR.value or ""))
      return
    train.train_and_evaluate(config, _WORKDIR.value)
  except (CheckpointError, ConfigError, DataError, MeshError, train.TrainingError) as e:
    print(f"jaxsae: error: {e}", file=sys.stderr)   # once: not also as an absl log line
    sys.exit(1)


def _parse_flags(argv):
  """absl's parsing, but a bad --config file or --config.* override (ml_collections raises
  from inside the parser, with a traceback) is one line naming the problem, exit status 1."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if "Error whilst parsing config file" not in str(e):
      return app.parse_flags_with_usage(argv)   # absl's own message and usage hint
    # The config file's get_config raised: its exception's own line, not the traceback.
    last = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
    print(f"jaxsae: error: --config: {last.partition(': ')[2] or last}", file=sys.stderr)
    sys.exit(1)
  except (AttributeError, KeyError, OSError, TypeError, ValueError) as e:
    text = " ".join(str(e).replace("\\n", " ").split()).strip("'\"")
    text = text.replace("\\'", "'")
    if isinstance(e, (AttributeError, KeyError)):   # "'step' Did you mean "steps" ...?"
      name, _, hint = text.partition(" ")
      text = f"no such config field {name} in a --config.* override" + (f"; {hint}" if hint else "")
    print(f"jaxsae: error: {text}", file=sys.stderr)
    sys.exit(1)


def run():
  """Console script `jaxsae-train`."""
  # absl's --help lists the flags of the module named sys.argv[0]: for a console script that is
  # the wrapper, which defines none, so this module's flags are registered as its own.
  for flag in flags.FLAGS.get_key_flags_for_module(__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
