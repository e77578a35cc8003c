"""train.lazy_optimizer: Adam on the selected latents' rows only (jaxsae/optim.py).

The lazy kernels (TPU and GPU flavours, CPU interpret mode) against their reference; the lazy
update against the dense one on a first step; untouched rows bit for bit; the rows a step marks
touched; the drift of a short run against dense Adam (measured, bounded); kernels=pallas against
kernels=xla on one device and on a (2, 2) mesh.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels
from configs import base
from jaxsae import config_check, model, optim, train
from pallas_kernels import fused_adam, fused_adam_gpu, sparse_ops

# Per flavour: the module and (n, d). The GPU kernel gets a ragged width (72 columns padded to 128).
FLAVOURS = {"tpu": (fused_adam, (64, 128)), "gpu": (fused_adam_gpu, (64, 72))}
H = fused_adam.hyper(1e-3, 0.9, 0.999, 6.25e-10, 5)


@pytest.fixture(autouse=True)
def checked_interpret(monkeypatch):
  """TPU interpret params: a DMA out of bounds (a padding id fetched) raises."""
  monkeypatch.setattr(sparse_ops, "INTERPRET", pltpu.InterpretParams())


def _rows(seed, n, d):
  """Fresh (w, g, mu, nu): unit-norm rows, nonzero moments (a mid-run state)."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  return (model.unit_rows(jax.random.normal(ks[0], (n, d))), jax.random.normal(ks[1], (n, d)),
          0.1 * jax.random.normal(ks[2], (n, d)), 0.01 * jnp.abs(jax.random.normal(ks[3], (n, d))))


def _touched(seed, n, frac=0.3):
  return np.asarray(jax.random.uniform(jax.random.PRNGKey(seed), (n,)) < frac)


def _close(a, b, name, rtol=1e-6):
  """Relative to the array's scale: elements near zero (a projection's cancellation) differ by
  their summation order."""
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.abs(b).max() or 1.0),
                             err_msg=name)


def _check_lazy(before, after, touched, expect_rows):
  """Untouched rows keep every bit; touched rows equal expect_rows (the touched rows updated)."""
  for name, old, new, exp in zip(("w", "mu", "nu"), before, after, expect_rows):
    old, new = np.asarray(old), np.asarray(new)
    np.testing.assert_array_equal(new[~touched], old[~touched], err_msg=f"untouched {name}")
    _close(new[touched], exp, f"touched {name}")
    changed = (new[touched] != old[touched]).reshape(int(touched.sum()), -1).any(axis=1)
    assert changed.all(), f"a touched {name} row was not written"


@pytest.mark.parametrize("project_renorm", [True, False])
@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_lazy_kernel_equals_reference(flavour, project_renorm):
  """Ids in increasing order padded with n and with ids past n: the padding is never fetched (the
  TPU interpreter raises on an out-of-bounds DMA) nor written; 3 grid steps of 8 ids."""
  kernel, (n, d) = FLAVOURS[flavour]
  w, g, mu, nu = _rows(0, n, d)
  touched = _touched(1, n)
  ids = np.concatenate([np.flatnonzero(touched), [n + 5]])
  ids = np.concatenate([ids, np.full(24 - len(ids), n)]).astype(np.int32)
  before = [np.asarray(a) for a in (w, mu, nu)]
  flags = dict(project=project_renorm, renorm=project_renorm)
  ref = kernel.adam_rows_lazy_reference(w, g, mu, nu, H, jnp.asarray(ids), **flags)
  out = kernel.adam_rows_lazy(w, g, mu, nu, H, jnp.asarray(ids), row_block=8, **flags)
  rows = kernel.adam_rows_reference(*(a[touched] for a in (w, g, mu, nu)), H, **flags)
  _check_lazy(before, out, touched, rows)
  _check_lazy(before, ref, touched, rows)


def _setup(n, d, *, kernels, flavour, monkeypatch):
  """(config, the optax optimizer, fresh params) for optim.fused_update on one shard."""
  c = base.get_config()
  c.sae.n, c.sae.d, c.train.lr = n, d, 1e-3
  c.train.decay_frac = 0.0   # a constant rate: the hyperparameters H the references use
  if kernels == "pallas":
    monkeypatch.setattr(pallas_kernels, "FLAVOR", flavour)
  tx = optim.make_optimizer(c)
  w, _, _, _ = _rows(2, n, d)
  params = {"W_enc": w + 0.1, "b_enc": jnp.zeros((n,)), "W_dec": w,
            "b_pre": jnp.linspace(-1.0, 1.0, d)}
  return c, tx, params


CASES = {"xla": ("xla", "tpu"), "pallas-tpu": ("pallas", "tpu"), "pallas-gpu": ("pallas", "gpu")}


