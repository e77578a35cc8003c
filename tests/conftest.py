"""Tests run on CPU with 8 fake devices (set before JAX starts) so sharded code runs for real."""
import os
import sys

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# kernels=pallas on CPU: the tests check the Pallas kernels in interpret mode, which a run refuses
# unless asked for (jaxsae/config_check.py).
os.environ.setdefault("JAXSAE_PALLAS_INTERPRET", "1")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


def run_cli(args, cwd=REPO, devices=1, timeout=300, env=None):
  """Runs `python -m jaxsae.main ARGS` as a user would; returns the CompletedProcess."""
  import subprocess
  full_env = {**os.environ, "JAX_PLATFORMS": "cpu",
              "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **(env or {})}
  return subprocess.run([sys.executable, "-m", "jaxsae.main", *args], cwd=cwd, env=full_env,
                        capture_output=True, text=True, timeout=timeout)


def assert_pallas_step_equals_xla(config, steps):
  """Trains config for `steps` steps with kernels=xla and with kernels=pallas (top-k GEMM, sparse
  ops, fused optimizer, lazy or dense as the config resolves); the parameters and every step's
  metrics must agree (rtol 1e-5)."""
  import numpy as np
  from jaxsae import train
  out = {}
  for kernels in ("xla", "pallas"):
    config.kernels = kernels
    run = train.setup(config)
    assert run.steps.optimizer.per_shard == (kernels == "pallas" or run.steps.lazy)
    state, metrics = run.state, []
    for _ in range(steps):
      state, m, _ = run.steps.train(state, jax.device_put(next(run.data.train),
                                                          run.batch_sharding))
      metrics.append(jax.device_get(m))
    out[kernels] = (jax.device_get(state.params), metrics)
  # Adam divides each gradient element by its own scale, so an element whose gradient is near 0
  # turns the kernels' different summation orders (float32 rounding) into steps that differ by
  # a few 1e-6 after 3 steps (seen: 1 element of 4608, 3.7e-6); a wrong kernel moves whole rows
  # by ~lr.
  for name in out["xla"][0]:
    np.testing.assert_allclose(out["pallas"][0][name], out["xla"][0][name], rtol=1e-5, atol=1e-5,
                               err_msg=name)
  for step, (a, b) in enumerate(zip(out["pallas"][1], out["xla"][1])):
    for key in b:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7,
                                 err_msg=f"{key}, step {step}")


@pytest.fixture
def tiny_config():
  """The quickstart shrunk to a few seconds on one device."""
  from configs import quickstart
  c = quickstart.get_config()
  c.sae.d, c.sae.n, c.sae.k = 32, 128, 4
  c.data.synthetic.num_features = 64
  c.data.synthetic.active = 4.0
  c.data.eval_rows = 512
  c.train.steps, c.train.batch_size, c.train.log_every = 4, 256, 2
  c.train.lr = 3e-3   # fixed: the automatic rate of a 4-step run (0.22) would magnify round-off
  c.train.init_rows = 1024
  c.mesh.shape = (1, 1)
  return c
