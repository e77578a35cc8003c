"""train_and_evaluate(config, workdir): the whole training job, importable and testable."""
import dataclasses
import json
import time
from typing import Any

import jax
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding

from jaxsae import checkpoint as checkpoint_lib, config_check, data as data_lib
from jaxsae import knobs, mesh as mesh_lib, metrics as metrics_lib
from jaxsae import model, optim, paths, plan as plan_lib, state as state_lib, stats
from jaxsae import sweep as sweep_lib
from jaxsae.group import Group
from jaxsae.step import StepFns


class TrainingError(RuntimeError):
  """Training cannot go on (bad data under on_nonfinite=stop, a non-finite loss)."""


# ---- setup ------------------------------------------------------------------------------------

def _write_json(path: str, obj):
  """Atomic: readers never see a half-written file."""
  paths.write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def resolved_config(config, spec: model.SaeSpec, mesh, density: float | None = None) -> dict:
  """config.json: the config and what the system chose (density: the data's, measured at start;
  None in a dry run, which reads no data)."""
  out = config.to_dict()
  lr, lr_source = optim.resolve_lr(config, density)
  kernels, kernels_source = config_check.resolve_kernels(config)
  b_pre_ratio, b_pre_source = optim.resolve_b_pre_ratio(config)
  lazy, lazy_source = optim.resolve_lazy(config)
  out["resolved"] = {"lr": lr, "lr_source": lr_source, "data_density": density,
                     "b_pre_lr_ratio": b_pre_ratio, "b_pre_lr_ratio_source": b_pre_source,
                     "kernels": kernels, "kernels_source": kernels_source,
                     "lazy_optimizer": lazy, "lazy_optimizer_source": lazy_source,
                     "warmup_steps": optim.resolve_warmup(config.train), "k_aux": spec.k_aux,
                     "mesh_shape": dict(mesh.shape),
                     "process_count": jax.process_count(), "jax_version": jax.__version__}
  specs = mesh_lib.Specs(mesh, config.mesh)
  for name, (value, why) in knobs.resolve_all(config, specs.data_size,
                                              specs.model_size).items():
    out["resolved"].update({name: value, name + "_source": why})
  return out


def open_data(config, spec: model.SaeSpec, layout=(0, 1)):
  """layout: (block, blocks) of each global batch this process feeds (mesh_lib.batch_layout)."""
  data = data_lib.create(config, *layout)
  if data.d != spec.d:
    where = config.data.path or config.data.source
    raise config_check.ConfigError(f"data {where} has d={data.d} but sae.d={spec.d}")
  return data


def init_statistics(config, data) -> stats.InitStats:
  """The input scale, geometric-median b_pre, target and element density, from a sample that every
  process draws identically (so every process, and a resumed run, gets the same); target is a
  transcoder's (b_dec, target scale), the same statistics of its target columns, else None."""
  sample = np.asarray(data.init_sample(config.train.init_rows), np.float32)
  bad = int(np.sum(~np.all(np.isfinite(sample), axis=1)))
  if bad:
    raise data_lib.DataError(f"{bad} of {len(sample)} init-sample rows hold NaN/inf")

  def centre_and_scale(rows):
    scale = stats.input_scale(rows, config.data.normalize, config.data.normalize_about)
    return scale, np.asarray(stats.geometric_median(rows * scale, config.train.median_iters))

  scale, b_pre = centre_and_scale(sample[:, :data.d])
  density = stats.element_density(sample[:, :data.d])
  if not data.d_target:
    return stats.InitStats(scale, b_pre, None, density)
  target_scale, b_dec = centre_and_scale(sample[:, data.d:])
  return stats.InitStats(scale, b_pre, (b_dec, target_scale), density)


# ---- evaluation -------------------------------------------------------------------------------

def _evaluate(eval_sums, w_decs, data, batch_sharding) -> list:
  """Per SAE, eval/* over the held-out batches; eval_sums(batch) gives the sums (a leading member
  axis when several SAEs are stacked); w_decs: each SAE's decoder, for ground-truth recovery."""
  totals = None
  if data.eval_batches is not None:
    for local in data.eval_batches():
      sums = eval_sums(mesh_lib.host_batch_to_global(local, batch_sharding))
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    totals = None if totals is None else jax.device_get(totals)
  out = []
  for i, w_dec in enumerate(w_decs):
    record = {}
    if totals is not None:
      t = {k: np.asarray(v).reshape(-1)[i if np.ndim(v) else 0] for k, v in totals.items()}
      record["eval/fvu"] = float(t["sq"] / t["total_var"])
      record["eval/explained_variance"] = 1.0 - record["eval/fvu"]
      record["eval/l0"] = float(t["l0"] / t["rows"])
    if data.ground_truth is not None:
      gt = metrics_lib.ground_truth_recovery(w_dec, data.ground_truth)
      record.update({k: float(v) for k, v in jax.device_get(gt).items()})
    out.append(record)
  return out


