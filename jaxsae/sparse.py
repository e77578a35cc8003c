"""Sparse encoder and decoder ops over selected latents, with hand-written sparse backward passes.

In a top-k SAE step only the encoder GEMM that *selects* the latents is dense. Everything after the
selection touches B*K (token, latent) pairs: the selected pre-activations, the decode, and every
gradient. Autodiff through a dense [B, n] code would do ~6x the FLOPs, so the two differentiable ops
here carry custom VJPs built from three primitives:

  gather_dot(x, W, idx)[b, j]    = x[b] . W[idx[b, j]]                  ("dots at selected indices")
  gather_sum(c, W, idx)[b]       = sum_j c[b, j] W[idx[b, j]]           (sparse decode)
  scatter_outer(c, x, idx)[i]    = sum_{b,j: idx[b,j]=i} c[b, j] x[b]   (segment sums: dW)

  encode_at(x, b_pre, W_enc, b_enc, idx) = gather_dot(x - b_pre, W_enc, idx) + b_enc[idx]
      backward: db_pre = -rows_sum(gather_sum(g, W_enc)), dW_enc = scatter_outer(g, x - b_pre),
                db_enc = segment_sum(g)
  decode(z, idx, W_dec) = gather_sum(z, W_dec, idx)
      backward: dz = gather_dot(g, W_dec), dW_dec = scatter_outer(z, g)

Latent sharding: weights are the local shard [n_local, d] of a matrix split over the mesh axis
`axis`; indices are global. Rows another shard owns contribute zero here, and the partial results
are psum'd over `axis` inside the ops (forward and backward), so callers see whole values. With
axis=None the ops are plain single-device ops. The Pallas kernels (pallas_kernels/sparse_ops.py for
TPU, sparse_ops_gpu.py for GPU) implement the same three primitives beside their pure-JAX
references; `kernels` picks which runs (and pallas_kernels.flavor() which Pallas flavour).
"""
import functools

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels import sparse_ops


def _primitives(kernels: str):
  """(gather_dot, gather_sum, scatter_outer): the pure-JAX references or the Pallas kernels."""
  if kernels == "xla":
    return sparse_ops.REFERENCE
  if kernels == "dense":   # the xla path as GEMMs over [B, n] codes (ops.Ops.kernels_for picks it)
    return sparse_ops.DENSE
  if kernels == "pallas":
    if pallas_kernels.flavor() == "gpu":
      from pallas_kernels import sparse_ops_gpu  # Pallas Triton: imported only where it runs
      return sparse_ops_gpu.PALLAS
    return sparse_ops.PALLAS
  raise ValueError(f"kernels={kernels!r}: expected 'xla', 'dense' or 'pallas'")


def localize(idx, n_local: int, axis):
  """Global latent indices -> (index into this shard's rows, whether this shard owns the latent)."""
  if axis is None:
    return idx, jnp.ones(idx.shape, bool)
  local = idx - jax.lax.axis_index(axis) * n_local
  own = (local >= 0) & (local < n_local)
  return jnp.where(own, local, 0), own


def _psum(x, axis):
  return x if axis is None else jax.lax.psum(x, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def encode_at(x, b_pre, w_enc, b_enc, idx, axis=None, kernels="xla"):
  """Pre-activations of the selected latents: (x - b_pre) . W_enc[idx] + b_enc[idx] -> [B, K] f32.

  x is data and gets no gradient. b_pre's gradient is a sum over rows, so the backward sums each
  shard's rows first and psums a [d] vector over `axis` instead of the [B, d] d(x - b_pre).
  """
  return _encode_fwd(x, b_pre, w_enc, b_enc, idx, axis, kernels)[0]


def _encode_fwd(x, b_pre, w_enc, b_enc, idx, axis, kernels):
  dot, _, _ = _primitives(kernels)
  xc = x - b_pre
  local, own = localize(idx, w_enc.shape[0], axis)
  vals = jnp.where(own, dot(xc, w_enc, local) + b_enc[local], 0.0)
  return _psum(vals, axis), (xc, w_enc, local, own)


def _encode_bwd(axis, kernels, res, g):
  xc, w_enc, local, own = res
  _, gsum, scatter = _primitives(kernels)
  n = w_enc.shape[0]
  g = jnp.where(own, g, 0.0)
  d_b = jax.ops.segment_sum(g.reshape(-1), local.reshape(-1), n)
  # b_pre's gradient, -sum over pairs of g W_enc[idx], is also -d_b @ W_enc: one pass over the
  # n_local rows instead of B*K gathered ones, whichever is fewer (AuxK has 8x the pairs).
  if n < g.size:
    d_b_pre = jnp.einsum("n,nd->d", d_b, w_enc, preferred_element_type=jnp.float32)
  else:
    d_b_pre = jnp.sum(gsum(g, w_enc, local), axis=0)
  d_b_pre = -_psum(d_b_pre, axis).astype(xc.dtype)
  d_w = scatter(g, xc, local, n).astype(w_enc.dtype)
  return None, d_b_pre, d_w, d_b.astype(w_enc.dtype), None


encode_at.defvjp(_encode_fwd, _encode_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def decode(z, idx, w_dec, axis=None, kernels="xla"):
  """Sparse decode without bias: sum_j z[b, j] W_dec[idx[b, j]] -> [B, d] f32."""
  return _decode_fwd(z, idx, w_dec, axis, kernels)[0]


def _decode_fwd(z, idx, w_dec, axis, kernels):
  _, gsum, _ = _primitives(kernels)
  local, own = localize(idx, w_dec.shape[0], axis)
  coef = jnp.where(own, z, 0.0)
  return _psum(gsum(coef, w_dec, local), axis), (coef, w_dec, local, own)


def _decode_bwd(axis, kernels, res, g):
  coef, w_dec, local, own = res
  dot, _, scatter = _primitives(kernels)
  dz = _psum(jnp.where(own, dot(g, w_dec, local), 0.0), axis).astype(coef.dtype)
  d_w = scatter(coef, g, local, w_dec.shape[0]).astype(w_dec.dtype)
  return dz, None, d_w


decode.defvjp(_decode_fwd, _decode_bwd)
