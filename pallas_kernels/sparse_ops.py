"""The three sparse primitives of a top-k SAE step, each as a pure-JAX reference and a Pallas kernel.

  gather_dot(x, W, idx)[b, j]  = x[b] . W[idx[b, j]]                  [B, d], [n, d], [B, K] -> [B, K]
  gather_sum(c, W, idx)[b]     = sum_j c[b, j] W[idx[b, j]]           [B, K], [n, d], [B, K] -> [B, d]
  scatter_outer(c, x, idx, n)  = row i: sum over (b, j) with idx[b, j] = i of c[b, j] x[b]  -> [n, d]

The references are what the `xla` path runs (jaxsae/sparse.py). The kernels are TPU-style
(Mosaic TPU): indices reach SMEM in bounded blocks, W rows are fetched from HBM by DMA, so W of any
size stays in HBM and only B*K rows move. They run on CPU in interpret mode (tests); they do
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


# TPU block-shape rules (checked when a kernel is lowered for TPU, not in interpret mode; the
# export tests in tests/test_tpu_lowering.py lower every kernel at every shipped config's shapes):
# a block's last two dimensions are multiples of (8, 128) or equal to the array's; a 1-D block is
# the whole array, a multiple of 1024, or a power of two >= 128. SMEM is small (~1 MiB) and fixed:
# nothing here puts an array whose length grows with B*K or n there whole; indices come through
# SMEM in bounded pieces, as pipelined blocks or by DMA from HBM.
SUBLANES, LANES = 8, 128
GATHER_INDICES = 2048   # indices per grid step of gather_dot / gather_sum (an 8 KiB SMEM block)
GATHER_COLS = 256       # K columns per grid step (K itself when it is at most this) ...
VMEM_BLOCK_BYTES = 2 << 20   # ... and fewer where d is wide: a VMEM buffer of W or output rows
                             # stays near this (double-buffered, so ~2x), whatever d is
SCATTER_CHUNK = 512     # sorted (latent, token, coef) triples scatter_outer DMAs to SMEM at once


def sublane_block(m: int, target: int) -> int:
  """The largest divisor of m that is <= target and a multiple of 8 (a legal second-to-last block
  dimension), or m itself when there is none."""
  for rb in range(min(m, max(target, 1)), 0, -1):
    if m % rb == 0 and (rb % SUBLANES == 0 or rb == m):
      return rb
  return m


def lane_block(m: int, target: int) -> int:
  """The largest divisor of m that is <= target and a multiple of 128 (a legal last block
  dimension), or m itself when m <= target or there is none."""
  if m <= target:
    return m
  for c in range(target - target % LANES, 0, -LANES):
    if m % c == 0:
      return c
  return m


def _legal_1d(size: int, total: int) -> bool:
  return size == total or size % (SUBLANES * LANES) == 0 or (
      size >= LANES and size & (size - 1) == 0)


def gather_blocks(b: int, k: int, row_bytes: int = 0) -> tuple[int, int]:
  """(tb, kc): tokens and K columns per grid step of the gather kernels. tb divides B and is a
  multiple of 8 (or B), kc divides K and is a multiple of 128 (or K), and the tb*kc indices of a
  step form a legal 1-D SMEM block of about GATHER_INDICES (the nearest legal size where B and K
  leave no closer one; all B*K only for a B that is no multiple of 8 and a K that fits nothing).
  row_bytes (one W row): kc shrinks (to 128) so that kc rows stay near VMEM_BLOCK_BYTES."""
  first = lane_block(k, max(LANES, min(GATHER_COLS, VMEM_BLOCK_BYTES // max(row_bytes, 1))))
  for kc in [first] + [c for c in range(LANES, k, LANES) if k % c == 0 and c != first] + [k]:
    tbs = [tb for tb in range(1, b + 1) if b % tb == 0 and (tb % SUBLANES == 0 or tb == b)
           and _legal_1d(tb * kc, b * k)]
    if tbs:
      want = max(SUBLANES, GATHER_INDICES // kc)
      fits = [tb for tb in tbs if tb <= want]
      return (max(fits) if fits else min(tbs)), kc
  return b, k


def _blocked_indices(idx, tb, kc):
  """[B, K] -> flat int32, laid out so grid step (i, j)'s [tb, kc] indices are one contiguous
  block of tb * kc, numbered i * (K / kc) + j."""
  b, k = idx.shape
  return (idx.astype(jnp.int32).reshape(b // tb, tb, k // kc, kc).transpose(0, 2, 1, 3)
          .reshape(-1))


def _copy_rows(idx_ref, w_hbm, rows, sem, t, slot, kc):
  """The kc DMAs W[idx[t, :]] -> rows[slot] (one per row; started together, awaited together)."""
  def copy(r):
    return pltpu.make_async_copy(w_hbm.at[pl.ds(idx_ref[t * kc + r], 1)],
                                 rows.at[slot, pl.ds(r, 1)], sem.at[slot])
  return copy


def _gather_call(name, lhs, w, idx, poison):
  """Grid (B / tb, K / kc). A step's indices arrive as a pipelined SMEM block; the kernel walks
  its tb tokens one by one, DMAing the token's kc W rows into one of two VMEM slots while it
  computes on the other, so VMEM holds 2 * kc rows whatever B and K are."""
  b, k = idx.shape
  d = w.shape[1]
  tb, kc = gather_blocks(b, k, d * w.dtype.itemsize)
  nk = k // kc
  dot = name == "gather_dot"
  out_cols = k if dot else d
  out_shape = jax.ShapeDtypeStruct((b, out_cols), jnp.float32)
  out_block = (pl.BlockSpec((tb, kc), lambda i, j: (i, j)) if dot
               else pl.BlockSpec((tb, d), lambda i, j: (i, 0)))
  lhs_block = (pl.BlockSpec((tb, d), lambda i, j: (i, 0)) if dot
               else pl.BlockSpec((tb, kc), lambda i, j: (i, j)))
  in_specs = [pl.BlockSpec((tb * kc,), lambda i, j: (i * nk + j,), memory_space=pltpu.SMEM),
              lhs_block, pl.BlockSpec(memory_space=pl.ANY)]
  args = [_blocked_indices(idx, tb, kc), lhs, w]
  aliases = {}
  if poison:  # the output starts as NaN: any element the kernel fails to write shows
    in_specs.append(out_block)
    args.append(jnp.full(out_shape.shape, jnp.nan, jnp.float32))
    aliases = {3: 0}

  def kernel(idx_ref, lhs_ref, w_hbm, *rest):
    out_ref, rows, sem = rest[-3:]
    loop = lambda n, f: jax.lax.fori_loop(0, n, lambda r, c: (f(r), c)[1], 0)
    start = lambda t, slot: loop(kc, lambda r: _copy_rows(idx_ref, w_hbm, rows, sem, t, slot,
                                                          kc)(r).start())
    wait = lambda t, slot: loop(kc, lambda r: _copy_rows(idx_ref, w_hbm, rows, sem, t, slot,
                                                         kc)(r).wait())
    if not dot:
      @pl.when(pl.program_id(1) == 0)
      def _():
        out_ref[...] = jnp.zeros((tb, d), jnp.float32)

    start(0, 0)

    def token(t, carry):
      slot = jax.lax.rem(t, 2)

      @pl.when(t + 1 < tb)
      def _():
        start(t + 1, 1 - slot)

      wait(t, slot)
      got = rows[slot].astype(jnp.float32)                      # [kc, d]
      mine = lhs_ref[pl.ds(t, 1), :].astype(jnp.float32)        # [1, d] or [1, kc]
      if dot:   # [1, d] x [kc, d]^T -> [1, kc]
        out_ref[pl.ds(t, 1), :] = jax.lax.dot_general(
            mine, got, (((1,), (1,)), ((), ())), precision=_HIGHEST,
            preferred_element_type=jnp.float32)
      else:     # [1, kc] x [kc, d] -> [1, d], summed over the K blocks
        out_ref[pl.ds(t, 1), :] += jax.lax.dot_general(
            mine, got, (((1,), (0,)), ((), ())), precision=_HIGHEST,
            preferred_element_type=jnp.float32)
      return carry

    jax.lax.fori_loop(0, tb, token, 0)

  return pl.pallas_call(
      kernel, grid=(b // tb, nk), in_specs=in_specs, out_specs=out_block, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((2, kc, d), w.dtype), pltpu.SemaphoreType.DMA((2,))],
      input_output_aliases=aliases,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel" if dot else "arbitrary")),
      interpret=_interpret())(*args)


def gather_dot(x, w, idx, *, poison=False):
  return _gather_call("gather_dot", x, w, idx, poison)


def gather_sum(coef, w, idx, *, poison=False):
  return _gather_call("gather_sum", coef, w, idx, poison)


def scatter_outer(coef, x, idx, n, *, poison=False):
  """Segment sums over (latent, token) pairs sorted by latent: grid step i owns latent rows
  [i*rb, (i+1)*rb), walks its contiguous run of pairs, DMAs each pair's x row and accumulates.
  Every output row is written (zeros where no pair selects it): Adam needs the dense gradient.
  The sorted pairs stay in HBM; the kernel DMAs them to SMEM SCATTER_CHUNK at a time."""
  b, k = idx.shape
  d = x.shape[1]
  rb = sublane_block(n, min(256, max(SUBLANES, VMEM_BLOCK_BYTES // (4 * d))))
  ch = SCATTER_CHUNK
  flat = idx.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat)
  lat, tok, c = flat[order], (order // k).astype(jnp.int32), coef.reshape(-1)[order]
  bounds = jnp.searchsorted(lat, jnp.arange(0, n + 1, rb, dtype=jnp.int32)).astype(jnp.int32)
  pad = lambda a, v: jnp.concatenate([a, jnp.full((ch,), v, a.dtype)])   # chunk reads stay in
  out_shape = jax.ShapeDtypeStruct((n, d), jnp.float32)
  args = [bounds, pad(lat, n), pad(tok, 0), pad(c.astype(jnp.float32), 0), x]
  in_specs = [pl.BlockSpec(memory_space=pl.ANY)] * 5
  aliases = {}
  if poison:
    in_specs.append(pl.BlockSpec((rb, d), lambda i: (i, 0)))
    args.append(jnp.full((n, d), jnp.nan, jnp.float32))
    aliases = {5: 0}

  def kernel(bounds_hbm, lat_hbm, tok_hbm, c_hbm, x_hbm, *rest):
    out_ref, bnd, lat_s, tok_s, c_s, xrow = rest[-6:]
    i = pl.program_id(0)
    pltpu.sync_copy(bounds_hbm.at[pl.ds(i, 2)], bnd)
    lo, hi = bnd[0], bnd[1]
    out_ref[...] = jnp.zeros((rb, d), jnp.float32)

    def chunk(ci, carry):
      s = lo + ci * ch
      for src, dst in ((lat_hbm, lat_s), (tok_hbm, tok_s), (c_hbm, c_s)):
        pltpu.sync_copy(src.at[pl.ds(s, ch)], dst)

      def pair(p, carry):
        pltpu.sync_copy(x_hbm.at[pl.ds(tok_s[p], 1)], xrow)
        r = lat_s[p] - i * rb
        out_ref[pl.ds(r, 1), :] += c_s[p] * xrow[...].astype(jnp.float32)
        return carry

      return jax.lax.fori_loop(0, jnp.minimum(ch, hi - s), pair, carry)

    jax.lax.fori_loop(0, jax.lax.div(hi - lo + ch - 1, ch), chunk, 0)

  return pl.pallas_call(
      kernel, grid=(n // rb,), in_specs=in_specs,
      out_specs=pl.BlockSpec((rb, d), lambda i: (i, 0)), out_shape=out_shape,
      scratch_shapes=[pltpu.SMEM((2,), jnp.int32), pltpu.SMEM((ch,), jnp.int32),
                      pltpu.SMEM((ch,), jnp.int32), pltpu.SMEM((ch,), jnp.float32),
                      pltpu.VMEM((1, d), x.dtype)],
      input_output_aliases=aliases,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=_interpret())(*args)


PALLAS = (gather_dot, gather_sum, scatter_outer)
