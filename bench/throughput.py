"""Train-step throughput against the machine's own matmul rate, measured in the same run.

  python bench/throughput.py                       # d=768 n=32768 k=32 B=4096 (issue 2's config)
  python bench/throughput.py --n=131072 --batch=16384 --compute_dtype=bfloat16   # a GPU config

Prints tokens/s of (a) the encoder GEMM alone, the ceiling: no step can beat its one dense
matmul; (b) jaxsae's sparse train step with no dead latents, and (c) with AuxK active
(10% of latents dead); (d) the same loss by dense autodiff. Appends a row to bench/RESULTS.md.
"""
import datetime
import os
import platform
import sys
import time

from absl import app, flags

_D = flags.DEFINE_integer("d", 768, "input width")
_N = flags.DEFINE_integer("n", 32768, "latents")
_K = flags.DEFINE_integer("k", 32, "active latents")
_B = flags.DEFINE_integer("batch", 4096, "tokens per step")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps per variant (after one warm-up)")
_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "encoder GEMM dtype")
_KERNELS = flags.DEFINE_enum("kernels", "xla", ["xla", "pallas"], "sparse op implementation")
_DENSE = flags.DEFINE_bool("dense", True, "also time the dense-autodiff step")
_RESULTS = flags.DEFINE_string("results", os.path.join(os.path.dirname(__file__), "RESULTS.md"),
                               "markdown file to append to ('' to skip)")


def timed(fn, *args, steps):
  """Seconds per call after one warm-up call; fn must return (carry, ...) fed back as arg 0."""
  import jax
  out = fn(*args)
  jax.block_until_ready(out)
  carry = out[0]
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn(carry, *args[1:])
    carry = out[0]
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps


def main(_):
  import jax
  import jax.numpy as jnp
  import optax
  from configs import base
  from jaxsae import mesh as mesh_lib, model, optim, state as state_lib, step as step_lib

  c = base.get_config()
  c.sae.d, c.sae.n, c.sae.k = _D.value, _N.value, _K.value
  c.train.batch_size, c.mesh.shape = _B.value, (1, 1)
  c.compute_dtype, c.kernels = _DTYPE.value, _KERNELS.value
  spec = model.SaeSpec.from_config(c.sae)
  mesh = mesh_lib.create_mesh(c.mesh)
  specs = mesh_lib.Specs(mesh, c.mesh)
  tx = optim.make_optimizer(c)
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (_B.value, _D.value), jnp.float32) + 0.5
  b, d, n, k = _B.value, _D.value, _N.value, _K.value
  cd = step_lib.DTYPES[_DTYPE.value]

  # (a) the ceiling: the encoder GEMM [B, d] x [d, n] alone.
  w = jax.random.normal(key, (n, d), jnp.float32)
  gemm = jax.jit(lambda w, x: (w, jnp.einsum("bd,nd->bn", x.astype(cd), w.astype(cd),
                                             preferred_element_type=jnp.float32).astype(cd)))
  t_gemm = timed(gemm, w, x, steps=_STEPS.value)
  rows = [("encoder GEMM alone (ceiling)", t_gemm)]

  # (b, c) jaxsae's step, without and with dead latents (AuxK runs only when some are dead).
  def fresh_state(dead_frac):
    state, shardings = state_lib.create(key, spec, tx, specs, jnp.zeros(d), 1.0)
    dead = jnp.arange(n) < int(dead_frac * n)
    return state.replace(since_fired=jnp.where(dead, spec.dead_tokens, 0)), shardings

  state, shardings = fresh_state(0.0)
  fns = step_lib.StepFns(c, spec, specs, tx, shardings)
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, specs.batch))
  # since_fired is reset when latents fire, so AuxK stays active only for the first steps; with
  # dead_tokens above the run length a dead latent stays dead unless it fires.
  rows.append(("jaxsae sparse step, no dead latents", timed(fns.train, state, xs, steps=_STEPS.value)))
  state, _ = fresh_state(0.1)
  rows.append((f"jaxsae sparse step, AuxK active (k_aux={spec.k_aux})",
               timed(fns.train, state, xs, steps=_STEPS.value)))

  # (d) the same loss by dense autodiff through a [B, n] code.
  if _DENSE.value:
    def dense_step(carry, x):
      params, opt_state = carry
      tv, _ = model.centred_sq_sum(x)
      dead = jnp.zeros((n,), bool)
      g = jax.grad(model.dense_loss)(params, x, dead, tv, spec)
      upd, opt_state = tx.update(g, opt_state, params)
      return (optim.renormalize_decoder(optax.apply_updates(params, upd)), opt_state),

    params = model.init_params(key, d, n, jnp.zeros(d))
    dense = jax.jit(dense_step, donate_argnums=0)
    rows.append(("dense autodiff step", timed(dense, (params, tx.init(params)), x,
                                              steps=_STEPS.value)))

  device = jax.devices()[0]
  where = f"{device.platform}:{getattr(device, 'device_kind', '')} ({os.cpu_count()} cores)"
  print(f"d={d} n={n} k={k} B={b} compute={_DTYPE.value} kernels={_KERNELS.value} on {where}, "
        f"jax {jax.__version__}")
  flops = 2 * b * d * n
  print(f"matmul rate: {flops / t_gemm / 1e9:.1f} GFLOP/s ({_DTYPE.value})")
  for name, t in rows:
    print(f"  {name:48s} {t * 1e3:9.1f} ms  {b / t:12,.0f} tok/s  {t_gemm / t:6.1%} of ceiling")
  if _RESULTS.value:
    cmd = "python bench/throughput.py " + " ".join(sys.argv[1:])
    line = (f"| {datetime.date.today()} | {where} | jax {jax.__version__} | `{cmd.strip()}` | "
            f"d={d} n={n} k={k} B={b} {_DTYPE.value} {_KERNELS.value} | "
            f"{flops / t_gemm / 1e9:.1f} GFLOP/s | "
            + " | ".join(f"{name}: {b / t:,.0f} tok/s ({t_gemm / t:.0%})" for name, t in rows[1:])
            + " |\n")
    with open(_RESULTS.value, "a") as f:
      f.write(line)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
