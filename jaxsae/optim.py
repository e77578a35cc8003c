"""Adam with the recipe's learning-rate scaling, the decoder-norm constraint, and the moments'
storage precision.

Decoder rows live on the unit sphere: before each update the gradient of every W_dec row loses its
component along that row (it would only change the norm), and after the update rows are
renormalized. Both are row-local, so they work unchanged on latent-sharded weights.
"""
import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxsae import model


# The learning rate when train.lr is unset: the best rate measured at a reference shape, carried to
# other shapes by one factor per cause (bench/history.md, eleventh and twelfth sessions, for the
# measurements):
#
#   lr = LR_REFERENCE sqrt(576/d) min(1, sqrt(48/k)) (4096/n)^(1/6)
#        x min(1, (batch/4096 x 225/steps)^(1/3)) x min(1, (0.65 / density)^1.5)
#
# - d: Adam moves every weight by about lr per step, whatever the gradient's scale. A decoder row
#   is a unit vector, its elements ~1/sqrt(d), and learning a feature turns it by O(1): the step
#   scales as 1/sqrt(d).
# - k: a second bound, on the codes. An encoder row moves by ~lr per element too, so a selected
#   latent's pre-activation moves by ~lr d (x scaled to mean squared norm d, elements ~1) against
#   a code of ~sqrt(d/k) (the k codes share |x|^2 = d): a relative jitter of lr sqrt(d k). Both
#   bounds scale as 1/sqrt(d); the decoder's binds at small k, the codes' past a knee K_KNEE,
#   where the rate falls as 1/sqrt(k). Measured at 150 steps (n=4096), as a fraction of each
#   dataset's best rate at k=32: k=16 0.88 and 1.06 (SmolLM2 L25, Gemma 3 L9), k=64 0.92 (L25),
#   k=128 0.59 and 0.57 (L25, Gemma). sqrt(K/k) meets them with the knee at K = 43 (k=128) to
#   54 (k=64): K_KNEE = 48.
# - steps: between two limits. A problem set by gradient noise alone wants the distance over
#   sqrt(steps) (the classic stochastic-approximation rate); one set by how far the weights have
#   travelled (lr x steps: the loss falls as a power of it while the SAE still finds features)
#   wants a rate independent of the length. With both, loss ~ (lr steps)^-a + c lr, the best rate
#   falls as steps^(-a/(1+a)): steps^(-1/3) for a = 1/2. Measured on SmolLM2 L3 at batch 4096:
#   flat up to ~225 steps, then steps^-0.27 to -0.31 (LLM pre-training with Adam measures
#   -0.32: Bjorck et al., ICLR 2025). The old 1/sqrt(steps) left a 5M-token run 2.4% behind.
# - batch: fewer tokens per step, noisier steps, a lower best rate. Measured at 1024 against 4096
#   tokens per step (750 steps): the best rate moved as batch^0.2 to batch^0.33 on three
#   datasets. The rule takes the length's exponent, so the rate depends on batch / steps alone;
#   at a fixed token budget it grows as batch^(2/3) until it meets the ceiling.
# - n: with more latents each is fed fewer tokens per step (batch x k / n), a noisier step again:
#   measured, n 4096 -> 16384 moved the best rate by 0.78x and 0.80x on two datasets: n^(-1/6).
# - The ceiling, LR_REFERENCE: the best rate where the length no longer limits it (L3's at 150
#   steps; the eight best rates at 50 and 150 steps on four real datasets have a geometric mean of
#   ~9.7e-3, two below the swept rates taken as 8e-3, one above as 1.2e-2). Above it a step
#   turns a decoder row by more than lr sqrt(d) ~ 0.23 rad, and short runs degrade fast.
# - density: the data's basis. Adam moves every weight by ~lr in each coordinate alike (it is not
#   rotation-invariant), so a step of an encoder row along an input x moves its pre-activation by
#   lr |x|_1 = lr density sqrt(d) |x|_2, density = E|x_i| / rms(x_i) over the centred elements
#   (stats.element_density, from the init sample). A dense basis, every coordinate alike and
#   Gaussian (isotropic synthetic data), has density sqrt(2/pi) = 0.80; a language model's residual
#   stream, whose variance sits in a few coordinates (SmolLM2-135M L3 and L15: 0.645), less: the
#   same lr is a ~1.2x larger step on the first. The measured rates above are the latter's, so
#   the rate falls where the data is denser than DENSITY_REFERENCE; a sparser basis keeps the
#   ceiling, as the decoder's bound (a row's turn, lr sqrt(d)) is blind to the basis. The step's
#   size alone would give the power 1; measured with the basis alone changed (a random rotation,
#   bench/rotate_acts.py; bench/history.md, nineteenth session), the best rate fell faster:
#   fixture 9.9e-3 -> 6.6e-3 (density 0.646 -> 0.788, a power of 2.0), half its coordinates
#   rotated 8.1e-3 (0.729, 1.7), SmolLM2 L3 7.9e-3 -> 6.2e-3 (0.644 -> 0.775, 1.4). Adam's
#   per-coordinate scaling also preconditions better in a sparse basis (the rotated data's best
#   FVU was 1.6-2.7% worse), which a step-size argument does not see. DENSITY_POWER is near the
#   low end of the measured range. SynthSAEBench-16k (0.785), held out from this, had missed the
#   shapes' rate by 5.4%.
LR_REFERENCE = 9.6e-3
LR_REFERENCE_SHAPE = {"d": 576, "n": 4096, "batch": 4096, "steps": 225}
K_KNEE = 48   # the codes' bound binds past it (above)
DENSITY_REFERENCE = 0.65   # the reference data's element density (above)
DENSITY_POWER = 1.5


