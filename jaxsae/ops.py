"""How the model's sparse ops and selection run here: the mesh axes, the kernels, the precision.

The model (model.py) says *what* an SAE computes; an `Ops` says *how* on this mesh and backend,
and is the only thing the model is given about either. The step (step.py) builds one from the
config's resolved choices (config_check.resolve_kernels, knobs.py, plan.py); tests and
single-device callers use the default, `Ops()`: unsharded, pure-JAX, float32.

Inside shard_map the model's arrays are one device's slices: latent rows split over `axis`, batch
rows over `batch_axes`. The ops do their own collectives over those axes (sparse.py, topk.py), so
the model's arithmetic reads the same sharded or not.
"""
import dataclasses

import jax
import jax.numpy as jnp

from jaxsae import sparse, topk


@dataclasses.dataclass(frozen=True)
class Ops:
  """Hashable: closed over by jit."""
  axis: str | None = None        # the mesh axis the latents are split over (None: not split)
  batch_axes: tuple = ()         # the mesh axes the batch is split over (() : not split)
  kernels: str = "xla"           # "xla" | "pallas" (config_check.resolve_kernels)
  dense_op_ratio: int = 0        # kernels_for; 0: the xla path always gathers (knobs.py)
  compute_dtype: type = jnp.float32   # the selection GEMM's (topk.pre_activations)
  encoder_tile: int = 0          # the selection GEMM in column tiles of this many latents; 0 whole

  def kernels_for(self, width: int, n_local: int) -> str:
    """Which primitives the sparse ops over `width` latents per token run: on the xla path, dense
    GEMMs over [B, n_local] codes when n_local <= dense_op_ratio * width (AuxK's k_aux over a
    small dictionary or a short dead list: there one GEMM beats B * width * d gathered elements),
    else the gathers."""
    if self.kernels == "xla" and self.dense_op_ratio and n_local <= self.dense_op_ratio * width:
      return "dense"
    return self.kernels

  def encode_at(self, x, b_pre, w_enc, b_enc, idx):
    """sparse.encode_at: (x - b_pre) . W_enc[idx] + b_enc[idx], [B, K]."""
    kernels = self.kernels_for(idx.shape[1], w_enc.shape[0])
    return sparse.encode_at(x, b_pre, w_enc, b_enc, idx, self.axis, kernels)

  def decode(self, z, idx, w_dec):
    """sparse.decode: sum_j z[b, j] W_dec[idx[b, j]], [B, d_out]."""
    kernels = self.kernels_for(idx.shape[1], w_dec.shape[0])
    return sparse.decode(z, idx, w_dec, self.axis, kernels)

  def select(self, xc, w_enc, b_enc, k: int):
    """topk.select: each row's top-k latents over every latent shard, [B, k] global indices."""
    return topk.select(xc, w_enc, b_enc, k, **self._encoder())

  def select_aux(self, xc, w_enc, b_enc, dead, k_aux: int, listed=None):
    """topk.select_aux: AuxK's top-k among the dead latents (over a dead list if given)."""
    return topk.select_aux(xc, w_enc, b_enc, dead, k_aux, listed=listed, **self._encoder())

  def batch_sum(self, a):
    """a summed over the batch's shards (a per-shard sum in, the global batch's out)."""
    return jax.lax.psum(a, self.batch_axes) if self.batch_axes else a

  def kth_largest(self, values, kth):
    """topk.kth_largest over the global batch's values."""
    return topk.kth_largest(values, kth, self.batch_axes or None)

  def centred_sq_sum(self, x):
    """(sum over the global batch's rows of ||x - mean||^2, the row count)."""
    count = self.batch_sum(jnp.asarray(x.shape[0], jnp.float32))
    mean = self.batch_sum(jnp.sum(x, axis=0)) / count
    return self.batch_sum(jnp.sum(jnp.square(x - mean))), count

  def _encoder(self):
    return dict(axis=self.axis, compute_dtype=self.compute_dtype, tile=self.encoder_tile,
                kernels=self.kernels)
