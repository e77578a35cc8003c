"""The step on a (data, model) mesh of 8 fake devices equals the single-device step."""
import jax
import numpy as np
import pytest

from jaxsae import train


def _run(config, shape, steps=6):
  config.mesh.shape = shape
  run = train.setup(config)
  state, out = run.state, []
  for _ in range(steps):
    state, m, _ = run.steps.train(state, jax.device_put(next(run.data.train), run.batch_sharding))
    out.append(jax.device_get(m))
  return jax.device_get(state), out


@pytest.mark.parametrize("shape", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_mesh_matches_single_device(tiny_config, shape):
  tiny_config.sae.dead_tokens = 256  # dead latents appear, so the sharded AuxK path runs too
  ref_state, ref_metrics = _run(tiny_config, (1, 1))
  state, metrics = _run(tiny_config, shape)
  for name in ref_state.params:
    np.testing.assert_allclose(state.params[name], ref_state.params[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)
  np.testing.assert_array_equal(state.since_fired, ref_state.since_fired)
  for a, b in zip(metrics, ref_metrics):
    for key in b:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7, err_msg=key)
  assert any(m["losses/auxk"] > 0 for m in ref_metrics)
