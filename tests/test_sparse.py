"""The sparse custom-VJP loss equals dense autodiff of the same loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import model, topk
from jaxsae.ops import Ops
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


def _sparse_loss_and_grads(params, x, dead, spec, ops=Ops()):
  """(loss, grads) as the step has them: main_terms' and aux_term's each differentiated alone
  (the residual held fixed), and summed; equal to loss_terms' differentiated as one."""
  total_var, _ = ops.centred_sq_sum(x)
  xc = x - params["b_pre"]
  idx = ops.select(xc, params["W_enc"], params["b_enc"], spec.k_select)
  (loss, aux), grads = jax.value_and_grad(model.main_terms, has_aux=True)(
      params, x, idx, total_var, spec, ops)
  aux_idx = aux_ok = None
  if spec.k_aux:
    aux_idx, aux_ok = ops.select_aux(xc, params["W_enc"], params["b_enc"], dead, spec.k_aux)
    scale = jnp.minimum(jnp.sum(dead) / spec.k_aux, 1.0)
    aux_loss, aux_grads = jax.value_and_grad(lambda p: model.aux_term(
        p, x, aux["resid"], aux_idx, aux_ok, total_var, scale, spec, ops)[0])(params)
    loss, grads = loss + aux_loss, jax.tree.map(jnp.add, grads, aux_grads)
    whole = lambda p: model.loss_terms(p, x, idx, aux_idx, aux_ok, total_var, scale, spec,
                                       ops)[0]
    one_loss, one_grads = jax.value_and_grad(whole)(params)
    np.testing.assert_allclose(loss, one_loss, rtol=1e-6)
    for name in params:
      np.testing.assert_allclose(grads[name], one_grads[name], rtol=1e-5, atol=1e-7,
                                 err_msg=name)
  return (loss, grads), total_var


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _assert_sparse_equals_dense(params, x, dead, spec, ops=Ops()):
  """The sparse loss and every gradient (each nonzero) equal dense autodiff's, relative 1e-5."""
  (loss, grads), total_var = _sparse_loss_and_grads(params, x, dead, spec, ops)
  dense, dgrads = jax.value_and_grad(model.dense_loss)(params, x, dead, total_var, spec)
  assert abs(float(loss) - float(dense)) <= 1e-5 * abs(float(dense))
  for name in params:
    assert float(jnp.linalg.norm(dgrads[name])) > 0, name
    assert _rel(grads[name], dgrads[name]) < 1e-5, name


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
                       dead_tokens=1, multi_topk=multi)
  ops = Ops(dense_op_ratio=ratio)
  assert ops.kernels_for(k_aux, 160) == ("dense" if ratio and k_aux else "xla")
  assert ops.kernels_for(6, 160) == ("dense" if ratio == 1000 else "xla")
  _assert_sparse_equals_dense(params, x, dead, spec, ops)


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
  resid_var = Ops().centred_sq_sum(x - model.decode(params, z, idx))[0]
  assert terms["input"] > 0
  np.testing.assert_allclose(terms["residual"], terms["input"] * float(total_var / resid_var),
                             rtol=1e-4)


# ---- BatchTopK ---------------------------------------------------------------------------------

def _batchtopk_spec(cap, k_aux=0, prefixes=()):
  return model.SaeSpec(d=24, n=160, k=6, k_aux=k_aux, auxk_coef=1 / 32 if k_aux else 0.0,
                       dead_tokens=1, multi_topk=False,
                       architecture="matryoshka_batchtopk" if prefixes else "batchtopk",
                       batchtopk_cap=cap, prefixes=prefixes)


@pytest.mark.parametrize("k_aux,prefixes", [(0, ()), (32, ()), (0, (10, 40)), (32, (10, 40))])
@pytest.mark.parametrize("seed", [0, 1])
def test_batchtopk_sparse_backward_equals_dense_autodiff(seed, k_aux, prefixes):
  """With a cap no row reaches, the sparse BatchTopK loss and gradients are dense autodiff's
  through a top-(B*k) over the whole flattened [B, n] batch; with prefixes (Matryoshka), of the
  mean of the errors of dense reconstructions from each prefix's latents alone."""
  params, x, dead = _problem(seed)
  spec = _batchtopk_spec(cap=20, k_aux=k_aux, prefixes=prefixes)
  _assert_sparse_equals_dense(params, x, dead, spec)


