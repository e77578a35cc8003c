r"""Scaling sweep: train-step tokens/s and peak memory as n grows and as k grows, jaxsae and peers.

  python bench/scaling.py                      # d=768 B=4096; n = 2^12..2^20 at k=32, k = 8..256 at n=2^15
  python bench/scaling.py --trainers=jaxsae --ns=4096,65536 --ks=32
  python bench/scaling.py --trainers=sparsify  # add EleutherAI sparsify (adam) to the same table

Trainers: jaxsae, saelens, sparsify, dictlearn (the peers of bench/peers.py, stepped as there).

Every point runs in its own process (`--worker`), so its peak resident memory (ru_maxrss from
wait4, which includes the interpreter and the imported framework, ~0.3-0.6 GB) is its own. jaxsae
points also report XLA's compiled-step peak (jaxsae.plan.compiled_peak: arguments + outputs not
donated + temporaries) and the start-up planner's estimate (jaxsae.plan.estimate). Tokens/s is
the median of --steps timed steps after one warm-up (compiling) step, on one fixed random batch,
no dead latents (jaxsae's AuxK branch is compiled but not taken; SAELens skips its AuxK too).

A point is skipped, not run, when its expected peak exceeds --max_mem_gb or the memory the machine
has available (jaxsae: the planner's estimate; SAELens: 8 f32 [B, n] buffers + 6 [n, d] parameter
buffers, which its dense autograd step measured close to). jaxsae runs with the encoder
un-tiled (encoder_tile=0) while that fits, and with encoder_tile=--tile once it does not (marked
in the table). Before each point it waits for the 1-minute load average to drop below --max_load.
Writes bench/scaling.jsonl (rerun: points already there are skipped), bench/scaling.md and
bench/scaling.png.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = flags.DEFINE_bool("worker", False, "internal: time one point and print JSON")
_TRAINER = flags.DEFINE_string("trainer", "jaxsae",
                               "internal (worker): jaxsae | saelens | sparsify | dictlearn")
_N = flags.DEFINE_integer("n", 32768, "internal (worker)")
_K = flags.DEFINE_integer("k", 32, "internal (worker)")
_TILE_USED = flags.DEFINE_integer("encoder_tile", 0, "internal (worker)")

_TRAINERS = flags.DEFINE_list("trainers", ["jaxsae", "saelens"],
                              "jaxsae | saelens | sparsify | dictlearn")
_NS = flags.DEFINE_list("ns", [str(1 << p) for p in range(12, 21)], "n sweep (at --k_for_n)")
_KS = flags.DEFINE_list("ks", ["8", "16", "32", "64", "128", "256"], "k sweep (at --n_for_k)")
_K_FOR_N = flags.DEFINE_integer("k_for_n", 32, "k of the n sweep")
_N_FOR_K = flags.DEFINE_integer("n_for_k", 32768, "n of the k sweep")
_D = flags.DEFINE_integer("d", 768, "input width")
_B = flags.DEFINE_integer("batch", 4096, "tokens per step")
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps per point")
_TILE = flags.DEFINE_integer("tile", 32768, "jaxsae encoder_tile when the un-tiled step won't fit")
_MAX_MEM = flags.DEFINE_float("max_mem_gb", 12.0, "skip points expected to need more (GB)")
_MAX_LOAD = flags.DEFINE_float("max_load", 1.5, "wait for the 1-min load average to drop below")
_WAIT = flags.DEFINE_integer("wait_quiet", 900, "seconds to wait for a quiet machine per point")
_OUT = flags.DEFINE_string("out", os.path.join(ROOT, "bench", "scaling.jsonl"), "JSON lines")
_PNG = flags.DEFINE_string("png", os.path.join(ROOT, "bench", "scaling.png"), "plot ('' skip)")
_TABLE = flags.DEFINE_string("table", os.path.join(ROOT, "bench", "scaling.md"), "table ('' skip)")

GB = 1e9


# ---- worker: one point ------------------------------------------------------------------------

def worker_jaxsae(d, n, k, b, steps, tile) -> dict:
  import jax
  import jax.numpy as jnp
  from configs import base
  from jaxsae import mesh as mesh_lib, model, optim, plan, state as state_lib, step as step_lib
  c = base.get_config()
  c.sae.d, c.sae.n, c.sae.k = d, n, k
  c.train.batch_size, c.mesh.shape, c.encoder_tile = b, (1, 1), tile
  spec = model.SaeSpec.from_config(c)
  mesh = mesh_lib.create_mesh(c.mesh)
  specs = mesh_lib.Specs(mesh, c.mesh)
  tx = optim.make_optimizer(c)
  key = jax.random.PRNGKey(0)
  state, shardings = state_lib.create(key, spec, tx, specs, jnp.zeros(d), 1.0)
  fns = step_lib.StepFns(c, spec, specs, tx, shardings)
  x = jax.device_put(jax.random.normal(key, (b, d), jnp.float32) + 0.5,
                     jax.sharding.NamedSharding(mesh, specs.batch))
  compiled = fns.train.lower(state, x).compile()
  times = []
  for i in range(steps + 1):
    t0 = time.perf_counter()
    state, m, _ = compiled(state, x)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  return {"step_s": sorted(times[1:])[len(times[1:]) // 2],
          "xla_peak_bytes": plan.compiled_peak(compiled),
          "plan_peak_bytes": plan.estimate(plan.Problem.from_config(c), 1, 1).peak,
          "jax": jax.__version__}


def worker_peer(name, d, n, k, b, steps) -> dict:
  import numpy as np
  from bench import peers
  mod = peers.load(name)
  x = (np.random.default_rng(0).standard_normal((b, d)) + 0.5).astype(np.float32)
  if name == "saelens":
    peer = mod.Peer(d, n, k, 1e-4, b, 10 ** 6, 10 ** 6)
  elif name == "dictlearn":   # dense [B, n] codes like SAELens: expected_bytes' default branch
    norm_factor = mod.unit_norm_factor(x)
    peer = mod.Peer(d, n, k, 1e-4, b, 10 ** 6, 10 ** 12, norm_factor=norm_factor)
  else:
    peer = mod.Peer(d, n, k, 1e-4, b, 10 ** 6, 10 ** 12, optimizer="adam", auxk_alpha=1 / 32)
  xb = peer.to_device(x)
  times = []
  for i in range(steps + 1):
    t0 = time.perf_counter()
    peer.step(xb)
    peer.sync()
    times.append(time.perf_counter() - t0)
  return {"step_s": sorted(times[1:])[len(times[1:]) // 2], **mod.versions()}


# ---- driver -----------------------------------------------------------------------------------

def expected_bytes(trainer, d, n, k, b, tile) -> int:
  if trainer == "jaxsae":
    from jaxsae import model, plan
    k_aux = model.resolve_k_aux(-1, d, n)
    return plan.estimate(plan.Problem(d=d, n=n, k=k, batch=b, k_aux=k_aux, encoder_tile=tile),
                         1, 1).peak + int(0.5 * GB)
  if trainer == "sparsify":   # dense only in the encoder's forward ([B, n] pre-acts, ReLU, top-k)
    return 3 * b * n * 4 + 6 * n * d * 4 + int(0.6 * GB)
  return 8 * b * n * 4 + 6 * n * d * 4 + int(0.6 * GB)


def available_bytes() -> int:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  return 1 << 62


def run_point(trainer, sweep, d, n, k, b) -> dict:
  rec = {"trainer": trainer, "sweep": sweep, "d": d, "n": n, "k": k, "batch": b,
         "date": time.strftime("%Y-%m-%d %H:%M")}
  tile = 0
  if trainer == "jaxsae" and expected_bytes(trainer, d, n, k, b, 0) > _MAX_MEM.value * GB:
    tile = _TILE.value
  need = expected_bytes(trainer, d, n, k, b, tile)
  avail = available_bytes()
  rec["encoder_tile"], rec["expected_bytes"] = tile, need
  if trainer == "jaxsae":
    rec["plan_peak_bytes"] = need - int(0.5 * GB)
  if need > _MAX_MEM.value * GB or need > avail - 2 * GB:
    rec["skipped"] = (f"needs ~{need / GB:.1f} GB; budget {_MAX_MEM.value:g} GB, "
                      f"{avail / GB:.1f} GB available")
    return rec
  from bench import quiet
  rec["load_start"] = quiet.wait_quiet(_MAX_LOAD.value, _WAIT.value, indent='  ')
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--trainer={trainer}",
         f"--d={d}", f"--n={n}", f"--k={k}", f"--batch={b}", f"--steps={_STEPS.value}",
         f"--encoder_tile={tile}"]
  with tempfile.TemporaryFile("w+") as fout, tempfile.TemporaryFile("w+") as ferr:
    proc = subprocess.Popen(cmd, stdout=fout, stderr=ferr, text=True, cwd=ROOT)
    # wait4, not wait(): it returns this child's own rusage (ru_maxrss in KiB on Linux).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    fout.seek(0)
    ferr.seek(0)
    out, err = fout.read(), ferr.read()
  rec["load_end"] = os.getloadavg()[0]
  if proc.returncode != 0:
    rec["skipped"] = f"worker failed (exit {proc.returncode}): {err.strip().splitlines()[-1:]}"
    return rec
  rec.update(json.loads(out.strip().splitlines()[-1]))
  rec["peak_rss_bytes"] = usage.ru_maxrss * 1024
  rec["tokens_per_s"] = b / rec["step_s"]
  return rec


def table(records) -> str:
  lines = ["| sweep | trainer | n | k | tok/s | step s | peak RSS | XLA step peak | planner | "
           "encoder tile | load |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  g = lambda r, key: f"{r[key] / GB:.2f} GB" if key in r else "-"
  for r in sorted(records, key=lambda r: (r["sweep"], r["trainer"], r["n"], r["k"])):
    if "skipped" in r:
      lines.append(f"| {r['sweep']} | {r['trainer']} | {r['n']:,} | {r['k']} | - | - | - | - | "
                   f"{g(r, 'plan_peak_bytes')} | "
                   f"{r['encoder_tile'] or '-'} | skipped: {r['skipped']} |")
      continue
    lines.append(f"| {r['sweep']} | {r['trainer']} | {r['n']:,} | {r['k']} | "
                 f"{r['tokens_per_s']:,.0f} | {r['step_s']:.2f} | {g(r, 'peak_rss_bytes')} | "
                 f"{g(r, 'xla_peak_bytes')} | {g(r, 'plan_peak_bytes')} | "
                 f"{r['encoder_tile'] or '-'} | {r['load_start']:.1f}-{r['load_end']:.1f} |")
  return "\n".join(lines) + "\n"


def plot(records, path, d, b):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  style = {"jaxsae": dict(color="tab:blue", marker="o"),
           "saelens": dict(color="tab:red", marker="s"),
           "sparsify": dict(color="tab:green", marker="^"),
           "dictlearn": dict(color="tab:purple", marker="v")}
  names = {"jaxsae": "jaxsae (xla)", "saelens": "SAELens", "sparsify": "sparsify (adam)",
           "dictlearn": "dictionary_learning"}
  for col, (sweep, key, label) in enumerate((("n", "n", "n (latents)"), ("k", "k", "k"))):
    for trainer in style:
      pts = sorted((r for r in records if r["sweep"] == sweep and r["trainer"] == trainer
                    and "skipped" not in r), key=lambda r: r[key])
      if not pts:
        continue
      xs = [r[key] for r in pts]
      name = names[trainer]
      axes[0, col].plot(xs, [r["tokens_per_s"] for r in pts], label=name, **style[trainer])
      axes[1, col].plot(xs, [r["peak_rss_bytes"] / GB for r in pts], label=f"{name}: peak RSS",
                        **style[trainer])
      if trainer == "jaxsae":
        axes[1, col].plot(xs, [r["xla_peak_bytes"] / GB for r in pts], linestyle="--",
                          label="jaxsae: XLA step peak", color="tab:cyan", marker=".")
        for r in pts:
          if r["encoder_tile"]:
            axes[0, col].annotate(f"encoder_tile={r['encoder_tile']}", (r[key], r["tokens_per_s"]),
                                  textcoords="offset points", xytext=(-40, -14), fontsize=7)
    for trainer in style:
      skipped = sorted((r for r in records if r["sweep"] == sweep and r["trainer"] == trainer
                        and "skipped" in r), key=lambda r: r[key])
      for r in skipped:
        axes[0, col].axvline(r[key], color=style[trainer]["color"], alpha=0.15, linewidth=6)
      if trainer == "jaxsae" and skipped:   # what the planner says they would need
        axes[1, col].plot([r[key] for r in skipped], [r["plan_peak_bytes"] / GB for r in skipped],
                          linestyle="none", marker="o", markerfacecolor="none", color="tab:blue",
                          label="jaxsae: planner estimate (not run)")
    for row in (0, 1):
      axes[row, col].set_xscale("log", base=2)
      axes[row, col].set_yscale("log")
      axes[row, col].set_xlabel(label)
      axes[row, col].grid(True, which="both", alpha=0.3)
      axes[row, col].legend(fontsize=8)
    axes[0, col].set_ylabel("train tokens/s")
    axes[1, col].set_ylabel("peak memory (GB)")
  fixed_n = next((r["n"] for r in records if r["sweep"] == "k"), "")
  fixed_k = next((r["k"] for r in records if r["sweep"] == "n"), "")
  axes[0, 0].set_title(f"n sweep (k={fixed_k})")
  axes[0, 1].set_title(f"k sweep (n={fixed_n})")
  fig.suptitle(f"train step, d={d}, batch {b}, CPU ({os.cpu_count()} cores); shaded: not run "
               "(memory)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(_):
  d, b = _D.value, _B.value
  if _WORKER.value:
    if _TRAINER.value == "jaxsae":
      out = worker_jaxsae(d, _N.value, _K.value, b, _STEPS.value, _TILE_USED.value)
    else:
      out = worker_peer(_TRAINER.value, d, _N.value, _K.value, b, _STEPS.value)
    print(json.dumps(out), flush=True)
    return
  done = []
  if os.path.exists(_OUT.value):
    with open(_OUT.value) as f:
      done = [json.loads(line) for line in f if line.strip()]
  have = {(r["trainer"], r["sweep"], r["d"], r["n"], r["k"], r["batch"]) for r in done
          if "skipped" not in r}
  points = [("n", int(n), _K_FOR_N.value) for n in _NS.value] + \
           [("k", _N_FOR_K.value, int(k)) for k in _KS.value]
  for sweep, n, k in points:
    for trainer in _TRAINERS.value:   # back to back at each point: both see the same conditions
      if (trainer, sweep, d, n, k, b) in have:
        continue
      print(f"{sweep} sweep: {trainer} n={n} k={k}", flush=True)
      rec = run_point(trainer, sweep, d, n, k, b)
      print("  " + json.dumps(rec), flush=True)
      done = [r for r in done if (r["trainer"], r["sweep"], r["d"], r["n"], r["k"], r["batch"])
              != (trainer, sweep, d, n, k, b)] + [rec]
      with open(_OUT.value, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in done)
  text = table(done)
  print(text)
  if _TABLE.value:
    with open(_TABLE.value, "w") as f:
      f.write(text)
  if _PNG.value:
    plot(done, _PNG.value, d, b)


if __name__ == "__main__":
  # Run as a script, bench/ is sys.path[0]: drop it (bench/__init__.py says why), add the root.
  sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(
      os.path.abspath(__file__))]
  sys.path.insert(0, ROOT)
  app.run(main)
