"""One sweep over the rows of a [n, d] weight: gradient projection, Adam, row renormalization.

The optimizer touches every parameter every step (~28 bytes per parameter in fp32 Adam); done as
separate XLA ops (project, moments, update, apply, renormalize) the rows are read and written
several times. Here each row block is read once (param, grad, mu, nu) and written once (param,
mu, nu), in place (aliased). Same arithmetic as optax.adam (bias correction from the incremented
count, eps outside the square root) followed by jaxsae's decoder-row projection and
renormalization, so `adam_rows_reference` and the kernel equal the optax path to float rounding.

Every row is updated every step (exact dense semantics): rows that no token selected still move
by their Adam momentum, as they do under optax. The lazy variant (`adam_rows_lazy`, for
train.lazy_optimizer) updates only the rows listed in `ids`, fetched and written back by DMA; every
other row, with its moments, stays exactly as it was (jaxsae/optim.py has the semantics).

TPU-style (Mosaic TPU; CPU interpret mode for tests). The GPU version is fused_adam_gpu.py (Pallas
Triton), which shares `_rows_update` and the reference with this module.
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import sparse_ops


def hyper(lr, b1, b2, eps, count_inc):
  """The scalars of one step: lr, b1, b2, eps, the two bias corrections 1 - beta^t, and 1 - b1,
  1 - b2 (in the caller's precision before the f32 rounding, as optax computes them: 1 - f32(0.999)
  is 1.3e-5 off 0.001)."""
  t = jnp.asarray(count_inc, jnp.float32)
  return jnp.stack([jnp.asarray(v, jnp.float32) for v in
                    (lr, b1, b2, eps, 1 - jnp.asarray(b1, jnp.float32) ** t,
                     1 - jnp.asarray(b2, jnp.float32) ** t, 1 - b1, 1 - b2)])


def _rows_update(w, g, mu, nu, h, project, renorm):
  """The arithmetic shared by kernel and reference; all f32. h = hyper(...)."""
  lr, b1, b2, eps, bc1, bc2, one_minus_b1, one_minus_b2 = (h[i] for i in range(8))
  if project:
    g = g - jnp.sum(g * w, axis=-1, keepdims=True) * w
  mu = one_minus_b1 * g + b1 * mu
  nu = one_minus_b2 * (g * g) + b2 * nu
  w = w + (-lr) * ((mu / bc1) / (jnp.sqrt(nu / bc2) + eps))
  if renorm:
    w = w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)
  return w, mu, nu


def adam_rows_reference(w, g, mu, nu, h, *, project=False, renorm=False):
  f32 = lambda a: a.astype(jnp.float32)
  w2, mu2, nu2 = _rows_update(f32(w), f32(g), f32(mu), f32(nu), h, project, renorm)
  return w2.astype(w.dtype), mu2.astype(mu.dtype), nu2.astype(nu.dtype)


def _divisor_block(m: int, target: int) -> int:
  """The largest divisor of m that is <= target and a multiple of 8 (grid steps must tile m
  exactly, and TPU blocks' second-to-last dimension is a multiple of 8), or m."""
  return sparse_ops.sublane_block(m, target)


def _row_block(n: int, d: int) -> int:
  """Rows per grid step: ~512 KiB of f32 per operand block (7 operands, double-buffered: ~7 MiB
  of VMEM), dividing n."""
  return _divisor_block(n, max(sparse_ops.SUBLANES, (1 << 17) // max(d, 1)))


def adam_rows(w, g, mu, nu, h, *, project=False, renorm=False):
  """Pallas: returns (w, mu, nu) updated, written over the inputs' buffers (donate them)."""
  n, d = w.shape
  rb = _row_block(n, d)
  block = pl.BlockSpec((rb, d), lambda i, h: (i, 0))

  def kernel(h_ref, w_ref, g_ref, mu_ref, nu_ref, w_out, mu_out, nu_out):
    hv = [h_ref[i] for i in range(h_ref.shape[0])]
    w2, mu2, nu2 = _rows_update(w_ref[...].astype(jnp.float32), g_ref[...].astype(jnp.float32),
                                mu_ref[...].astype(jnp.float32), nu_ref[...].astype(jnp.float32),
                                hv, project, renorm)
    w_out[...] = w2.astype(w_out.dtype)
    mu_out[...] = mu2.astype(mu_out.dtype)
    nu_out[...] = nu2.astype(nu_out.dtype)

  grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=(n // rb,),
                                           in_specs=[block] * 4, out_specs=[block] * 3)
  shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (w, mu, nu)]
  # Operand i + 1 (after the prefetched scalars) is written in place as output j.
  return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=shapes,
                        input_output_aliases={1: 0, 3: 1, 4: 2},
                        interpret=sparse_ops._interpret())(h, w, g, mu, nu)


# ---- lazy: only the rows in `ids` ------------------------------------------------------------
# ids [m] int32: distinct row indices in increasing order, padded at the end with n (any id >= n
# is padding and is skipped). Rows not listed are neither read nor written.

def adam_rows_lazy_reference(w, g, mu, nu, h, ids, *, project=False, renorm=False):
  """adam_rows_reference on the rows `ids` (gathered), scattered back over the inputs; what the
  xla path runs (jaxsae/optim.py). Padding ids gather zeros and their rows are dropped."""
  take = lambda a: jnp.take(a, ids, axis=0, mode="fill", fill_value=0)
  rows = adam_rows_reference(*(take(a) for a in (w, g, mu, nu)), h, project=project,
                             renorm=renorm)
  put = lambda a, r: a.at[ids].set(r, mode="drop", indices_are_sorted=True, unique_indices=True)
  return tuple(put(a, r) for a, r in zip((w, mu, nu), rows))


def adam_rows_lazy(w, g, mu, nu, h, ids, *, project=False, renorm=False, row_block=None):
  """Pallas: adam_rows on the rows `ids` only, in place (donate w, mu, nu). Each grid step owns
  row_block ids (DMAed from HBM into a row_block-long SMEM buffer; only h is scalar-prefetched, so
  SMEM use does not grow with len(ids)): it DMAs those rows of w, g, mu and nu from HBM
  into VMEM (all copies started, then awaited), updates them, and DMAs w, mu, nu back. Padding ids
  (>= n) start no copy, so their VMEM rows hold garbage that is computed on and never written."""
  n, d = w.shape
  m = ids.shape[0]
  rb = row_block or _divisor_block(m, min(64, (1 << 18) // max(d, 1)))
  anywhere = pl.BlockSpec(memory_space=pl.ANY)

  def kernel(h_ref, ids_hbm, w_hbm, g_hbm, mu_hbm, nu_hbm, w_out, mu_out, nu_out,
             ids_ref, w_buf, g_buf, mu_buf, nu_buf, sem):
    pltpu.sync_copy(ids_hbm.at[pl.ds(pl.program_id(0) * rb, rb)], ids_ref)
    first = 0

    def each_row(copies, act):
      """act(copy) on the DMA copies(row, r) of every real row of this grid step."""
      def one(r, carry):
        row = ids_ref[first + r]

        @pl.when(row < n)
        def _():
          for c in copies(row, r):
            act(c)
        return carry
      jax.lax.fori_loop(0, rb, one, 0)

    def fetch(row, r):
      return [pltpu.make_async_copy(src.at[pl.ds(row, 1)], buf.at[pl.ds(r, 1)], sem.at[i])
              for i, (src, buf) in enumerate(zip((w_hbm, g_hbm, mu_hbm, nu_hbm),
                                                 (w_buf, g_buf, mu_buf, nu_buf)))]

    def store(row, r):
      return [pltpu.make_async_copy(buf.at[pl.ds(r, 1)], dst.at[pl.ds(row, 1)], sem.at[i])
              for i, (buf, dst) in enumerate(zip((w_buf, mu_buf, nu_buf),
                                                 (w_out, mu_out, nu_out)))]

    each_row(fetch, lambda c: c.start())
    each_row(fetch, lambda c: c.wait())
    hv = [h_ref[i] for i in range(h_ref.shape[0])]
    f32 = lambda ref: ref[...].astype(jnp.float32)
    w2, mu2, nu2 = _rows_update(f32(w_buf), f32(g_buf), f32(mu_buf), f32(nu_buf), hv, project,
                                renorm)
    w_buf[...] = w2.astype(w_buf.dtype)
    mu_buf[...] = mu2.astype(mu_buf.dtype)
    nu_buf[...] = nu2.astype(nu_buf.dtype)
    each_row(store, lambda c: c.start())
    each_row(store, lambda c: c.wait())

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(m // rb,), in_specs=[anywhere] * 5,
      out_specs=[anywhere] * 3,
      scratch_shapes=[pltpu.SMEM((rb,), jnp.int32)]
      + [pltpu.VMEM((rb, d), a.dtype) for a in (w, g, mu, nu)]
      + [pltpu.SemaphoreType.DMA((4,))])
  shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (w, mu, nu)]
  # Operand i counts the prefetched h: w, mu, nu (2, 4, 5) are written in place.
  return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=shapes,
                        input_output_aliases={2: 0, 4: 1, 5: 2},
                        interpret=sparse_ops._interpret())(h, ids.astype(jnp.int32), w, g, mu, nu)
