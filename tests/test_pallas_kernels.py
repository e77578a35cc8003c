"""Pallas kernels (TPU-style, CPU interpret mode) equal their pure-JAX references; the tests through
jaxsae (selection, gradients, the train step) run the TPU and the GPU flavour."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels
from conftest import assert_pallas_step_equals_xla
from jaxsae import model, topk
from jaxsae.ops import Ops
from pallas_kernels import sparse_ops

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
B, K, D, N = 16, 4, 128, 64


@pytest.fixture(autouse=True)
def checked_interpret(monkeypatch):
  """TPU interpret params: out-of-bounds DMAs raise instead of being clamped."""
  monkeypatch.setattr(sparse_ops, "INTERPRET", pltpu.InterpretParams())


def _inputs(seed, dtype):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(ks[0], (B, D)).astype(dtype)
  w = jax.random.normal(ks[1], (N, D)).astype(dtype)
  c = jax.random.normal(ks[2], (B, K)).astype(dtype)
  idx = jax.random.randint(ks[3], (B, K), 0, N)
  return x, w, c, idx


def _close(out, ref, dtype):
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert np.isfinite(out).all(), "an output element was never written (still NaN poison)"
  scale = np.abs(ref).max()
  np.testing.assert_allclose(out, ref, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_kernels_equal_references(seed, dtype):
  x, w, c, idx = _inputs(seed, dtype)
  _close(sparse_ops.gather_dot(x, w, idx, poison=True),
         sparse_ops.gather_dot_reference(x, w, idx), dtype)
  _close(sparse_ops.gather_sum(c, w, idx, poison=True),
         sparse_ops.gather_sum_reference(c, w, idx), dtype)
  _close(sparse_ops.scatter_outer(c, x, idx, N, poison=True),
         sparse_ops.scatter_outer_reference(c, x, idx, N), dtype)


def test_scatter_writes_rows_no_pair_selects():
  x, _, c, _ = _inputs(2, jnp.float32)
  idx = jnp.full((B, K), 3, jnp.int32)  # every pair on one latent: the other rows must be zeros
  out = np.asarray(sparse_ops.scatter_outer(c, x, idx, N, poison=True))
  assert np.isfinite(out).all() and not out[np.arange(N) != 3].any()
  np.testing.assert_allclose(out[3], np.asarray(c.sum(1) @ x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel", ["gather_dot", "gather_sum"])
def test_out_of_range_index_is_caught(kernel):
  x, w, c, idx = _inputs(3, jnp.float32)
  bad = idx.at[5, 2].set(N + 7)
  lhs = x if kernel == "gather_dot" else c
  with pytest.raises(Exception, match="(?i)out-of-bounds"):
    jax.block_until_ready(getattr(sparse_ops, kernel)(lhs, w, bad))


@pytest.mark.parametrize("flavor", ["tpu", "gpu"])
def test_pallas_selection_and_gradients(monkeypatch, flavor):
  """Pallas top-k (main and AuxK) picks what lax.top_k picks, and gradients through the Pallas
  sparse ops equal dense autodiff; for the GPU flavour on ragged sizes (d=72, n=50, B=13)."""
  monkeypatch.setattr(pallas_kernels, "FLAVOR", flavor)
  ks = jax.random.split(jax.random.PRNGKey(4), 5)
  d, n, b = (128, 64, 16) if flavor == "tpu" else (72, 50, 13)
  params = model.init_params(ks[0], d, n, 0.1 * jax.random.normal(ks[1], (d,)))
  params["W_enc"] = params["W_enc"] + 0.2 * jax.random.normal(ks[2], (n, d))
  x = jax.random.normal(ks[3], (b, d))
  dead = jax.random.uniform(ks[4], (n,)) < 0.3
  spec = model.SaeSpec(d=d, n=n, k=4, k_aux=8, auxk_coef=1 / 32, dead_tokens=1, multi_topk=False)
  tv, _ = Ops().centred_sq_sum(x)
  xc = x - params["b_pre"]
  # jitted: eagerly, every op and kernel would compile alone (~3x slower)
  both = lambda xc, w, b, dead, kernels: (topk.select(xc, w, b, 4, kernels=kernels),
                                          *topk.select_aux(xc, w, b, dead, 8, kernels=kernels))
  sel = {kern: jax.jit(functools.partial(both, kernels=kern))(
      xc, params["W_enc"], params["b_enc"], dead) for kern in ("xla", "pallas")}
  for a, b_ in zip(sel["pallas"], sel["xla"]):   # idx, aux_idx, aux_ok
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))
  scale = jnp.minimum(jnp.sum(dead) / 8, 1.0)
  loss = lambda p: model.loss_terms(p, x, *sel["pallas"], tv, scale, spec,
                                    Ops(kernels="pallas"))[0]
  grads = jax.jit(jax.grad(loss))(params)
  ref = jax.grad(model.dense_loss)(params, x, dead, tv, spec)
  for name in params:
    err = jnp.linalg.norm(grads[name] - ref[name]) / jnp.linalg.norm(ref[name])
    assert float(err) < 1e-5, name


@pytest.mark.parametrize("flavor", ["tpu", "gpu"])
@pytest.mark.parametrize("mesh,architecture,lazy", [((1, 1), "topk", False), ((2, 2), "topk", False),
                                                    ((2, 2), "topk", None),
                                                    ((2, 2), "batchtopk", None)])
def test_train_step_with_pallas_equals_xla(tiny_config, monkeypatch, mesh, architecture, lazy,
                                           flavor):
  """All kernels at once: top-k GEMM, sparse ops, fused optimizer (dense, and lazy as the default
  makes it here: batch x k = 128 >= n = 64); on one device and sharded; the TPU flavour and the
  GPU one (pallas_kernels/*_gpu.py), both in CPU interpret mode; and BatchTopK's candidates and
  threshold through them."""
  tiny_config.train.lazy_optimizer = lazy
  # Plain interpret mode inside the step's shard_map (TPU interpret params there can hang).
  monkeypatch.setattr(sparse_ops, "INTERPRET", True)
  monkeypatch.setattr(pallas_kernels, "FLAVOR", flavor)
  tiny_config.mesh.shape = mesh
  # d=72 is no power of 2: the GPU kernels' blocks overhang and must mask.
  tiny_config.sae.d, tiny_config.sae.n = (128 if flavor == "tpu" else 72), 64
  tiny_config.train.batch_size = 32
  tiny_config.sae.dead_tokens = 32
  tiny_config.sae.architecture = architecture
  assert_pallas_step_equals_xla(tiny_config, steps=3)


def test_kernels_equal_references_over_many_grid_steps(monkeypatch):
  """Blocks smaller than the arrays in every direction: 2 x 2 gather grid steps (8 tokens by 128
  columns of K each, their indices as separate SMEM blocks), and scatter_outer over 2 row blocks
  whose sorted pairs arrive in SMEM 16 at a time, runs crossing chunk ends."""
  monkeypatch.setattr(sparse_ops, "GATHER_COLS", 128)
  monkeypatch.setattr(sparse_ops, "GATHER_INDICES", 1024)
  monkeypatch.setattr(sparse_ops, "SCATTER_CHUNK", 16)
  monkeypatch.setattr(sparse_ops, "INTERPRET", True)   # unchecked: 4x faster at 8k DMAs
  b, k, d, n = 16, 256, 128, 512
  assert sparse_ops.gather_blocks(b, k) == (8, 128)
  ks = jax.random.split(jax.random.PRNGKey(7), 4)
  x = jax.random.normal(ks[0], (b, d))
  w = jax.random.normal(ks[1], (n, d))
  c = jax.random.normal(ks[2], (b, k))
  idx = jax.random.randint(ks[3], (b, k), 0, n)
  _close(sparse_ops.gather_dot(x, w, idx, poison=True),
         sparse_ops.gather_dot_reference(x, w, idx), jnp.float32)
  _close(sparse_ops.gather_sum(c, w, idx, poison=True),
         sparse_ops.gather_sum_reference(c, w, idx), jnp.float32)
  _close(sparse_ops.scatter_outer(c, x, idx, n, poison=True),
         sparse_ops.scatter_outer_reference(c, x, idx, n), jnp.float32)


def test_gather_blocks_are_legal_tpu_blocks():
  """(tb, kc): tb a multiple of 8 (or B), kc of 128 (or K), tb * kc indices a legal 1-D block."""
  legal_1d = lambda s, total: s == total or s % 1024 == 0 or (s >= 128 and s & (s - 1) == 0)
  for b in (8, 16, 13, 256, 4096, 8192, 16384):
    for k in (4, 32, 64, 128, 256, 1024, 2048, 48):
      tb, kc = sparse_ops.gather_blocks(b, k)
      assert b % tb == 0 and k % kc == 0, (b, k)
      assert tb % 8 == 0 or tb == b, (b, k, tb)
      assert kc % 128 == 0 or kc == k, (b, k, kc)
      assert legal_1d(tb * kc, b * k), (b, k, tb, kc)
      assert tb * kc <= 4096 or b < 64, (b, k, tb, kc)


@pytest.mark.parametrize("flavor", ["tpu", "gpu"])
def test_skip_transcoder_step_with_pallas_equals_xla(tiny_config, monkeypatch, flavor,
                                                     tmp_path):
  """A skip transcoder (d=72 in, 40 out) through the kernels, sharded (2, 2): W_dec [n, d_out]
  in the sparse ops and the fused optimizer, b_dec and W_skip beside them."""
  from test_transcoder import rotation_stores
  monkeypatch.setattr(sparse_ops, "INTERPRET", True)
  monkeypatch.setattr(pallas_kernels, "FLAVOR", flavor)
  x_path, y_path, _, _ = rotation_stores(tmp_path, d=72, d_out=40, rows=2048)
  c = tiny_config
  c.data.source, c.data.path, c.data.target_path = "store", x_path, y_path
  c.sae.d, c.sae.d_out, c.sae.skip, c.sae.n = 72, 40, True, 64
  c.mesh.shape, c.train.batch_size, c.sae.dead_tokens = (2, 2), 32, 32
  assert_pallas_step_equals_xla(c, steps=3)
