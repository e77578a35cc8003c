"""The three sparse primitives of a top-k SAE step, each as a pure-JAX reference and a Pallas kernel.

  gather_dot(x, W, idx)[b, j]  = x[b] . W[idx[b, j]]                  [B, d], [n, d], [B, K] -> [B, K]
  gather_sum(c, W, idx)[b]     = sum_j c[b, j] W[idx[b, j]]           [B, K], [n, d], [B, K] -> [B, d]
  scatter_outer(c, x, idx, n)  = row i: sum over (b, j) with idx[b, j] = i of c[b, j] x[b]  -> [n, d]

The references are what the `xla` path runs (jaxsae/sparse.py). The kernels are TPU-style
(Mosaic TPU): indices are scalar-prefetched into SMEM, W rows are fetched from HBM by DMA, so W of
any size stays in HBM and only B*K rows move. They run on CPU in interpret mode (tests); they do
not lower on GPU, which has its own version in sparse_ops_gpu.py (Pallas Triton; `kernels=pallas`
picks it on a GPU backend, see pallas_kernels.flavor()). All accumulate in f32.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# ---------------------------------------------------------------------------------------------
# Pure-JAX references. XLA materializes gathered rows [B, chunk, d]: bound them to about this many
# elements by processing the K axis in chunks (AuxK selects hundreds of latents per token).
MAX_GATHER_ELEMS = 1 << 25


def _chunk(b: int, k: int, d: int) -> int:
  c = max(1, MAX_GATHER_ELEMS // max(1, b * d))
  while k % c:
    c -= 1
  return c


def _split(a, c):
  b, k = a.shape
  return a.reshape(b, k // c, c).transpose(1, 0, 2)


def gather_dot_reference(x, w, idx):
  b, k = idx.shape
  c = _chunk(b, k, w.shape[1])
  one = lambda ix: jnp.einsum("bd,bkd->bk", x, w[ix], preferred_element_type=jnp.float32)
  if c == k:
    return one(idx)
  return jax.lax.map(one, _split(idx, c)).transpose(1, 0, 2).reshape(b, k)


def gather_sum_reference(coef, w, idx):
  b, k = idx.shape
  c = _chunk(b, k, w.shape[1])

  def one(acc, ci):
    co, ix = ci
    return acc + jnp.einsum("bk,bkd->bd", co, w[ix], preferred_element_type=jnp.float32), None

  zero = jnp.zeros((b, w.shape[1]), jnp.float32)
  if c == k:
    return one(zero, (coef, idx))[0]
  return jax.lax.scan(one, zero, (_split(coef, c), _split(idx, c)))[0]


def scatter_outer_reference(coef, x, idx, n):
  b, k = idx.shape
  c = _chunk(b, k, x.shape[1])

  def one(acc, ci):
    co, ix = ci
    rows = (co[:, :, None] * x[:, None, :]).reshape(-1, x.shape[1])
    return acc.at[ix.reshape(-1)].add(rows.astype(jnp.float32)), None

  zero = jnp.zeros((n, x.shape[1]), jnp.float32)
  if c == k:
    return one(zero, (coef, idx))[0]
  return jax.lax.scan(one, zero, (_split(coef, c), _split(idx, c)))[0]


REFERENCE = (gather_dot_reference, gather_sum_reference, scatter_outer_reference)

# ---------------------------------------------------------------------------------------------
# The same three as dense GEMMs over [B, n] codes. Cheaper than the gathers once K is a sizable
# fraction of n: AuxK (k_aux=256) over a few thousand latents moves B*K*d gathered elements per
# op, where one GEMM does B*n*d multiply-adds at the machine's matmul rate (model.py picks).
# HIGHEST: f32 products in f32 (GPUs would otherwise round to TF32), as the gathers compute.
_HIGHEST = jax.lax.Precision.HIGHEST


def _codes(coef, idx, n):
  """[B, K] values at [B, K] indices -> dense [B, n] f32 (repeated indices add up)."""
  rows = jnp.arange(idx.shape[0])[:, None]
  return jnp.zeros((idx.shape[0], n), jnp.float32).at[rows, idx].add(coef.astype(jnp.float32))


def gather_dot_dense(x, w, idx):
  full = jnp.einsum("bd,nd->bn", x, w, precision=_HIGHEST, preferred_element_type=jnp.float32)
  return jnp.take_along_axis(full, idx, axis=1)


def gather_sum_dense(coef, w, idx):
  return jnp.einsum("bn,nd->bd", _codes(coef, idx, w.shape[0]), w, precision=_HIGHEST,
                    preferred_element_type=jnp.float32)


def scatter_outer_dense(coef, x, idx, n):
  return jnp.einsum("bn,bd->nd", _codes(coef, idx, n), x, precision=_HIGHEST,
                    preferred_element_type=jnp.float32)


DENSE = (gather_dot_dense, gather_sum_dense, scatter_outer_dense)

# ---------------------------------------------------------------------------------------------
# Pallas kernels (Mosaic TPU; CPU interpret mode for tests).


def _interpret():
  """Interpret mode off TPU. The tests swap in pltpu.InterpretParams() to catch bad indices."""
  backend = jax.default_backend()
  if backend == "tpu":
    return False
  if backend == "cpu":
    return INTERPRET
  raise NotImplementedError(
      f"kernels=pallas: these kernels are written for TPU (and CPU interpret mode), not {backend}; "
      f"GPUs run the *_gpu modules (pallas_kernels.FLAVOR 'auto' or 'gpu'), else use kernels=xla.")


INTERPRET = True  # what CPU runs; tests set pltpu.InterpretParams() for bounds checks


def _token_block(b: int, k: int) -> int:
  """Tokens per grid step: divides B, and keeps the gathered rows of one step to ~512."""
  tb = max(1, min(b, 512 // max(k, 1)))
  while b % tb:
    tb -= 1
  return tb


def _gather_rows(idx_ref, w_hbm, rows, sem, first_token, tb, k):
  """DMAs W[idx[t, j]] for the tb tokens from first_token into rows [tb * k, d]: all copies are
  started, then all awaited, so they overlap."""

  def copy(r):
    row = idx_ref[(first_token + r // k) * k + r % k]
    return pltpu.make_async_copy(w_hbm.at[pl.ds(row, 1)], rows.at[pl.ds(r, 1)], sem.at[0])

  jax.lax.fori_loop(0, tb * k, lambda r, c: (copy(r).start(), c)[1], 0)
  jax.lax.fori_loop(0, tb * k, lambda r, c: (copy(r).wait(), c)[1], 0)


def _gather_call(body, out_cols, lhs, w, idx, poison):
  b, k = idx.shape
  d = w.shape[1]
  tb = _token_block(b, k)
  out_shape = jax.ShapeDtypeStruct((b, out_cols), jnp.float32)
  in_specs = [pl.BlockSpec((tb, lhs.shape[1]), lambda i, idx: (i, 0)),
              pl.BlockSpec(memory_space=pl.ANY)]
  args = [idx.reshape(-1).astype(jnp.int32), lhs, w]
  aliases = {}
  if poison:  # the output starts as NaN: any element the kernel fails to write shows
    in_specs.append(pl.BlockSpec((tb, out_cols), lambda i, idx: (i, 0)))
    args.append(jnp.full(out_shape.shape, jnp.nan, jnp.float32))
    aliases = {3: 0}
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(b // tb,), in_specs=in_specs,
      out_specs=pl.BlockSpec((tb, out_cols), lambda i, idx: (i, 0)),
      scratch_shapes=[pltpu.VMEM((tb * k, d), w.dtype), pltpu.SemaphoreType.DMA((1,))])

  def kernel(idx_ref, lhs_ref, w_hbm, *rest):
    out_ref, rows, sem = rest[-3:]
    _gather_rows(idx_ref, w_hbm, rows, sem, pl.program_id(0) * tb, tb, k)
    out_ref[...] = body(lhs_ref[...].astype(jnp.float32),
                        rows[...].astype(jnp.float32).reshape(tb, k, d))

  return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape,
                        input_output_aliases=aliases, interpret=_interpret())(*args)


def gather_dot(x, w, idx, *, poison=False):
  return _gather_call(lambda xb, rows: jnp.sum(xb[:, None, :] * rows, axis=-1), idx.shape[1],
                      x, w, idx, poison)


def gather_sum(coef, w, idx, *, poison=False):
  return _gather_call(lambda cb, rows: jnp.sum(cb[:, :, None] * rows, axis=1), w.shape[1],
                      coef, w, idx, poison)


def _row_block(n: int) -> int:
  rb = min(n, 256)
  while n % rb:
    rb -= 1
  return rb


def scatter_outer(coef, x, idx, n, *, poison=False):
  """Segment sums over (latent, token) pairs sorted by latent: grid step i owns latent rows
  [i*rb, (i+1)*rb), walks its contiguous run of pairs, DMAs each pair's x row and accumulates.
  Every output row is written (zeros where no pair selects it): Adam needs the dense gradient."""
  b, k = idx.shape
  d = x.shape[1]
  rb = _row_block(n)
  flat = idx.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat)
  lat, tok, c = flat[order], (order // k).astype(jnp.int32), coef.reshape(-1)[order]
  bounds = jnp.searchsorted(lat, jnp.arange(0, n + 1, rb, dtype=jnp.int32)).astype(jnp.int32)
  out_shape = jax.ShapeDtypeStruct((n, d), jnp.float32)
  args = [bounds, lat, tok, c.astype(jnp.float32), x]
  in_specs = [pl.BlockSpec(memory_space=pl.ANY)]
  aliases = {}
  if poison:
    in_specs.append(pl.BlockSpec((rb, d), lambda i, *_: (i, 0)))
    args.append(jnp.full((n, d), jnp.nan, jnp.float32))
    aliases = {5: 0}
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4, grid=(n // rb,), in_specs=in_specs,
      out_specs=pl.BlockSpec((rb, d), lambda i, *_: (i, 0)),
      scratch_shapes=[pltpu.VMEM((1, d), x.dtype), pltpu.SemaphoreType.DMA((1,))])

  def kernel(bounds_ref, lat_ref, tok_ref, c_ref, x_hbm, *rest):
    out_ref, xrow, sem = rest[-3:]
    i = pl.program_id(0)
    out_ref[...] = jnp.zeros((rb, d), jnp.float32)

    def pair(p, carry):
      pltpu.sync_copy(x_hbm.at[pl.ds(tok_ref[p], 1)], xrow)
      r = lat_ref[p] - i * rb
      out_ref[pl.ds(r, 1), :] += c_ref[p] * xrow[...].astype(jnp.float32)
      return carry

    jax.lax.fori_loop(bounds_ref[i], bounds_ref[i + 1], pair, 0)

  return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape,
                        input_output_aliases=aliases, interpret=_interpret())(*args)


PALLAS = (gather_dot, gather_sum, scatter_outer)
