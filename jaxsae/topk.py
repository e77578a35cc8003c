"""Which latents fire: the dense encoder GEMM and top-k, over a latent-sharded encoder.

Selection is not differentiated (gradients flow through sparse.encode_at, which recomputes the
selected pre-activations), so this module is free to compute `pre` in bf16, in tiles, or in a fused
kernel. With the latents split over a mesh axis, each shard takes its local top-k, all-gathers only
those candidates (B x k x shards values, never B x n), and takes the global top-k of the candidates:
exactly the unsharded top-k, because every global winner is among its own shard's local top-k.
"""
import jax
import jax.numpy as jnp

NEG = -jnp.inf


def pre_activations(xc, w_enc, b_enc, compute_dtype):
  """xc [B, d] @ W_enc[n, d]^T + b_enc -> [B, n] in compute_dtype (the step's one dense GEMM)."""
  pre = jnp.einsum("bd,nd->bn", xc.astype(compute_dtype), w_enc.astype(compute_dtype),
                   preferred_element_type=jnp.float32)
  return (pre + b_enc).astype(compute_dtype)


def _sharded_top_k(pre, k, axis):
  """Top-k of each row of pre [B, n_local] over all shards of `axis`: (values, global indices)."""
  vals, idx = jax.lax.top_k(pre, k)
  if axis is None:
    return vals, idx
  idx = idx + jax.lax.axis_index(axis) * pre.shape[1]
  cand_v = jax.lax.all_gather(vals, axis, axis=1, tiled=True)   # [B, k * shards]
  cand_i = jax.lax.all_gather(idx, axis, axis=1, tiled=True)
  vals, pos = jax.lax.top_k(cand_v, k)
  return vals, jnp.take_along_axis(cand_i, pos, axis=1)


def select(xc, w_enc, b_enc, k, *, dead=None, k_aux=0, axis=None, compute_dtype=jnp.float32):
  """Indices of the top-k latents of each row, and of the top-k_aux *dead* latents.

  Returns idx [B, k] and, when k_aux > 0, (aux_idx [B, k_aux], aux_ok [B, k_aux]) where aux_ok is
  False for picks that are not dead (fewer than k_aux dead latents are available).
  """
  pre = pre_activations(xc, w_enc, b_enc, compute_dtype)
  _, idx = _sharded_top_k(pre, k, axis)
  if not k_aux:
    return idx, None, None
  aux_vals, aux_idx = _sharded_top_k(jnp.where(dead[None, :], pre, NEG), k_aux, axis)
  return idx, aux_idx, aux_vals > NEG