def evaluate(steps: StepFns, state, data, batch_sharding) -> dict:
  """eval/* of one SAE."""
  return _evaluate(lambda batch: steps.eval(state, batch), [state.params["W_dec"]], data,
                   batch_sharding)[0]


def evaluate_group(group: Group, data, batch_sharding) -> list:
  """eval/* of each SAE of a group."""
  return _evaluate(group.eval_sums, group.w_decs(), data, batch_sharding)


# ---- the job ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
  """Everything a run is built from: what train_and_evaluate, tests and benchmarks share."""
  spec: model.SaeSpec
  mesh: jax.sharding.Mesh
  specs: mesh_lib.Specs
  data: data_lib.Data
  tx: optax.GradientTransformation
  state: state_lib.TrainState
  shardings: state_lib.TrainState
  steps: StepFns
  batch_sharding: NamedSharding
  input_scale: float
  lr: float               # the peak rate (train.lr, else the automatic one)


def setup(config) -> Setup:
  """Checks config, opens the data, builds the mesh and the sharded state, compiles nothing yet.

  Every check that can fail on bad input runs here, before the first compile.
  """
  config_check.validate(config)
  mesh, specs, data, (group,), _ = _build(config, sweep_lib.members(config, ""))
  return Setup(spec=group.spec, mesh=mesh, specs=specs, data=data, tx=group.tx,
               state=group.state, shardings=group.shardings, steps=group.steps,
               batch_sharding=NamedSharding(mesh, specs.batch),
               input_scale=group.input_scale, lr=group.lrs[0])


def _resume_step(config, members, workdir: str):
  """(the step to resume from or None, the sweep's record or None). Refuses, before anything is
  built, a workdir holding another SAE or another sweep."""
  record = sweep_lib.read_state(workdir)
  if not config.get("sweep"):
    if record is not None:
      raise checkpoint_lib.CheckpointError(
          f"{workdir} holds a sweep ({sweep_lib.state_path(workdir)}); this config has no "
          "`sweep`: use a new --workdir, or the sweep's config to resume it")
    return checkpoint_lib.check_compatible(workdir, config.to_dict()), None
  if checkpoint_lib.complete_steps(checkpoint_lib.checkpoint_dir(workdir)):
    raise checkpoint_lib.CheckpointError(
        f"{workdir} holds the checkpoints of a plain run, not a sweep: use a new --workdir")
  names = [m.name for m in members]
  if record is None:
    held = [m.name for m in members if checkpoint_lib.complete_steps(
        checkpoint_lib.checkpoint_dir(m.workdir))]
    if held:
      raise checkpoint_lib.CheckpointError(
          f"{workdir} holds checkpoints of members {held} but no {sweep_lib.state_path(workdir)}: "
          "not a sweep this version wrote; use a new --workdir")
    return None, None
  if record["members"] != names:
    raise checkpoint_lib.CheckpointError(
        f"{workdir} holds a sweep of members {record['members']}; this config's are {names}. "
        "Use a new --workdir, or the original sweep to resume it.")
  for m in members:
    checkpoint_lib.check_compatible(m.workdir, m.config.to_dict())
  return record.get("checkpointed_step"), record


@dataclasses.dataclass
class Trainee:
  """One SAE of the job as it trains: a plain run's, or one member of a sweep."""
  member: sweep_lib.Member
  group: Group
  index: int                 # its place in the group's stacked state
  resolved: dict             # its config.json
  writer: metrics_lib.Writer
  checkpoints: checkpoint_lib.Checkpointer
  schedule: Any              # step -> learning rate, for the logs
  last_record: dict = dataclasses.field(default_factory=dict)

  @property
  def active(self) -> bool:
    return self.group.active[self.index]

  def label(self) -> str:
    return f"[{self.member.name}] " if self.member.name else ""


