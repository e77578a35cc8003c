"""Train-step throughput against the machine's own matmul rate and PyTorch peers, in one run.

  python bench/throughput.py                       # d=768 n=32768 k=32 B=4096 (issue 2's config)
  python bench/throughput.py --n=131072 --batch=16384 --compute_dtype=bfloat16   # a GPU config
  python bench/throughput.py --d=64 --n=1024 --k=8 --batch=256 --kernels=xla,pallas  # Pallas on CPU

Prints tokens/s of (a) the encoder GEMM alone, the ceiling: no step can beat its one dense
matmul; (b) jaxsae's sparse train step with no dead latents, and (c) with AuxK active
(10% of latents dead, their b_enc at -1e4 so they stay dead and AuxK runs on every timed step),
once per --kernels path (with --lazy also under train.lazy_optimizer, with --aux_all also with
AuxK over all n instead of over the dead list, train.auxk_compact=False); (d) the same loss by dense
autodiff; and (e) each of --peers (bench/peers.py; default all three, each skipped with a note
when its library is not installed) on the same batch, with no dead latents and with 10% dead (its
AuxK), on --peer_device (auto: CUDA when torch sees a GPU):
  saelens   SAELens's TopKTrainingSAE + SAETrainer.step (bench/saelens_peer.py)
  sparsify  EleutherAI sparsify's SparseCoder + its Trainer's step, optimizer --sparsify_optimizer
            (adam: the same optimizer as jaxsae), AuxK alpha 1/32 (bench/sparsify_peer.py)
  dictlearn dictionary_learning's AutoEncoderTopK + TopKTrainer.update as its trainSAE calls it,
            inputs normalized to unit mean squared norm (bench/dictlearn_peer.py)
Ratios jaxsae / peer compare like with like (no dead with no dead, AuxK with AuxK).

Precision on a GPU: --compute_dtype=bfloat16 runs jaxsae's encoder GEMM in bf16 (weights f32);
SAELens then runs under its own bf16 autocast option (--peer_autocast, default: on exactly when
--compute_dtype=bfloat16 and the peer is on CUDA), and so does dictionary_learning (its trainSAE's
autocast_dtype=bfloat16: batch cast to bf16, update under CUDA autocast, as its demo trains);
sparsify's forward always autocasts to bf16 on
CUDA (its own decorator; its fp32 matmuls outside autocast run as TF32, as its fit() sets), whatever
--compute_dtype says. On CPU every peer runs in float32. Peers get the batch already on their
device, as jaxsae does. A variant that fails (out of memory, a kernel path that is not built for
this backend) is reported as failed and the others are timed.

Timing is interleaved: --rounds rounds, each timing every variant for --steps steps after the
warm-up; the median round per variant is reported, so all variants see the same machine load. jax
variants block on their last step's outputs, torch ones synchronize CUDA before and after.
Before timing it waits (up to --wait_quiet seconds) for the 1-minute load average to drop below
--max_load, and prints the load it ran under. Appends a row to bench/RESULTS.md.

Pallas on CPU runs in interpret mode (the TPU kernels emulated grid step by grid step): its speed
says nothing about a TPU or GPU, so the big config refuses it on CPU unless --allow_interpret.
"""
import datetime
import os
import statistics
import sys
import time

from absl import app, flags

_D = flags.DEFINE_integer("d", 768, "input width")
_N = flags.DEFINE_integer("n", 32768, "latents")
_K = flags.DEFINE_integer("k", 32, "active latents")
_B = flags.DEFINE_integer("batch", 4096, "tokens per step")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps per variant per round (after one warm-up)")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "interleaved rounds; the median round is reported")
_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "encoder GEMM dtype")
_KERNELS = flags.DEFINE_list("kernels", ["xla"], "sparse op paths to time: xla, pallas")
_DENSE = flags.DEFINE_bool("dense", True, "also time the dense-autodiff step")
_LAZY = flags.DEFINE_bool("lazy", False, "also time each jaxsae step with train.lazy_optimizer")
_AUX_ALL = flags.DEFINE_bool("aux_all", False, "also time the AuxK step with "
                             "train.auxk_compact=False (AuxK over all n latents, not the dead list)")
