"""Command-line entry: python -m jaxsae.main --config=configs/quickstart.py --workdir=DIR

Config fields are overridden by name: --config.sae.n=65536 --config.train.steps=100.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics, checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from jaxsae import train  # after flag parsing: importing JAX first would slow --help
  from jaxsae.config_check import ConfigError
  from jaxsae.data import DataError
  from jaxsae.mesh import MeshError
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, DataError, MeshError, train.TrainingError) as e:
    logging.error("%s", e)
    print(f"jaxsae: error: {e}", file=sys.stderr)
    sys.exit(1)


def run():
  """Console script `jaxsae-train`."""
  app.run(main)


if __name__ == "__main__":
  run()