def default_lr(d: int, k: int, n: int, batch: int, steps: int,
               density: float = DENSITY_REFERENCE) -> float:
  """The automatic peak rate: see LR_REFERENCE."""
  ref = LR_REFERENCE_SHAPE
  codes = min(1.0, math.sqrt(K_KNEE / k))
  length = min(1.0, (batch / ref["batch"] * ref["steps"] / max(steps, 1)) ** (1 / 3))
  basis = min(1.0, (DENSITY_REFERENCE / density) ** DENSITY_POWER)
  return (LR_REFERENCE * math.sqrt(ref["d"] / d) * codes * (ref["n"] / n) ** (1 / 6) * length
          * basis)


def resolve_lr(config, density: float | None = None) -> tuple[float, str]:
  """(peak learning rate, how it was chosen): train.lr, else default_lr from the shapes and the
  data's element density (None: not measured, as in a dry run: the rate before that factor, the
  most it can be)."""
  t, s = config.train, config.sae
  if t.lr is not None:
    return float(t.lr), "train.lr"
  lr = default_lr(s.d, s.k, s.n, t.batch_size, t.steps,
                  DENSITY_REFERENCE if density is None else density)
  basis = (f"min(1, ({DENSITY_REFERENCE:g}/density)^{DENSITY_POWER:g}), the density measured at "
           "start-up" if density is None
           else f"min(1, ({DENSITY_REFERENCE:g}/density={density:.3f})^{DENSITY_POWER:g})")
  return lr, (
      f"automatic: {LR_REFERENCE:g} x sqrt(576/d={s.d}) x min(1, sqrt({K_KNEE}/k={s.k})) x "
      f"(4096/n={s.n})^(1/6) x "
      f"min(1, (batch={t.batch_size}/4096 x 225/steps={t.steps})^(1/3)) x {basis}")


# train.lazy_optimizer unset. Lazy Adam (below) differs from dense Adam in two ways. (1) A latent
# that stops being selected stops moving; under dense Adam it coasts on its first moment for
# ~1/(1 - b1) = 10 more steps in the direction that was lowering it, further below the top-k: on
# the benchmark datasets that is where the latents that die late in a run die (dead 0.6-1.0% ->
# 0.0-0.2% on the fixture over three seeds, the FVU within 0.2%: bench/history.md, ninth session).
# (2) A latent selected once every T >> 10 steps moves by one Adam step per selection instead of
# the ~10 its momentum spreads over the following steps: a ~10x lower rate for rare latents. Where
# batch x k >= n the average latent is selected every step and (2) touches only the rarest; in a
# dictionary of millions of latents (batch x k / n ~ 0.01) it would slow nearly every latent, so
# dense Adam stays there. bf16 moments have no lazy sweep.
def resolve_lazy(config) -> tuple[bool, str]:
  """(whether the optimizer is lazy, why): train.lazy_optimizer, else the rule above."""
  t, s = config.train, config.sae
  if t.lazy_optimizer is not None:
    return bool(t.lazy_optimizer), "set in the config"
  return automatic_lazy(t.batch_size, s.k, s.n, t.opt_state_dtype)