_PEERS = flags.DEFINE_list("peers", ["saelens", "sparsify", "dictlearn"],
                          "PyTorch peers to time beside jaxsae: saelens, sparsify, dictlearn "
                          "('' none)")
_PEER_DEVICE = flags.DEFINE_string("peer_device", "auto", "auto | cpu | cuda")
_PEER_AUTOCAST = flags.DEFINE_bool(
    "peer_autocast", None, "SAELens and dictionary_learning with their bf16 autocast options "
    "(default: on when --compute_dtype=bfloat16 and the peer is on CUDA)")
_SPARSIFY_OPT = flags.DEFINE_enum("sparsify_optimizer", "adam", ["adam", "signum"],
                                  "sparsify's optimizer (its default is signum)")
flags.DEFINE_alias("saelens_device", "peer_device")
flags.DEFINE_alias("saelens_autocast", "peer_autocast")
_ALLOW_INTERPRET = flags.DEFINE_bool("allow_interpret", False,
                                     "time kernels=pallas on CPU (interpret mode) at any size")
_MAX_LOAD = flags.DEFINE_float("max_load", 1.5, "wait for the 1-min load average to drop below")
_WAIT = flags.DEFINE_integer("wait_quiet", 900, "seconds to wait for a quiet machine (0: no wait)")
_RESULTS = flags.DEFINE_string("results", os.path.join(os.path.dirname(__file__), "RESULTS.md"),
                               "markdown file to append to ('' to skip)")


PEAK = "bf16 square matmul (the machine's peak)"


class JaxVariant:
  """A jitted fn whose first result is fed back as its first argument; warm on first use."""

  def __init__(self, fn, carry, *args):
    self.fn, self.carry, self.args, self.warm = fn, carry, args, False

  def __call__(self, steps: int) -> float:
    import jax
    if not self.warm:
      out = self.fn(self.carry, *self.args)
      jax.block_until_ready(out)
      self.carry, self.warm = out[0], True
    t0 = time.perf_counter()
    for _ in range(steps):
      out = self.fn(self.carry, *self.args)
      self.carry = out[0]
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps


class PeerVariant:
  """A PyTorch peer stepping on one device-resident batch; warm on first use."""

  def __init__(self, peer, batch, dead_frac):
    self.peer, self.batch, self.warm = peer, peer.to_device(batch), False
    peer.make_dead(dead_frac)

  def __call__(self, steps: int) -> float:
    if not self.warm:
      self.peer.step(self.batch)
      self.warm = True
    self.peer.sync()
    t0 = time.perf_counter()
    for _ in range(steps):
      self.peer.step(self.batch)
    self.peer.sync()
    return (time.perf_counter() - t0) / steps


def short_error(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:160] if text else ''}".replace("|", "/")