def _build(config, members):
  """(mesh, specs, data, groups, each member's (group, index)): the shared mesh and data stream,
  and the members' states and steps, stackable members together (sweep.stack_key)."""
  mesh = mesh_lib.create_mesh(config.mesh)
  specs = mesh_lib.Specs(mesh, config.mesh)
  spec_of = [model.SaeSpec.from_config(m.config) for m in members]
  for spec in spec_of:
    specs.check(spec.n, config.train.batch_size, jax.process_count())
  if config.get("sweep"):
    plan_lib.check_sweep([(m.name, m.config) for m in members], specs)
  else:
    plan_lib.check(config, specs)   # refuses, with the memory table, a step that cannot fit
  data = open_data(config, spec_of[0], mesh_lib.batch_layout(NamedSharding(mesh, specs.batch)))
  stacking, why = sweep_lib.resolve_stacking(config)
  try:
    inits, stacks = {}, {}
    for i, m in enumerate(members):
      stacks.setdefault(sweep_lib.stack_key(m, stacking), []).append(i)
    groups, place = [], {}
    for indices in stacks.values():
      first = members[indices[0]].config
      key = (first.train.init_rows, first.train.median_iters)
      if key not in inits:   # the data's statistics, once per sample size
        inits[key] = init_statistics(first, data)
      groups.append(Group([members[i].config for i in indices], spec_of[indices[0]], specs,
                          inits[key], stacking))
      place.update({i: (groups[-1], j) for j, i in enumerate(indices)})
      if len(indices) > 1:
        logging.info("members %s share one compiled step: %s (%s)",
                     ", ".join(members[i].name for i in indices), stacking, why)
  except BaseException:
    data.close()
    raise
  return mesh, specs, data, groups, [place[i] for i in range(len(members))]


def _log_start(t: Trainee, mesh):
  spec, res = t.group.spec, t.resolved["resolved"]
  c, who = t.member.config, t.label()
  logging.info("%straining %s: %s d=%d n=%d k=%d k_aux=%d on mesh %s, %d steps of %d tokens, "
               "input scale %.4g", who, c.data.source, spec.architecture, spec.d, spec.n, spec.k,
               spec.k_aux, dict(mesh.shape), c.train.steps, c.train.batch_size,
               t.group.input_scale)
  if spec.transcoder:
    logging.info("%stranscoder: %s (d=%d) -> %s (d_out=%d)%s, target scale %.4g", who,
                 c.data.path, spec.d, c.data.target_path, spec.d_out,
                 ", with a skip connection" if spec.skip else "",
                 float(t.group.target_scale))
  if spec.batchtopk:
    logging.info("%sbatch top-k: up to %d candidates per row (sae.batchtopk_cap=%d x k), "
                 "inference threshold averaged over ~%d steps%s", who, spec.k_select,
                 spec.batchtopk_cap, spec.threshold_ema_steps,
                 f", nested dictionaries of {spec.prefixes} and {spec.n} latents"
                 if spec.prefixes else "")
  logging.info("%ssparse ops: kernels=%s (%s), compute dtype %s", who, res["kernels"],
               res["kernels_source"], c.compute_dtype)
  logging.info("%slearning rate %.4g (%s), warmup %d steps, linear decay to 0 over the last %g of "
               "the run; b_pre at %.3g of it (%s), W_dec at %g of it; %s Adam (%s)", who,
               res["lr"], res["lr_source"], res["warmup_steps"], c.train.decay_frac,
               res["b_pre_lr_ratio"], res["b_pre_lr_ratio_source"], c.train.decoder_lr_ratio,
               "lazy" if res["lazy_optimizer"] else "dense",
               res["lazy_optimizer_source"])
  logging.info("%schosen by the system (speed and memory only; set a field to override):\n%s",
               who, knobs.describe(res))


def _log_compiled_memory(config, specs, groups):
  """XLA's per-device figure for the compiled train step, beside the plan's (plan.py), once the
  first step has compiled: wherever the job runs, the planner is checked against the compiler.
  A warning where the plan counted more than 20% low (what tests/test_plan.py holds it to)."""
  compiled = [g.compiled_bytes() for g in groups]
  if None in compiled:
    return
  if config.get("sweep"):
    logging.info("memory per device, XLA's compiled steps: %s",
                 ", ".join(plan_lib.fmt_bytes(b) for b in compiled))
    return
  planned = plan_lib.check(config, specs, log=False).peak
  ratio = compiled[0] / planned
  (logging.warning if ratio > 1.2 else logging.info)(
      "memory per device: the compiled step needs %s (XLA's memory analysis), the plan said %s "
      "(%.2fx)%s", plan_lib.fmt_bytes(compiled[0]), plan_lib.fmt_bytes(planned), ratio,
      "; the plan under-counts this step, so its fit check is not to be trusted here"
      if ratio > 1.2 else "")


