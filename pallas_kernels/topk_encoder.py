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
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import sparse_ops


def topk_reference(xc, w, b, k):
  """Dense: (values [B, k], indices [B, k]) of the top-k of xc W^T + b."""
  return jax.lax.top_k(jnp.einsum("bd,nd->bn", xc, w, preferred_element_type=jnp.float32) + b, k)


def column_tile(n: int, k: int, want: int) -> int:
  """Columns per tile: a divisor of n that is a multiple of 128 (a legal TPU lane block) or n
  itself, at least k (a tile must hold a whole candidate list), and the largest such <= want,
  else the smallest such above it."""
  legal = [t for t in list(range(128, n, 128)) + [n] if n % t == 0 and t >= k]
  if not legal:
    raise ValueError(f"no column tile of n={n} holds k={k} candidates (n is smaller than k)")
  fits = [t for t in legal if t <= max(want, k)]
  return max(fits) if fits else min(legal)


W_BLOCK_BYTES = 2 << 20   # one [tile, d-piece] block of W (double-buffered: 4 MiB of VMEM)


def tile_candidates(xc, w, b, k, *, col_tile=2048, row_tile=128, compute_dtype=jnp.float32):
  """Kernel: per (token block, column tile) top-k -> values, indices [B, (n / tile) * k].

  Grid (token blocks, column tiles, pieces of d): the GEMM accumulates pre[tb, tn] over pieces of
  d in a VMEM scratch (W blocks of at most about W_BLOCK_BYTES, whatever d is: at d=4096 a whole
  [2048, 4096] f32 block would be 32 MiB, twice over), and the last piece extracts the top-k.
  The kernel writes candidates as [tiles, B, k] (a block (tb, k) of its last two dimensions is
  legal on TPU for any k, where a (tb, k) block of [B, tiles * k] is not unless k % 128 == 0);
  they are transposed to [B, tiles * k] outside."""
  bsz, d = xc.shape
  n = w.shape[0]
  tn = column_tile(n, k, col_tile)
  tb = sparse_ops.sublane_block(bsz, row_tile)
  td = sparse_ops.lane_block(d, max(sparse_ops.LANES, W_BLOCK_BYTES // (tn * w.dtype.itemsize)))
  tiles, pieces = n // tn, d // td

  def kernel(x_ref, w_ref, b_ref, v_out, i_out, acc):
    t, c = pl.program_id(1), pl.program_id(2)

    @pl.when(c == 0)
    def _():
      acc[...] = jnp.zeros((tb, tn), jnp.float32)

    acc[...] += jax.lax.dot_general(
        x_ref[...].astype(compute_dtype), w_ref[...].astype(compute_dtype),
        (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    @pl.when(c == pieces - 1)
    def _():
      pre = acc[...] + b_ref[...].astype(jnp.float32)
      cols = jax.lax.broadcasted_iota(jnp.int32, pre.shape, 1)
      slots = jax.lax.broadcasted_iota(jnp.int32, (tb, k), 1)

      def extract(j, carry):
        pre, vals, ids = carry
        best = jnp.max(pre, axis=1, keepdims=True)
        # Lowest column holding the max: ties resolve to the lower index, as lax.top_k does.
        at = jnp.min(jnp.where(pre == best, cols, tn), axis=1, keepdims=True)
        vals = jnp.where(slots == j, best, vals)   # column j of the lists, kept in vregs
        ids = jnp.where(slots == j, at + t * tn, ids)
        return jnp.where(cols == at, -jnp.inf, pre), vals, ids

      _, vals, ids = jax.lax.fori_loop(
          0, k, extract, (pre, jnp.full((tb, k), -jnp.inf, jnp.float32),
                          jnp.zeros((tb, k), jnp.int32)))
      v_out[...] = vals
      i_out[...] = ids

  out_block = pl.BlockSpec((None, tb, k), lambda i, t, c: (t, i, 0))
  cand_v, cand_i = pl.pallas_call(
      kernel, grid=(bsz // tb, tiles, pieces),
      in_specs=[pl.BlockSpec((tb, td), lambda i, t, c: (i, c)),
                pl.BlockSpec((tn, td), lambda i, t, c: (t, c)),
                pl.BlockSpec((1, tn), lambda i, t, c: (0, t))],
      out_specs=[out_block, out_block],
      out_shape=[jax.ShapeDtypeStruct((tiles, bsz, k), jnp.float32),
                 jax.ShapeDtypeStruct((tiles, bsz, k), jnp.int32)],
      scratch_shapes=[pltpu.VMEM((tb, tn), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=sparse_ops._interpret())(xc, w, b.reshape(1, n))
  flat = lambda a: a.transpose(1, 0, 2).reshape(bsz, tiles * k)
  return flat(cand_v), flat(cand_i)


def topk(xc, w, b, k, **tiles):
  """Exact top-k of xc W^T + b without materializing it: (values [B, k], indices [B, k])."""
  cand_v, cand_i = tile_candidates(xc, w, b, k, **tiles)
  vals, pos = jax.lax.top_k(cand_v, k)
  return vals, jnp.take_along_axis(cand_i, pos, axis=1)
