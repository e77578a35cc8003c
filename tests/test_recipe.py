"""The training recipe's invariants, on the real step function."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from jaxsae import model, optim, stats, train
from jaxsae import step as step_lib


def test_decoder_rows_unit_norm_after_every_step(tiny_config):
  run = train.setup(tiny_config)
  state = run.state
  for _ in range(5):
    batch = next(run.data.train)
    state, metrics, _ = run.steps.train(state, jax.device_put(batch, run.batch_sharding))
    norms = np.linalg.norm(np.asarray(state.params["W_dec"]), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
  assert np.isfinite(float(metrics["train/fvu"]))
  assert int(state.step) == 5


def test_projected_decoder_gradient_is_orthogonal_to_rows():
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  params = model.init_params(ks[0], 16, 64, jnp.zeros(16))
  grads = {name: jax.random.normal(k, p.shape) for (name, p), k in
           zip(params.items(), jax.random.split(ks[1], 4))}
  tx = optim.project_decoder_grads()
  out, _ = tx.update(grads, tx.init(params), params)
  dots = jnp.sum(out["W_dec"] * params["W_dec"], axis=1)
  assert float(jnp.max(jnp.abs(dots))) < 1e-5
  assert float(jnp.max(jnp.abs(jnp.sum(grads["W_dec"] * params["W_dec"], axis=1)))) > 0.1
  np.testing.assert_array_equal(np.asarray(out["W_enc"]), np.asarray(grads["W_enc"]))


@pytest.mark.parametrize("encoder_norm", [1.0, 0.1])
def test_tied_init_and_geometric_median(tiny_config, encoder_norm):
  tiny_config.sae.encoder_init_norm = encoder_norm
  run = train.setup(tiny_config)
  p = jax.device_get(run.state.params)
  np.testing.assert_allclose(p["W_enc"], encoder_norm * p["W_dec"], rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=1), 1.0, rtol=1e-5)
  assert not p["b_enc"].any()
  # The geometric median zeroes the sum of unit vectors towards the rows (its optimality condition).
  sample = run.data.init_sample(tiny_config.train.init_rows) * run.input_scale
  diff = sample - p["b_pre"]
  pull = (diff / np.linalg.norm(diff, axis=1, keepdims=True)).sum(0) / len(sample)
  assert np.linalg.norm(pull) < 1e-2
  assert np.linalg.norm(p["b_pre"] - sample.mean(0)) > 1e-3  # it is not simply the mean


def test_input_scale_fixes_mean_squared_norm():
  x = np.random.default_rng(0).normal(3.0, 2.0, (500, 12)).astype(np.float32)
  centred = x - x.mean(axis=0)
  for mode, target in (("d", 12.0), ("unit", 1.0)):
    s = stats.input_scale(x, mode, "zero")
    assert abs(np.mean(np.sum((s * x) ** 2, axis=1)) - target) < 1e-3 * target
    s = stats.input_scale(x, mode, "mean")   # the default: about the mean, blind to the offset
    assert abs(np.mean(np.sum((s * centred) ** 2, axis=1)) - target) < 1e-3 * target
    assert abs(stats.input_scale(x + 100.0, mode) - s) < 1e-4 * s
  assert stats.input_scale(x, "none") == 1.0


def test_element_density_sees_the_basis_not_the_scale():
  """E|x_i| / rms: sqrt(2/pi) for Gaussian elements whatever their mean and scale, lower for
  heavy-tailed ones (Laplace: 1/sqrt(2)) or variance held by a few coordinates; a rotation that
  spreads that variance over the coordinates brings it most of the way back."""
  rng = np.random.default_rng(0)
  g = rng.normal(size=(20000, 64))
  assert stats.element_density(3.0 * g + 7.0) == pytest.approx(np.sqrt(2 / np.pi), abs=0.01)
  assert stats.element_density(rng.laplace(size=(20000, 64))) == pytest.approx(2 ** -0.5, abs=0.01)
  uneven = g * np.where(np.arange(64) < 4, 10.0, 1.0)   # 4 coordinates hold 2/3 of the variance
  q = np.linalg.qr(rng.normal(size=(64, 64)))[0]
  assert stats.element_density(uneven) < 0.5
  assert stats.element_density(uneven @ q) > 0.73


def test_init_statistics_make_no_float64_copy_of_the_sample():
  """The input scale and the density read the init sample a block of rows at a time: at d=16k
  its 32k rows are 2 GiB, and each whole float64 temporary would be 4 GiB more."""
  import tracemalloc
  x = np.random.default_rng(0).normal(size=(65536, 128)).astype(np.float32)   # 32 MiB
  for measure in (lambda: stats.input_scale(x, "d", "mean"), lambda: stats.input_scale(x, "d", "zero"),
                  lambda: stats.element_density(x)):
    tracemalloc.start()
    measure()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < x.nbytes / 2, peak   # one float64 copy would be 2 x x.nbytes; a block, 1/16


def test_k_aux_default():
  assert model.resolve_k_aux(-1, 768, 10 ** 6) == 256
  assert model.resolve_k_aux(-1, 4096, 10 ** 6) == 2048
  assert model.resolve_k_aux(-1, 128, 2048) == 64
  assert model.resolve_k_aux(100, 128, 2048) == 100


def test_automatic_lr_and_schedule():
  """lr unset: the reference rate, carried to other shapes by sqrt(576/d), min(1, sqrt(48/k)),
  (4096/n)^(1/6) and min(1, (batch/4096 x 225/steps)^(1/3)); train.lr wins when set. The schedule
  warms up linearly over 5% of the run, then decays linearly to 0 at the last step."""
  c = base.get_config()
  c.sae.d, c.sae.k, c.sae.n, c.train.batch_size, c.train.steps = 576, 32, 4096, 4096, 150
  lr, source = optim.resolve_lr(c)
  assert lr == optim.LR_REFERENCE   # a short run at the reference shape: the ceiling
  assert "automatic" in source and "d=576" in source and "k=32" in source and "steps=150" in source
  c.sae.k = 4 * optim.K_KNEE   # four times the knee's k: half the rate
  assert optim.resolve_lr(c)[0] == pytest.approx(lr / 2)
  c.sae.k = 8     # below the knee the decoder's bound holds: the ceiling
  assert optim.resolve_lr(c)[0] == pytest.approx(lr)
  c.sae.k = 32
  c.train.steps = 225 * 8   # eight times the knee's steps: half the rate
  assert optim.resolve_lr(c)[0] == pytest.approx(lr / 2)
  c.train.batch_size = 4096 * 8   # and eight times the batch: the ceiling again
  assert optim.resolve_lr(c)[0] == pytest.approx(lr)
  c.train.batch_size = 4096
  c.sae.d, c.sae.n = 4 * 576, 64 * 4096   # four times the width: half; 64 times the latents: half
  assert optim.resolve_lr(c)[0] == pytest.approx(lr / 8)
  # The data's basis: denser than the reference's lowers the rate in proportion, sparser keeps it.
  assert optim.resolve_lr(c, 0.8)[0] == pytest.approx(lr / 8 * (0.65 / 0.8) ** 1.5)
  assert optim.resolve_lr(c, 0.5)[0] == pytest.approx(lr / 8)
  assert "density=0.800" in optim.resolve_lr(c, 0.8)[1]
  assert "measured at start-up" in optim.resolve_lr(c)[1]   # not measured yet (a dry run)
  c.train.lr = 1e-3
  assert optim.resolve_lr(c) == (1e-3, "train.lr")
  assert optim.resolve_lr(c, 0.8) == (1e-3, "train.lr")

  c.train.steps, c.train.warmup_steps, c.train.decay_frac = 200, -1, 1.0
  assert optim.resolve_warmup(c.train) == 10
  sched = optim.learning_rate(c)
  rates = np.array([float(sched(i)) for i in range(201)])
  assert rates[0] == 0 and rates[10] == pytest.approx(1e-3) and rates.max() <= 1e-3 * (1 + 1e-6)
  assert np.all(np.diff(rates[:11]) > 0) and np.all(np.diff(rates[10:]) < 0)
  assert rates[200] == 0 and rates[105] == pytest.approx(5e-4)
  c.train.steps = 10 ** 6
  assert optim.resolve_warmup(c.train) == optim.WARMUP_MAX
  c.train.warmup_steps, c.train.decay_frac = 0, 0.0
  assert float(optim.learning_rate(c)(12345)) == pytest.approx(1e-3)


def test_adam_is_lazy_where_every_latent_is_selected_each_step():
  """train.lazy_optimizer unset: lazy when batch x k >= n with fp32 moments (optim.resolve_lazy);
  dense for wide dictionaries and with bf16 moments; a value set in the config wins."""
  c = base.get_config()
  c.sae.n, c.sae.k, c.train.batch_size = 4096, 32, 4096
  assert optim.resolve_lazy(c) == (True, "automatic: batch x k = 131072 >= n = 4096")
  c.sae.n = 2 ** 24
  assert optim.resolve_lazy(c) == (False, "automatic: batch x k = 131072 < n = 16777216")
  c.sae.n, c.train.opt_state_dtype = 4096, "bfloat16"
  assert optim.resolve_lazy(c) == (False, "automatic: opt_state_dtype=bfloat16 has no lazy sweep")
  c.train.opt_state_dtype, c.train.lazy_optimizer = "float32", False
  assert optim.resolve_lazy(c) == (False, "set in the config")


def _first_step_moves(config) -> dict:
  """How far one step at the peak rate (lr 3e-3 in tiny_config) moves each parameter: the largest
  element's change. The tied init's b_dec starts equal to b_pre."""
  config.train.decay_frac = 0.0
  run = train.setup(config)
  before = jax.device_get(run.state.params)
  state, _, _ = run.steps.train(run.state, jax.device_put(next(run.data.train),
                                                          run.batch_sharding))
  after = jax.device_get(state.params)
  np.testing.assert_array_equal(before["b_dec"], before["b_pre"])
  return {name: np.abs(after[name] - before[name]).max() for name in after}


def test_b_pre_steps_at_its_own_share_of_the_rate(tiny_config):
  """b_pre_lr_ratio unset: 1 / (encoder_init_norm sqrt(d)). Adam's first step moves every element
  with a nonzero gradient by ~lr: the weights by lr, b_pre by ratio * lr; ratio 1 is one rate.
  The output's bias b_dec starts equal to b_pre and steps at the full rate whatever the ratio."""
  c = base.get_config()
  c.sae.d, c.sae.encoder_init_norm = 576, 0.3
  ratio, source = optim.resolve_b_pre_ratio(c)
  assert ratio == pytest.approx(1 / (0.3 * 24)) and "automatic" in source
  c.train.b_pre_lr_ratio = 0.5
  assert optim.resolve_b_pre_ratio(c) == (0.5, "set in the config")

  moved = {}
  for setting in (-1, 1.0):
    tiny_config.train.b_pre_lr_ratio = setting
    moved[setting] = _first_step_moves(tiny_config)
  auto = 1 / (0.3 * np.sqrt(32))   # tiny_config's d=32: 0.59
  assert moved[1.0]["b_pre"] == pytest.approx(3e-3, rel=1e-3)
  assert moved[-1]["b_pre"] == pytest.approx(auto * 3e-3, rel=1e-3)
  assert moved[-1]["b_enc"] == pytest.approx(3e-3, rel=1e-3) == moved[1.0]["b_enc"]
  assert moved[-1]["b_dec"] == pytest.approx(3e-3, rel=1e-3) == moved[1.0]["b_dec"]