def automatic_lazy(batch: int, k: int, n: int, opt_state_dtype: str) -> tuple[bool, str]:
  """The rule above: lazy when batch x k >= n, with fp32 moments."""
  if opt_state_dtype != "float32":
    return False, f"automatic: opt_state_dtype={opt_state_dtype} has no lazy sweep"
  pairs = batch * k
  if pairs >= n:
    return True, f"automatic: batch x k = {pairs} >= n = {n}"
  return False, f"automatic: batch x k = {pairs} < n = {n}"


def resolve_warmup(train) -> int:
  """train.warmup_steps, or when it is -1 the automatic warmup: WARMUP_FRAC of the run, at most
  WARMUP_MAX steps."""
  if train.warmup_steps >= 0:
    return int(train.warmup_steps)
  return min(int(round(WARMUP_FRAC * train.steps)), WARMUP_MAX)


# train.warmup_steps=-1: a warmup over 5% of the run. Not the default: Adam's first steps move
# every weight by a full lr (bias correction makes m / sqrt(v) = sign(g)), which a warmup tames,
# but on the fixture at lr 1.2e-2 the 5% warmup cost 2% held-out FVU (bench/history.md).
WARMUP_FRAC = 0.05
WARMUP_MAX = 1000


def schedule_steps(train) -> tuple[int, int]:
  """(warmup steps, decay steps) of the schedule; the decay never reaches into the warmup."""
  warmup = resolve_warmup(train)
  return warmup, min(int(train.steps * train.decay_frac), max(train.steps - warmup, 0))


def rate_shape(train):
  """The schedule's shape, peaking at 1: linear warmup, constant, then linear decay to 0 over
  train.decay_frac of the run (1.0, the default: from the end of warmup to the last step, as
  sparsify). The rate at a step is the peak rate times this."""
  warmup, decay_steps = schedule_steps(train)
  flat = max(train.steps - warmup - decay_steps, 0)
  parts, bounds = [], []
  if warmup:
    parts.append(optax.linear_schedule(0.0, 1.0, warmup))
    bounds.append(warmup)
  parts.append(optax.constant_schedule(1.0))
  if decay_steps:
    bounds.append(warmup + flat)
    parts.append(optax.linear_schedule(1.0, 0.0, decay_steps))
  return optax.join_schedules(parts, bounds) if bounds else parts[0]


def learning_rate(config, density: float | None = None):
  """The schedule: the peak rate (resolve_lr) times rate_shape."""
  peak, shape = resolve_lr(config, density)[0], rate_shape(config.train)
  return lambda count: peak * shape(count)


# b_pre's step, as a fraction of the weights' (train.b_pre_lr_ratio = -1). b_pre centres the
# encoder's input. Its gradient is a mean over every token of the batch: nearly noise-free, so Adam
# moves each of its d coordinates by the full lr in the same direction step after step (a noisy
# weight random-walks), and a shift Delta of b_pre moves latent i's pre-activation by
# -W_enc[i] . Delta: up to |W_enc[i]| sqrt(d) lr per step for the latents whose encoder row lies
# along the drift, while that latent's own bias b_enc[i] can follow by only lr per step. Those
# latents fall below the top-k threshold for good. Scaling b_pre's steps by
# 1 / (encoder_init_norm sqrt(d)) keeps every latent's drift from b_pre within what its bias can
# follow. The encoder rows grow (to ~2 by the end of the benchmark runs), where the same bound would
# allow less; its limit, a frozen b_pre, cost up to 0.7% held-out FVU on the real datasets (4.6% on
# SynthSAEBench-16k), so the init norm it is. Measured (bench/history.md, seventh session): dead
# latents 2.7% -> 0.2% on SmolLM2 L25 and 2.5% -> 0.3% on Gemma 3 L9.
# The output's bias, b_dec, moves no code and steps at the full rate. Until the fourteenth session
# one b_pre did both jobs at this slow rate and could not travel from its init (the geometric
# median) to where the decoder wanted its bias: 3.7% worse held-out FVU on SynthSAEBench-16k at
# 1,024 tokens per step, 0.1-0.7% on the real datasets (bench/history.md, fourteenth session).
def resolve_b_pre_ratio(config) -> tuple[float, str]:
  """(b_pre's learning rate / the weights', how it was chosen)."""
  ratio = config.train.b_pre_lr_ratio
  if ratio != -1:
    return float(ratio), "set in the config"
  s = config.sae
  return 1 / (s.encoder_init_norm * math.sqrt(s.d)), (
      f"automatic: 1 / (encoder_init_norm={s.encoder_init_norm:g} x sqrt(d={s.d}))")