def train_and_evaluate(config, workdir: str):
  """Trains an SAE as config says, writing to workdir; returns the last metrics record. With
  config.sweep, trains each member in workdir/members/<name> on the same batches (sweep.py) and
  returns {name: its last record}."""
  is_sweep = bool(config.get("sweep"))
  config_check.validate(config)
  members = sweep_lib.members(config, workdir)   # each member's config checked
  # Before anything is built or written: a workdir holding another SAE is never mixed into.
  resume_step, record = _resume_step(config, members, workdir)
  stopped = dict(record["stopped"]) if record else {}
  if jax.process_index() == 0 and (is_sweep or resume_step is not None):
    for m in members:   # before any Writer opens metrics.jsonl (trimming replaces the file)
      checkpoint_lib.trim_metrics(m.workdir, resume_step or 0)
  mesh, specs, data, groups, places = _build(config, members)
  batch_sharding = NamedSharding(mesh, specs.batch)
  lead = jax.process_index() == 0
  total_steps, batch_size = config.train.steps, config.train.batch_size
  save_every = config.checkpoint.every_steps
  # A sweep's step is complete once every member's is; members keep the one before meanwhile.
  keep = max(config.checkpoint.max_to_keep, 2) if is_sweep else config.checkpoint.max_to_keep
  trainees, preemption = [], None
  committed = resume_step   # the last step every member's checkpoint holds (a sweep's)

  def write_record():
    if is_sweep and lead:
      sweep_lib.write_state(workdir, {"members": [m.name for m in members], "stopped": stopped,
                                      "checkpointed_step": committed})

  try:
    for m, (group, index) in zip(members, places):
      paths.of(m.workdir).mkdir(parents=True, exist_ok=True)   # a no-op on an object store
      resolved = resolved_config(m.config, group.spec, mesh, group.density)
      if m.name:
        resolved["resolved"].update(sweep_member=m.name, sweep_overrides=m.overrides)
      if lead:   # process 0 writes the shared files (config.json, metrics, events)
        _write_json(paths.join(m.workdir, "config.json"), resolved)
      writer = metrics_lib.Writer(m.workdir, lead, wandb_project=m.config.metrics.wandb_project,
                                  run_name=m.name, run_config=resolved)
      trainees.append(Trainee(m, group, index, resolved, writer,
                              checkpoint_lib.Checkpointer(m.workdir, keep,
                                                          config.checkpoint.async_save, m.name),
                              optim.learning_rate(m.config, group.density)))
    if is_sweep and lead:
      stacking, why = sweep_lib.resolve_stacking(config)
      _write_json(paths.join(workdir, "config.json"), {**config.to_dict(), "resolved": {
          "members": {m.name: m.overrides for m in members}, "sweep_stacking": stacking,
          "sweep_stacking_source": why}})
    _restore(trainees, groups, stopped, resume_step, is_sweep, data, lead)
    write_record()
    for t in trainees:
      if not t.active:
        logging.warning("%sstopped earlier (%s); not trained", t.label(),
                        stopped[t.member.name]["reason"])
      _log_start(t, mesh)
    if not any(g.running for g in groups):
      raise TrainingError(f"every member of the sweep in {workdir} has stopped")

    intervals = [metrics_lib.Interval() for _ in groups]
    start_step = done = resume_step or 0
    t_start, skipped = time.perf_counter(), 0
    guards, pending = None, None
    preemption = checkpoint_lib.Preemption()
    saved_step = resume_step   # the last step whose saves were started
    save_every = config.checkpoint.every_steps

    def save(step):
      """Saves every active member at `step`; a sweep first confirms the step saved before
      complete on disk for every member, and names it in sweep.json as the one to resume from."""
      nonlocal saved_step, committed
      if is_sweep:
        for t in trainees:
          t.checkpoints.wait()
        committed = saved_step
        write_record()
      for t in trainees:
        if t.active:
          t.writer.flush()   # the records a resumed run keeps are stored before its checkpoint
          t.checkpoints.save(step, t.group.member_state(t.index), data.train.get_state(), {
              "config": t.resolved, "data": data.metadata, "metrics": t.last_record,
              "tokens": step * batch_size, "jaxsae_version": checkpoint_lib.version()})
      saved_step = step

    def emit(step, evals):
      """Logs a finished interval (called once the step after it is already queued)."""
      elapsed = time.perf_counter() - t_start
      eta = elapsed / max(step - start_step, 1) * (total_steps - step)
      for i, extra in evals.items():   # per group index
        g = groups[i]
        summary = intervals[i].summary(step, step * batch_size, batch_size)
        for t in trainees:
          if t.group is not g or not t.active:
            continue
          record = {k: float(v if np.ndim(v) == 0 else v[t.index]) for k, v in summary.items()}
          record["step"] = step
          record["train/lr"] = float(t.schedule(step - 1))   # the interval's last step's rate
          record.update(extra[t.index])
          t.writer.write(record)
          if save_every and step % save_every == 0:
            t.writer.flush()   # a checkpoint step's own record, logged one step after its save
          logging.info("%s%s", t.label(), metrics_lib.step_line(record, total_steps, eta))
          t.last_record = record
      for t in trainees:
        t.checkpoints.check()   # a background save that failed stops the run, naming its step

    def check(step, flags):
      """Acts on a finished step's guard flags (per group index; a member axis when stacked)."""
      nonlocal skipped
      for i, f in flags.items():
        g = groups[i]
        rows = int(np.max(f["nonfinite_rows"]))   # the same batch for every member
        if rows:
          skipped += _check_rows(config, step, rows)
          return
        for t in trainees:
          if t.group is not g or not t.active or not bool(g.member(f["skipped"], t.index)):
            continue
          msg = (f"step {step}: the loss went non-finite (train/fvu="
                 f"{float(g.member(f['fvu'], t.index))}, losses/auxk="
                 f"{float(g.member(f['auxk'], t.index))}); the update was not applied")
          if not is_sweep:
            raise TrainingError(msg)
          logging.error("%s%s; this member stops, its last checkpoint kept in %s", t.label(), msg,
                        t.checkpoints.directory)
          stopped[t.member.name] = {"step": step, "reason": "the loss went non-finite"}
          g.stop(t.index)
          write_record()
      if not any(g.running for g in groups):
        raise TrainingError(f"step {step}: every member of the sweep has stopped")

    for step in range(start_step, total_steps):
      t0 = time.perf_counter()
      local = next(data.train)
      wait = time.perf_counter() - t0
      batch = mesh_lib.host_batch_to_global(local, batch_sharding, batch_size)
      step_metrics = {i: g.train(batch) for i, g in enumerate(groups) if g.running}
      if step == start_step:
        _log_compiled_memory(config, specs, groups)
      # Step `step` is queued; only now wait for step - 1 and act on its results.
      if guards is not None:
        check(step - 1, jax.device_get(guards))
      if pending is not None:
        emit(*pending)
        pending = None
      guards = {}
      for i, (m, step_guard) in step_metrics.items():
        guards[i] = {**step_guard, "fvu": m["train/fvu"], "auxk": m["losses/auxk"]}
        intervals[i].add(m, wait)
      done = step + 1
      if done % config.train.log_every == 0 or done == total_steps:
        every = config.train.eval_every
        evals = {i: [{}] * g.size for i, g in enumerate(groups) if g.running}
        if done == total_steps or (every and done % every == 0):
          # Blocks, and must: the next step donates (invalidates) this state's buffers.
          evals = {i: evaluate_group(groups[i], data, batch_sharding) for i in evals}
        pending = (done, evals)
      stop = preemption.requested(done)
      if stop or (save_every and done % save_every == 0 and done < total_steps):
        # Only a state whose own step passed its guard is saved (never one after a bad loss),
        # so read this step's flags now instead of after the next step.
        check(step, jax.device_get(guards))
        guards = None
        if stop:
          break
        save(done)   # returns once the state is off the devices; the next step may donate it
    if guards is not None:
      check(done - 1, jax.device_get(guards))
    if pending is not None:
      emit(*pending)
    save(done)
    for t in trainees:
      t.checkpoints.wait()
    committed = done
    write_record()
    if done < total_steps:
      logging.warning("stopped at step %d of %d on request; checkpoint saved in %s: rerun the "
                      "same command to resume", done, total_steps,
                      workdir if is_sweep else trainees[0].checkpoints.directory)
  finally:
    if preemption is not None:
      preemption.close()
    for t in trainees:
      t.checkpoints.close()   # waits for a save in flight: after an error, the last good step lands
      t.writer.close()
    data.close()
  if skipped:
    logging.warning("skipped %d batches holding NaN/inf rows", skipped)
  if lead and done == total_steps:
    logging.info("%s", run_summary(workdir, trainees, data, done, batch_size, is_sweep))
  if not is_sweep:
    return trainees[0].last_record
  if lead:
    logging.info("sweep of %d members in %s:\n%s", len(members), workdir,
                 sweep_lib.summary_table(workdir))
  return {t.member.name: t.last_record for t in trainees}