@pytest.mark.parametrize("case", list(CASES))
def test_first_lazy_step_equals_dense(case, monkeypatch):
  """Step 1 with gradients on the touched rows only: every row equals optax's dense update (the
  untouched rows have zero moments, so dense Adam leaves them in place too)."""
  kernels, flavour = CASES[case]
  n, d = FLAVOURS[flavour][1]
  cfg, tx, params = _setup(n, d, kernels=kernels, flavour=flavour, monkeypatch=monkeypatch)
  touched = _touched(3, n)
  ks = jax.random.split(jax.random.PRNGKey(4), 4)
  rows = lambda a: jnp.where(touched.reshape((n,) + (1,) * (a.ndim - 1)), a, 0.0)
  grads = {"W_enc": rows(jax.random.normal(ks[0], (n, d))), "b_enc": rows(
      jax.random.normal(ks[1], (n,))), "W_dec": rows(jax.random.normal(ks[2], (n, d))),
      "b_pre": jax.random.normal(ks[3], (d,))}
  state = tx.init(params)
  updates, dense_state = tx.update(grads, state, params)
  dense = optim.renormalize_decoder(optax.apply_updates(params, updates))
  lazy, lazy_state = jax.jit(functools.partial(optim.fused_update, cfg, kernels=kernels,
                                               chunk=16))(params, grads, state,
                                                          jnp.asarray(touched))
  for name in params:
    _close(lazy[name], dense[name], name)
    for m in ("mu", "nu"):
      _close(getattr(lazy_state[1][0], m)[name], getattr(dense_state[1][0], m)[name],
             f"{m} {name}")
  assert int(lazy_state[1][0].count) == 1 and int(lazy_state[1][1].count) == 1


@pytest.mark.parametrize("chunk", [8, 0])   # 8: several passes; 0: one pass over the shard
@pytest.mark.parametrize("case", list(CASES))
def test_untouched_rows_keep_their_bits(case, chunk, monkeypatch):
  """Mid-run (step 5, nonzero moments everywhere): a lazy step leaves every untouched row of W_enc,
  W_dec, b_enc and of both their moments bit-identical, updates each touched row as the dense
  arithmetic would, and b_pre densely."""
  kernels, flavour = CASES[case]
  n, d = FLAVOURS[flavour][1]
  cfg, tx, params = _setup(n, d, kernels=kernels, flavour=flavour, monkeypatch=monkeypatch)
  touched = _touched(5, n)
  moments = {}
  for i, (name, p) in enumerate(params.items()):
    _, g, mu, nu = _rows(10 + i, n, d)
    shape_like = lambda a: a.reshape(-1)[: p.size].reshape(p.shape)
    moments[name] = tuple(shape_like(a) for a in (g, mu, nu))
  grads = {name: jnp.where(touched.reshape((-1,) + (1,) * (p.ndim - 1)), moments[name][0], 0.0)
           if name in optim.LATENT_PARAMS else moments[name][0] for name, p in params.items()}
  count = jnp.asarray(4, jnp.int32)
  state = (optax.EmptyState(), (
      optax.ScaleByAdamState(count=count, mu={k: v[1] for k, v in moments.items()},
                             nu={k: v[2] for k, v in moments.items()}),
      optax.ScaleByScheduleState(count=count)))
  new, new_state = jax.jit(functools.partial(optim.fused_update, cfg, kernels=kernels,
                                             chunk=chunk))(params, grads, state,
                                                           jnp.asarray(touched))
  adam = new_state[1][0]
  for name, p in params.items():
    flags = dict(project=name == "W_dec", renorm=name == "W_dec")
    args = (p, grads[name], state[1][0].mu[name], state[1][0].nu[name])
    after = (new[name], adam.mu[name], adam.nu[name])
    # b_pre and W_dec at their own shares of the rate (optim.lr_ratios)
    h = fused_adam.hyper(1e-3 * optim.lr_ratios(cfg).get(name, 1.0), 0.9, 0.999, 6.25e-10, 5)
    if name in optim.LATENT_PARAMS:
      rows = fused_adam.adam_rows_reference(*(np.asarray(a)[touched] for a in args), h, **flags)
      _check_lazy(args[:1] + args[2:], after, touched, rows)
    else:
      dense = fused_adam.adam_rows_reference(*(a[:, None] for a in args), h)
      for a, b in zip(after, dense):
        _close(a, b[:, 0], name)
  assert int(adam.count) == 5


def _tiny(config, n=1024, batch=64, steps=4):
  config.sae.n, config.train.batch_size, config.train.steps = n, batch, steps
  return config