# The decoder's step, as a multiple of the weights' (train.decoder_lr_ratio, 1.5). The rate rule
# above has two bounds, and they belong to different matrices: a unit decoder row turns by
# ~lr sqrt(d) per step, while the codes' jitter, lr sqrt(d k), is set by the encoder's step. One
# shared rate held the decoder to the encoder's limit. Measured at 614k tokens and the automatic
# rate, the decoder's best ratio lay between 1.3 and 2 at every k tried (16, 32, 64, 128 on SmolLM2
# L25 and Gemma 3 L9), 2 costing up to 2.8% at k=128 and 4 worse everywhere but on clean
# synthetic data: 1.5 is the middle, and no worse than 1 at any of them (bench/history.md,
# fifteenth session).
def lr_ratios(config) -> dict:
  """Per-parameter factors on the schedule's rate (the others take 1): what make_optimizer and
  fused_update both apply."""
  return {"b_pre": resolve_b_pre_ratio(config)[0], "W_dec": float(config.train.decoder_lr_ratio)}


def scale_by_learning_rates(peak: float, shape, ratios: dict) -> optax.GradientTransformation:
  """optax.scale_by_learning_rate(peak * shape) with a per-parameter factor (ratios: name -> factor,
  1 for the others); the same state (ScaleByScheduleState), so checkpoints and fused_update keep
  their layout. update() takes the peak as an extra argument, peak_lr (a traced value: the members
  of a sweep stacked in one step each have their own, sweep.py); without it, `peak`."""

  def init(params):
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, *, peak_lr=None, **extra):
    del params, extra
    lr = (peak if peak_lr is None else peak_lr) * shape(state.count)
    updates = {name: -lr * ratios.get(name, 1.0) * u for name, u in updates.items()}
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init, update)


def project_decoder_grads() -> optax.GradientTransformation:
  """Removes from each W_dec row's gradient its component parallel to the row."""

  def update(updates, state, params):
    w, g = params["W_dec"], updates["W_dec"]
    g = g - jnp.sum(g * w, axis=1, keepdims=True) * w
    return {**updates, "W_dec": g}, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


OPT_STATE_DTYPES = ("float32", "bfloat16")


def make_optimizer(config, peak: float | None = None) -> optax.GradientTransformation:
  """peak: the peak rate (None: resolve_lr's without the data's density); the train step passes
  its own to each update (scale_by_learning_rates' peak_lr)."""
  t = config.train
  peak = resolve_lr(config)[0] if peak is None else peak
  rates = scale_by_learning_rates(peak, rate_shape(t), lr_ratios(config))
  if t.opt_state_dtype == "float32":
    adam = optax.chain(optax.scale_by_adam(b1=t.b1, b2=t.b2, eps=t.eps), rates)
  elif t.opt_state_dtype == "bfloat16":
    adam = optax.chain(scale_by_adam_bf16(t.b1, t.b2, t.eps), rates)
  else:
    raise ValueError(f"train.opt_state_dtype={t.opt_state_dtype!r}: expected one of "
                     f"{OPT_STATE_DTYPES}")
  return optax.chain(project_decoder_grads(), adam)