def run_summary(workdir: str, trainees, data, step: int, batch_size: int, is_sweep: bool) -> str:
  """What a finished run tells its user: where the SAE is, how it scored on held-out rows, how
  much data it saw, and the commands that come next."""
  tokens = step * batch_size
  if data.train_rows:
    seen = (f"{tokens / data.train_rows:.2f} passes over {data.train_rows:,} training rows; "
            f"{data.eval_rows:,} rows held out")
  else:
    seen = f"a generated stream; {data.eval_rows:,} rows held out"
  lines = [f"finished: {step} steps, {tokens:,} tokens ({seen})"]
  for t in trainees:
    r = t.last_record or {}
    scores = ", ".join(f"{key} {r[key]:.4g}" for key in ("eval/fvu", "eval/l0") if key in r)
    dead = r.get("sparsity/dead_frac")
    lines.append(f"  {t.label()}{scores or 'no eval'}"
                 + (f", dead {100 * dead:.2f}%" if dead is not None else "")
                 + f"; checkpoint {t.checkpoints.directory}")
  first = trainees[0].member.workdir
  lines += ["next:",
            f"  python -m jaxsae.inspect {workdir}" + ("   # the members" if is_sweep else ""),
            f"  python -m jaxsae.export --workdir={first} --format=saelens --out=EXPORT_DIR",
            f"  python -m jaxsae.plot {first}",
            f"  python -m jaxsae.evaluate --sae={first} --model=MODEL --layer=L --text=FILES"]
  return "\n".join(lines)


