"""`python -m jaxsae.main --config=X [--workdir=W] --dry_run`: what a run would do, then exit.

Everything a run checks before it compiles, with the same errors: the config (and each sweep
member's), the mesh, the data (opened, its width and dtype checked, never read past its metadata),
the memory plan against the devices, and a workdir it would resume. Then what the system chose by
itself (learning rate, b_pre's rate, lazy or dense Adam, kernels, warmup, k_aux, a sweep's
stacking, the performance knobs of knobs.py), each with why, as the run would log and record
them. Nothing is written, nothing is compiled, no statistics are computed.
"""
import jax
from jax.sharding import NamedSharding

from jaxsae import config_check, knobs, mesh as mesh_lib, model, plan as plan_lib
from jaxsae import sweep as sweep_lib
from jaxsae import train

_CHOICES = (("lr", "learning rate", "{:.4g}"), ("b_pre_lr_ratio", "b_pre's rate / lr", "{:.3g}"),
            ("lazy_optimizer", "lazy Adam", "{}"), ("kernels", "kernels", "{}"))


def describe(config, workdir: str = "") -> str:
  """The dry run's report; raises what the run would raise before compiling."""
  config_check.validate(config)
  is_sweep = bool(config.get("sweep"))
  members = sweep_lib.members(config, workdir or "WORKDIR")
  resume = None
  if workdir:
    resume = train._resume_step(config, members, workdir)[0]   # refuses another SAE's workdir
  mesh = mesh_lib.create_mesh(config.mesh)
  specs = mesh_lib.Specs(mesh, config.mesh)
  spec_of = [model.SaeSpec.from_config(m.config) for m in members]
  for spec in spec_of:
    specs.check(spec.n, config.train.batch_size, jax.process_count())
  lines = [f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} device(s)"]
  setting = config.mesh.device_memory
  memory = None if setting == "off" else plan_lib.configured_memory(setting)
  if is_sweep:
    plans = plan_lib.check_sweep([(m.name, m.config) for m in members], specs, log=False)
    stacking, why = sweep_lib.resolve_stacking(config)
    lines.append(f"sweep of {len(members)} members, stacking {stacking} ({why}); per device:")
    lines += [f"  {name:<30}{plan_lib.fmt_bytes(pl.peak):>12}" for name, pl in plans]
    total = sum(pl.peak for _, pl in plans)
    lines.append(f"  {'all members':<30}{plan_lib.fmt_bytes(total):>12}"
                 + (f" of {plan_lib.fmt_bytes(memory)}" if memory else ""))
  else:
    plan = plan_lib.check(config, specs, log=False)   # refuses a step that does not fit
    lines.append("memory plan:\n" + (plan_lib.verdict(plan, memory)[1] if memory
                                      else plan_lib.table(plan, 0) + "\n(device memory unknown)"))
  data = train.open_data(config, spec_of[0],
                         mesh_lib.batch_layout(NamedSharding(mesh, specs.batch)))
  data.close()
  steps, batch = config.train.steps, config.train.batch_size
  where = config.data.path or config.data.source
  if data.train_rows:
    passes = steps * batch / data.train_rows
    lines.append(f"data {where}: {data.train_rows:,} training rows ({passes:.2f} passes in {steps} "
                 f"steps of {batch}), {data.eval_rows:,} held out, d={data.d} {data.dtype}")
  else:
    lines.append(f"data {where}: a generated stream, {steps} steps of {batch}, "
                 f"{data.eval_rows:,} rows held out, d={data.d}")
  if not workdir:
    lines.append("no --workdir given: no checkpoints checked")
  else:
    lines.append(f"workdir {workdir}: "
                 + ("a new run" if resume is None else f"resumes from step {resume}"))
  for m, spec in zip(members, spec_of):
    res = train.resolved_config(m.config, spec, mesh)["resolved"]
    lines.append(f"{m.name + ': ' if m.name else ''}{spec.architecture} d={spec.d} n={spec.n} "
                 f"k={spec.k} k_aux={res['k_aux']}, warmup {res['warmup_steps']} steps")
    for key, label, fmt in _CHOICES:
      lines.append(f"  {label:<20}{fmt.format(res[key]):<10}({res[key + '_source']})")
    lines.append("  speed and memory only (knobs.py):\n" + knobs.describe(res, "    "))
  return "\n".join(lines)