# ---- bf16 moments -----------------------------------------------------------------------------
# Adam's moments are 2/3 of the state (d=4096, n=2^24: 1 TB of the 1.5 TB in fp32); stored in bf16
# they halve. Plain round-to-nearest does not work: bf16 keeps 8 significant bits, so nu * 0.999
# rounds back to nu (a relative change of 1e-3 is under half a bf16 step, 2e-3) and the second
# moment never decays. Stochastic rounding (round up with probability equal to the discarded
# fraction) is unbiased, so the moments follow their fp32 values on average. The update itself is
# computed in fp32 from the stored moments.

def _hash32(x):
  """lowbias32 (C. Wellons): a cheap, well-mixed uint32 -> uint32 hash."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def stochastic_round_bf16(x, salt):
  """f32 -> bf16, rounding the magnitude up with probability (discarded low 16 bits) / 2^16.

  The random bits hash the value, its position and `salt` (the step and the leaf): elementwise,
  so it fuses into the update and needs no RNG state or params-sized buffer of random bits, and
  a sharded array rounds exactly as an unsharded one.
  """
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  pos = jnp.zeros(x.shape, jnp.uint32)   # flat position, wrapping mod 2^32 (fine for hashing)
  for dim, size in enumerate(x.shape):
    pos = pos * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim)
  noise = _hash32(bits ^ _hash32(pos ^ _hash32(salt.astype(jnp.uint32)))) & jnp.uint32(0xFFFF)
  up = (bits + noise) & jnp.uint32(0xFFFF0000)   # a carry into the exponent is the next value
  return jax.lax.bitcast_convert_type(up, jnp.float32).astype(jnp.bfloat16)


def scale_by_adam_bf16(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """optax.scale_by_adam with both moments stored in bf16 (stochastically rounded).

  Its state is an optax.ScaleByAdamState, so optax.tree_map_params (state.py) shards it as fp32
  Adam's.
  """

  def init(params):
    zeros = lambda p: jnp.zeros(p.shape, jnp.bfloat16)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                  mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params))

  def update(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    mu = jax.tree.map(lambda m, g: b1 * m.astype(jnp.float32) + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v.astype(jnp.float32) + (1 - b2) * jnp.square(g),
                      state.nu, updates)
    leaves, tree = jax.tree.flatten(mu)
    salts = [count * 1024 + 2 * i for i in range(len(leaves))]   # distinct per step and leaf
    mu = tree.unflatten([stochastic_round_bf16(m, s) for m, s in zip(leaves, salts)])
    nu = tree.unflatten([stochastic_round_bf16(v, s + 1)
                         for v, s in zip(jax.tree.leaves(nu), salts)])
    # The update reads the stored (rounded) moments: no fp32 moment buffer outlives this line.
    c = count.astype(jnp.float32)
    out = jax.tree.map(lambda m, v: (m.astype(jnp.float32) / (1 - b1 ** c))
                       / (jnp.sqrt(v.astype(jnp.float32) / (1 - b2 ** c)) + eps), mu, nu)
    return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


def renormalize_decoder(params):
  return {**params, "W_dec": model.unit_rows(params["W_dec"])}


# ---- one sweep per weight matrix: kernels=pallas, and train.lazy_optimizer ---------------------
# Lazy Adam (train.lazy_optimizer; like TF's LazyAdam): a step updates only the latent rows it
# selected -- the top-k of some token (all 4k under Multi-TopK) or an AuxK pick of a dead latent --
# in W_enc, W_dec and b_enc, and their Adam moments. Every other latent row keeps its parameters and
# both moments bit for bit: no moment decay, no step carried by momentum. A selected row gets
# exactly the dense update (decoder-gradient projection, Adam with the global step's bias
# correction, renormalization), also when its gradient is zero (selected, ReLU'd to 0). The
# [d] vectors (b_pre, b_dec) are updated densely. The optimizer state is the dense one, so a run
# may switch between the two.

LATENT_PARAMS = ("W_enc", "b_enc", "W_dec")   # one row per latent: what a lazy step may skip


def lazy_chunk_rows(n_local: int, batch: int, k_select: int, model_size: int) -> int:
  """Touched rows the lazy update handles per pass: the (token, latent) pairs a latent shard gets
  on average, batch * k_select / model_size (AuxK adds only dead latents), at most an eighth of the
  shard, rounded up to a multiple of 8. A step makes ceil(touched / chunk) passes, so the chunk
  sets the gathered-row memory (~5 chunk-sized buffers on the xla path, plan.py), not the result.
  (With every row touched, eighths ran faster on CPU than one dense sweep: 106 vs 220 ms at
  n=16384, d=768, and a dense sweep with the untouched rows masked back took 8 [n, d] buffers.)"""
  rows = min(-(-batch * k_select // model_size), -(-n_local // 8))
  return min(n_local, -(-rows // 8) * 8)


def _adam_module(kernels: str):
  """pallas_kernels.fused_adam (TPU flavour; its references are what kernels=xla runs) or
  fused_adam_gpu: hyper, adam_rows, adam_rows_lazy and their references."""
  import pallas_kernels
  if kernels == "pallas" and pallas_kernels.flavor() == "gpu":
    from pallas_kernels import fused_adam_gpu as fused_adam
  else:
    from pallas_kernels import fused_adam
  return fused_adam


def _as_rows(rows_fn, args, h, flags, keep=None):
  """rows_fn on (w, g, mu, nu) viewed as rows (a vector as one element per row: biases have no
  projection); with `keep` [rows] bool, rows where it is False keep their old values."""
  shape = args[0].shape
  view = [a.reshape(shape[0], -1) for a in args]
  new = rows_fn(*view, h, **flags)
  if keep is not None:
    new = [jnp.where(keep[:, None], a, old) for a, old in zip(new, (view[0], *view[2:]))]
  return tuple(a.reshape(shape) for a in new)


def _lazy_rows(rows_fn, args, h, touched, chunk, flags):
  """(w, mu, nu) of the [n_local, d] matrix args = (w, g, mu, nu) with its touched rows updated,
  `chunk` rows a pass: the touched row ids (ascending, padded with n_local) are sliced chunk by
  chunk and rows_fn (adam_rows_lazy or its reference) updates those rows in place."""
  n_local = touched.shape[0]
  passes = -(-n_local // chunk)
  ids = jnp.nonzero(touched, size=passes * chunk, fill_value=n_local)[0].astype(jnp.int32)
  w, g, mu, nu = args

  def one_pass(i, state):
    part = jax.lax.dynamic_slice_in_dim(ids, i * chunk, chunk)
    return rows_fn(state[0], g, state[1], state[2], h, part, **flags)

  used = -(-jnp.sum(touched, dtype=jnp.int32) // chunk)
  return jax.lax.fori_loop(0, used, one_pass, (w, mu, nu))


def fused_update(config, params, grads, opt_state, touched=None, *, kernels="pallas", chunk=0,
                 peak_lr=None):
  """What tx.update + apply_updates + renormalize_decoder do, one sweep per weight matrix: with
  kernels=pallas in Pallas (pallas_kernels/fused_adam.py, or fused_adam_gpu.py for the GPU
  flavour), with kernels=xla in their pure-JAX references. Biases take the same arithmetic in plain
  JAX. Reads and writes make_optimizer's fp32 state (its ScaleByAdamState and
  ScaleByScheduleState). Runs per shard: rows are independent. make_step_optimizer wraps it as
  the step's optimizer.

  touched: None updates every row (dense). A [n_local] bool mask of this shard's latents makes the
  step lazy (see above): the matrices' touched rows are updated `chunk` rows a pass (default: the
  whole shard; step.py passes lazy_chunk_rows), gathered and scattered back on the xla path,
  fetched by DMA or masked loads on the Pallas one; b_enc by a masked select. peak_lr: as in
  scale_by_learning_rates (None: the config's).
  """
  train = config.train
  fa = _adam_module(kernels)
  adam, sched = _find_state(opt_state, optax.ScaleByAdamState), _find_state(
      opt_state, optax.ScaleByScheduleState)
  count = optax.safe_increment(adam.count)
  peak = resolve_lr(config)[0] if peak_lr is None else peak_lr
  lr, ratios = peak * rate_shape(train)(sched.count), lr_ratios(config)
  hyper = lambda name: fa.hyper(lr * ratios.get(name, 1.0), train.b1, train.b2, train.eps, count)
  args = {name: (w, grads[name], adam.mu[name], adam.nu[name]) for name, w in params.items()}
  flags = lambda name: dict(project=name == "W_dec", renorm=name == "W_dec")
  out = {}
  if touched is not None:
    lazy_fn = fa.adam_rows_lazy if kernels == "pallas" else fa.adam_rows_lazy_reference
    chunk = min(chunk or touched.shape[0], touched.shape[0])
    for name in LATENT_PARAMS:   # one matrix at a time: one set of gathered rows is live
      if args[name][0].ndim == 2:
        out[name] = _lazy_rows(lazy_fn, args[name], hyper(name), touched, chunk, flags(name))
  for name, a in args.items():
    if name in out:
      continue
    pallas_sweep = kernels == "pallas" and a[0].ndim == 2
    keep = touched if name in LATENT_PARAMS else None
    out[name] = _as_rows(fa.adam_rows if pallas_sweep else fa.adam_rows_reference, a,
                         hyper(name), flags(name), keep)
  new = {key: {name: out[name][i] for name in params} for i, key in enumerate(("w", "mu", "nu"))}
  return new["w"], _replace_states(opt_state, {
      optax.ScaleByAdamState: optax.ScaleByAdamState(count=count, mu=new["mu"], nu=new["nu"]),
      optax.ScaleByScheduleState: optax.ScaleByScheduleState(
          count=optax.safe_increment(sched.count))})


# fused_update reads and writes make_optimizer's state by the type of its parts, not their position
# in the chain: the state stays the one pytree (and checkpoint layout) whichever update wrote it.
def _is_part(kind):
  return lambda node: isinstance(node, kind)


def _find_state(opt_state, kind):
  """The one `kind` part of an optimizer state (an optax.ScaleByAdamState, ...)."""
  (part,) = [n for n in jax.tree.leaves(opt_state, is_leaf=_is_part(kind)) if isinstance(n, kind)]
  return part


def _replace_states(opt_state, parts: dict):
  """opt_state with its parts of each type in `parts` (type -> new part) replaced."""
  kinds = tuple(parts)
  return jax.tree.map(lambda n: parts[type(n)] if isinstance(n, kinds) else n, opt_state,
                      is_leaf=_is_part(kinds))


@dataclasses.dataclass(frozen=True)
class StepOptimizer:
  """The update the train step runs, optax-style but returning the new parameters (the fused sweep
  writes them directly; params + (new - params) would not round-trip bit for bit). The state is
  make_optimizer's (its init), whichever update runs, so checkpoints are the same:

    update(grads, state, params, touched=None, peak_lr=None) -> (new params, new state)

  touched and peak_lr are as in fused_update (a dense update ignores touched). per_shard: update
  must run on each device's own rows, inside shard_map (Pallas calls are not partitioned by XLA,
  and the lazy sweep works on a shard's own touched rows); otherwise it runs on the global,
  sharded arrays (bf16 moments' stochastic rounding hashes the global position)."""
  update: Callable
  per_shard: bool


def make_step_optimizer(config, tx: optax.GradientTransformation, *, kernels: str,
                        chunk: int = 0) -> StepOptimizer:
  """tx (make_optimizer(config)) as the step applies it: with train.lazy_optimizer or
  kernels=pallas (fp32 moments) as fused_update's one sweep per matrix, `chunk` rows a lazy pass;
  otherwise tx.update, apply_updates and renormalize_decoder."""
  if resolve_lazy(config)[0] or (kernels == "pallas"
                                  and config.train.opt_state_dtype == "float32"):
    def fused(grads, state, params, touched=None, peak_lr=None):
      return fused_update(config, params, grads, state, touched, kernels=kernels, chunk=chunk,
                          peak_lr=peak_lr)
    return StepOptimizer(fused, per_shard=True)

  def dense(grads, state, params, touched=None, peak_lr=None):
    del touched   # every row
    updates, state = tx.update(grads, state, params, peak_lr=peak_lr)
    return renormalize_decoder(optax.apply_updates(params, updates)), state
  return StepOptimizer(dense, per_shard=False)
