"""The top-k SAE: parameters, tied init, encode/decode, and the training loss (Gao et al. 2024).

  pre   = (x - b_pre) @ W_enc^T + b_enc          W_enc [n, d], b_enc [n]
  z     = ReLU(top-k(pre))                       k nonzeros per row
  x_hat = z @ W_dec + b_pre                      W_dec [n, d] with unit-norm rows, b_pre [d]

Both matrices are stored [n, d] (row gathers; DESIGN.md 3). `loss_terms` is the sparse training
loss over selected latents; `dense_loss` computes the same loss by dense autodiff and is the
reference the sparse backward is tested against.
"""
import dataclasses

import jax
import jax.numpy as jnp

from jaxsae import sparse, topk


@dataclasses.dataclass(frozen=True)
class SaeSpec:
  """The static shape of the problem, from config.sae (hashable: closed over by jit)."""
  d: int
  n: int
  k: int
  k_aux: int          # 0 disables AuxK
  auxk_coef: float
  dead_tokens: int
  multi_topk: bool
  dense_op_ratio: int = 0   # see ops_for; 0: the xla path always gathers
  auxk_relu: bool = False   # AuxK values through ReLU (the paper) if True; see loss_terms
  auxk_norm: str = "input"  # AuxK divided by the input's or the residual's variance; loss_terms
  encoder_init_norm: float = 1.0   # norm of the encoder rows at init (init_params)

  @classmethod
  def from_config(cls, config):
    sae = config.sae
    k_aux = resolve_k_aux(sae.k_aux, sae.d, sae.n) if sae.auxk_coef > 0 else 0
    return cls(d=sae.d, n=sae.n, k=sae.k, k_aux=k_aux, auxk_coef=float(sae.auxk_coef),
               dead_tokens=int(sae.dead_tokens), multi_topk=bool(sae.multi_topk),
               dense_op_ratio=int(config.train.dense_op_ratio), auxk_relu=bool(sae.auxk_relu),
               auxk_norm=str(sae.auxk_norm), encoder_init_norm=float(sae.encoder_init_norm))

  def ops_for(self, kernels: str, k: int, n_local: int) -> str:
    """Which primitives the sparse ops over k latents per token run: on the xla path, dense GEMMs
    over [B, n_local] codes when n_local <= dense_op_ratio * k (AuxK's k_aux over a small
    dictionary: there one GEMM beats B*k*d gathered elements), else the gathers."""
    if kernels == "xla" and self.dense_op_ratio and n_local <= self.dense_op_ratio * k:
      return "dense"
    return kernels

  @property
  def k_select(self) -> int:
    """Latents selected per token: 4k under Multi-TopK (the top-k are its first k)."""
    return 4 * self.k if self.multi_topk else self.k


def resolve_k_aux(k_aux: int, d: int, n: int) -> int:
  """-1 means the power of two nearest d/2 (ties go down, as OpenAI's default of 256 for d=768)."""
  if k_aux >= 0:
    return k_aux
  lo = 1 << max(0, (d // 2).bit_length() - 1)
  pick = lo if d / 2 - lo <= 2 * lo - d / 2 else 2 * lo
  return min(pick, n)


def unit_rows(w, eps=1e-12):
  return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), eps)


def init_params(key, d: int, n: int, b_pre, encoder_norm: float = 1.0):
  """Tied init: decoder rows random unit vectors, encoder = decoder times encoder_norm (both
  [n, d]), b_enc = 0."""
  w = unit_rows(jax.random.normal(key, (n, d), jnp.float32))
  # Separate buffers: tied only at init, and a donated step must not see one twice.
  return {"W_enc": w * encoder_norm, "b_enc": jnp.zeros((n,), jnp.float32), "W_dec": jnp.copy(w),
          "b_pre": jnp.asarray(b_pre, jnp.float32)}


def encode(params, x, k, compute_dtype=jnp.float32):
  """Inference encode of x [B, d] (already input-scaled): (z values [B, k] >= 0, indices [B, k])."""
  xc = x - params["b_pre"]
  idx, _, _ = topk.select(xc, params["W_enc"], params["b_enc"], k, compute_dtype=compute_dtype)
  vals = sparse.encode_at(x, params["b_pre"], params["W_enc"], params["b_enc"], idx)
  return jax.nn.relu(vals), idx


def decode(params, z, idx):
  return sparse.decode(z, idx, params["W_dec"]) + params["b_pre"]


