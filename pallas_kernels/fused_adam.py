"""One sweep over the rows of a [n, d] weight: gradient projection, Adam, row renormalization.

The optimizer touches every parameter every step (~28 bytes per parameter in fp32 Adam); done as
separate XLA ops (project, moments, update, apply, renormalize) the rows are read and written
several times. Here each row block is read once (param, grad, mu, nu) and written once (param,
mu, nu), in place (aliased). Same arithmetic as optax.adam (bias correction from the incremented
count, eps outside the square root) followed by jaxsae's decoder-row projection and
renormalization, so `adam_rows_reference` and the kernel equal the optax path to float rounding.

Every row is updated every step (exact dense semantics): rows that no token selected still move
by their Adam momentum, as they do under optax.

TPU-style (Mosaic TPU; CPU interpret mode for tests). The GPU version is fused_adam_gpu.py (Pallas
Triton), which shares `_rows_update` and the reference with this module.
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import sparse_ops


def hyper(lr, b1, b2, eps, count_inc):
  """The scalars of one step: lr, b1, b2, eps and the two bias corrections 1 - beta^t."""
  t = jnp.asarray(count_inc, jnp.float32)
  return jnp.stack([jnp.asarray(v, jnp.float32) for v in
                    (lr, b1, b2, eps, 1 - jnp.asarray(b1, jnp.float32) ** t,
                     1 - jnp.asarray(b2, jnp.float32) ** t)])


def _rows_update(w, g, mu, nu, h, project, renorm):
  """The arithmetic shared by kernel and reference; all f32. h = hyper(...)."""
  lr, b1, b2, eps, bc1, bc2 = (h[i] for i in range(6))
  if project:
    g = g - jnp.sum(g * w, axis=-1, keepdims=True) * w
  mu = (1 - b1) * g + b1 * mu
  nu = (1 - b2) * (g * g) + b2 * nu
  w = w + (-lr) * ((mu / bc1) / (jnp.sqrt(nu / bc2) + eps))
  if renorm:
    w = w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)
  return w, mu, nu


def adam_rows_reference(w, g, mu, nu, h, *, project=False, renorm=False):
  f32 = lambda a: a.astype(jnp.float32)
  w2, mu2, nu2 = _rows_update(f32(w), f32(g), f32(mu), f32(nu), h, project, renorm)
  return w2.astype(w.dtype), mu2.astype(mu.dtype), nu2.astype(nu.dtype)


def _row_block(n: int, d: int) -> int:
  """Rows per grid step: ~1 MiB of f32 per operand block, dividing n."""
  rb = max(1, min(n, (1 << 18) // max(d, 1)))
  while n % rb:
    rb -= 1
  return rb


def adam_rows(w, g, mu, nu, h, *, project=False, renorm=False):
  """Pallas: returns (w, mu, nu) updated, written over the inputs' buffers (donate them)."""
  n, d = w.shape
  rb = _row_block(n, d)
  block = pl.BlockSpec((rb, d), lambda i, h: (i, 0))

  def kernel(h_ref, w_ref, g_ref, mu_ref, nu_ref, w_out, mu_out, nu_out):
    hv = [h_ref[i] for i in range(6)]
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
