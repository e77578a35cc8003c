"""Joining the processes of a multi-host run: one call, before anything touches a JAX device.

Three ways, in this order:
  1. explicit: a coordinator address, process count and process id from flags, or else from the
     environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), e.g. on one machine
     `--coordinator_address=127.0.0.1:1234 --num_processes=2 --process_id=0`;
  2. auto (--distributed): bare jax.distributed.initialize(), which detects Cloud TPU pods, SLURM,
     Open MPI and Kubernetes and reads everything from there;
  3. neither: a single process; nothing to do.
After it, process 0 writes files (config, metrics, checkpoints) and every process logs.
"""
import os

from absl import logging


class DistributedError(ValueError):
  """Inconsistent distributed settings; names the flags and variables."""


def _from_env(value, name, cast=str):
  if value is not None:
    return value
  raw = os.environ.get(name)
  if raw in (None, ""):
    return None
  try:
    return cast(raw)
  except ValueError:
    raise DistributedError(f"{name}={raw!r} is not a valid {cast.__name__}") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> bool:
  """Joins the run's processes (see the module doc); returns whether JAX runs distributed."""
  import jax  # here, not at the top: importing this module must not start JAX

  coordinator_address = _from_env(coordinator_address or None, "JAX_COORDINATOR_ADDRESS")
  num_processes = _from_env(num_processes, "JAX_NUM_PROCESSES", int)
  process_id = _from_env(process_id, "JAX_PROCESS_ID", int)
  explicit = {"--coordinator_address / JAX_COORDINATOR_ADDRESS": coordinator_address,
              "--num_processes / JAX_NUM_PROCESSES": num_processes,
              "--process_id / JAX_PROCESS_ID": process_id}
  given = [k for k, v in explicit.items() if v is not None]
  if given and len(given) < 3 and not auto:
    missing = [k for k, v in explicit.items() if v is None]
    raise DistributedError(f"{', '.join(given)} given without {', '.join(missing)} "
                           "(or pass --distributed to let JAX detect the cluster)")
  if given and len(given) == 3:
    if not 0 <= process_id < num_processes:
      raise DistributedError(f"--process_id={process_id} must lie in 0..--num_processes-1 "
                             f"({num_processes - 1})")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif auto:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    return False
  logging.info("process %d of %d: %d local devices of %d (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  return True

