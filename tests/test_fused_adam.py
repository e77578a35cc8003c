"""The fused optimizer sweep (TPU and GPU flavours, CPU interpret mode) equals optax.adam +
projection + renormalization."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxsae import model, optim
from pallas_kernels import fused_adam, fused_adam_gpu, sparse_ops


@pytest.fixture(autouse=True)
def checked_interpret(monkeypatch):
  monkeypatch.setattr(sparse_ops, "INTERPRET", pltpu.InterpretParams())


# Per flavour: the module, (n, d), and extra kwargs. The GPU kernel gets a ragged shape (50 rows in
# blocks of 8, 72 columns padded to 128), since its blocks overhang and must mask.
FLAVOURS = {"tpu": (fused_adam, (64, 128), {}),
            "gpu": (fused_adam_gpu, (50, 72), {"row_block": 8})}


@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("project_renorm", [True, False])
def test_fused_sweep_equals_optax_over_steps(project_renorm, flavour):
  kernel, (n, d), kwargs = FLAVOURS[flavour]
  ks = jax.random.split(jax.random.PRNGKey(0), 2)
  lr = 1e-3
  w = model.unit_rows(jax.random.normal(ks[0], (n, d)))
  adam = optax.adam(lr, b1=0.9, b2=0.999, eps=6.25e-10)
  tx = optax.chain(optim.project_decoder_grads(), adam) if project_renorm else adam
  params = {"W_dec": w}
  state = tx.init(params)
  mu, nu = jnp.zeros_like(w), jnp.zeros_like(w)
  fw = w
  for t in range(1, 4):
    g = jax.random.normal(jax.random.fold_in(ks[1], t), (n, d))
    updates, state = tx.update({"W_dec": g}, state, params)
    params = optax.apply_updates(params, updates)
    if project_renorm:
      params = optim.renormalize_decoder(params)
    h = kernel.hyper(lr, 0.9, 0.999, 6.25e-10, t)
    before = [np.asarray(a) for a in (fw, mu, nu)]
    ref = kernel.adam_rows_reference(fw, g, mu, nu, h, project=project_renorm,
                                     renorm=project_renorm)
    fw, mu, nu = kernel.adam_rows(fw, g, mu, nu, h, project=project_renorm,
                                  renorm=project_renorm, **kwargs)
    for new, old in zip((fw, mu, nu), before):   # in place: every element must be rewritten
      assert (np.asarray(new) != old).all(), "an element was not written"
    for a, b in zip((fw, mu, nu), ref):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(fw), np.asarray(params["W_dec"]), rtol=1e-5, atol=1e-6)
  if project_renorm:
    np.testing.assert_allclose(np.linalg.norm(np.asarray(fw), axis=1), 1.0, rtol=1e-6)


def test_bf16_moments():
  ks = jax.random.split(jax.random.PRNGKey(1), 2)
  w = jax.random.normal(ks[0], (32, 128))
  g = jax.random.normal(ks[1], (32, 128))
  mu = jnp.zeros((32, 128), jnp.bfloat16)
  nu = jnp.zeros((32, 128), jnp.bfloat16)
  h = fused_adam.hyper(1e-3, 0.9, 0.999, 1e-8, 1)
  out = fused_adam.adam_rows(w, g, mu, nu, h)
  ref = fused_adam.adam_rows_reference(w, g, mu, nu, h)
  for a, b in zip(out, ref):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2,
                               atol=1e-6)
