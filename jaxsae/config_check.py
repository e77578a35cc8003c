"""Checks a config before anything is built or compiled; every problem is named by its field."""
import importlib.util
import os
import sys

from jaxsae import model, stats

KERNELS = ("auto", "xla", "pallas")
COMPUTE_DTYPES = ("float32", "bfloat16")
ON_NONFINITE = ("stop", "skip")


# kernels=pallas on a CPU backend runs the kernels in Pallas interpret mode: an emulation, grid step
# by grid step, that checks them against their references but is far slower than kernels=xla. It is
# for tests (tests/conftest.py sets this variable); a run asks for it explicitly or is refused.
PALLAS_INTERPRET_ENV = "JAXSAE_PALLAS_INTERPRET"


class ConfigError(ValueError):
  pass


def _importable(module: str) -> bool:
  """Whether `module` can be imported, without importing it (wandb takes ~1 s to import)."""
  if module in sys.modules:   # None there: imports of it are blocked
    return sys.modules[module] is not None
  return importlib.util.find_spec(module) is not None


def pallas_interpret_allowed() -> bool:
  return os.environ.get(PALLAS_INTERPRET_ENV, "").lower() not in ("", "0", "false")


def _problems(c):
  s, t = c.sae, c.train
  if s.d <= 0:
    yield f"sae.d={s.d} must be positive"
  if s.n <= 0:
    yield f"sae.n={s.n} must be positive"
  if not 0 < s.k <= s.n:
    yield f"sae.k={s.k} must satisfy 0 < k <= sae.n={s.n}"
  if s.multi_topk and 4 * s.k > s.n:
    yield f"sae.multi_topk needs 4 * sae.k={4 * s.k} <= sae.n={s.n}"
  if s.architecture not in model.ARCHITECTURES:
    yield f"sae.architecture={s.architecture!r}: expected one of {model.ARCHITECTURES}"
  elif s.architecture in model.BATCH_ARCHITECTURES:
    if s.multi_topk:
      yield "sae.multi_topk=True is for architecture='topk'; BatchTopK selects per batch"
    if s.architecture == "matryoshka_batchtopk":
      sizes = model.matryoshka_sizes(s)
      if not sizes or any(not 0 < a < b for a, b in zip(sizes, sizes[1:] + (s.n,))):
        yield (f"sae.matryoshka_prefixes={tuple(s.matryoshka_prefixes)}: fractions of sae.n="
               f"{s.n} that are increasing, each of at least one latent and below 1")
    if s.batchtopk_cap < 1 or s.batchtopk_cap * s.k > s.n:
      yield (f"sae.batchtopk_cap={s.batchtopk_cap} must be >= 1 with batchtopk_cap * sae.k <= "
             f"sae.n={s.n}")
  if c.data.target_path:
    if c.data.source != "store":
      yield (f"data.target_path is set (a transcoder) but data.source={c.data.source!r}: "
             f"transcoders read two row-aligned activation stores (data.source='store')")
    if s.d_out < 0:
      yield f"sae.d_out={s.d_out} must be positive (or 0: the input's width sae.d)"
  else:
    if s.d_out not in (0, s.d):
      yield (f"sae.d_out={s.d_out} differs from sae.d={s.d} but data.target_path is unset: "
             f"an autoencoder rebuilds its input; set data.target_path for a transcoder")
    if s.skip:
      yield "sae.skip=True is for transcoders (set data.target_path)"
  if s.k_aux < -1 or s.k_aux > s.n:
    yield f"sae.k_aux={s.k_aux} must be -1 (auto) or within 0..sae.n={s.n}"
  if s.auxk_coef < 0:
    yield f"sae.auxk_coef={s.auxk_coef} must be >= 0"
  if s.auxk_norm not in ("input", "residual"):
    yield f"sae.auxk_norm={s.auxk_norm!r}: expected 'input' or 'residual'"
  if s.dead_tokens <= 0:
    yield f"sae.dead_tokens={s.dead_tokens} must be positive"
  if not s.encoder_init_norm > 0:
    yield f"sae.encoder_init_norm={s.encoder_init_norm} must be positive"
  if t.steps <= 0:
    yield f"train.steps={t.steps} must be positive"
  if t.batch_size <= 0:
    yield f"train.batch_size={t.batch_size} must be positive"
  if t.lr is not None and t.lr <= 0:
    yield f"train.lr={t.lr} must be positive (or unset for the automatic rate)"
  if not (t.b_pre_lr_ratio == -1 or t.b_pre_lr_ratio >= 0):
    yield f"train.b_pre_lr_ratio={t.b_pre_lr_ratio} must be >= 0 (or -1: automatic)"
  if not t.decoder_lr_ratio > 0:
    yield f"train.decoder_lr_ratio={t.decoder_lr_ratio} must be positive"
  if t.log_every <= 0:
    yield f"train.log_every={t.log_every} must be positive"
  if not 0 <= t.decay_frac <= 1:
    yield f"train.decay_frac={t.decay_frac} must lie in [0, 1]"
  if t.warmup_steps < -1:
    yield f"train.warmup_steps={t.warmup_steps} must be >= 0 (or -1: automatic)"
  if t.on_nonfinite not in ON_NONFINITE:
    yield f"train.on_nonfinite={t.on_nonfinite!r}: expected one of {ON_NONFINITE}"
  if t.init_rows <= 0:
    yield f"train.init_rows={t.init_rows} must be positive"
  if c.data.normalize not in stats.NORMALIZE:
    yield f"data.normalize={c.data.normalize!r}: expected one of {stats.NORMALIZE}"
  if c.data.normalize_about not in stats.NORMALIZE_ABOUT:
    yield (f"data.normalize_about={c.data.normalize_about!r}: expected one of "
           f"{stats.NORMALIZE_ABOUT}")
  if c.kernels not in KERNELS:
    yield f"kernels={c.kernels!r}: expected one of {KERNELS}"
  if c.compute_dtype not in COMPUTE_DTYPES:
    yield f"compute_dtype={c.compute_dtype!r}: expected one of {COMPUTE_DTYPES}"
  if t.opt_state_dtype not in ("float32", "bfloat16"):
    yield f"train.opt_state_dtype={t.opt_state_dtype!r}: expected 'float32' or 'bfloat16'"
  if t.lazy_optimizer is True and t.opt_state_dtype != "float32":
    yield (f"train.lazy_optimizer=True needs train.opt_state_dtype='float32' (got "
           f"{t.opt_state_dtype!r}): the lazy sweep reads and writes fp32 moments; stochastically "
           f"rounded bf16 moments are not implemented for it")
  if c.encoder_tile is not None and c.encoder_tile < 0:
    yield f"encoder_tile={c.encoder_tile} must be >= 0 (0: no tiling; unset: automatic)"
  if t.dense_op_ratio is not None and t.dense_op_ratio < 0:
    yield f"train.dense_op_ratio={t.dense_op_ratio} must be >= 0 (0: never dense; unset: automatic)"
  if c.metrics.wandb_project and not _importable("wandb"):
    yield (f"metrics.wandb_project={c.metrics.wandb_project!r} but wandb is not installed: "
           f"pip install -e \".[wandb]\" (or leave metrics.wandb_project empty)")
  if c.checkpoint.every_steps < 0 or c.checkpoint.max_to_keep < 1:
    yield "checkpoint.every_steps must be >= 0 and checkpoint.max_to_keep >= 1"


