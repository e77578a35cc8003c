"""The top-k SAE: parameters, tied init, encode/decode, and the training loss (Gao et al. 2024).

  pre   = (x - b_pre) @ W_enc^T + b_enc          W_enc [n, d], b_enc [n], b_pre [d]
  z     = ReLU(top-k(pre))                       k nonzeros per row
  x_hat = z @ W_dec + b_dec                      W_dec [n, d] with unit-norm rows, b_dec [d]

b_pre centres the encoder's input and b_dec is the output's bias. Both start at the same point
(the data's geometric median), as the paper's single b_pre, and are exported as one (the
difference folds into b_enc: export.py). They are two parameters because they step at different
rates: a move of b_pre moves every code, so it steps slowly (optim.resolve_b_pre_ratio), while
b_dec moves no code and steps at the full rate.

BatchTopK (sae.architecture="batchtopk", Bussmann et al. 2024) keeps instead the B*k largest
ReLU'd pre-activations of the whole global batch: k per row on average, more on rows that need
them. Sparsely: each row's top cap*k are its candidates (topk.select), and a candidate is kept when
it reaches the batch's B*k-th largest candidate (topk.kth_largest, over every data shard). A row
whose every candidate is kept may have lost some to the cap: such rows are counted
(sparsity/rows_at_cap), never dropped silently. At inference the SAE is a JumpReLU: z = pre where
pre > theta, theta the running average of the training thresholds (TrainState.threshold).

Matryoshka BatchTopK ("matryoshka_batchtopk", Bussmann et al. 2025, Nabeshima 2024) selects as
BatchTopK and trains nested dictionaries: the loss is the mean over the prefixes (the first
sae.matryoshka_prefixes[i] * n latents, and all n) of each prefix's reconstruction error, so the
first latents must rebuild x alone and the later ones add detail (less feature absorption). Each
prefix's reconstruction is the one decode with the pairs of later latents masked to 0.

A transcoder (data.target_path set; Dunefsky et al. 2024) encodes x [B, d] as above and rebuilds a
target y [B, d_out] (e.g. an MLP's output from its input): W_dec is [n, d_out] and the output has its
bias b_dec [d_out] starting at the target's median, plus x W_skip^T with sae.skip (skip
transcoders, Paulo et al. 2025). The losses and AuxK are those of y; an SAE is the case y = x.

Both matrices are stored [n, d] (row gathers; docs/design.md). `loss_terms` is the sparse training
loss over selected latents, the sum of `main_terms` and AuxK's `aux_term` (which the step
differentiates apart); `dense_loss` computes the same loss by dense autodiff and is the reference
the sparse backward is tested against. The sparse terms run their ops through an `ops.Ops`, the
only thing they know of the mesh, the kernels and the precision (default: one device, pure JAX).
"""
import dataclasses

import jax
import jax.numpy as jnp

from jaxsae import topk
from jaxsae.ops import Ops


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
  auxk_relu: bool = False   # AuxK values through ReLU (the paper) if True; see loss_terms
  auxk_norm: str = "input"  # AuxK divided by the input's or the residual's variance; loss_terms
  encoder_init_norm: float = 1.0   # norm of the encoder rows at init (init_params)
  architecture: str = "topk"       # "topk" | "batchtopk" (module docstring)
  batchtopk_cap: int = 4           # batchtopk: candidates per row, in units of k
  threshold_ema_steps: int = 1     # batchtopk: time constant of the inference threshold's average
  prefixes: tuple = ()             # matryoshka: the nested dictionaries' sizes below n
  d_out: int = 0                   # the output's width (0: d, an autoencoder)
  transcoder: bool = False         # rebuilds a target of its own (b_dec; module docstring)
  skip: bool = False               # transcoder with the linear term W_skip

  @classmethod
  def from_config(cls, config):
    sae = config.sae
    k_aux = resolve_k_aux(sae.k_aux, sae.d, sae.n) if sae.auxk_coef > 0 else 0
    return cls(d=sae.d, n=sae.n, k=sae.k, k_aux=k_aux, auxk_coef=float(sae.auxk_coef),
               dead_tokens=int(sae.dead_tokens), multi_topk=bool(sae.multi_topk),
               auxk_relu=bool(sae.auxk_relu),
               auxk_norm=str(sae.auxk_norm), encoder_init_norm=float(sae.encoder_init_norm),
               architecture=str(sae.architecture), batchtopk_cap=int(sae.batchtopk_cap),
               threshold_ema_steps=threshold_ema_steps(config.train.steps),
               prefixes=matryoshka_sizes(sae) if sae.architecture == "matryoshka_batchtopk"
               else (), d_out=int(sae.d_out or sae.d),
               transcoder=bool(config.data.target_path), skip=bool(sae.skip))

  @property
  def k_select(self) -> int:
    return select_width(self.k, self.multi_topk, self.architecture, self.batchtopk_cap)

  @property
  def batchtopk(self) -> bool:
    """Selected per batch (BatchTopK and Matryoshka BatchTopK), a JumpReLU at inference."""
    return self.architecture in BATCH_ARCHITECTURES


ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk")
BATCH_ARCHITECTURES = ("batchtopk", "matryoshka_batchtopk")


