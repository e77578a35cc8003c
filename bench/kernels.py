"""Each sparse-work kernel against the machine's own ceilings, measured in the same run.

  python bench/kernels.py                       # d=768 n=131072 k=32; B=4096 and 16384 on GPU,
                                                # B=16384 elsewhere (issue 5)
  python bench/kernels.py --d=128 --n=4096 --batch=512             # small, e.g. on CPU
  python bench/kernels.py --d=64 --n=512 --batch=64 --k_aux=16 --interpret --flavor=gpu --reps=1
                                                # CPU: the GPU kernels in interpret mode
  python bench/kernels.py --topk_sweep --batch=16384   # GPU: the top-k kernel's knobs (below)

First the two ceilings: memory bandwidth (a large device copy) and the bf16 matmul rate. Then, per
kernel, the XLA path (pallas_kernels' pure-JAX references) and the Pallas kernels of this
backend's flavour (pallas_kernels.flavor(): the *_gpu modules, Pallas Triton, on GPU; the TPU ones
on TPU; on CPU only with --interpret, which measures Python, not hardware, and --flavor picks
which): time, bytes and FLOPs it must move at least, and the fraction of the ceiling that the
faster of the two implies. The optimizer sweeps donate their buffers (each repetition feeds the
last one's outputs back), so neither side pays for copies. Appends a table to bench/RESULTS.md.

--topk_sweep times the GPU top-k kernel alone (the step's largest cost on the H200, 26 of 31 ms
at B=16384 on 2026-12-04) over row/column/depth tiles, warps and column splits (SWEEP), for k and
for k_aux, each against the bf16 matmul rate, and checks every configuration's values against the
default one's. Its table picks the kernel's defaults.
"""
import datetime
import functools
import os
import sys
import time

from absl import app, flags

_D = flags.DEFINE_integer("d", 768, "input width")
_N = flags.DEFINE_integer("n", 131072, "latents")
_K = flags.DEFINE_integer("k", 32, "active latents per token")
_K_AUX = flags.DEFINE_integer("k_aux", 256, "AuxK latents per token (0: skip the AuxK top-k)")
_DEAD = flags.DEFINE_float("dead_frac", 0.03, "fraction of dead latents in the AuxK case")
_B = flags.DEFINE_multi_integer("batch", None, "tokens (repeatable); default 4096 and 16384 on "
                                "GPU, 16384 elsewhere")
_REPS = flags.DEFINE_integer("reps", 5, "timed repetitions (after one warm-up)")
_INTERPRET = flags.DEFINE_bool("interpret", False, "on CPU, also time the Pallas kernels in "
                               "interpret mode (slow; use tiny shapes)")
_FLAVOR = flags.DEFINE_enum("flavor", "auto", ["auto", "tpu", "gpu"],
                            "which Pallas kernels (pallas_kernels.FLAVOR)")
_SWEEP = flags.DEFINE_bool("topk_sweep", False, "instead of the table: time the GPU top-k kernel "
                           "(pallas_kernels/topk_encoder_gpu.py) over its tile sizes, warps and "
                           "column splits, for k and k_aux, each checked against the default's "
                           "values")
_SWEEP_BUDGET = flags.DEFINE_float("sweep_budget", 240, "seconds for --topk_sweep: configurations "
                                   "left when it is spent are reported as skipped")
_RESULTS = flags.DEFINE_string("results", os.path.join(os.path.dirname(__file__), "RESULTS.md"),
                               "markdown file to append to ('' to skip)")


def timed(fn, *args):
  import jax
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(_REPS.value):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / _REPS.value