def _lazy_on_two_shards(tiny_config, n, dead_tokens):
  """A lazy-Adam run on a (1, 2) mesh, and its per-device gradients, sums and latent masks."""
  config = _tiny(tiny_config, n=n, batch=64)
  config.sae.dead_tokens = dead_tokens
  config.train.lazy_optimizer = True
  config.mesh.shape = (1, 2)
  run = train.setup(config)
  st, specs = run.steps, run.specs
  replicated = jax.sharding.PartitionSpec()
  local = st._shard_map(st._local_grads,
                        (st.param_specs, specs.batch, specs.batch, specs.latent, replicated),
                        (st.param_specs, replicated, specs.latent))
  return run, jax.jit(lambda params, x, since: local(params, x, x, since, st.auxk(since)))


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_touched_rows_are_the_selected_ones(tiny_config, architecture):
  """The mask the step hands the lazy optimizer holds every row with a gradient: main top-k (or
  BatchTopK's kept candidates) and AuxK picks (dead latents after one step), on a (1, 2) mesh;
  the metric is its mean."""
  tiny_config.sae.architecture = architecture
  run, local_grads = _lazy_on_two_shards(tiny_config, n=256, dead_tokens=64)
  st = run.steps
  state, aux_seen = run.state, False
  for _ in range(3):
    batch = jax.device_put(next(run.data.train), run.batch_sharding)
    grads, _, latents = jax.device_get(
        local_grads(state.params, batch * state.input_scale, state.since_fired))
    touched = latents["touched"]
    nonzero = {name: np.abs(g).reshape(g.shape[0], -1).max(axis=1) > 0
               for name, g in grads.items() if name in optim.LATENT_PARAMS}
    for name, rows in nonzero.items():
      assert not (rows & ~touched).any(), f"{name} has gradient rows the mask leaves out"
    # Touched rows that carry no gradient are selected latents whose ReLU'd value is 0.
    assert nonzero["W_dec"].sum() >= 0.5 * touched.sum()
    fired_only = latents["fired"]
    aux_seen |= bool((touched & ~fired_only & nonzero["W_enc"]).any())
    state, metrics, _ = st.train(state, batch)
    np.testing.assert_allclose(metrics["sparsity/touched_frac"], touched.mean(), rtol=1e-6)
  assert aux_seen, "no AuxK-only row was touched: AuxK was not exercised"


# The drift of lazy against dense Adam: the same run (init, data order) trained both ways. The run
# is short and the dictionary wide (n = 2048, B * k = 256 pairs a step, no latent dead yet, so only
# the main top-k is touched): a latent is selected every ~10 steps, and dense Adam keeps moving it
# by its momentum in between, which lazy Adam does not, so lazy learns more slowly per step.
# Measured (jax 0.10.2 CPU; `pytest -s -k drift` prints it):
#   touched rows a step 11.5%; relative distance (norm of the difference over the norm of the dense
#   run's movement) W_dec 0.71, W_enc 0.47 -- the top-k selections diverge, so the trajectories
#   do; eval FVU dense 0.423, lazy 0.535.
# Bounds: lazy's eval FVU at most 0.2 above dense's (a lazy step that drops or misplaces updates
# does not learn: FVU ~1) and not below it by more than 0.05; distances above 0.05 (not dense).
DRIFT_STEPS = 120


def _train(config):
  run = train.setup(config)
  state, init = run.state, jax.device_get(run.state.params)
  fvus, touched = [], []
  for _ in range(DRIFT_STEPS):
    state, m, _ = run.steps.train(state, jax.device_put(next(run.data.train),
                                                        run.batch_sharding))
    m = jax.device_get(m)
    fvus.append(float(m["train/fvu"]))
    touched.append(float(m.get("sparsity/touched_frac", np.nan)))
  ev = train.evaluate(run.steps, state, run.data, run.batch_sharding)
  return init, jax.device_get(state.params), ev["eval/fvu"], fvus, np.mean(touched)


def test_lazy_drift_against_dense(tiny_config):
  config = _tiny(tiny_config, n=2048, batch=64, steps=DRIFT_STEPS)
  config.sae.dead_tokens = 10 ** 6
  config.train.lr = 3e-3
  init, dense, dense_fvu, dense_curve, _ = _train(config)
  config.train.lazy_optimizer = True
  _, lazy, lazy_fvu, lazy_curve, touched = _train(config)
  dist = {name: float(np.linalg.norm(lazy[name] - dense[name])
                      / np.linalg.norm(dense[name] - init[name])) for name in ("W_dec", "W_enc")}
  late = slice(-20, None)
  print(f"\nlazy vs dense, {DRIFT_STEPS} steps: touched rows a step {100 * touched:.1f}%; "
        f"relative distance W_dec {dist['W_dec']:.3f} W_enc {dist['W_enc']:.3f}; eval FVU dense "
        f"{dense_fvu:.4f} lazy {lazy_fvu:.4f}; train FVU (last 20 steps) dense "
        f"{np.mean(dense_curve[late]):.4f} lazy {np.mean(lazy_curve[late]):.4f}")
  assert 0 < touched < 0.2, touched
  assert -0.05 < lazy_fvu - dense_fvu < 0.2, (lazy_fvu, dense_fvu)
  for name, dst in dist.items():
    assert dst > 0.05, (name, dst)


