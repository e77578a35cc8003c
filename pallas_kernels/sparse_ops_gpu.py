"""GPU versions (Pallas Triton backend) of the three sparse primitives of sparse_ops.py.

  gather_dot(x, W, idx)[b, j]  = x[b] . W[idx[b, j]]                  [B, d], [n, d], [B, K] -> [B, K]
  gather_sum(c, W, idx)[b]     = sum_j c[b, j] W[idx[b, j]]           [B, K], [n, d], [B, K] -> [B, d]
  scatter_outer(c, x, idx, n)  = row i: sum over (b, j) with idx[b, j] = i of c[b, j] x[b]  -> [n, d]

Same signatures and semantics as sparse_ops.py, whose pure-JAX references (re-exported here) are
what the tests compare against. All accumulate in f32; W may be f32 or bf16.

Backend: Pallas has two GPU lowerings. Triton (`compiler_params=plt.CompilerParams(...)` selects it)
is deprecated since jax 0.11 but present in 0.11.2, the GPU machine's version; Mosaic GPU (`plgpu`)
is the future. These kernels are written for Triton because it lowers from a CPU host (the tests
cross-lower them for CUDA) and runs in CPU interpret mode; migrating to Mosaic GPU is left for later.

How Triton shapes the code:
- Every tensor has power-of-2 dimensions, so blocks overhang the arrays whenever B, K, d or n are
  not multiples of them: every load and store is masked (padding reads 0 and is never written).
- No BlockSpecs: each operand is a whole-array ref (a pointer into GPU memory) and each program
  computes its own offsets from program_id. Gathers index a ref with arrays in every dimension
  (w_ref.at[rows[:, :, None], cols[None, None, :]]): Triton takes a mix of arrays and pl.ds too,
  but interpret mode does not (NotImplementedError), and both must run.
- `INTERPRET` (module level, read at trace time) is what CPU runs: True there; the tests set False
  to cross-lower for CUDA with jax.export. On a GPU backend the kernels always compile.
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.sparse_ops import (  # noqa: F401  (the references, for callers and tests)
    REFERENCE, gather_dot_reference, gather_sum_reference, scatter_outer_reference)

INTERPRET = True  # CPU: interpret mode. False on CPU only to cross-lower for CUDA (tests).

# Elements of the largest per-program register tensor (a [tokens, latents, columns] gather): 8192
# f32 is 64 registers a thread at 4 warps, which leaves room for the operands and the accumulator.
GATHER_ELEMS = 8192


def _interpret():
  backend = jax.default_backend()
  if backend == "gpu":
    return False
  if backend == "cpu":
    return INTERPRET
  raise NotImplementedError(f"the GPU Pallas kernels run on GPU (and CPU in interpret mode), "
                            f"not on {backend}")


def _pow2(x: int) -> int:
  """The smallest power of 2 >= x (Triton tensor dimensions must be powers of 2)."""
  return 1 << max(0, int(x) - 1).bit_length()


def _call(kernel, out_shape, args, *, grid, num_warps=4, num_stages=2, poison=False):
  """pallas_call on whole-array refs. poison: the output starts as NaN (aliased to an extra input),
  so any element the kernel fails to write shows in the tests."""
  aliases = {}
  if poison:
    args = (*args, jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
    aliases = {len(args) - 1: 0}
    body = kernel
    kernel = lambda *refs: body(*refs[:-2], refs[-1])  # drop the poison input's ref
  return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, input_output_aliases=aliases,
                        interpret=_interpret(),
                        compiler_params=plt.CompilerParams(num_warps=num_warps,
                                                           num_stages=num_stages))(*args)


def _gather_blocks(b, k, d, token_block, latent_block, col_block):
  """(tokens, latents, columns) per program, powers of 2: W rows are read in col_block-wide
  pieces (512 contiguous bytes in f32); tokens fill the rest of GATHER_ELEMS."""
  kb = latent_block or min(_pow2(k), 32)
  bd = col_block or min(_pow2(d), 128)
  tb = token_block or max(1, min(_pow2(b), GATHER_ELEMS // (kb * bd)))
  return tb, kb, bd


def gather_dot(x, w, idx, *, poison=False, token_block=None, latent_block=None, col_block=None):
  """Grid (token blocks, latent blocks); each program loops over d in col_block pieces, gathering
  W[idx] rows [tokens, latents, cols] and reducing against x in f32 registers. Memory-bound: it
  reads B*K*d elements of W once, x once, and writes [B, K]."""
  b, k = idx.shape
  d = w.shape[1]
  tb, kb, bd = _gather_blocks(b, k, d, token_block, latent_block, col_block)

  def kernel(x_ref, w_ref, idx_ref, out_ref):
    t = pl.program_id(0) * tb + jnp.arange(tb)
    j = pl.program_id(1) * kb + jnp.arange(kb)
    tm = t < b
    pair = tm[:, None] & (j < k)[None, :]
    rows = plt.load(idx_ref.at[t[:, None], j[None, :]], mask=pair, other=0)

    def step(c, acc):
      cols = c * bd + jnp.arange(bd)
      cm = cols < d
      xv = plt.load(x_ref.at[t[:, None], cols[None, :]], mask=tm[:, None] & cm[None, :], other=0)
      wv = plt.load(w_ref.at[rows[:, :, None], cols[None, None, :]],
                    mask=pair[:, :, None] & cm[None, None, :], other=0)
      return acc + jnp.sum(xv.astype(jnp.float32)[:, None, :] * wv.astype(jnp.float32), axis=-1)

    acc = jax.lax.fori_loop(0, pl.cdiv(d, bd), step, jnp.zeros((tb, kb), jnp.float32))
    plt.store(out_ref.at[t[:, None], j[None, :]], acc, mask=pair)

  return _call(kernel, jax.ShapeDtypeStruct((b, k), jnp.float32),
               (x, w, idx.astype(jnp.int32)), grid=(pl.cdiv(b, tb), pl.cdiv(k, kb)),
               poison=poison)


def gather_sum(coef, w, idx, *, poison=False, token_block=None, latent_block=None,
               col_block=None):
  """Grid (token blocks, column blocks); each program loops over the K selected latents in
  latent_block pieces, accumulating coef-weighted W rows [tokens, cols] in f32. Memory-bound like
  gather_dot: B*K*d elements of W, written [B, d] once."""
  b, k = idx.shape
  d = w.shape[1]
  tb, kb, bd = _gather_blocks(b, k, d, token_block, latent_block, col_block)

  def kernel(c_ref, w_ref, idx_ref, out_ref):
    t = pl.program_id(0) * tb + jnp.arange(tb)
    cols = pl.program_id(1) * bd + jnp.arange(bd)
    tm, cm = t < b, cols < d

    def step(s, acc):
      j = s * kb + jnp.arange(kb)
      pair = tm[:, None] & (j < k)[None, :]
      at = (t[:, None], j[None, :])
      rows = plt.load(idx_ref.at[at], mask=pair, other=0)
      cv = plt.load(c_ref.at[at], mask=pair, other=0).astype(jnp.float32)
      wv = plt.load(w_ref.at[rows[:, :, None], cols[None, None, :]],
                    mask=pair[:, :, None] & cm[None, None, :], other=0)
      return acc + jnp.sum(cv[:, :, None] * wv.astype(jnp.float32), axis=1)

    acc = jax.lax.fori_loop(0, pl.cdiv(k, kb), step, jnp.zeros((tb, bd), jnp.float32))
    plt.store(out_ref.at[t[:, None], cols[None, :]], acc, mask=tm[:, None] & cm[None, :])

  return _call(kernel, jax.ShapeDtypeStruct((b, d), jnp.float32),
               (coef, w, idx.astype(jnp.int32)), grid=(pl.cdiv(b, tb), pl.cdiv(d, bd)),
               poison=poison)


def _split_bf16(a):
  """f32 a = hi + mid + lo, each bf16 (8 significant bits each: 24 = all of f32's, up to the last
  bit's rounding). A one-hot matrix times each part is exact on the tensor cores."""
  hi = a.astype(jnp.bfloat16)
  r = a - hi.astype(jnp.float32)
  mid = r.astype(jnp.bfloat16)
  return hi, mid, (r - mid.astype(jnp.float32)).astype(jnp.bfloat16)


def scatter_outer(coef, x, idx, n, *, poison=False, row_block=64, pair_block=64, col_block=None):
  """Segment sums over (latent, token) pairs sorted by latent, as the TPU kernel does.

  Why not f32 atomics (plt.atomic_add of c * x rows into a zeroed [n, d]): they would need a
  separate zeroing pass over [n, d] anyway, their summation order (so the low bits of dW) changes
  from run to run, and interpret mode cannot check them (its atomic_add takes no mask and drops
  all but one of duplicate indices in a block). Sorted segments are deterministic and write every
  output element exactly once, zeros included (Adam needs the dense gradient).

  Grid (row blocks, column blocks): program (i, jd) owns latent rows [i*rb, (i+1)*rb) and columns
  [jd*bd, (jd+1)*bd); its pairs are the contiguous run bounds[i]..bounds[i+1] of the sorted list,
  read pair_block at a time: gather those tokens' x columns [pb, bd], scale by c, and add them
  into the row accumulator [rb, bd] with a one-hot [rb, pb] matrix product on the tensor cores
  (Triton cannot scatter into registers). The f32 products go in as three bf16 parts so the sum
  keeps f32 accuracy (a plain f32 dot would run as TF32, or as slow IEEE FMAs). A latent chosen by
  many tokens only makes its program loop longer: work per program is (its pairs / pb) steps.
  """
  b, k = idx.shape
  d = x.shape[1]
  rb, pb = row_block, pair_block
  bd = col_block or min(_pow2(d), 128)
  flat = idx.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat)
  lat, tok, c = flat[order], (order // k).astype(jnp.int32), coef.reshape(-1)[order]
  bounds = jnp.searchsorted(lat, jnp.arange(0, pl.cdiv(n, rb) * rb + 1, rb, dtype=jnp.int32)
                            ).astype(jnp.int32)

  def kernel(bounds_ref, lat_ref, tok_ref, c_ref, x_ref, out_ref):
    i = pl.program_id(0)
    rows = i * rb + jnp.arange(rb)
    cols = pl.program_id(1) * bd + jnp.arange(bd)
    cm = cols < d
    start, end = bounds_ref[i], bounds_ref[i + 1]

    def step(s, acc):
      p = start + s * pb + jnp.arange(pb)
      pm = p < end
      lv = plt.load(lat_ref.at[p], mask=pm, other=-1)   # -1: matches no row of the one-hot
      tv = plt.load(tok_ref.at[p], mask=pm, other=0)
      cv = plt.load(c_ref.at[p], mask=pm, other=0).astype(jnp.float32)
      xv = plt.load(x_ref.at[tv[:, None], cols[None, :]], mask=pm[:, None] & cm[None, :], other=0)
      one, zero = jnp.bfloat16(1), jnp.bfloat16(0)   # (a where, not an i1 -> bf16 convert)
      onehot = jnp.where(rows[:, None] == lv[None, :], one, zero)
      for part in _split_bf16(cv[:, None] * xv.astype(jnp.float32)):
        acc = acc + jnp.dot(onehot, part, preferred_element_type=jnp.float32)
      return acc

    acc = jax.lax.fori_loop(0, pl.cdiv(end - start, pb), step, jnp.zeros((rb, bd), jnp.float32))
    plt.store(out_ref.at[rows[:, None], cols[None, :]], acc,
              mask=(rows < n)[:, None] & cm[None, :])

  return _call(kernel, jax.ShapeDtypeStruct((n, d), jnp.float32),
               (bounds, lat, tok, c.astype(jnp.float32), x),
               grid=(pl.cdiv(n, rb), pl.cdiv(d, bd)), poison=poison)


PALLAS = (gather_dot, gather_sum, scatter_outer)