def _widest_gpu_topk(c) -> int:
  """Latents the GPU top-k kernel would keep per token: sae.k (x4 with multi_topk, x cap with
  batchtopk) or k_aux."""
  s = c.sae
  return max(model.select_width(s.k, s.multi_topk, s.architecture, s.batchtopk_cap),
             model.resolve_k_aux(s.k_aux, s.d, s.n) if s.auxk_coef > 0 else 0)


def resolve_kernels(c) -> tuple[str, str]:
  """The sparse-op path a config runs, "xla" or "pallas", and why (logged, in config.json).

  kernels="auto" picks from the backend, as measured (bench/RESULTS.md, H200, 2026-12-04):
  - GPU: pallas. XLA:GPU's top_k sorts whole [B, n] rows for k=32 and its scatter-add is slow:
    the xla step ran at 55k tokens/s against pallas's 535k (d=768, n=2^17, k=32, B=16384, bf16)
    and needed most of the 141 GB for [B, n] buffers. Unless a top-k is wider than the kernel's
    register list (MAX_K), which only xla can do.
  - TPU: xla. The TPU kernels lower for TPU (tests/test_tpu_lowering.py) but have never been
    timed on one; XLA:TPU's own top-k and scatters are the measured-nowhere-worse choice until then.
  - CPU: xla. The Pallas kernels run there in interpret mode, for tests only.
  """
  if c.kernels != "auto":
    return c.kernels, "set in the config"
  import jax
  backend = jax.default_backend()
  if backend != "gpu":
    return "xla", f"auto on {backend}"
  from pallas_kernels import topk_encoder_gpu
  widest = _widest_gpu_topk(c)
  if widest > topk_encoder_gpu.MAX_K:
    return "xla", (f"auto on gpu: a top-k of {widest} is wider than the Pallas "
                   f"kernel's {topk_encoder_gpu.MAX_K}")
  return "pallas", "auto on gpu"


def _backend_problems(c):
  import jax
  backend = jax.default_backend()
  if c.kernels != "pallas":
    return
  if backend not in ("cpu", "tpu", "gpu"):
    yield (f"kernels=pallas: the Pallas kernels exist for TPU and GPU (CPU runs them in interpret "
           f"mode); there is no {backend} version: use kernels=xla")
    return
  if backend == "cpu" and not pallas_interpret_allowed():
    yield (f"kernels=pallas on CPU would run the Pallas kernels in interpret mode, a slow "
           f"emulation for testing them: use kernels=xla or auto (or set {PALLAS_INTERPRET_ENV}=1 "
           f"to test the kernels)")
    return
  import pallas_kernels
  if pallas_kernels.flavor() == "gpu":
    from pallas_kernels import topk_encoder_gpu
    widest = _widest_gpu_topk(c)
    if widest > topk_encoder_gpu.MAX_K:
      yield (f"kernels=pallas on GPU: the top-k kernel keeps each row's top-k in registers, up to "
             f"k={topk_encoder_gpu.MAX_K}; this config selects {widest} latents per token "
             f"(sae.k, x4 with multi_topk, x batchtopk_cap with batchtopk, or sae.k_aux): use "
             f"kernels=xla or auto")


def validate(config):
  problems = list(_problems(config)) + list(_backend_problems(config))
  if problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