def loss_terms(params, x, idx, aux_idx, aux_ok, total_var, aux_scale, spec: SaeSpec,
               axis=None, kernels="xla", batch_axes=None, aux_rows=None):
  """Loss of one (local) batch given the selected latents, and its metrics.

  total_var is the summed squared deviation of the *global* batch from its mean, so the losses of
  all data shards add up to the global normalized MSE (FVU). AuxK rebuilds the residual x - x_hat
  (held fixed) from the selected dead latents only; aux_scale = min(dead / k_aux, 1). Its squared
  error is divided by total_var (spec.auxk_norm="input", as EleutherAI's sparsify), or by the
  residual's own centred variance over the global batch ("residual", as OpenAI's reference
  train.py): that makes AuxK 1/FVU times stronger, and keeps it so as the FVU falls. batch_axes:
  the mesh axes the batch is split over, for that variance. aux_rows: this shard's dead list
  (topk.dead_list), when aux_idx are positions in it (topk.select's aux_list): AuxK then works on
  those rows only, as dense GEMMs over the list where it is short (SaeSpec.ops_for).
  Returns (loss, aux) with aux holding per-batch sums and z.
  """
  n_local = params["W_enc"].shape[0]
  ops = lambda width: spec.ops_for(kernels, width, n_local)
  vals = sparse.encode_at(x, params["b_pre"], params["W_enc"], params["b_enc"], idx, axis,
                          ops(idx.shape[1]))
  z = jax.nn.relu(vals)
  k = spec.k
  x_hat = sparse.decode(z[:, :k], idx[:, :k], params["W_dec"], axis, ops(k)) + params["b_pre"]
  sq = jnp.sum(jnp.square(x_hat - x))
  loss = sq / total_var
  if spec.multi_topk:
    x_hat4 = sparse.decode(z, idx, params["W_dec"], axis, ops(idx.shape[1])) + params["b_pre"]
    loss = loss + jnp.sum(jnp.square(x_hat4 - x)) / total_var / 8
  auxk_sq = jnp.zeros((), jnp.float32)
  if aux_idx is not None:
    resid = jax.lax.stop_gradient(x - x_hat)
    w_enc, b_enc, w_dec = params["W_enc"], params["b_enc"], params["W_dec"]
    if aux_rows is not None:   # gradients flow back to the full matrices through the gathers
      w_enc, b_enc, w_dec = (jnp.take(a, aux_rows, axis=0) for a in (w_enc, b_enc, w_dec))
    aux_ops = spec.ops_for(kernels, aux_idx.shape[1], w_enc.shape[0])
    aux_vals = sparse.encode_at(x, params["b_pre"], w_enc, b_enc, aux_idx, axis, aux_ops)
    # With the ReLU, a dead latent whose pre-activations are all negative gets no AuxK gradient
    # and stays dead (seen at high lr: 40% dead, losses/auxk == train/fvu); auxk_relu=False lets
    # AuxK pull its encoder row back toward the residual.
    z_aux = jnp.where(aux_ok, jax.nn.relu(aux_vals) if spec.auxk_relu else aux_vals, 0.0)
    e_hat = sparse.decode(z_aux, aux_idx, w_dec, axis, aux_ops)
    auxk_sq = jnp.sum(jnp.square(e_hat - resid))
    aux_var = centred_sq_sum(resid, batch_axes)[0] if spec.auxk_norm == "residual" else total_var
    loss = loss + spec.auxk_coef * aux_scale * auxk_sq / aux_var
  return loss, {"sq": sq, "auxk_sq": auxk_sq, "z": z[:, :k]}


def dense_loss(params, x, dead, total_var, spec: SaeSpec):
  """The same loss by dense autodiff through lax.top_k and [B, n] codes: the test reference."""
  xc = x - params["b_pre"]
  pre = xc @ params["W_enc"].T + params["b_enc"]
  rows = jnp.arange(x.shape[0])[:, None]

  def dense_code(p, kk):
    v, i = jax.lax.top_k(p, kk)
    return jnp.zeros_like(p).at[rows, i].set(jax.nn.relu(v))

  z = dense_code(pre, spec.k_select)
  zk = dense_code(pre, spec.k)
  x_hat = zk @ params["W_dec"] + params["b_pre"]
  loss = jnp.sum(jnp.square(x_hat - x)) / total_var
  if spec.multi_topk:
    loss += jnp.sum(jnp.square(z @ params["W_dec"] + params["b_pre"] - x)) / total_var / 8
  if spec.k_aux:
    num_dead = jnp.sum(dead)
    masked = jnp.where(dead[None, :], pre, -jnp.inf)
    v, i = jax.lax.top_k(masked, spec.k_aux)
    v_aux = jax.nn.relu(v) if spec.auxk_relu else v
    z_aux = jnp.zeros_like(pre).at[rows, i].add(jnp.where(jnp.isfinite(v), v_aux, 0.0))
    resid = jax.lax.stop_gradient(x - x_hat)
    aux_var = centred_sq_sum(resid)[0] if spec.auxk_norm == "residual" else total_var
    auxk = jnp.sum(jnp.square(z_aux @ params["W_dec"] - resid)) / aux_var
    scale = jnp.minimum(num_dead / spec.k_aux, 1.0)
    loss += jnp.where(num_dead > 0, spec.auxk_coef * scale * auxk, 0.0)
  return loss


def centred_sq_sum(x, axes=None):
  """Sum over rows of ||x - mean||^2, with the sums psum'd over mesh `axes` (global batch)."""
  psum = (lambda a: a) if axes is None else (lambda a: jax.lax.psum(a, axes))
  count = psum(jnp.asarray(x.shape[0], jnp.float32))
  mean = psum(jnp.sum(x, axis=0)) / count
  return psum(jnp.sum(jnp.square(x - mean))), count