@pytest.mark.parametrize("flavour,mesh", [("tpu", (1, 1)), ("tpu", (2, 2)), ("gpu", (2, 2))],
                         ids=["tpu-1x1", "tpu-2x2", "gpu-2x2"])
def test_lazy_step_with_pallas_equals_xla(tiny_config, monkeypatch, flavour, mesh):
  """The whole lazy step (top-k kernels, sparse kernels, the lazy sweep in passes of 16 or 8 rows)
  against kernels=xla, on one device and sharded; AuxK picks included (dead latents from step 2).
  (The GPU flavour on one device: its kernels are the same, tests/test_pallas_kernels.py.)"""
  monkeypatch.setattr(sparse_ops, "INTERPRET", True)   # TPU interpret params can hang in shard_map
  monkeypatch.setattr(pallas_kernels, "FLAVOR", flavour)
  config = _tiny(tiny_config, n=128, batch=32)
  config.sae.d = 128 if flavour == "tpu" else 72
  config.sae.dead_tokens = 32
  config.train.lazy_optimizer = True
  config.mesh.shape = mesh
  out = {}
  for kernels in ("xla", "pallas"):
    config.kernels = kernels
    run = train.setup(config)
    state, metrics = run.state, []
    for _ in range(3):
      state, m, _ = run.steps.train(state, jax.device_put(next(run.data.train),
                                                          run.batch_sharding))
      metrics.append(jax.device_get(m))
    out[kernels] = (jax.device_get(state.params), jax.device_get(state.opt_state[1][0]), metrics)
  assert max(m["sparsity/touched_frac"] for m in out["xla"][2]) < 1
  for name in out["xla"][0]:
    # atol 1e-5 is 0.3% of one Adam step at lr 3e-3: the kernels sum in another order than XLA,
    # and Adam's division by sqrt(nu) magnifies that rounding where gradients are small (2e-6 on
    # one element of 16384 after 3 steps, seen); a wrong or missed row is off by a whole step.
    np.testing.assert_allclose(out["pallas"][0][name], out["xla"][0][name], rtol=1e-5,
                               atol=1e-5, err_msg=name)
    np.testing.assert_allclose(out["pallas"][1].nu[name], out["xla"][1].nu[name], rtol=1e-5,
                               atol=1e-12, err_msg=f"nu {name}")
  for a, b in zip(out["pallas"][2], out["xla"][2]):
    for key in b:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_config_check(tiny_config):
  tiny_config.train.lazy_optimizer = True
  config_check.validate(tiny_config)
  tiny_config.train.opt_state_dtype = "bfloat16"
  with pytest.raises(config_check.ConfigError, match=r"train\.lazy_optimizer=True needs "
                                                     r"train\.opt_state_dtype='float32'"):
    config_check.validate(tiny_config)


def test_touched_rows_with_auxk_over_the_dead_list(tiny_config):
  """With few dead latents AuxK runs over their list (positions, not latent ids): the mask must
  still name the latents it picked, on a (1, 2) mesh, and nothing else outside the top-k."""
  run, local_grads = _lazy_on_two_shards(tiny_config, n=4096, dead_tokens=10_000)
  st = run.steps
  dead = np.zeros(4096, bool)
  dead[np.random.default_rng(0).choice(4096, 40, replace=False)] = True
  assert st.aux_branches[int(st.aux_branch(jnp.int32(40), jnp.int32(40)))][1] > 0, "not a list"
  since = jax.device_put(jnp.where(dead, 10_000, 0).astype(run.state.since_fired.dtype),
                         run.state.since_fired.sharding)
  batch = jax.device_put(next(run.data.train), run.batch_sharding)
  grads, _, latents = jax.device_get(
      local_grads(run.state.params, batch * run.state.input_scale, since))
  touched, fired = latents["touched"], latents["fired"]
  w_enc_rows = np.abs(grads["W_enc"]).max(axis=1) > 0
  assert not (w_enc_rows & ~touched).any(), "gradient rows the mask leaves out"
  aux_only = touched & ~fired
  assert aux_only.any() and dead[aux_only & w_enc_rows].all(), "AuxK rows must be dead latents"
  assert (dead & w_enc_rows).sum() >= 30, "AuxK reached too few of the 40 dead latents"
