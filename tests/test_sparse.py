"""The sparse custom-VJP loss equals dense autodiff of the same loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import model, topk
from pallas_kernels import sparse_ops


def _problem(seed, b=48, d=24, n=160, dead_frac=0.3):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  params = model.init_params(ks[0], d, n, 0.1 * jax.random.normal(ks[1], (d,)))
  # Untie and perturb everything so no gradient is accidentally symmetric or zero.
  params["W_enc"] = params["W_enc"] + 0.2 * jax.random.normal(ks[2], (n, d))
  params["b_enc"] = 0.1 * jax.random.normal(ks[3], (n,))
  x = jax.random.normal(ks[4], (b, d)) * 1.5 + 0.3
  dead = jax.random.uniform(ks[5], (n,)) < dead_frac
  return params, x, dead


def _sparse_loss_and_grads(params, x, dead, spec):
  total_var, _ = model.centred_sq_sum(x)
  xc = x - params["b_pre"]
  idx, aux_idx, aux_ok = topk.select(xc, params["W_enc"], params["b_enc"], spec.k_select,
                                     dead=dead, k_aux=spec.k_aux)
  scale = jnp.minimum(jnp.sum(dead) / max(spec.k_aux, 1), 1.0)
  f = lambda p: model.loss_terms(p, x, idx, aux_idx, aux_ok, total_var, scale, spec)[0]
  return jax.value_and_grad(f)(params), total_var


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("k_aux,multi,b,ratio", [
    (0, False, 48, 0), (32, False, 48, 0), (32, True, 48, 0), (0, False, 4, 0),
    (32, False, 48, 5), (32, True, 48, 1000)])
@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_backward_equals_dense_autodiff(seed, k_aux, multi, b, ratio):
  """b=48: more pairs than latents, so b_pre's gradient is d_b @ W_enc; b=4: fewer, gathered.
  ratio (dense_op_ratio): 0 gathers everywhere; 5 runs AuxK's ops (32 of 160 latents) as dense
  GEMMs and the main ones as gathers; 1000 runs every op densely."""
  params, x, dead = _problem(seed, b=b)
  spec = model.SaeSpec(d=24, n=160, k=6, k_aux=k_aux, auxk_coef=1 / 32 if k_aux else 0.0,
                       dead_tokens=1, multi_topk=multi, dense_op_ratio=ratio)
  assert spec.ops_for("xla", k_aux, 160) == ("dense" if ratio and k_aux else "xla")
  assert spec.ops_for("xla", 6, 160) == ("dense" if ratio == 1000 else "xla")
  (loss, grads), total_var = _sparse_loss_and_grads(params, x, dead, spec)
  dense, dgrads = jax.value_and_grad(model.dense_loss)(params, x, dead, total_var, spec)
  assert abs(float(loss) - float(dense)) <= 1e-5 * abs(float(dense))
  for name in params:
    assert float(jnp.linalg.norm(dgrads[name])) > 0, name
    assert _rel(grads[name], dgrads[name]) < 1e-5, name


def test_auxk_reaches_dead_latents_only_through_aux_term():
  params, x, dead = _problem(3)
  spec = model.SaeSpec(d=24, n=160, k=6, k_aux=32, auxk_coef=1 / 32, dead_tokens=1,
                       multi_topk=False)
  (_, with_aux), _ = _sparse_loss_and_grads(params, x, dead, spec)
  plain = model.SaeSpec(**{**spec.__dict__, "k_aux": 0, "auxk_coef": 0.0})
  (_, without), _ = _sparse_loss_and_grads(params, x, dead, plain)
  changed = np.asarray(jnp.any(with_aux["W_dec"] != without["W_dec"], axis=1))
  assert changed.any()
  assert not changed[~np.asarray(dead)].any(), "AuxK moved the decoder row of a live latent"


def test_no_dead_latents_gives_finite_zero_auxk():
  params, x, _ = _problem(4)
  dead = jnp.zeros((160,), bool)
  spec = model.SaeSpec(d=24, n=160, k=6, k_aux=32, auxk_coef=1 / 32, dead_tokens=1,
                       multi_topk=False)
  (loss, grads), total_var = _sparse_loss_and_grads(params, x, dead, spec)
  dense = model.dense_loss(params, x, dead, total_var, spec)
  assert np.isfinite(float(loss)) and abs(float(loss) - float(dense)) < 1e-5 * float(dense)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads.values())


def test_chunked_primitives_equal_unchunked(monkeypatch):
  """AuxK's long index lists are processed in chunks; the result must not depend on it."""
  ks = jax.random.split(jax.random.PRNGKey(7), 4)
  x = jax.random.normal(ks[0], (16, 8))
  w = jax.random.normal(ks[1], (40, 8))
  c = jax.random.normal(ks[2], (16, 12))
  idx = jax.random.randint(ks[3], (16, 12), 0, 40)
  run = lambda: [f(*a) for f, a in zip(sparse_ops.REFERENCE,
                                        [(x, w, idx), (c, w, idx), (c, x, idx, 40)])]
  whole = run()
  monkeypatch.setattr(sparse_ops, "MAX_GATHER_ELEMS", 16 * 8 * 3)  # chunks of 3 of 12 columns
  assert sparse_ops._chunk(16, 12, 8) == 3
  chunked = run()
  for a, b in zip(whole, chunked):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_encode_decode_match_definitions():
  params, x, _ = _problem(5)
  z, idx = model.encode(params, x, 6)
  pre = (x - params["b_pre"]) @ params["W_enc"].T + params["b_enc"]
  ref_v, ref_i = jax.lax.top_k(pre, 6)
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_i))
  np.testing.assert_allclose(np.asarray(z), np.maximum(np.asarray(ref_v), 0), rtol=1e-5, atol=1e-5)
  dense_z = jnp.zeros_like(pre).at[jnp.arange(48)[:, None], idx].set(z)
  np.testing.assert_allclose(np.asarray(model.decode(params, z, idx)),
                             np.asarray(dense_z @ params["W_dec"] + params["b_pre"]),
                             rtol=1e-5, atol=1e-5)