def _codes(params, x, spec):
  """(dense [B, n] BatchTopK codes, threshold, rows at cap) through the sparse path."""
  idx = topk.select(x - params["b_pre"], params["W_enc"], params["b_enc"], spec.k_select)
  total_var, _ = Ops().centred_sq_sum(x)
  _, aux = model.loss_terms(params, x, idx, None, None, total_var, 0.0, spec)
  rows = jnp.arange(x.shape[0])[:, None]
  return (np.asarray(jnp.zeros((x.shape[0], spec.n)).at[rows, idx].set(aux["z"])),
          float(aux["threshold"]), float(aux["at_cap"]))


def test_batchtopk_keeps_exactly_the_batch_top_bk():
  """Brute force: the kept pairs are the B*k largest ReLU'd pre-activations of the batch, rows
  hold unequal numbers of them, and none reaches a cap of 20k."""
  params, x, _ = _problem(5)
  spec = _batchtopk_spec(cap=20)
  z, threshold, at_cap = _codes(params, x, spec)
  pre = np.asarray((x - params["b_pre"]) @ params["W_enc"].T + params["b_enc"])
  want = np.zeros_like(pre, bool)
  want.reshape(-1)[np.argsort(-pre.reshape(-1), kind="stable")[:x.shape[0] * spec.k]] = True
  np.testing.assert_array_equal(z > 0, want)
  np.testing.assert_allclose(z[want], pre[want], rtol=1e-5)
  assert threshold == pytest.approx(float(np.sort(pre.reshape(-1))[-x.shape[0] * spec.k]), rel=1e-6)
  per_row = want.sum(axis=1)
  assert per_row.min() < spec.k < per_row.max() and at_cap == 0.0


def test_batchtopk_rows_at_the_cap_are_counted():
  """cap=1: rows with more than k of the batch's top B*k keep only their k candidates, and are
  counted; B*k pairs are still kept, so the other rows keep what they had and more."""
  params, x, _ = _problem(5)
  z, _, at_cap = _codes(params, x, _batchtopk_spec(cap=1))
  full, _, _ = _codes(params, x, _batchtopk_spec(cap=20))
  over = (full > 0).sum(axis=1) > 6
  assert at_cap >= over.sum() > 0
  assert ((z > 0).sum(axis=1) <= 6).all()
  assert ((z > 0) | ~(full > 0))[~over].all() and (z > 0).sum() == x.shape[0] * 6


def test_kth_largest_is_exact_at_any_scale():
  rng = np.random.default_rng(0)
  for scale in (1e-30, 1e-3, 1.0, 1e4, 1e30):
    v = np.maximum(rng.standard_normal(1000).astype(np.float32) * np.float32(scale), 0)
    for kth in (1, 7, 400, 1000):
      assert float(topk.kth_largest(jnp.asarray(v), kth)) == np.sort(v)[::-1][kth - 1]


def test_matryoshka_loss_is_the_mean_of_its_prefixes_errors():
  """Direct check of the loss's value: a Matryoshka loss is (e_10 + e_40 + e_160) / 3 where e_p is
  the FVU of the reconstruction from latents < p of the same BatchTopK codes."""
  params, x, _ = _problem(6)
  plain = _batchtopk_spec(cap=20)
  z, _, _ = _codes(params, x, plain)
  total_var, _ = Ops().centred_sq_sum(x)
  err = lambda p: float(jnp.sum(jnp.square(z[:, :p] @ params["W_dec"][:p] + params["b_pre"] - x))
                        / total_var)
  idx = topk.select(x - params["b_pre"], params["W_enc"], params["b_enc"], plain.k_select)
  loss, aux = model.loss_terms(params, x, idx, None, None, total_var, 0.0,
                               _batchtopk_spec(cap=20, prefixes=(10, 40)))
  assert float(loss) == pytest.approx((err(10) + err(40) + err(160)) / 3, rel=1e-5)
  assert len({round(err(p), 4) for p in (10, 40, 160)}) == 3   # three different terms
  assert float(aux["sq"]) / float(total_var) == pytest.approx(err(160), rel=1e-5)
