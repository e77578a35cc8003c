"""Per-device memory of a training step, worked out before anything is allocated.

  python -m jaxsae.plan --d=4096 --n=16777216 --k=64 --batch=8192 --devices=64 \
      --device-memory=95GiB [--optimizer-state=bf16] [--mesh=1x64] [--encoder-tile=65536]
      [--lazy-optimizer]

prints what each device holds (params, optimizer state, gradients, activations) and a verdict: fits,
or the smallest (data, model) mesh that would; exit status 0 when it fits, 1 when it does not. The
training job runs the same check at start-up (`check`) and refuses with the same table instead of
dying of out-of-memory at step 0.

The model (per device; n_l = n / model, B_l = batch / data, P = one f32 [n_l, d] weight shard):
  state       params (W_enc, W_dec, b_enc, b_pre, b_dec) + Adam's two moments + dead-latent counters
  gradients   dense f32 gradients of the params
  then the largest of three phases, which are never live together:
  update      the optimizer pass's f32 temporaries: 5 P; with train.lazy_optimizer, 5 buffers of
              the rows it gathers per pass ([chunk, d], optim.lazy_chunk_rows)
  activations the larger of selection: pre [B_l, n_l] (or a [B_l, tile] tile of the blocked
              encoder, double-buffered; AuxK selects after the main selection, on its own pre),
              plus the gathered top-k candidates; and the sparse ops: 2 gathered-row buffers
              [B_l, c, d] (c: the chunk of pallas_kernels/sparse_ops.py)
  reduction   the gradients once more: their psum over the batch axes writes new buffers (on XLA:CPU
              even over one device). Under the dense update it never sets the peak; under the
              lazy one it usually does.
The constants (5 P, 5 chunks, 2 buffers) come from XLA:CPU's compiled buffer assignment of the real
step (tests/test_plan.py holds the planner to the compiled figure); other backends may pack tighter.
"""
import argparse
import dataclasses
import math
import os
import re
import sys

import jax
import jax.numpy as jnp

from jaxsae import mesh as mesh_lib
from jaxsae import config_check, knobs, model, optim, topk
from jaxsae import state as state_lib

UPDATE_TEMPS = 5       # f32 [n_l, d] buffers the optimizer pass holds besides the gradients
LAZY_TEMPS = 5         # f32 [chunk, d] buffers of the lazy optimizer's gathered rows
SPARSE_BUFFERS = 2     # gathered-row buffers live at once in the sparse ops
GATHER_ELEMS = 1 << 25  # = pallas_kernels.sparse_ops.MAX_GATHER_ELEMS (tests check), the bound on
                        # one gathered-row buffer (not imported: the planner should not load Pallas)
OPT_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2}
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}


class PlanError(mesh_lib.MeshError):
  """The run does not fit the devices; the message holds the plan table."""


def parse_bytes(text) -> int:
  """'95GiB', '80GB', '1.5TiB', '12345' -> bytes."""
  m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
  if not m or m.group(2).lower() not in _UNITS:
    raise ValueError(f"{text!r} is not a memory size (examples: 95GiB, 80GB, 1.5TiB)")
  return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(b: float) -> str:
  for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if b >= size:
      return f"{b / size:.2f} {unit}"
  return f"{int(b)} B"


