"""The encoder GEMM with a top-k epilogue: pre[B, n] never reaches device memory.

Grid step (i, t) computes the tile pre[i-th token block, t-th column tile] = xc W_enc^T + b in
on-chip memory and keeps only the tile's k largest values and their global column indices, found
by k rounds of (row max, mask it out). The kernel's output is B x (n / tile) x k candidates; a
final lax.top_k over them is exact, because each of a row's global top-k lies in its own tile's
top-k. Memory drops from B*n to B*n*k/tile (a 64x cut at tile=2048, k=32).

AuxK uses the same kernel: its mask "dead latents only" is a bias of -inf on live latents.

TPU-style (Mosaic TPU), runs on CPU in interpret mode. The GPU version is topk_encoder_gpu.py
(Pallas Triton; a running top-k per program instead of per-tile candidates).
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import sparse_ops


def topk_reference(xc, w, b, k):
  """Dense: (values [B, k], indices [B, k]) of the top-k of xc W^T + b."""
  return jax.lax.top_k(jnp.einsum("bd,nd->bn", xc, w, preferred_element_type=jnp.float32) + b, k)


def _divisor(total: int, want: int) -> int:
  t = max(1, min(total, want))
  while total % t:
    t -= 1
  return t


def tile_candidates(xc, w, b, k, *, col_tile=2048, row_tile=128, compute_dtype=jnp.float32):
  """Kernel: per (token block, column tile) top-k -> values, indices [B, (n / tile) * k]."""
  bsz, d = xc.shape
  n = w.shape[0]
  tn = _divisor(n, max(col_tile, k))
  if tn < k:
    raise ValueError(f"column tile {tn} (a divisor of n={n}) is smaller than k={k}")
  tb = _divisor(bsz, row_tile)
  tiles = n // tn

  def kernel(x_ref, w_ref, b_ref, v_out, i_out):
    t = pl.program_id(1)
    pre = jax.lax.dot_general(x_ref[...].astype(compute_dtype), w_ref[...].astype(compute_dtype),
                              (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    pre = pre + b_ref[...].astype(jnp.float32)
    cols = jax.lax.broadcasted_iota(jnp.int32, pre.shape, 1)

    def extract(j, pre):
      best = jnp.max(pre, axis=1, keepdims=True)
      # Lowest column holding the max: ties resolve to the lower index, as lax.top_k does.
      at = jnp.min(jnp.where(pre == best, cols, tn), axis=1, keepdims=True)
      v_out[:, pl.ds(j, 1)] = best
      i_out[:, pl.ds(j, 1)] = at + t * tn
      return jnp.where(cols == at, -jnp.inf, pre)

    jax.lax.fori_loop(0, k, extract, pre)

  out_block = pl.BlockSpec((tb, k), lambda i, t: (i, t))
  return pl.pallas_call(
      kernel, grid=(bsz // tb, tiles),
      in_specs=[pl.BlockSpec((tb, d), lambda i, t: (i, 0)),
                pl.BlockSpec((tn, d), lambda i, t: (t, 0)),
                pl.BlockSpec((1, tn), lambda i, t: (0, t))],
      out_specs=[out_block, out_block],
      out_shape=[jax.ShapeDtypeStruct((bsz, tiles * k), jnp.float32),
                 jax.ShapeDtypeStruct((bsz, tiles * k), jnp.int32)],
      interpret=sparse_ops._interpret())(xc, w, b.reshape(1, n))


def topk(xc, w, b, k, **tiles):
  """Exact top-k of xc W^T + b without materializing it: (values [B, k], indices [B, k])."""
  cand_v, cand_i = tile_candidates(xc, w, b, k, **tiles)
  vals, pos = jax.lax.top_k(cand_v, k)
  return vals, jnp.take_along_axis(cand_i, pos, axis=1)