def timed_sweep(fn, w, g, mu, nu, h):
  """fn(w, g, mu, nu, h) -> (w, mu, nu) with w, mu, nu donated: the outputs feed the next call."""
  import jax
  import jax.numpy as jnp
  fn = jax.jit(fn, donate_argnums=(0, 2, 3))
  state = [jnp.copy(a) for a in (w, mu, nu)]
  state = jax.block_until_ready(fn(state[0], g, state[1], state[2], h))
  t0 = time.perf_counter()
  for _ in range(_REPS.value):
    state = fn(state[0], g, state[1], state[2], h)
  jax.block_until_ready(state)
  return (time.perf_counter() - t0) / _REPS.value


def matmul_rate() -> float:
  """bf16 FLOP/s of a large square matmul, measured now: the machine's own peak."""
  import jax
  import jax.numpy as jnp
  m = 8192 if jax.default_backend() == "gpu" else 4096 if jax.default_backend() != "cpu" else 1024
  a16 = jnp.ones((m, m), jnp.bfloat16)
  return 2 * m ** 3 / timed(jax.jit(lambda a: a @ a), a16)


def ceilings(n, d):
  """(bytes/s of a large read + write, bf16 FLOP/s of a large matmul), measured now."""
  import jax
  import jax.numpy as jnp
  big = jnp.ones((max(n * d, 1 << 26),), jnp.float32)
  # Donated, each call's output is the next one's input: no allocation is timed (an undonated
  # `a * 1.0` read 179 GB/s on the H200, whose kernels here moved 2.4 TB/s).
  bump = jax.jit(lambda a: a + 1.0, donate_argnums=0)
  big = jax.block_until_ready(bump(big))
  t0 = time.perf_counter()
  for _ in range(_REPS.value):
    big = bump(big)
  jax.block_until_ready(big)
  t_copy = (time.perf_counter() - t0) / _REPS.value
  return 2 * big.size * 4 / t_copy, matmul_rate()


# --topk_sweep: (row_tile, col_tile, depth_tile, num_warps, col_split); None is the kernel's
# default, which comes first (the values every other configuration is checked against).
SWEEP = [(None, 128, None, None, 8192)] + [
    (tb, tn, bk, warps, split)
    for tb, tn in ((128, 128), (64, 128), (128, 64), (64, 256))
    for bk in (64, 128)
    for warps in (4, 8)
    for split in (8192, 32768)] + [(None, 128, None, None, 131072)]
# A wide list (k_aux=256) already cuts the row tile to 32 (LIST_ELEMS): smaller ones, and splits.
SWEEP_WIDE = [(None, 128, None, None, 8192)] + [
    (tb, tn, None, warps, split)
    for tb, tn in ((16, 128), (32, 64), (32, 128))
    for warps in (4, 8)
    for split in (8192, 32768)]


def topk_sweep(batches, n, d, k, k_aux, tk):
  """Times tk.topk over SWEEP for k and k_aux; returns markdown blocks."""
  import jax
  import jax.numpy as jnp
  matmul = matmul_rate()
  t_end = time.perf_counter() + _SWEEP_BUDGET.value
  blocks = []
  for b in batches:
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(ks[0], (b, d), jnp.float32)
    w = jax.random.normal(ks[1], (n, d), jnp.float32)
    live = jax.random.uniform(ks[2], (n,)) >= _DEAD.value
    for kk, bias in ((k, jnp.zeros((n,))), (k_aux, jnp.where(live, -jnp.inf, 0.0))):
      if not kk:
        continue
      lines = [f"top-{kk}, B={b}, d={d}, n={n}, bf16 (matmul {matmul / 1e12:.0f} TFLOP/s)", "",
               "| row_tile | col_tile | depth_tile | warps | col_split | ms | of matmul |",
               "|---|---|---|---|---|---|---|"]
      want = None
      for tb, tn, bk, warps, split in (SWEEP if kk <= 64 else SWEEP_WIDE):
        conf = f"| {tb or 'auto'} | {tn} | {bk or 'auto'} | {warps or 'auto'} | {split} |"
        if time.perf_counter() > t_end:
          lines.append(f"{conf} skipped (sweep budget) | |")
          continue
        fn = jax.jit(functools.partial(tk.topk, k=kk, compute_dtype=jnp.bfloat16, row_tile=tb,
                                       col_tile=tn, depth_tile=bk, num_warps=warps,
                                       col_split=split))
        try:
          vals = jax.block_until_ready(fn(x, w, bias)[0])
          if want is None:
            want = vals
          elif not bool(jnp.array_equal(vals, want)):
            lines.append(f"{conf} WRONG (values differ from the default's) | |")
            continue
          t = timed(fn, x, w, bias)
        except Exception as e:  # noqa: BLE001 - a configuration Triton refuses is a finding
          lines.append(f"{conf} failed: {str(e).splitlines()[0][:80]} | |")
          continue
        lines.append(f"{conf} {t * 1e3:.2f} | {2 * b * n * d / t / matmul:.0%} |")
      print("\n".join(lines) + "\n")
      blocks.append("\n".join(lines))
  return blocks


