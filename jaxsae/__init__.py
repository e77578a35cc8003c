"""jaxsae: top-k sparse autoencoders trained at scale in JAX.

Entry points: `python -m jaxsae.main` (train), `jaxsae.dump` (activation stores), `jaxsae.plan`
(memory), `jaxsae.export` (SAELens / sparsify / npz), `jaxsae.inspect` (a run or an export),
`jaxsae.evaluate` (spliced LM loss, KL, FVU of an SAE in its model), `jaxsae.plot` (pictures).
From Python: `jaxsae.train.train_and_evaluate(config, workdir)`.
"""
import logging


class _QuietBackendProbe(logging.Filter):
  """Drops JAX's "Unable to initialize backend 'tpu': ... libtpu.so ..." line. JAX probes every
  backend it knows and logs, at INFO, each one it quietly skips; absl (every jaxsae command runs
  under absl.app) shows INFO, so every CPU and GPU run printed it. Only quiet probes are logged so:
  a backend asked for by JAX_PLATFORMS that fails raises, and jax.devices('tpu') still says why."""

  def filter(self, record):
    return not (record.levelno <= logging.INFO
                and str(record.msg).startswith("Unable to initialize backend"))


logging.getLogger("jax._src.xla_bridge").addFilter(_QuietBackendProbe())