def main(_):
  # On a GPU the peers share the device with jax: let jax take memory as it needs it instead of
  # 75% up front (set before jax is imported; no effect on CPU).
  if [p for p in _PEERS.value if p]:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from configs import base
  from jaxsae import mesh as mesh_lib, model, optim, state as state_lib, step as step_lib
  from jaxsae.ops import Ops

  b, d, n, k = _B.value, _D.value, _N.value, _K.value
  on_cpu = jax.default_backend() == "cpu"
  for kern in _KERNELS.value:
    if kern not in ("xla", "pallas"):
      raise app.UsageError(f"--kernels: {kern!r} is not xla or pallas")
  if "pallas" in _KERNELS.value and on_cpu and not _ALLOW_INTERPRET.value and b * k > 8192:
    raise app.UsageError("kernels=pallas on CPU runs in interpret mode (minutes per step at this "
                         "size, and meaningless as a speed): use a tiny config or "
                         "--allow_interpret")

  c = base.get_config()
  c.sae.d, c.sae.n, c.sae.k = d, n, k
  c.train.batch_size, c.mesh.shape = b, (1, 1)
  c.compute_dtype = _DTYPE.value
  spec = model.SaeSpec.from_config(c)
  mesh = mesh_lib.create_mesh(c.mesh)
  specs = mesh_lib.Specs(mesh, c.mesh)
  tx = optim.make_optimizer(c)
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (b, d), jnp.float32) + 0.5
  cd = step_lib.DTYPES[_DTYPE.value]

  # (a) the ceiling: the encoder GEMM [B, d] x [d, n] alone.
  w = jax.random.normal(key, (n, d), jnp.float32)
  gemm = jax.jit(lambda w, x: (w, jnp.einsum("bd,nd->bn", x.astype(cd), w.astype(cd),
                                             preferred_element_type=jnp.float32).astype(cd)))
  # The machine's own peak: a large square bf16 matmul (MFU below is the step's encoder FLOPs,
  # 2 B d n, against it; the GEMM ceiling above is the same FLOPs at this shape's own rate).
  m = {"gpu": 8192, "cpu": 1024}.get(jax.default_backend(), 4096)
  square = jax.jit(lambda a: (a, a @ a))
  variants = [("encoder GEMM alone (ceiling)", JaxVariant(gemm, w, x)),
              (PEAK, JaxVariant(square, jnp.ones((m, m), jnp.bfloat16)))]

  failed = {}   # variant name -> why it was not timed

  def add(name, make):
    try:
      variants.append((name, make()))
    except Exception as e:  # noqa: BLE001 - reported in the output and the row
      failed[name] = short_error(e)
      print(f"{name}: not timed ({failed[name]})", flush=True)

  # (b, c) jaxsae's step, without and with dead latents (AuxK runs only when some are dead).
  def fresh_state(dead_frac):
    state, shardings = state_lib.create(key, spec, tx, specs, jnp.zeros(d), 1.0)
    dead = jnp.arange(n) < int(dead_frac * n)
    # Dead, and kept dead: a b_enc of -1e4 never wins the top-k, so AuxK (which selects among the
    # dead by pre-activation, at the same cost whatever the values) runs on every timed step.
    params = {**state.params, "b_enc": jnp.where(dead, -1e4, state.params["b_enc"])}
    return state.replace(params=params, since_fired=jnp.where(dead, spec.dead_tokens, 0)), shardings

  def jaxsae_variant(kern, dead_frac, lazy=False, compact=True):
    c.kernels, c.train.lazy_optimizer, c.train.auxk_compact = kern, lazy, compact
    state, shardings = fresh_state(dead_frac)
    return JaxVariant(step_lib.StepFns(c, spec, specs, tx, shardings).train, state, xs)

  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, specs.batch))
  for kern in _KERNELS.value:
    for lazy in (False, True) if _LAZY.value else (False,):
      tags = ([] if kern == "xla" else [f"{kern}{' interpret' if on_cpu else ''}"]) + (
          ["lazy Adam"] if lazy else [])
      suffix = f" [{', '.join(tags)}]" if tags else ""
      add(f"jaxsae sparse step, no dead latents{suffix}", lambda: jaxsae_variant(kern, 0.0, lazy))
      add(f"jaxsae sparse step, AuxK active (k_aux={spec.k_aux}){suffix}",
          lambda: jaxsae_variant(kern, 0.1, lazy))
      if _AUX_ALL.value:
        all_suffix = f" [{', '.join(tags + ['AuxK over all n'])}]"
        add(f"jaxsae sparse step, AuxK active (k_aux={spec.k_aux}){all_suffix}",
            lambda: jaxsae_variant(kern, 0.1, lazy, compact=False))

  # (d) the same loss by dense autodiff through a [B, n] code.
  if _DENSE.value:
    def dense_step(carry, x):
      params, opt_state = carry
      tv, _ = Ops().centred_sq_sum(x)
      dead = jnp.zeros((n,), bool)
      g = jax.grad(model.dense_loss)(params, x, dead, tv, spec)
      upd, opt_state = tx.update(g, opt_state, params)
      return (optim.renormalize_decoder(optax.apply_updates(params, upd)), opt_state),

    def dense_variant():
      params = model.init_params(key, d, n, jnp.zeros(d))
      return JaxVariant(jax.jit(dense_step, donate_argnums=0), (params, tx.init(params)), x)

    add("dense autodiff step", dense_variant)

  # (e) the PyTorch peers on the same batch.
  from bench import peers as peers_lib
  peer_infos, labels = [], []
  xb = np.asarray(x)
  for pname in [p for p in _PEERS.value if p]:
    if pname not in peers_lib.MODULES:
      raise app.UsageError(f"--peers: unknown {pname!r} (expected {sorted(peers_lib.MODULES)})")
    try:
      mod = peers_lib.load(pname)
    except ImportError as e:
      print(f"{pname} not timed: {e}", flush=True)
      continue
    import torch
    dev = _PEER_DEVICE.value
    if dev == "auto":
      dev = "cuda" if torch.cuda.is_available() else "cpu"
    v = mod.versions()
    on_cuda = dev.startswith("cuda")
    hw = (torch.cuda.get_device_name(torch.device(dev)) if on_cuda
          else f"cpu, {v['torch_threads']} threads")
    autocast = _PEER_AUTOCAST.value
    if autocast is None:
      autocast = on_cuda and _DTYPE.value == "bfloat16"
    if pname == "saelens":
      info = f"sae-lens {v['sae_lens']} ({'bf16 autocast' if autocast else 'fp32'})"
      make = lambda: mod.Peer(d, n, k, 1e-4, b, 10 ** 6, 10 ** 6, device=dev, autocast=autocast)
    elif pname == "dictlearn":
      # trainSAE autocasts on CUDA only; the peer runs fp32 on CPU whatever --peer_autocast says.
      info = (f"dictionary_learning {v['dictionary_learning']} "
              f"({'bf16 autocast' if autocast and on_cuda else 'fp32'})")
      norm_factor = mod.unit_norm_factor(xb)
      make = lambda: mod.Peer(d, n, k, 1e-4, b, 10 ** 6, 10 ** 12, norm_factor=norm_factor,
                              device=dev, autocast=autocast)
    else:
      info = (f"sparsify {v['sparsify']} ({_SPARSIFY_OPT.value}, decoder "
              f"{v['sparsify_decoder']}, {'its bf16 autocast' if on_cuda else 'fp32'})")
      make = lambda: mod.Peer(d, n, k, 1e-4, b, 10 ** 6, 10 ** 12, device=dev,
                              optimizer=_SPARSIFY_OPT.value, auxk_alpha=1 / 32)
    peer_infos.append(f"{info}, torch {v['torch']} on {dev} ({hw})")
    labels.append(mod.LABEL)
    for frac, vname in ((0.0, "no dead latents"), (0.1, f"AuxK active (k_aux={d // 2})")):
      add(f"{mod.LABEL} step, {vname}", lambda: PeerVariant(make(), xb, frac))
  peer_info = "; ".join(peer_infos)

  def run_variants(steps):
    out = {}
    for name, v in list(variants):
      try:
        out[name] = v(steps)
      except Exception as e:  # noqa: BLE001 - e.g. out of memory: reported, the rest go on
        failed[name] = short_error(e)
        print(f"{name}: failed ({failed[name]})", flush=True)
        variants[:] = [(nm, vv) for nm, vv in variants if nm != name]
    return out

  # Warm-up (compiles) before waiting for a quiet machine: compiling is not timed.
  run_variants(1)
  if not variants or variants[0][0] != "encoder GEMM alone (ceiling)":
    raise RuntimeError(f"the GEMM ceiling failed: {failed}")
  from bench import quiet
  load0 = quiet.wait_quiet(_MAX_LOAD.value, _WAIT.value)
  times = {name: [] for name, _ in variants}
  for _ in range(_ROUNDS.value):
    for name, t in run_variants(_STEPS.value).items():
      times[name].append(t)
  load1 = os.getloadavg()[0]
  rows = [(name, statistics.median(ts)) for name, ts in times.items() if name not in failed]
  t_gemm = rows[0][1]
  peak = dict(rows).get(PEAK)
  peak = 2 * m ** 3 / peak if peak else float("nan")
  rows = [r for r in rows if r[0] != PEAK]

  device = jax.devices()[0]
  where = f"{device.platform}:{getattr(device, 'device_kind', '')} ({os.cpu_count()} cores)"
  print(f"d={d} n={n} k={k} B={b} compute={_DTYPE.value} kernels={','.join(_KERNELS.value)} on "
        f"{where}, jax {jax.__version__}" + (f"; {peer_info}" if peer_info else ""))
  print(f"load average (1 min) {load0:.2f} before, {load1:.2f} after; median of "
        f"{_ROUNDS.value} interleaved rounds of {_STEPS.value} steps")
  flops = 2 * b * d * n
  print(f"matmul rate: {flops / t_gemm / 1e9:.1f} GFLOP/s ({_DTYPE.value}, this GEMM); peak "
        f"{peak / 1e9:.1f} GFLOP/s (bf16 {m}x{m} square); MFU = 2 B d n / time / peak")
  by_name = dict(rows)

  def peer_of(name, label):
    return (f"{label} step, no dead latents" if "no dead" in name
            else f"{label} step, AuxK active (k_aux={d // 2})")

  ratios = []
  for name, t in rows:
    line = (f"  {name:56s} {t * 1e3:9.1f} ms  {b / t:12,.0f} tok/s  {t_gemm / t:6.1%} of ceiling"
            f"  MFU {flops / t / peak:6.1%}")
    if name.startswith("jaxsae"):
      for label in labels:
        peer_t = by_name.get(peer_of(name, label))
        if peer_t:
          line += f"  {peer_t / t:6.2f}x {label}"
          ratios.append((name, label, peer_t / t))
    print(line)
  for name, why in failed.items():
    print(f"  {name:56s} not timed: {why}")
  if _RESULTS.value:
    cmd = "python bench/throughput.py " + " ".join(sys.argv[1:])
    line = (f"| {datetime.date.today()} | {where} | jax {jax.__version__} | `{cmd.strip()}` | "
            f"d={d} n={n} k={k} B={b} {_DTYPE.value} {','.join(_KERNELS.value)} | "
            f"{flops / t_gemm / 1e9:.1f} GFLOP/s (peak {peak / 1e9:.1f}) | "
            + " | ".join(f"{name}: {b / t:,.0f} tok/s ({t_gemm / t:.0%}, "
                         f"MFU {flops / t / peak:.0%})" for name, t in rows[1:])
            + "".join(f" | {name}: not timed ({why})" for name, why in failed.items())
            + "".join(f" | {name} / {label}: {r:.2f}x" for name, label, r in ratios)
            + (f" | {peer_info}" if peer_info else "") + f" | load {load0:.1f}-{load1:.1f}"
            + " |\n")
    with open(_RESULTS.value, "a") as f:
      f.write(line)


if __name__ == "__main__":
  # Run as a script, bench/ is sys.path[0]: drop it (bench/__init__.py says why), add the root.
  here = os.path.dirname(os.path.abspath(__file__))
  sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
  sys.path.insert(0, os.path.dirname(here))
  app.run(main)
