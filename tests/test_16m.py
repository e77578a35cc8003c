"""A 16M-latent dictionary (n = 2^24, d = 16, k = 32) trains 2 steps on 8 fake CPU devices, and its
measured peak memory is within 20% of the planner's figure.

The run happens in a fresh subprocess (this file, run as a script) so that its peak resident set
is its own: measured = peak RSS - the RSS of the same process before setup (JAX and jaxsae
imported, devices up). The planner's figure is per device; the 8 fake devices share the host, so
the process holds 8 times it. XLA's compiled figure for the same step is checked too.
"""
import json
import os
import subprocess
import sys

import numpy as np

N, D, K, BATCH, DEVICES, TILE = 2**24, 16, 32, 256, 8, 8192


def _config():
  from configs import quickstart
  c = quickstart.get_config()
  c.sae.d, c.sae.n, c.sae.k = D, N, K
  c.train.batch_size, c.train.steps, c.train.init_rows = BATCH, 2, 4096
  c.data.eval_rows = 0
  c.mesh.shape = (1, DEVICES)
  c.encoder_tile = TILE       # pre[256, 2^21] per device would be 2 GiB (x2 with AuxK)
  return c


def worker():
  import resource
  import jax
  jax.config.update("jax_num_cpu_devices", DEVICES)
  from jaxsae import mesh as mesh_lib, plan, train
  jax.devices()
  rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  baseline = rss()
  config = _config()
  run = train.setup(config)            # runs the planner's start-up check
  state, fvus = run.state, []
  for _ in range(2):
    batch = mesh_lib.host_batch_to_global(next(run.data.train), run.batch_sharding, BATCH)
    state, metrics, _ = run.steps.train(state, batch)
    fvus.append(float(metrics["train/fvu"]))
  jax.block_until_ready(state)
  peak = rss()
  planned = plan.estimate(plan.Problem.from_config(config), 1, DEVICES).peak
  compiled = plan.compiled_peak(run.steps.train.lower(state, batch).compile())
  print(json.dumps({"baseline": baseline, "peak": peak, "planned_per_device": planned,
                    "compiled_per_device": compiled, "fvu": fvus,
                    "step": int(jax.device_get(state.step))}))


def test_16m_latents_train_within_planned_memory():
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": repo}
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=repo, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["step"] == 2 and all(np.isfinite(out["fvu"])), out
  measured = out["peak"] - out["baseline"]
  planned = DEVICES * out["planned_per_device"]
  assert planned > 8 * 2**30   # params and Adam alone are 6 GiB: a real 16M dictionary
  assert abs(measured / planned - 1) <= 0.2, (measured / 2**30, planned / 2**30)
  assert abs(out["compiled_per_device"] / out["planned_per_device"] - 1) <= 0.2, out


if __name__ == "__main__":
  worker()
