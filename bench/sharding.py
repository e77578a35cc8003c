"""What sharding costs: tokens/s of one config on 1 device vs 8 (fake CPU devices by default), and
the compiled step's collective bytes per step on a (2, 4) mesh beside the analytic minimum.

  python bench/sharding.py                       # d=768, n=32768, k=32, batch 4096, AuxK on
  python bench/sharding.py --steps=5 --batch=8192

On CPU the 8 "devices" share the host's cores, so 8-device tokens/s measures what the sharded
program costs in bookkeeping and collectives, not a speed-up. Collective bytes are the result
sizes of each collective per device, read from the optimized HLO (jaxsae/hlo.py), on a (2, 4) and
a (1, 8) mesh; the AuxK branch runs whenever some latent is dead, the other branch otherwise. Over
more than 2 latent shards the top-k candidates are exchanged (all-to-all) and only the winners
gathered (jaxsae/topk.py); the last table gives the planner's per-step figure for the 16M-latent
config (d=4096, n=2^24, k=64, k_aux=2048, batch 8192 over 64 latent shards) both ways.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

if jax.config.jax_platforms in (None, "", "cpu"):
  jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # noqa: E402
from jaxsae import hlo, mesh as mesh_lib, model, optim, plan, state as state_lib, topk  # noqa: E402
from jaxsae.step import StepFns  # noqa: E402


def config(a, shape):
  c = base.get_config()
  c.sae.d, c.sae.n, c.sae.k = a.d, a.n, a.k
  c.sae.dead_tokens = a.batch if a.auxk else 10**12   # AuxK every step, or never
  c.train.batch_size, c.mesh.shape, c.encoder_tile = a.batch, shape, a.tile
  return c


def tokens_per_sec(a, shape) -> float:
  """Median over a.steps timed steps after one warm-up (compile) step; fixed random batch."""
  c = config(a, shape)
  spec = model.SaeSpec.from_config(c)
  devices = jax.devices()[:int(np.prod(shape))]
  mesh = mesh_lib.create_mesh(c.mesh, devices)
  specs = mesh_lib.Specs(mesh, c.mesh)
  tx = optim.make_optimizer(c)
  rng = np.random.default_rng(0)
  state, shardings = state_lib.create(jax.random.PRNGKey(0), spec, tx, specs,
                                      np.zeros(a.d, np.float32), 1.0)
  steps = StepFns(c, spec, specs, tx, shardings)
  batch = jax.device_put(rng.standard_normal((a.batch, a.d), np.float32),
                         jax.sharding.NamedSharding(mesh, specs.batch))
  state, m, _ = steps.train(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(a.steps):
    t0 = time.perf_counter()
    state, m, _ = steps.train(state, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  assert float(m["losses/auxk"]) > 0 or not a.auxk, "AuxK did not run"
  return a.batch / float(np.median(times))


def collective_bytes(a, shape=(2, 4)):
  c = config(a, shape)
  text = plan.compile_step(c).as_text()
  groups = hlo.by_branch(hlo.collectives(text))
  aux = hlo.last_branch(groups)   # AuxK at full width over all latents
  total = lambda cs: sum(x.bytes for x in cs)
  data, model_size = shape
  b_l, n_l, k_aux = a.batch // data, a.n // model_size, model.SaeSpec.from_config(c).k_aux
  cand = lambda k: topk.candidate_bytes(b_l, k, model_size)   # f32 values + int32 indices
  xhat = b_l * a.d * 4                             # one partial [B_local, d] psum
  grads = (2 * n_l * a.d + n_l + a.d) * 4          # dense gradients, summed over the data axis
  return {
      # "common" runs every step: the main selection's exchanges (latent axis) and the
      # gradients' and sums' psums (batch axes); the AuxK branch adds its own selection's.
      "measured": {"no AuxK": total(groups["common"]) + total(groups["branch_0"]),
                   "AuxK": total(groups["common"]) + total(groups[aux]),
                   "main candidates": total(
                       [x for x in groups["common"] if x.kind in ("all-gather", "all-to-all")]),
                   "AuxK branch": total(groups[aux]),
                   "of which candidates, AuxK": total(
                       [x for x in groups[aux] if x.kind in ("all-gather", "all-to-all")]),
                   "every step (main selection, gradients, sums)": total(groups["common"])},
      "minimum": {"candidates + x_hat psum": cand(a.k) + xhat,
                  "... + AuxK candidates + e_hat psum": cand(a.k) + xhat + cand(k_aux) + xhat,
                  "candidates, top-k + AuxK": cand(a.k) + cand(k_aux),
                  "gradient sum over data": grads},
      "detail": {k: [(x.kind, x.arrays, x.op_name.rsplit("/", 1)[-1]) for x in v]
                 for k, v in groups.items()},
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--d", type=int, default=768)
  ap.add_argument("--n", type=int, default=32768)
  ap.add_argument("--k", type=int, default=32)
  ap.add_argument("--batch", type=int, default=4096)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--tile", type=int, default=0)
  ap.add_argument("--auxk", type=int, default=1, help="1: dead latents every step (AuxK runs)")
  ap.add_argument("--meshes", default="1x1,1x8,2x4,8x1")
  ap.add_argument("--detail", type=int, default=0, help="1: list every collective")
  a = ap.parse_args()
  dev = jax.devices()[0]
  print(f"{len(jax.devices())} x {dev.platform} ({dev.device_kind}), {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__}; d={a.d} n={a.n} k={a.k} batch={a.batch} AuxK={bool(a.auxk)}")
  print("\n| mesh (data, model) | devices | tokens/s |\n|---|---|---|")
  for m in a.meshes.split(","):
    shape = tuple(int(s) for s in m.split("x"))
    print(f"| {shape} | {int(np.prod(shape))} | {tokens_per_sec(a, shape):,.0f} |", flush=True)
  mib = lambda b: f"{b / 2**20:.2f} MiB"
  for shape in ((2, 4), (1, 8)):
    cb = collective_bytes(a, shape)
    how = "exchanged" if topk.exchanges(a.batch // shape[0], shape[1]) else "gathered"
    print(f"\ncollective bytes per step per device, mesh {shape} (candidates {how}):\n")
    print("| measured | bytes | | analytic minimum | bytes |\n|---|---|---|---|---|")
    meas, mins = list(cb["measured"].items()), list(cb["minimum"].items())
    for i in range(max(len(meas), len(mins))):
      l = meas[i] if i < len(meas) else ("", None)
      r = mins[i] if i < len(mins) else ("", None)
      print(f"| {l[0]} | {mib(l[1]) if l[1] is not None else ''} | | {r[0]} | "
            f"{mib(r[1]) if r[1] is not None else ''} |")
    if a.detail:
      print("\ncollectives by group (kind, result arrays, source op):")
      for group, items in cb["detail"].items():
        print(f"  {group}:")
        for item in items:
          print(f"    {item}")
  big = plan.estimate(plan.Problem(d=4096, n=2**24, k=64, batch=8192, k_aux=2048,
                                   encoder_tile=32768), 1, 64)
  print("\nat 16M latents (configs/dict_16m.py: d=4096, k=64, k_aux=2048, batch 8192, mesh (1, 64)),"
        " candidates received per device per step (jaxsae.plan):\n")
  print("| selection | exchanged (now) | gathered from every shard (before) |\n|---|---|---|")
  for name, (now, before) in big.comm.items():
    print(f"| {name} | {plan.fmt_bytes(now)} | {plan.fmt_bytes(before)} |")


if __name__ == "__main__":
  main()
