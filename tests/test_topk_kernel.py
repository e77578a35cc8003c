"""The encoder GEMM with a top-k epilogue selects exactly what dense GEMM + lax.top_k selects."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import topk_encoder

B, D, N = 16, 32, 256


def _inputs(seed):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (B, D)), jax.random.normal(ks[1], (N, D)),
          jax.random.normal(ks[2], (N,)))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k,col_tile", [(4, 64), (8, 32), (4, 256)])
def test_exact_top_k(seed, k, col_tile):
  x, w, b = _inputs(seed)
  vals, idx = topk_encoder.topk(x, w, b, k, col_tile=col_tile, row_tile=8)
  ref_v, ref_i = topk_encoder.topk_reference(x, w, b, k)
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_i))
  np.testing.assert_allclose(np.asarray(vals), np.asarray(ref_v), rtol=1e-5, atol=1e-5)


def test_masked_bias_selects_dead_latents_only():
  x, w, b = _inputs(2)
  dead = np.zeros(N, bool)
  dead[np.random.default_rng(0).choice(N, 12, replace=False)] = True
  vals, idx = topk_encoder.topk(x, w, jnp.where(dead, b, -jnp.inf), 16, col_tile=64, row_tile=8)
  finite = np.isfinite(np.asarray(vals))
  assert finite.sum(1).tolist() == [12] * B  # all 12 dead latents, then -inf fillers
  assert dead[np.asarray(idx)[finite]].all()
  ref_v, ref_i = topk_encoder.topk_reference(x, w, jnp.where(dead, b, -jnp.inf), 12)
  np.testing.assert_array_equal(np.asarray(idx)[:, :12], np.asarray(ref_i))


def test_bf16_compute_matches_bf16_reference_values():
  x, w, b = _inputs(3)
  vals, idx = topk_encoder.topk(x, w, b, 4, col_tile=64, row_tile=8, compute_dtype=jnp.bfloat16)
  pre = jnp.einsum("bd,nd->bn", x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                   preferred_element_type=jnp.float32) + b
  picked = np.take_along_axis(np.asarray(pre), np.asarray(idx), 1)
  np.testing.assert_allclose(np.asarray(vals), picked, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(vals), np.asarray(jax.lax.top_k(pre, 4)[0]), rtol=1e-6)


def test_column_tiles_are_legal_tpu_blocks():
  """Tiles divide n, are multiples of 128 (or n) and hold k; fewer latents than k are refused."""
  assert topk_encoder.column_tile(256, 8, 64) == 128      # 64 is no legal lane block
  assert topk_encoder.column_tile(250, 8, 5) == 250       # no multiple of 128 divides 250
  assert topk_encoder.column_tile(4096, 2048, 512) == 2048
  assert topk_encoder.column_tile(2 ** 18, 64, 2048) == 2048
  x, w, b = _inputs(4)
  with pytest.raises(ValueError, match="smaller than k"):
    topk_encoder.tile_candidates(x, w[:6], b[:6], 8)


def test_exact_top_k_over_pieces_of_d(monkeypatch):
  """W blocks smaller than d: pre accumulates over 4 pieces of 128 columns (the [tile, d] block of
  a wide d would not fit VMEM), over 2 column tiles and 2 token blocks."""
  monkeypatch.setattr(topk_encoder, "W_BLOCK_BYTES", 128 * 128 * 4)
  ks = jax.random.split(jax.random.PRNGKey(5), 3)
  x, w = jax.random.normal(ks[0], (16, 512)), jax.random.normal(ks[1], (N, 512))
  b = jax.random.normal(ks[2], (N,))
  vals, idx = topk_encoder.topk(x, w, b, 8, col_tile=128, row_tile=8)
  ref_v, ref_i = topk_encoder.topk_reference(x, w, b, 8)
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_i))
  np.testing.assert_allclose(np.asarray(vals), np.asarray(ref_v), rtol=1e-5, atol=1e-4)