def test_decoder_steps_at_its_own_share_of_the_rate(tiny_config):
  """train.decoder_lr_ratio scales W_dec's steps alone: Adam's first step moves every element with
  a nonzero gradient by ~lr, the encoder's by lr whatever the ratio; a decoder row's move, its
  renormalization's share included, is linear in its rate to first order."""
  moved = {}
  for ratio in (1.0, 2.0):
    tiny_config.train.decoder_lr_ratio = ratio
    moved[ratio] = _first_step_moves(tiny_config)
  assert moved[2.0]["W_dec"] == pytest.approx(2 * moved[1.0]["W_dec"], rel=0.05)
  assert moved[2.0]["W_enc"] == pytest.approx(3e-3, rel=1e-3) == moved[1.0]["W_enc"]


def test_dead_latents_are_tracked_and_trained_by_auxk(tiny_config):
  """A latent silent for dead_tokens tokens counts as dead, and AuxK, alone, trains its rows:
  one step from the same state with and without AuxK moves exactly the dead rows differently."""
  tiny_config.sae.dead_tokens = 256  # one batch
  run = train.setup(tiny_config)
  state = run.state
  batch = lambda: jax.device_put(next(run.data.train), run.batch_sharding)
  for _ in range(20):
    state, m, _ = run.steps.train(state, batch())
    if float(m["sparsity/dead_frac"]) > 0:
      break
  dead = np.asarray(state.since_fired) >= 256
  assert dead.any() and (~dead).any()
  assert np.asarray(state.since_fired).max() <= 256  # saturates instead of overflowing

  tiny_config.sae.auxk_coef = 0.0
  plain = train.setup(tiny_config)
  x = batch()
  copy = lambda s: jax.tree.map(jnp.copy, s)
  with_aux, m_aux, _ = run.steps.train(copy(state), x)
  without, m_plain, _ = plain.steps.train(copy(state), x)
  assert float(m_aux["losses/auxk"]) > 0 and float(m_plain["losses/auxk"]) == 0
  differs = np.any(np.asarray(with_aux.params["W_dec"]) != np.asarray(without.params["W_dec"]), 1)
  assert differs[dead].any()
  assert not differs[~dead].any(), "AuxK changed the update of a live latent's decoder row"