def cases(b, n, d, k, k_aux, pallas_mods):
  """(name, xla fn, pallas fn, args, bytes at least, flops, bound, sweep?) per kernel."""
  import jax
  import jax.numpy as jnp
  from pallas_kernels import fused_adam, sparse_ops, topk_encoder
  ops, adam, tk = pallas_mods
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  x = jax.random.normal(ks[0], (b, d), jnp.float32)
  w = jax.random.normal(ks[1], (n, d), jnp.float32)
  c = jax.random.normal(ks[2], (b, k), jnp.float32)
  idx = jax.random.randint(ks[3], (b, k), 0, n)
  f32, gathered = 4, b * k * d * 4
  h = fused_adam.hyper(1e-4, 0.9, 0.999, 6.25e-10, 1)
  mu, nu = jnp.zeros_like(w), jnp.zeros_like(w)
  out = [
      ("gather_dot [B,k] = x . W[idx]", sparse_ops.gather_dot_reference, ops.gather_dot,
       (x, w, idx), gathered + b * d * f32 + b * k * f32, 2 * b * k * d, "memory", False),
      ("gather_sum [B,d] = sum c W[idx]", sparse_ops.gather_sum_reference, ops.gather_sum,
       (c, w, idx), gathered + b * d * f32, 2 * b * k * d, "memory", False),
      ("scatter_outer [n,d] segment sums", lambda *a: sparse_ops.scatter_outer_reference(*a, n),
       lambda *a: ops.scatter_outer(*a, n), (c, x, idx), n * d * f32 + b * d * f32,
       2 * b * k * d, "memory", False),
      ("fused Adam sweep over W_dec", functools.partial(
          fused_adam.adam_rows_reference, project=True, renorm=True), functools.partial(
          adam.adam_rows, project=True, renorm=True), (w, w, mu, nu, h), 7 * n * d * f32,
       20 * n * d, "memory", True),
      (f"encoder GEMM + top-{k} (bf16)", lambda *a: topk_encoder.topk_reference(
          *(v.astype(jnp.bfloat16) for v in a[:2]), a[2], k), lambda *a: tk.topk(
          *a, k, compute_dtype=jnp.bfloat16), (x, w, jnp.zeros((n,))), None, 2 * b * n * d,
       "matmul", False),
  ]
  if k_aux:
    live = jax.random.uniform(ks[4], (n,)) >= _DEAD.value
    aux_bias = jnp.where(live, -jnp.inf, jax.random.normal(ks[5], (n,)))
    out.append((f"AuxK GEMM + top-{k_aux}, {_DEAD.value:.0%} dead (bf16)",
                lambda *a: topk_encoder.topk_reference(
                    *(v.astype(jnp.bfloat16) for v in a[:2]), a[2], k_aux),
                lambda *a: tk.topk(*a, k_aux, compute_dtype=jnp.bfloat16), (x, w, aux_bias),
                None, 2 * b * n * d, "matmul", False))
  return out