@dataclasses.dataclass(frozen=True)
class Problem:
  """What sets the memory of a step (one config, any mesh)."""
  d: int
  n: int
  k: int
  batch: int
  k_aux: int = 0              # 0: no AuxK
  multi_topk: bool = False
  k_select: int = 0           # latents selected per row (model.select_width); 0: k, 4k multi-topk
  opt_state: str = "float32"  # Adam moment dtype
  encoder_tile: int = 0
  dense_op_ratio: int = 0     # ops.Ops.kernels_for: dense [B, n_local] codes for wide ops
  lazy_optimizer: bool = False  # train.lazy_optimizer: the update gathers chunks of rows
  # The parameters' elements: per latent row (split over the latent axis) and the rest
  # (replicated); 0: an SAE's, 2d + 1 and 2d. from_config takes them from model.init_params.
  row_elems: int = 0
  shared_elems: int = 0

  @property
  def selected(self) -> int:
    """Latents selected per row."""
    return self.k_select or model.select_width(self.k, self.multi_topk, "topk", 1)

  def weights(self, n_local: int) -> int:
    """Parameter elements on a device holding n_local latents."""
    return (self.row_elems or 2 * self.d + 1) * n_local + (self.shared_elems or 2 * self.d)

  @classmethod
  def from_config(cls, config, encoder_tile: int | None = None):
    """The problem of a config; encoder_tile: the tile resolved for its mesh (check passes
    resolve_encoder_tile's), else encoder_tile as set (unset: un-tiled)."""
    spec = model.SaeSpec.from_config(config)
    row_elems, shared_elems = param_elems(spec)
    if encoder_tile is None:
      encoder_tile = config.encoder_tile or 0
    xla = config_check.resolve_kernels(config)[0] == "xla"
    ratio = knobs.dense_op_ratio(config)[0] if xla else 0
    # A transcoder's parameters are counted as init_params makes them; its activations are
    # planned as an SAE's of its wider side (d = max(d, d_out)).
    return cls(d=max(spec.d, spec.d_out), n=spec.n, k=spec.k, batch=config.train.batch_size,
               k_aux=spec.k_aux,
               multi_topk=spec.multi_topk, k_select=spec.k_select,
               opt_state=config.train.opt_state_dtype,
               encoder_tile=encoder_tile, dense_op_ratio=ratio,
               lazy_optimizer=optim.resolve_lazy(config)[0],
               row_elems=row_elems, shared_elems=shared_elems)


def param_elems(spec) -> tuple[int, int]:
  """(elements per latent row, other elements) of the parameters model.init_params makes for
  spec, by their shapes alone (jax.eval_shape: nothing is allocated). The latent parameters
  (optim.LATENT_PARAMS, split over the latent axis: mesh.py) have one row per latent; the others
  are replicated."""
  target = state_lib.zero_target(spec)   # a transcoder's (b_dec, scale) stand-in, as state.py's
  b_dec = target[0] if target else None
  shapes = jax.eval_shape(lambda key: model.init_params(
      key, spec.d, spec.n, jnp.zeros(spec.d), b_dec=b_dec, skip=spec.skip), jax.random.key(0))
  row = sum(a.size for name, a in shapes.items() if name in optim.LATENT_PARAMS) // spec.n
  shared = sum(a.size for name, a in shapes.items() if name not in optim.LATENT_PARAMS)
  return row, shared


@dataclasses.dataclass
class Plan:
  problem: Problem
  data: int
  model: int
  rows: dict        # name -> bytes per device
  peak: int
  # name -> (bytes received per step per device, the same if every shard's were gathered)
  comm: dict = dataclasses.field(default_factory=dict)

  @property
  def devices(self) -> int:
    return self.data * self.model