def matryoshka_sizes(sae_config) -> tuple:
  """sae.matryoshka_prefixes (fractions of n, increasing, below 1) as latent counts."""
  return tuple(int(round(f * sae_config.n)) for f in sae_config.matryoshka_prefixes)


def select_width(k: int, multi_topk: bool, architecture: str, batchtopk_cap: int) -> int:
  """Latents selected per token: k; 4k under Multi-TopK (the top-k are its first k); cap * k
  candidates under (Matryoshka) BatchTopK."""
  if architecture in BATCH_ARCHITECTURES:
    return batchtopk_cap * k
  return 4 * k if multi_topk else k


def threshold_ema_steps(steps: int) -> int:
  """BatchTopK's inference threshold averages the last ~10% of the run's batch thresholds (at most
  1000 steps, dictionary_learning's 1 - 0.999): long enough to smooth one batch's order
  statistic, short enough to follow the encoder as it settles under the decaying rate."""
  return int(min(1000, max(1, steps // 10)))


def resolve_k_aux(k_aux: int, d: int, n: int) -> int:
  """-1 means the power of two nearest d/2 (ties go down, as OpenAI's default of 256 for d=768)."""
  if k_aux >= 0:
    return k_aux
  lo = 1 << max(0, (d // 2).bit_length() - 1)
  pick = lo if d / 2 - lo <= 2 * lo - d / 2 else 2 * lo
  return min(pick, n)


def unit_rows(w, eps=1e-12):
  return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), eps)


def init_params(key, d: int, n: int, b_pre, encoder_norm: float = 1.0, b_dec=None,
                skip: bool = False):
  """Tied init: decoder rows random unit vectors, encoder = decoder times encoder_norm (both
  [n, d]), b_enc = 0, b_dec = b_pre. A transcoder (b_dec given, [d_out]) has no tie, its input and
  output being different spaces: decoder [n, d_out] and encoder [n, d] rows are drawn apart;
  W_skip starts at 0."""
  if b_dec is None:
    w = unit_rows(jax.random.normal(key, (n, d), jnp.float32))
    b_pre = jnp.asarray(b_pre, jnp.float32)
    # Separate buffers: tied only at init, and a donated step must not see one twice.
    return {"W_enc": w * encoder_norm, "b_enc": jnp.zeros((n,), jnp.float32),
            "W_dec": jnp.copy(w), "b_pre": b_pre, "b_dec": jnp.copy(b_pre)}
  k_enc, k_dec = jax.random.split(key)
  b_dec = jnp.asarray(b_dec, jnp.float32)
  params = {"W_enc": unit_rows(jax.random.normal(k_enc, (n, d), jnp.float32)) * encoder_norm,
            "b_enc": jnp.zeros((n,), jnp.float32),
            "W_dec": unit_rows(jax.random.normal(k_dec, (n, b_dec.shape[0]), jnp.float32)),
            "b_pre": jnp.asarray(b_pre, jnp.float32), "b_dec": b_dec}
  if skip:
    params["W_skip"] = jnp.zeros((b_dec.shape[0], d), jnp.float32)
  return params


def output_base(params, x):
  """What the output holds before any latent: b_dec, plus x W_skip^T for a skip transcoder."""
  if "W_skip" in params:
    return x @ params["W_skip"].T + params["b_dec"]
  return params["b_dec"]


def encode(params, x, k, compute_dtype=jnp.float32):
  """Inference encode of x [B, d] (already input-scaled): (z values [B, k] >= 0, indices [B, k])."""
  ops = Ops(compute_dtype=compute_dtype)
  idx = ops.select(x - params["b_pre"], params["W_enc"], params["b_enc"], k)
  vals = ops.encode_at(x, params["b_pre"], params["W_enc"], params["b_enc"], idx)
  return jax.nn.relu(vals), idx


def batchtopk_codes(vals, k: int, ops: Ops = Ops(), threshold=None):
  """BatchTopK's codes of candidates vals [B, C] (module docstring): (z [B, C], the threshold used,
  rows whose every candidate was kept). threshold None: the global batch's B*k-th largest ReLU'd
  candidate, kept at or above it (training); else the JumpReLU's, kept above it (inference)."""
  relu = jnp.where(vals > 0, vals, 0.0)   # +0.0 where not positive: topk.kth_largest's bits
  if threshold is None:
    rows = ops.batch_sum(jnp.asarray(vals.shape[0], jnp.int32))
    threshold = ops.kth_largest(jax.lax.stop_gradient(relu), rows * k)
    keep = (relu >= threshold) & (relu > 0)
  else:
    keep = vals > threshold
  z = jnp.where(keep, vals, 0.0)
  return z, threshold, jnp.sum(jnp.all(keep, axis=1), dtype=jnp.float32)


def decode(params, z, idx, x=None):
  """The output of codes z at idx; x (the input) is needed by a skip transcoder only."""
  return Ops().decode(z, idx, params["W_dec"]) + output_base(params, x)


def loss_terms(params, x, idx, aux_idx, aux_ok, total_var, aux_scale, spec: SaeSpec,
               ops: Ops = Ops(), aux_rows=None, threshold=None, target=None):
  """Loss of one (local) batch given the selected latents, and its metrics: main_terms plus, with
  aux_idx, aux_term on main_terms' residual. The step differentiates the two apart (the AuxK term
  alone varies with its branch, step.py); their gradients add up to this one's, the residual
  being held fixed.

  target: what is rebuilt, a transcoder's y [B, d_out]; None: x itself (an SAE).
  total_var is the summed squared deviation of the *global* batch's target from its mean, so the
  losses of all data shards add up to the global normalized MSE (FVU); AuxK's own normalization
  (spec.auxk_norm) and aux_rows: aux_term. ops: how the ops run (the mesh axes, the kernels).
  Returns (loss, aux) with aux holding per-batch sums, z and the columns of idx it codes
  (main_terms), and auxk_sq (0 without aux_idx).
  """
  loss, aux = main_terms(params, x, idx, total_var, spec, ops, threshold, target)
  resid = aux.pop("resid")
  auxk_sq = jnp.zeros((), jnp.float32)
  if aux_idx is not None:
    aux_loss, auxk_sq = aux_term(params, x, resid, aux_idx, aux_ok, total_var, aux_scale, spec,
                                 ops, aux_rows)
    loss = loss + aux_loss
  return loss, {**aux, "auxk_sq": auxk_sq}


def main_terms(params, x, idx, total_var, spec: SaeSpec, ops: Ops = Ops(), threshold=None,
               target=None):
  """The loss of the selected latents idx (and its Matryoshka / Multi-TopK terms), without AuxK:
  (loss, aux) with aux holding the sums sq (and BatchTopK's threshold, at_cap), z and the columns
  of idx it codes, and resid, the residual y - y_hat held fixed, which AuxK rebuilds (aux_term).
  BatchTopK (spec.batchtopk): idx are each row's candidates, coded by batchtopk_codes over the
  global batch (threshold None) or with the inference threshold given. Other arguments as
  loss_terms'."""
  vals = ops.encode_at(x, params["b_pre"], params["W_enc"], params["b_enc"], idx)
  extra = {}
  if spec.batchtopk:
    z, extra["threshold"], extra["at_cap"] = batchtopk_codes(vals, spec.k, ops, threshold)
    k = idx.shape[1]
  else:
    z, k = jax.nn.relu(vals), spec.k
  y = x if target is None else target
  base = output_base(params, x)
  y_hat = ops.decode(z[:, :k], idx[:, :k], params["W_dec"]) + base
  sq = jnp.sum(jnp.square(y_hat - y))
  loss = sq / total_var
  if spec.prefixes:   # Matryoshka: the mean of every nested dictionary's error (module docstring)
    for size in spec.prefixes:
      inner = jnp.where(idx[:, :k] < size, z[:, :k], 0.0)
      y_in = ops.decode(inner, idx[:, :k], params["W_dec"]) + base
      loss = loss + jnp.sum(jnp.square(y_in - y)) / total_var
    loss = loss / (len(spec.prefixes) + 1)
  if spec.multi_topk:
    y_hat4 = ops.decode(z, idx, params["W_dec"]) + base
    loss = loss + jnp.sum(jnp.square(y_hat4 - y)) / total_var / 8
  resid = jax.lax.stop_gradient(y - y_hat)
  return loss, {"sq": sq, "z": z[:, :k], "resid": resid, **extra}


def aux_term(params, x, resid, aux_idx, aux_ok, total_var, aux_scale, spec: SaeSpec,
             ops: Ops = Ops(), aux_rows=None):
  """AuxK's term: (its loss, its squared error auxk_sq). It rebuilds the residual resid [B, d_out]
  (main_terms', held fixed: no gradient reaches the main term through it) from the selected dead
  latents aux_idx only (aux_ok: which picks are real); aux_scale = min(dead / k_aux, 1). Its
  squared error is divided by total_var (spec.auxk_norm="input", as EleutherAI's sparsify), or by
  the residual's own centred variance over the global batch ("residual", as OpenAI's reference
  train.py): that makes AuxK 1/FVU times stronger, and keeps it so as the FVU falls. aux_rows: this
  shard's dead list (topk.dead_list), when aux_idx are positions in it (topk.select_aux's
  listed): AuxK then works on those rows only, as dense GEMMs over the list where it is short
  (Ops.kernels_for)."""
  w_enc, b_enc, w_dec = params["W_enc"], params["b_enc"], params["W_dec"]
  if aux_rows is not None:   # gradients flow back to the full matrices through the gathers
    w_enc, b_enc, w_dec = (jnp.take(a, aux_rows, axis=0) for a in (w_enc, b_enc, w_dec))
  aux_vals = ops.encode_at(x, params["b_pre"], w_enc, b_enc, aux_idx)
  # With the ReLU, a dead latent whose pre-activations are all negative gets no AuxK gradient
  # and stays dead (seen at high lr: 40% dead, losses/auxk == train/fvu); auxk_relu=False lets
  # AuxK pull its encoder row back toward the residual.
  z_aux = jnp.where(aux_ok, jax.nn.relu(aux_vals) if spec.auxk_relu else aux_vals, 0.0)
  e_hat = ops.decode(z_aux, aux_idx, w_dec)
  auxk_sq = jnp.sum(jnp.square(e_hat - resid))
  aux_var = ops.centred_sq_sum(resid)[0] if spec.auxk_norm == "residual" else total_var
  return spec.auxk_coef * aux_scale * auxk_sq / aux_var, auxk_sq


def dense_loss(params, x, dead, total_var, spec: SaeSpec, target=None):
  """The same loss by dense autodiff through lax.top_k and [B, n] codes: the test reference."""
  y = x if target is None else target
  base = output_base(params, x)
  xc = x - params["b_pre"]
  pre = xc @ params["W_enc"].T + params["b_enc"]
  rows = jnp.arange(x.shape[0])[:, None]

  def dense_code(p, kk):
    v, i = jax.lax.top_k(p, kk)
    return jnp.zeros_like(p).at[rows, i].set(jax.nn.relu(v))

  z = dense_code(pre, spec.k_select)
  zk = dense_code(pre, spec.k)
  if spec.batchtopk:   # the B*k largest ReLU'd pre-activations of the whole batch, no cap
    relu = jax.nn.relu(pre)
    kth = jax.lax.top_k(relu.reshape(-1), x.shape[0] * spec.k)[0][-1]
    zk = jnp.where((relu >= kth) & (relu > 0), relu, 0.0)
  y_hat = zk @ params["W_dec"] + base
  loss = jnp.sum(jnp.square(y_hat - y)) / total_var
  if spec.prefixes:   # each nested dictionary on its own: the first `size` latents
    for size in spec.prefixes:
      y_in = zk[:, :size] @ params["W_dec"][:size] + base
      loss += jnp.sum(jnp.square(y_in - y)) / total_var
    loss /= len(spec.prefixes) + 1
  if spec.multi_topk:
    loss += jnp.sum(jnp.square(z @ params["W_dec"] + base - y)) / total_var / 8
  if spec.k_aux:
    num_dead = jnp.sum(dead)
    masked = jnp.where(dead[None, :], pre, -jnp.inf)
    v, i = jax.lax.top_k(masked, spec.k_aux)
    v_aux = jax.nn.relu(v) if spec.auxk_relu else v
    z_aux = jnp.zeros_like(pre).at[rows, i].add(jnp.where(jnp.isfinite(v), v_aux, 0.0))
    resid = jax.lax.stop_gradient(y - y_hat)
    aux_var = Ops().centred_sq_sum(resid)[0] if spec.auxk_norm == "residual" else total_var
    auxk = jnp.sum(jnp.square(z_aux @ params["W_dec"] - resid)) / aux_var
    scale = jnp.minimum(num_dead / spec.k_aux, 1.0)
    loss += jnp.where(num_dead > 0, spec.auxk_coef * scale * auxk, 0.0)
  return loss