def test_aux_sizes():
  assert step_lib.aux_sizes(256, True) == (32, 256)
  assert step_lib.aux_sizes(2048, True) == (32, 256, 2048)
  assert step_lib.aux_sizes(64, True) == (64,)
  assert step_lib.aux_sizes(2048, False) == (2048,)


@pytest.mark.parametrize("num_dead", [5, 100])
def test_auxk_buckets_give_the_same_step(tiny_config, num_dead):
  """AuxK at width 32 (5 dead) or 256 (100 dead) updates exactly like AuxK at k_aux=256."""
  tiny_config.sae.n, tiny_config.sae.k_aux = 512, 256
  tiny_config.sae.dead_tokens = 10_000
  runs = {}
  for buckets in (True, False):
    tiny_config.train.auxk_buckets = buckets
    runs[buckets] = train.setup(tiny_config)
  assert runs[True].steps.aux_sizes == (32, 256)
  state = runs[True].state
  dead = np.zeros(512, bool)
  dead[np.random.default_rng(num_dead).choice(512, num_dead, replace=False)] = True
  state = state.replace(since_fired=jnp.where(dead, 10_000, 0).astype(state.since_fired.dtype))
  x = jax.device_put(next(runs[True].data.train), runs[True].batch_sharding)
  out = {b: r.steps.train(jax.tree.map(jnp.copy, state), x) for b, r in runs.items()}
  assert float(out[True][1]["losses/auxk"]) > 0
  np.testing.assert_allclose(out[True][1]["losses/auxk"], out[False][1]["losses/auxk"], rtol=1e-6)
  for name in ("W_dec", "W_enc", "b_enc", "b_pre"):
    np.testing.assert_allclose(out[True][0].params[name], out[False][0].params[name],
                               rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("mesh", [(1, 1), (2, 2)])
def test_auxk_over_the_dead_list_gives_the_same_step(tiny_config, mesh):
  """train.auxk_compact: with 40 of 4096 latents dead (AuxK over a 64-long dead list, or 32-long
  per shard of 2048 at (2, 2): its ops then run as dense GEMMs over the list) or 1500 (over all
  latents), the step updates as without it. (Selection itself: tests/test_sharded_step.py.)"""
  tiny_config.sae.n, tiny_config.sae.k_aux = 4096, 32
  tiny_config.sae.dead_tokens = 10_000
  tiny_config.mesh.shape = mesh
  runs = {}
  for compact in (True, False):
    tiny_config.train.auxk_compact = compact
    runs[compact] = train.setup(tiny_config)
  n_local = 4096 // runs[True].specs.model_size
  assert runs[True].steps.aux_branches == [(0, 0), (32, n_local // 64), (32, n_local // 8), (32, 0)]
  assert runs[False].steps.aux_branches == [(0, 0), (32, 0)]
  x = jax.device_put(next(runs[True].data.train), runs[True].batch_sharding)
  for num_dead in (40, 1500):
    state = runs[True].state
    dead = np.zeros(4096, bool)
    dead[np.random.default_rng(num_dead).choice(4096, num_dead, replace=False)] = True
    state = state.replace(since_fired=jax.device_put(
        jnp.where(dead, 10_000, 0).astype(state.since_fired.dtype), state.since_fired.sharding))
    out = {c: r.steps.train(jax.tree.map(jnp.copy, state), x) for c, r in runs.items()}
    assert float(out[True][1]["losses/auxk"]) > 0
    np.testing.assert_allclose(out[True][1]["losses/auxk"], out[False][1]["losses/auxk"],
                               rtol=1e-6)
    for name in ("W_dec", "W_enc", "b_enc", "b_pre"):
      np.testing.assert_allclose(out[True][0].params[name], out[False][0].params[name],
                                 rtol=1e-5, atol=1e-6, err_msg=f"{name}, {num_dead} dead")


def test_auxk_branch_takes_the_narrowest_width_and_shortest_list(tiny_config):
  tiny_config.sae.n, tiny_config.sae.k_aux = 8192, 256
  steps = train.setup(tiny_config).steps
  assert steps.aux_sizes == (32, 256)
  assert steps.aux_branches == [(0, 0), (32, 128), (32, 1024), (32, 0), (256, 1024), (256, 0)]
  for num_dead, most, want in [(0, 0, 0), (5, 5, 1), (32, 32, 1), (32, 200, 2), (33, 33, 4),
                               (100, 1024, 4), (2000, 1025, 5), (20, 2000, 3)]:
    assert int(steps.aux_branch(jnp.int32(num_dead), jnp.int32(most))) == want, (num_dead, most)
