"""GPU version (Pallas Triton backend) of fused_adam.adam_rows: one sweep over the rows of a [n, d]
weight doing gradient projection, Adam and row renormalization, in place.

Same semantics as fused_adam.py (whose `hyper` and references are re-exported here, and whose
`_rows_update` holds the shared arithmetic): optax.adam's update, every row every step; and the
lazy variant `adam_rows_lazy`, only the rows listed in `ids` (train.lazy_optimizer).
Each program owns `rb` whole rows, padded to a power of 2 of columns (d=768 -> 1024; masked), so
the row sums of the projection and the renormalization stay in registers: every element is read
once (w, g, mu, nu) and written once (w, mu, nu) -- 28 bytes per fp32 parameter, the floor for
dense fp32 Adam (n=2^17, d=768: 2.8 GB, ~0.94 ms at 3 TB/s on an H100).

Triton backend (deprecated since jax 0.11, still in 0.11.2; Mosaic GPU is the future, migration
left for later); see sparse_ops_gpu.py for the conventions (whole-array refs, masks, INTERPRET).
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import sparse_ops_gpu
from pallas_kernels.fused_adam import (  # noqa: F401  (re-exported for callers and tests)
    _rows_update, adam_rows_lazy_reference, adam_rows_reference, hyper)

# Elements per operand block: 4 operands of 4096 f32 at 4 warps are 128 registers a thread.
# A row wider than this is still one block (rb = 1): correct, but registers spill past d ~ 8k.
BLOCK_ELEMS = 4096


def _sweep(rows, n, d, dp, refs, project, renorm):
  """One program's rows (an int vector; rows >= n are masked off) of the update, loaded, computed
  and stored in place: the body of adam_rows and adam_rows_lazy."""
  h_ref, w_ref, g_ref, mu_ref, nu_ref, w_out, mu_out, nu_out = refs
  cols = jnp.arange(dp)
  m = (rows < n)[:, None] & (cols < d)[None, :]
  at = (rows[:, None], cols[None, :])
  load = lambda ref: plt.load(ref.at[at], mask=m, other=0).astype(jnp.float32)
  hv = [h_ref[i] for i in range(h_ref.shape[0])]
  # Padding columns read 0 and stay 0 through the projection and the moments; the update can
  # still make them nonzero (0 / (0 + eps) is 0, but eps = 0 gives NaN), so the renormalization
  # masks them before taking the row norm.
  w2, mu2, nu2 = _rows_update(load(w_ref), load(g_ref), load(mu_ref), load(nu_ref), hv,
                              project, False)
  if renorm:
    w2 = jnp.where(m, w2, 0.0)
    w2 = w2 / jnp.maximum(jnp.sqrt(jnp.sum(w2 * w2, axis=-1, keepdims=True)), 1e-12)
  plt.store(w_out.at[at], w2.astype(w_out.dtype), mask=m)
  plt.store(mu_out.at[at], mu2.astype(mu_out.dtype), mask=m)
  plt.store(nu_out.at[at], nu2.astype(nu_out.dtype), mask=m)


def _call(kernel, rows, rb, dp, w, g, mu, nu, h, *extra):
  """pallas_call of rb-row programs covering `rows`; extra inputs (the lazy ids) come after h."""
  shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (w, mu, nu)]
  k = 1 + len(extra)   # w, mu, nu (operands k, k + 2, k + 3) are written in place
  return pl.pallas_call(
      kernel, out_shape=shapes, grid=(pl.cdiv(rows, rb),),
      input_output_aliases={k: 0, k + 2: 1, k + 3: 2},
      interpret=sparse_ops_gpu._interpret(),
      compiler_params=plt.CompilerParams(num_warps=4 if rb * dp <= 4096 else 8, num_stages=1),
  )(jnp.asarray(h, jnp.float32), *extra, w, g, mu, nu)


def _rows_per_program(rows, dp, row_block):
  """Rows per program: BLOCK_ELEMS elements of each operand (row_block overrides)."""
  return row_block or max(1, min(sparse_ops_gpu._pow2(rows), BLOCK_ELEMS // dp))


def adam_rows(w, g, mu, nu, h, *, project=False, renorm=False, row_block=None):
  """Returns (w, mu, nu) updated, written over the inputs' buffers (donate them). h: hyper(...)."""
  n, d = w.shape
  dp = sparse_ops_gpu._pow2(d)
  rb = _rows_per_program(n, dp, row_block)

  def kernel(*refs):
    _sweep(pl.program_id(0) * rb + jnp.arange(rb), n, d, dp, refs, project, renorm)

  return _call(kernel, n, rb, dp, w, g, mu, nu, h)


def adam_rows_lazy(w, g, mu, nu, h, ids, *, project=False, renorm=False, row_block=None):
  """adam_rows on the rows `ids` only (fused_adam.adam_rows_lazy has the contract: distinct ids,
  padding >= n), in place. Each program loads row_block ids and masks the padding off every load
  and store, so rows not listed are never read or written."""
  n, d = w.shape
  m = ids.shape[0]
  dp = sparse_ops_gpu._pow2(d)
  rb = _rows_per_program(m, dp, row_block)

  def kernel(h_ref, ids_ref, *refs):
    slot = pl.program_id(0) * rb + jnp.arange(rb)
    rows = plt.load(ids_ref.at[slot], mask=slot < m, other=n)
    _sweep(rows, n, d, dp, (h_ref, *refs), project, renorm)

  return _call(kernel, m, rb, dp, w, g, mu, nu, h, ids.astype(jnp.int32))