def _restore(trainees, groups, stopped, step, is_sweep, data, lead):
  """Puts every member at `step` (None: fresh), its metrics trimmed to match. A stopped member
  restores its own last checkpoint (it stays frozen). A sweep member's steps after `step` were
  never the sweep's (sweep.json names the last complete one): they are dropped."""
  for t in trainees:
    if t.member.name in stopped:
      t.group.stop(t.index)
  if is_sweep:
    for t in trainees:
      if t.active:
        late = t.checkpoints.discard_after(step)
        if late:
          logging.warning("%sdropped checkpoint steps %s: saved after the sweep's last complete "
                          "step (%s)", t.label(), late, step)
  if step is None:
    return
  data_state = None
  for g in groups:
    mine = [t for t in trainees if t.group is g]
    at = [step if t.active else t.checkpoints.latest_step() for t in mine]
    if all(a is None for a in at):
      continue   # stopped before their first checkpoint: their fresh states stand in
    # A member with nothing saved keeps its fresh state; the others' fresh buffers are freed
    # before their checkpoints are read, so a state is never held twice.
    fresh = {t.index: g.member_state(t.index) for t, a in zip(mine, at) if a is None}
    target = g.abstract_member()
    g.free(keep=fresh)
    states = []
    for t, a in zip(mine, at):
      if a is None:
        states.append(fresh[t.index])
        continue
      restored = t.checkpoints.restore(target, a)
      states.append(restored.state)
      if t.active:
        data_state = restored.data
    g.set_states(states)
  data.train.set_state(data_state)
  logging.info("resumed from step %d (%s)", step, "every member of the sweep" if is_sweep
               else trainees[0].checkpoints.directory)
def _check_rows(config, step: int, rows: int) -> int:
  """Acts on a finished step's batch holding NaN/inf rows; returns 1 (the batch was skipped)."""
  msg = f"step {step}: the batch holds {rows} rows with NaN/inf"
  if config.train.on_nonfinite == "stop":
    raise TrainingError(msg + "; not trained on (train.on_nonfinite=stop)")
  logging.warning("%s; batch skipped (train.on_nonfinite=skip)", msg)
  return 1
