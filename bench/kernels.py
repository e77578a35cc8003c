"""Each sparse-work kernel against the machine's own ceilings, measured in the same run.

  python bench/kernels.py                                  # d=768 n=131072 k=32 B=16384 (issue 5)
  python bench/kernels.py --d=128 --n=4096 --batch=512     # small, e.g. on CPU

First the two ceilings: memory bandwidth (a large device copy) and the bf16 matmul rate. Then, per
kernel, the XLA path (pallas_kernels' pure-JAX references) and, where this backend runs them, the
Pallas kernels (TPU natively; CPU only with --interpret, which measures Python, not hardware):
time, bytes and FLOPs it must move at least, and the fraction of the ceiling that implies.
Appends a table to bench/RESULTS.md.
"""
import datetime
import os
import sys
import time

from absl import app, flags

_D = flags.DEFINE_integer("d", 768, "input width")
_N = flags.DEFINE_integer("n", 131072, "latents")
_K = flags.DEFINE_integer("k", 32, "active latents per token")
_B = flags.DEFINE_integer("batch", 16384, "tokens")
_REPS = flags.DEFINE_integer("reps", 5, "timed repetitions (after one warm-up)")
_INTERPRET = flags.DEFINE_bool("interpret", False, "on CPU, also time the Pallas kernels in "
                               "interpret mode (slow; use tiny shapes)")
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


def main(_):
  import jax
  import jax.numpy as jnp
  from pallas_kernels import fused_adam, sparse_ops, topk_encoder

  d, n, k, b = _D.value, _N.value, _K.value, _B.value
  backend = jax.default_backend()
  pallas_ok = backend == "tpu" or (backend == "cpu" and _INTERPRET.value)
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  x = jax.random.normal(ks[0], (b, d), jnp.float32)
  w = jax.random.normal(ks[1], (n, d), jnp.float32)
  c = jax.random.normal(ks[2], (b, k), jnp.float32)
  idx = jax.random.randint(ks[3], (b, k), 0, n)
  f32 = 4

  # Ceilings: a copy of a large array (read + write) and a large bf16 matmul.
  big = jnp.ones((max(n * d, 1 << 26),), jnp.float32)
  t_copy = timed(jax.jit(lambda a: a * 1.0), big)
  bandwidth = 2 * big.size * f32 / t_copy
  m = 4096 if backend != "cpu" else 1024
  a16 = jnp.ones((m, m), jnp.bfloat16)
  t_mm = timed(jax.jit(lambda a: a @ a), a16)
  matmul = 2 * m ** 3 / t_mm

  h = fused_adam.hyper(1e-4, 0.9, 0.999, 6.25e-10, 1)
  mu, nu = jnp.zeros_like(w), jnp.zeros_like(w)
  gathered = b * k * d * f32
  cases = [
      # name, xla fn, pallas fn, args, bytes at least, flops, bound
      ("gather_dot [B,k] = x . W[idx]", sparse_ops.gather_dot_reference, sparse_ops.gather_dot,
       (x, w, idx), gathered + b * d * f32 + b * k * f32, 2 * b * k * d, "memory"),
      ("gather_sum [B,d] = sum c W[idx]", sparse_ops.gather_sum_reference, sparse_ops.gather_sum,
       (c, w, idx), gathered + b * d * f32, 2 * b * k * d, "memory"),
      ("scatter_outer [n,d] segment sums", lambda *a: sparse_ops.scatter_outer_reference(*a, n),
       lambda *a: sparse_ops.scatter_outer(*a, n), (c, x, idx),
       n * d * f32 + b * d * f32, 2 * b * k * d, "memory"),
      ("fused Adam sweep over W_dec", lambda *a: fused_adam.adam_rows_reference(
          *a, project=True, renorm=True), lambda *a: fused_adam.adam_rows(
          *a, project=True, renorm=True), (w, w, mu, nu, h), 7 * n * d * f32, 20 * n * d,
       "memory"),
      ("encoder GEMM + top-k (bf16)", lambda *a: topk_encoder.topk_reference(
          *(v.astype(jnp.bfloat16) for v in a[:2]), a[2], k), lambda *a: topk_encoder.topk(
          *a, k, compute_dtype=jnp.bfloat16), (x, w, jnp.zeros((n,))), None, 2 * b * n * d,
       "matmul"),
  ]
  rows = []
  for name, ref, kern, args, nbytes, flops, bound in cases:
    t_xla = timed(jax.jit(ref), *args)
    t_pl = timed(jax.jit(kern), *args) if pallas_ok else None
    best = min(t for t in (t_xla, t_pl) if t is not None)
    frac = (nbytes / best / bandwidth) if bound == "memory" else (flops / best / matmul)
    rows.append((name, t_xla, t_pl, nbytes, flops, bound, frac))

  dev = jax.devices()[0]
  where = f"{dev.platform}:{dev.device_kind}"
  head = (f"{where}, jax {jax.__version__}, d={d} n={n} k={k} B={b}: copy {bandwidth / 1e9:.0f} "
          f"GB/s, bf16 matmul {matmul / 1e12:.2f} TFLOP/s")
  lines = [f"| kernel | XLA ms | Pallas ms | bytes (min) | FLOPs | best vs its ceiling |",
           "|---|---|---|---|---|---|"]
  for name, t_xla, t_pl, nbytes, flops, bound, frac in rows:
    pl_ms = f"{t_pl * 1e3:.2f}" if t_pl is not None else "n/a"
    lines.append(f"| {name} | {t_xla * 1e3:.2f} | {pl_ms} | "
                 f"{f'{nbytes / 1e6:.2f} MB' if nbytes else '-'} | {flops / 1e9:.1f} G | "
                 f"{frac:.0%} of {bound} |")
  print(head)
  print("\n".join(lines))
  if not pallas_ok:
    print(f"(Pallas kernels not timed: they are TPU-style; on {backend} "
          f"{'pass --interpret' if backend == 'cpu' else 'there is no version yet'})")
  if _RESULTS.value:
    cmd = "python bench/kernels.py " + " ".join(sys.argv[1:])
    with open(_RESULTS.value, "a") as f:
      f.write(f"\n### Kernels, {datetime.date.today()}: `{cmd.strip()}`\n\n{head}\n\n"
              + "\n".join(lines) + "\n")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