def main(_):
  import jax
  import pallas_kernels
  pallas_kernels.FLAVOR = _FLAVOR.value
  flavor = pallas_kernels.flavor()
  if flavor == "gpu":
    from pallas_kernels import fused_adam_gpu as adam, sparse_ops_gpu as ops
    from pallas_kernels import topk_encoder_gpu as tk
  else:
    from pallas_kernels import fused_adam as adam, sparse_ops as ops, topk_encoder as tk

  d, n, k = _D.value, _N.value, _K.value
  k_aux = min(_K_AUX.value, n)
  backend = jax.default_backend()
  batches = _B.value or ([4096, 16384] if backend == "gpu" else [16384])
  pallas_ok = (backend == "cpu" and _INTERPRET.value) or (backend, flavor) in (
      ("tpu", "tpu"), ("gpu", "gpu"))
  dev = jax.devices()[0]
  if _SWEEP.value:
    if not (pallas_ok and flavor == "gpu"):
      raise app.UsageError("--topk_sweep times the GPU top-k kernel: it needs a GPU, or "
                           "--interpret --flavor=gpu on CPU (plumbing only)")
    blocks = topk_sweep(batches, n, d, k, k_aux, tk)
    head = f"{dev.platform}:{dev.device_kind}, jax {jax.__version__}, top-k kernel sweep"
    blocks = [head] + blocks
  else:
    blocks = table(batches, n, d, k, k_aux, (ops, adam, tk), pallas_ok, flavor, backend)
  if _RESULTS.value:
    cmd = "python bench/kernels.py " + " ".join(sys.argv[1:])
    with open(_RESULTS.value, "a") as f:
      f.write(f"\n### Kernels, {datetime.date.today()}: `{cmd.strip()}`\n\n"
              + "\n\n".join(blocks) + "\n")


def table(batches, n, d, k, k_aux, mods, pallas_ok, flavor, backend):
  """The kernels against their ceilings, per batch size: markdown blocks."""
  import jax
  bandwidth, matmul = ceilings(n, d)
  dev = jax.devices()[0]   # for the table's heading
  blocks = []
  for b in batches:
    rows = []
    for name, ref, kern, args, nbytes, flops, bound, sweep in cases(b, n, d, k, k_aux, mods):
      timer = timed_sweep if sweep else lambda f, *a: timed(jax.jit(f), *a)
      t_xla = timer(ref, *args)
      t_pl = timer(kern, *args) if pallas_ok else None
      best = min(t for t in (t_xla, t_pl) if t is not None)
      frac = (nbytes / best / bandwidth) if bound == "memory" else (flops / best / matmul)
      rows.append((name, t_xla, t_pl, nbytes, flops, bound, frac))
    head = (f"{dev.platform}:{dev.device_kind}, jax {jax.__version__}, Pallas flavour {flavor}, "
            f"d={d} n={n} k={k} B={b}: copy {bandwidth / 1e9:.0f} GB/s, bf16 matmul "
            f"{matmul / 1e12:.2f} TFLOP/s")
    lines = ["| kernel | XLA ms | Pallas ms | bytes (min) | FLOPs | best vs its ceiling |",
             "|---|---|---|---|---|---|"]
    for name, t_xla, t_pl, nbytes, flops, bound, frac in rows:
      pl_ms = f"{t_pl * 1e3:.2f}" if t_pl is not None else "n/a"
      lines.append(f"| {name} | {t_xla * 1e3:.2f} | {pl_ms} | "
                   f"{f'{nbytes / 1e6:.2f} MB' if nbytes else '-'} | {flops / 1e9:.1f} G | "
                   f"{frac:.0%} of {bound} |")
    print(head)
    print("\n".join(lines))
    blocks.append(f"{head}\n\n" + "\n".join(lines))
  if not pallas_ok:
    print(f"(Pallas kernels not timed: flavour {flavor} does not run on {backend}"
          f"{'; pass --interpret' if backend == 'cpu' else ''})")
  return blocks


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