def estimate(p: Problem, data: int, model_size: int) -> Plan:
  """Per-device bytes of one train step of problem p on a (data, model) mesh."""
  n_l, b_l = -(-p.n // model_size), -(-p.batch // data)
  weights = p.weights(n_l)
  k_sel = p.selected
  cols = n_l if not p.encoder_tile or p.encoder_tile >= n_l \
      else min(n_l, max(p.encoder_tile, k_sel, p.k_aux))
  pre_copies = 2 if cols < n_l else 1   # the scan's buffers (AuxK masks the bias, not pre)
  # The selections' f32 values + int32 indices: every shard's, gathered (<= 2 shards), or this
  # shard's, those exchanged and the gathered winners (topk._global_top_k).
  copies = 3 if topk.exchanges(b_l, model_size) else model_size
  candidates = b_l * (k_sel + p.k_aux) * copies * 8
  widest = max(k_sel, p.k_aux)
  # Dense-path ops (ops.Ops.kernels_for) hold the [B, n_local] codes, a GEMM result and their
  # gradient.
  dense_ops = 3 * b_l * n_l * 4 if p.dense_op_ratio and n_l <= p.dense_op_ratio * widest else 0
  update_rows = optim.lazy_chunk_rows(n_l, p.batch, k_sel, model_size) if p.lazy_optimizer else 0
  rows = {
      "params": weights * 4,
      "optimizer state": 2 * weights * OPT_BYTES[p.opt_state],
      "dead-latent counters": n_l * 4,
      "gradients": weights * 4,
      "update temporaries": (LAZY_TEMPS * update_rows if update_rows else UPDATE_TEMPS * n_l)
                            * p.d * 4,
      "activations": max(pre_copies * b_l * cols * 4 + candidates,
                         SPARSE_BUFFERS * b_l * _chunk(b_l, widest, p.d) * p.d * 4, dense_ops),
  }
  state = rows["params"] + rows["optimizer state"] + rows["dead-latent counters"]
  peak = state + rows["gradients"] + max(rows["update temporaries"], rows["activations"],
                                         rows["gradients"])
  gathered = lambda k: b_l * k * model_size * 8 if model_size > 1 else 0
  comm = {"top-k candidates": (topk.candidate_bytes(b_l, k_sel, model_size), gathered(k_sel))}
  if p.k_aux:   # AuxK at its full width: steps with few dead latents run narrower (aux_sizes)
    comm["AuxK candidates"] = (topk.candidate_bytes(b_l, p.k_aux, model_size), gathered(p.k_aux))
  return Plan(p, data, model_size, rows, peak, comm)


def _chunk(b: int, k: int, d: int) -> int:
  """Selected latents per gathered-row buffer, as pallas_kernels/sparse_ops.py chunks them."""
  c = max(1, GATHER_ELEMS // max(1, b * d))
  while k % c:
    c -= 1
  return c


def _divisors(x: int) -> list[int]:
  small = [i for i in range(1, math.isqrt(x) + 1) if x % i == 0]
  return sorted(set(small + [x // i for i in small]))


def best_mesh(p: Problem, devices: int) -> Plan | None:
  """The (data, model) split of `devices` with the least peak memory (None: no valid split)."""
  plans = [estimate(p, devices // m, m) for m in _divisors(devices)
           if p.n % m == 0 and p.batch % (devices // m) == 0]
  return min(plans, key=lambda pl: pl.peak) if plans else None


def smallest_fitting(p: Problem, memory: int) -> Plan | None:
  """The mesh with the fewest devices on which p fits (ties: least peak memory)."""
  plans = [estimate(p, dd, m) for m in _divisors(p.n) for dd in _divisors(p.batch)]
  fits = [pl for pl in plans if pl.peak <= memory]
  return min(fits, key=lambda pl: (pl.devices, pl.peak)) if fits else None


def table(plan: Plan, memory: int) -> str:
  p = plan.problem
  k_sel = p.selected
  lines = [f"d={p.d} n={p.n} k={p.k}" + (f" ({k_sel} selected per row)" if k_sel != p.k else "")
           + f" k_aux={p.k_aux} batch={p.batch} "
           f"optimizer state {p.opt_state}{' (lazy)' if p.lazy_optimizer else ''} "
           f"encoder_tile={p.encoder_tile or 'off'}",
           f"per device on mesh (data={plan.data}, model={plan.model}), {plan.devices} devices:"]
  for name, b in plan.rows.items():
    lines.append(f"  {name:<22}{fmt_bytes(b):>12}")
  lines.append(f"  {'peak':<22}{fmt_bytes(plan.peak):>12}   (state + gradients + the largest "
               "of update temporaries, activations and gradients again)")
  lines.append(f"  {'device memory':<22}{fmt_bytes(memory):>12}")
  if plan.model > 1:
    how = ("exchanged (all-to-all), winners gathered" if topk.exchanges(
        -(-p.batch // plan.data), plan.model) else "gathered from every shard")
    lines.append(f"per step, received per device over the latent axis (candidates {how}):")
    for name, (b, all_gathered) in plan.comm.items():
      extra = f"   (gathered from every shard: {fmt_bytes(all_gathered)})" if b != all_gathered else ""
      lines.append(f"  {name:<22}{fmt_bytes(b):>12}{extra}")
  return "\n".join(lines)


def verdict(plan: Plan, memory: int) -> tuple[bool, str]:
  """(fits, the table and what to do about it)."""
  text = table(plan, memory)
  if plan.peak <= memory:
    return True, f"{text}\nfits ({100 * plan.peak / memory:.0f}% of device memory)"
  p = plan.problem
  out = [text, "DOES NOT FIT"]
  small = smallest_fitting(p, memory)
  if small:
    out.append(f"  smallest mesh that fits: {small.devices} devices as (data={small.data}, "
               f"model={small.model}), peak {fmt_bytes(small.peak)}")
  else:
    out.append("  no (data, model) mesh fits: the batch or one latent shard is too large")
  if p.opt_state in ("float32", "fp32"):
    small16 = smallest_fitting(dataclasses.replace(p, opt_state="bfloat16"), memory)
    if small16 and (not small or small16.devices < small.devices):
      out.append(f"  with bf16 optimizer state (train.opt_state_dtype): {small16.devices} devices "
                 f"as (data={small16.data}, model={small16.model})")
  if not p.encoder_tile and plan.rows["activations"] > plan.rows["update temporaries"]:
    out.append("  activations dominate: the blocked encoder (encoder_tile > 0, e.g. 8192 latents "
               "per tile) bounds pre[B, n]")
  return False, "\n".join(out)


# ---- the training job's start-up check ---------------------------------------------------------

def device_memory(setting: str) -> int | None:
  """Bytes per device: the config's value, else what the device reports (CPU: host RAM shared by
  the local devices); None when unknown."""
  if setting:
    return parse_bytes(setting)
  import jax
  local = jax.local_devices()
  stats = local[0].memory_stats() if hasattr(local[0], "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if local[0].platform == "cpu":
    try:
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(local)
    except (ValueError, OSError):
      return None
  return None


def configured_memory(setting: str) -> int | None:
  """device_memory for mesh.device_memory (not "off"), a bad value refused naming the field."""
  try:
    return device_memory(setting)
  except ValueError as e:
    raise PlanError(f"mesh.device_memory: {e}") from None


def resolve_encoder_tile(config, data_size: int, model_size: int) -> tuple[int, str]:
  """(encoder_tile, why): as set, else 0 (pre[B, n_local] in one piece, the fastest) wherever the
  un-tiled step fits the device memory, and where it does not, the largest power-of-two tile
  whose step fits (fewest scan steps). Tiling never changes the picks (topk.py)."""
  if config.encoder_tile is not None:
    return int(config.encoder_tile), knobs.SET
  setting = config.mesh.device_memory
  memory = None if setting == "off" else configured_memory(setting)
  if memory is None:
    return 0, "automatic: device memory unknown or not checked, pre[B, n_local] in one piece"
  p = Problem.from_config(config, encoder_tile=0)
  whole = estimate(p, data_size, model_size).peak
  if whole <= memory:
    return 0, (f"automatic: pre[B, n_local] in one piece fits, {fmt_bytes(whole)} of "
               f"{fmt_bytes(memory)} per device")
  n_local, widest = -(-p.n // model_size), max(p.selected, p.k_aux, 1)
  tile = 1 << max(n_local - 1, 1).bit_length() - 1   # the largest power of two below n_local
  while tile >= widest:   # a tile holds at least one whole candidate list (topk.py)
    peak = estimate(dataclasses.replace(p, encoder_tile=tile), data_size, model_size).peak
    if peak <= memory:
      return tile, (f"automatic: the un-tiled step needs {fmt_bytes(whole)} of "
                    f"{fmt_bytes(memory)} per device; tiles of {tile} latents need "
                    f"{fmt_bytes(peak)}")
    tile //= 2
  return 0, (f"automatic: the step does not fit, {fmt_bytes(whole)} of {fmt_bytes(memory)}, "
             "and no tile makes it fit")


def check(config, specs, log: bool = True) -> Plan:
  """Refuses (PlanError, holding the table) a run whose step would not fit the devices; logs the
  table unless `log` is off (the dry run prints it instead)."""
  from absl import logging
  plan = estimate(_problem(config, specs), specs.data_size, specs.model_size)
  if config.mesh.device_memory == "off":
    return plan
  memory = configured_memory(config.mesh.device_memory)
  if memory is None:
    if log:
      logging.info("memory plan (device memory unknown, not checked):\n%s", table(plan, 0))
    return plan
  fits, text = verdict(plan, memory)
  if not fits:
    raise PlanError("the step does not fit in device memory (mesh.device_memory to override, "
                    f"'off' to skip):\n{text}")
  if log:
    logging.info("memory plan:\n%s", text)
  return plan


def _problem(config, specs) -> Problem:
  """The problem as the run builds it on specs' mesh: with its resolved encoder tile."""
  tile, _ = resolve_encoder_tile(config, specs.data_size, specs.model_size)
  return Problem.from_config(config, encoder_tile=tile)


def check_sweep(named_configs: list, specs, log: bool = True) -> list:
  """A sweep's check (train.py): every member's state and step counted as if all were live at
  once (stacked members are; members of separate steps hold their state throughout, and this
  over-counts only their activations). Refuses, naming the members to drop or move to another job,
  a sweep whose members together do not fit."""
  from absl import logging
  plans = [(name, estimate(_problem(c, specs), specs.data_size, specs.model_size))
           for name, c in named_configs]
  setting = named_configs[0][1].mesh.device_memory
  if setting == "off":
    return plans
  memory = configured_memory(setting)
  total = sum(pl.peak for _, pl in plans)
  lines = [f"  {name:<30}{fmt_bytes(pl.peak):>12}" for name, pl in plans]
  text = "per device, each member's peak:\n" + "\n".join(lines) + (
      f"\n  {'all members':<30}{fmt_bytes(total):>12}")
  if memory is None:
    if log:
      logging.info("sweep memory plan (device memory unknown, not checked):\n%s", text)
    return plans
  if total > memory:
    drop, left = [], total
    for name, pl in sorted(plans, key=lambda item: -item[1].peak):
      if left <= memory:
        break
      drop.append(name)
      left -= pl.peak
    raise PlanError(f"the sweep does not fit in device memory ({fmt_bytes(memory)}; "
                    f"mesh.device_memory to override, 'off' to skip):\n{text}\n"
                    f"drop these members or move them to another job: {', '.join(drop)}")
  if log:
    logging.info("sweep memory plan:\n%s\nfits (%.0f%% of device memory)", text,
                 100 * total / memory)
  return plans


# ---- the compiled step, for checking the model ---------------------------------------------------

def compile_step(config):
  """The real train step of `config`, compiled for its mesh against abstract (never allocated)
  state and batch. Its memory_analysis() is XLA's figure per device; its as_text() the HLO."""
  from jax.sharding import NamedSharding
  from jaxsae.step import StepFns
  spec = model.SaeSpec.from_config(config)
  mesh = mesh_lib.create_mesh(config.mesh)
  specs = mesh_lib.Specs(mesh, config.mesh)
  specs.check(spec.n, config.train.batch_size)
  tx = optim.make_optimizer(config)
  state, shardings = state_lib.abstract(spec, tx, specs)
  width = spec.d + (spec.d_out if spec.transcoder else 0)   # a transcoder's rows: x beside y
  batch = jax.ShapeDtypeStruct((config.train.batch_size, width), jnp.float32,
                               sharding=NamedSharding(mesh, specs.batch))
  return StepFns(config, spec, specs, tx, shardings).train.lower(state, batch).compile()


def compiled_peak(compiled) -> int:
  """Per-device peak of a compiled step: its arguments, outputs not aliased to donated arguments,
  and XLA's temporaries."""
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


# ---- command line -------------------------------------------------------------------------------

def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m jaxsae.plan", description=__doc__.split("\n")[0])
  ap.add_argument("--d", type=int, required=True, help="input width")
  ap.add_argument("--n", type=int, required=True, help="latents")
  ap.add_argument("--k", type=int, required=True, help="active latents per token")
  ap.add_argument("--batch", type=int, required=True, help="tokens per step (global)")
  ap.add_argument("--devices", type=int, required=True, help="devices in the mesh")
  ap.add_argument("--device-memory", required=True, help="per device, e.g. 95GiB or 80GB")
  ap.add_argument("--optimizer-state", default="fp32", choices=sorted(OPT_BYTES))
  ap.add_argument("--k-aux", type=int, default=-1,
                  help="AuxK latents (-1: power of two nearest d/2, 0: no AuxK)")
  ap.add_argument("--multi-topk", action="store_true")
  ap.add_argument("--architecture", default="topk", choices=model.ARCHITECTURES,
                  help="sae.architecture: the batch ones select --batchtopk-cap x k per row")
  ap.add_argument("--batchtopk-cap", type=int, default=4, help="sae.batchtopk_cap")
  ap.add_argument("--encoder-tile", type=int, default=0, help="blocked encoder tile (0: off)")
  ap.add_argument("--lazy-optimizer", action=argparse.BooleanOptionalAction, default=None,
                  help="train.lazy_optimizer: Adam on the selected rows only (default: as "
                  "training decides, lazy when batch x k >= n with fp32 moments)")
  ap.add_argument("--mesh", default="", help="DATAxMODEL, e.g. 1x64 (default: the best split)")
  a = ap.parse_args(argv)
  try:
    memory = parse_bytes(a.device_memory)
  except ValueError as e:
    ap.error(f"--device-memory: {e}")
  for name in ("d", "n", "k", "batch", "devices"):
    if getattr(a, name) <= 0:
      ap.error(f"--{name} must be positive")
  p = Problem(d=a.d, n=a.n, k=a.k, batch=a.batch, k_aux=model.resolve_k_aux(a.k_aux, a.d, a.n),
              multi_topk=a.multi_topk, opt_state=a.optimizer_state, encoder_tile=a.encoder_tile,
              k_select=model.select_width(a.k, a.multi_topk, a.architecture, a.batchtopk_cap),
              lazy_optimizer=a.lazy_optimizer if a.lazy_optimizer is not None else
              optim.automatic_lazy(a.batch, a.k, a.n, "float32" if OPT_BYTES[
                  a.optimizer_state] == 4 else "bfloat16")[0])
  if a.mesh:
    try:
      data, model_size = (int(s) for s in a.mesh.lower().split("x"))
    except ValueError:
      ap.error(f"--mesh={a.mesh!r}: expected DATAxMODEL, e.g. 1x64")
    if data * model_size != a.devices:
      ap.error(f"--mesh={a.mesh} has {data * model_size} devices, --devices={a.devices}")
    if p.n % model_size or p.batch % data:
      ap.error(f"--mesh={a.mesh}: n={p.n} must divide by {model_size} and batch={p.batch} by "
               f"{data}")
    plan = estimate(p, data, model_size)
  else:
    plan = best_mesh(p, a.devices)
    if plan is None:
      ap.error(f"no (data, model) split of {a.devices} devices divides n={p.n} and "
               f"batch={p.batch}")
  fits, text = verdict(plan, memory)
  print(text)
  return 0 if fits else 1


if __name__ == "__main__":
  sys.exit(main())
