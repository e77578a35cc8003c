"""bf16 Adam moments (train.opt_state_dtype): stochastic rounding keeps them unbiased, so the second
moment still decays, and training follows the fp32 run."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import optim, train


def test_stochastic_rounding_is_unbiased():
  x = jnp.full((200_000,), 1.0 + 0.3 * 2.0**-7, jnp.float32)   # 30% of a bf16 step above 1
  for sign in (1.0, -1.0):
    r = np.asarray(optim.stochastic_round_bf16(sign * x, jnp.int32(7)).astype(jnp.float32))
    assert set(np.abs(r)) == {1.0, 1.0 + 2.0**-7}               # only the two neighbours
    assert abs(np.mean(np.abs(r) == 1.0 + 2.0**-7) - 0.3) < 0.01
  a = optim.stochastic_round_bf16(x, jnp.int32(1))
  b = optim.stochastic_round_bf16(x, jnp.int32(2))
  assert np.any(a != b), "the salt (step) must change the rounding"


def _nu_after_decay(tx, steps=700):
  params = {"w": jnp.zeros((4096,))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  _, state = update({"w": jnp.ones(4096)}, state)
  for _ in range(steps):
    _, state = update({"w": jnp.zeros(4096)}, state)
  return float(jnp.mean(state.nu["w"].astype(jnp.float32)))


def test_second_moment_decays_in_bf16():
  """nu * 0.999 rounds back to nu in bf16 (a step there is 2^-8 relative): with plain
  rounding nu would never decay. Stochastic rounding follows the fp32 decay on average."""
  expected = 0.001 * 0.999 ** 700
  got = _nu_after_decay(optim.scale_by_adam_bf16(0.9, 0.999, 1e-8))
  assert abs(got / expected - 1) < 0.02, (got, expected)
  nearest = jnp.asarray(0.001, jnp.bfloat16)
  assert (nearest.astype(jnp.float32) * 0.999).astype(jnp.bfloat16) == nearest


def _fvu(config, opt_dtype, steps=40):
  config.train.opt_state_dtype = opt_dtype
  config.train.steps = steps
  run = train.setup(config)
  state, fvus = run.state, []
  for _ in range(steps):
    state, m, _ = run.steps.train(state, jax.device_put(next(run.data.train), run.batch_sharding))
    fvus.append(float(m["train/fvu"]))
  return np.mean(fvus[-5:]), state


def test_bf16_moments_train_like_fp32(tiny_config):
  fp32, _ = _fvu(tiny_config, "float32")
  bf16, state = _fvu(tiny_config, "bfloat16")
  assert {m.dtype for m in jax.tree.leaves(state.opt_state[1][0].mu)} == {jnp.dtype("bfloat16")}
  assert abs(bf16 / fp32 - 1) < 0.01, (bf16, fp32)