def test_auxk_without_relu_reaches_dead_latents_with_negative_pre_activations():
  """Dead latents whose pre-activations are negative on every row: through AuxK's ReLU their
  encoder rows get no gradient (they stay dead); with auxk_relu=False they do. Sparse == dense."""
  params, x, dead = _problem(5)
  params["b_enc"] = jnp.where(dead, -100.0, params["b_enc"])
  moved = {}
  for relu in (True, False):
    spec = model.SaeSpec(d=24, n=160, k=6, k_aux=32, auxk_coef=1 / 32, dead_tokens=1,
                         multi_topk=False, auxk_relu=relu)
    (_, grads), total_var = _sparse_loss_and_grads(params, x, dead, spec)
    dgrads = jax.grad(model.dense_loss)(params, x, dead, total_var, spec)
    for name in params:
      assert _rel(grads[name], dgrads[name]) < 1e-5, (relu, name)
    moved[relu] = np.abs(np.asarray(grads["W_enc"])[np.asarray(dead)]).sum(axis=1) > 0
  assert not moved[True].any()
  assert moved[False].sum() >= 32   # every AuxK pick is a dead latent and trains


def test_residual_auxk_norm():
  """auxk_norm="residual" (OpenAI's train.py): the AuxK term is the "input" one times
  total_var / (the residual's centred variance), and sparse == dense autodiff for it too."""
  params, x, dead = _problem(6)
  terms = {}
  for norm in ("input", "residual"):
    spec = model.SaeSpec(d=24, n=160, k=6, k_aux=32, auxk_coef=1 / 32, dead_tokens=1,
                         multi_topk=False, auxk_norm=norm)
    (loss, grads), total_var = _sparse_loss_and_grads(params, x, dead, spec)
    dense, dgrads = jax.value_and_grad(model.dense_loss)(params, x, dead, total_var, spec)
    assert abs(float(loss) - float(dense)) <= 1e-5 * abs(float(dense)), norm
    for name in params:
      assert _rel(grads[name], dgrads[name]) < 1e-5, (norm, name)
    plain = model.SaeSpec(**{**spec.__dict__, "k_aux": 0, "auxk_coef": 0.0})
    (main, _), _ = _sparse_loss_and_grads(params, x, dead, plain)
    terms[norm] = float(loss) - float(main)
  z, idx = model.encode(params, x, 6)
  resid_var = model.centred_sq_sum(x - model.decode(params, z, idx))[0]
  assert terms["input"] > 0
  np.testing.assert_allclose(terms["residual"], terms["input"] * float(total_var / resid_var),
                             rtol=1e-4)
