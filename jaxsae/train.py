"""train_and_evaluate(config, workdir): the whole training job, importable and testable."""
import dataclasses
import json
import time

import jax
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding

from jaxsae import checkpoint as checkpoint_lib, config_check, data as data_lib
from jaxsae import mesh as mesh_lib, metrics as metrics_lib
from jaxsae import model, optim, paths, plan as plan_lib, state as state_lib, stats
from jaxsae.step import StepFns


class TrainingError(RuntimeError):
  """Training cannot go on (bad data under on_nonfinite=stop, a non-finite loss)."""


# ---- setup ------------------------------------------------------------------------------------

def _write_json(path: str, obj):
  """Atomic: readers never see a half-written file."""
  paths.write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def resolved_config(config, spec: model.SaeSpec, mesh) -> dict:
  out = config.to_dict()
  lr, lr_source = optim.resolve_lr(config)
  kernels, kernels_source = config_check.resolve_kernels(config)
  b_pre_ratio, b_pre_source = optim.resolve_b_pre_ratio(config)
  lazy, lazy_source = optim.resolve_lazy(config)
  out["resolved"] = {"lr": lr, "lr_source": lr_source,
                     "b_pre_lr_ratio": b_pre_ratio, "b_pre_lr_ratio_source": b_pre_source,
                     "kernels": kernels, "kernels_source": kernels_source,
                     "lazy_optimizer": lazy, "lazy_optimizer_source": lazy_source,
                     "warmup_steps": optim.resolve_warmup(config.train), "k_aux": spec.k_aux,
                     "mesh_shape": dict(mesh.shape),
                     "process_count": jax.process_count(), "jax_version": jax.__version__}
  return out


def open_data(config, spec: model.SaeSpec, layout=(0, 1)):
  """layout: (block, blocks) of each global batch this process feeds (mesh_lib.batch_layout)."""
  data = data_lib.create(config, *layout)
  if data.d != spec.d:
    where = config.data.path or config.data.source
    raise config_check.ConfigError(f"data {where} has d={data.d} but sae.d={spec.d}")
  return data


def init_statistics(config, data):
  """(input scale, geometric-median b_pre, target) from a sample that every process draws
  identically; target is a transcoder's (b_dec, target scale), the same statistics of its target
  columns, else None."""
  sample = np.asarray(data.init_sample(config.train.init_rows), np.float32)
  bad = int(np.sum(~np.all(np.isfinite(sample), axis=1)))
  if bad:
    raise data_lib.DataError(f"{bad} of {len(sample)} init-sample rows hold NaN/inf")

  def centre_and_scale(rows):
    scale = stats.input_scale(rows, config.data.normalize, config.data.normalize_about)
    return scale, np.asarray(stats.geometric_median(rows * scale, config.train.median_iters))

  scale, b_pre = centre_and_scale(sample[:, :data.d])
  if not data.d_target:
    return scale, b_pre, None
  target_scale, b_dec = centre_and_scale(sample[:, data.d:])
  return scale, b_pre, (b_dec, target_scale)


# ---- evaluation -------------------------------------------------------------------------------

def evaluate(steps: StepFns, state, data, batch_sharding) -> dict:
  out = {}
  if data.eval_batches is not None:
    total = None
    for local in data.eval_batches():
      sums = steps.eval(state, mesh_lib.host_batch_to_global(local, batch_sharding))
      total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
    if total is not None:
      total = jax.device_get(total)
      out["eval/fvu"] = float(total["sq"] / total["total_var"])
      out["eval/explained_variance"] = 1.0 - out["eval/fvu"]
      out["eval/l0"] = float(total["l0"] / total["rows"])
  if data.ground_truth is not None:
    gt = metrics_lib.ground_truth_recovery(state.params["W_dec"], data.ground_truth)
    out.update({k: float(v) for k, v in jax.device_get(gt).items()})
  return out


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


def setup(config) -> Setup:
  """Checks config, opens the data, builds the mesh and the sharded state, compiles nothing yet.

  Every check that can fail on bad input runs here, before the first compile.
  """
  config_check.validate(config)
  spec = model.SaeSpec.from_config(config)
  mesh = mesh_lib.create_mesh(config.mesh)
  specs = mesh_lib.Specs(mesh, config.mesh)
  specs.check(spec.n, config.train.batch_size, jax.process_count())
  plan_lib.check(config, specs)   # refuses, with the memory table, a step that cannot fit
  data = open_data(config, spec, mesh_lib.batch_layout(NamedSharding(mesh, specs.batch)))
  scale, b_pre, target = init_statistics(config, data)
  tx = optim.make_optimizer(config)
  state, shardings = state_lib.create(jax.random.PRNGKey(config.train.seed), spec, tx, specs,
                                      b_pre, scale, target)
  return Setup(spec=spec, mesh=mesh, specs=specs, data=data, tx=tx, state=state,
               shardings=shardings, steps=StepFns(config, spec, specs, tx, shardings),
               batch_sharding=NamedSharding(mesh, specs.batch), input_scale=scale)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains an SAE as config says, writing to workdir; returns the last metrics record."""
  # Before anything is built or written: a workdir holding another SAE is never mixed into.
  resuming = checkpoint_lib.check_compatible(workdir, config.to_dict()) is not None
  run = setup(config)
  spec, mesh, data, steps, state = run.spec, run.mesh, run.data, run.steps, run.state
  batch_sharding = run.batch_sharding
  lead = jax.process_index() == 0
  paths.of(workdir).mkdir(parents=True, exist_ok=True)   # a no-op on an object store (gs://)
  resolved = resolved_config(config, spec, mesh)
  if lead:   # process 0 writes the shared files (config.json, metrics, events)
    _write_json(paths.join(workdir, "config.json"), resolved)
  total_steps, batch_size = config.train.steps, config.train.batch_size
  checkpoints = checkpoint_lib.Checkpointer(workdir, config.checkpoint.max_to_keep,
                                            config.checkpoint.async_save)
  if resuming:
    state = checkpoints.resume(state, data.train)
    if lead:
      checkpoint_lib.trim_metrics(workdir, int(jax.device_get(state.step)))
  logging.info("training %s: %s d=%d n=%d k=%d k_aux=%d on mesh %s, %d steps of %d tokens, "
               "input scale %.4g", config.data.source, spec.architecture, spec.d, spec.n, spec.k,
               spec.k_aux, dict(mesh.shape), total_steps, batch_size, run.input_scale)
  if spec.transcoder:
    logging.info("transcoder: %s (d=%d) -> %s (d_out=%d)%s, target scale %.4g", config.data.path,
                 spec.d, config.data.target_path, spec.d_out,
                 ", with a skip connection" if spec.skip else "",
                 float(jax.device_get(state.target_scale)))
  if spec.batchtopk:
    logging.info("batch top-k: up to %d candidates per row (sae.batchtopk_cap=%d x k), inference "
                 "threshold averaged over ~%d steps%s", spec.k_select, spec.batchtopk_cap,
                 spec.threshold_ema_steps,
                 f", nested dictionaries of {spec.prefixes} and {spec.n} latents"
                 if spec.prefixes else "")
  logging.info("sparse ops: kernels=%s (%s), compute dtype %s", resolved["resolved"]["kernels"],
               resolved["resolved"]["kernels_source"], config.compute_dtype)
  logging.info("learning rate %.4g (%s), warmup %d steps, linear decay to 0 over the last %g of "
               "the run; b_pre at %.3g of it (%s); %s Adam (%s)", resolved["resolved"]["lr"],
               resolved["resolved"]["lr_source"], resolved["resolved"]["warmup_steps"],
               config.train.decay_frac, resolved["resolved"]["b_pre_lr_ratio"],
               resolved["resolved"]["b_pre_lr_ratio_source"],
               "lazy" if resolved["resolved"]["lazy_optimizer"] else "dense",
               resolved["resolved"]["lazy_optimizer_source"])
  schedule = optim.learning_rate(config)

  writer = metrics_lib.Writer(workdir, lead)
  interval = metrics_lib.Interval()
  start_step = done = int(jax.device_get(state.step))
  t_start, skipped = time.perf_counter(), 0
  last_record, guard, pending = {}, None, None
  preemption = checkpoint_lib.Preemption()
  save_every = config.checkpoint.every_steps

  def save(step):
    writer.flush()   # the records a resumed run keeps are stored before its checkpoint
    checkpoints.save(step, state, data.train.get_state(), {
        "config": resolved, "data": data.metadata, "metrics": last_record,
        "tokens": step * batch_size, "jaxsae_version": checkpoint_lib.version()})

  def emit(record):
    """Logs a finished interval (called once the step after it is already queued)."""
    record.update(interval.summary(record["step"], record["step"] * batch_size, batch_size))
    record["train/lr"] = float(schedule(record["step"] - 1))   # the interval's last step's rate
    elapsed = time.perf_counter() - t_start
    eta = elapsed / max(record["step"] - start_step, 1) * (total_steps - record["step"])
    writer.write(record)
    if save_every and record["step"] % save_every == 0:
      writer.flush()   # a checkpoint step's own record, logged one step after its save started
    logging.info(metrics_lib.step_line(record, total_steps, eta))
    checkpoints.check()   # a background save that failed stops the run here, naming its step
    return record

  try:
    for step in range(start_step, total_steps):
      t0 = time.perf_counter()
      local = next(data.train)
      wait = time.perf_counter() - t0
      state, m, step_guard = steps.train(state, mesh_lib.host_batch_to_global(local, batch_sharding,
                                                                  batch_size))
      # Step `step` is queued; only now wait for step - 1 and act on its results.
      if guard is not None:
        skipped += _check_step(config, step - 1, jax.device_get(guard))
      if pending is not None:
        last_record, pending = emit(pending), None
      guard = {**step_guard, "fvu": m["train/fvu"], "auxk": m["losses/auxk"]}
      interval.add(m, wait)
      done = step + 1
      if done % config.train.log_every == 0 or done == total_steps:
        pending = {"step": done}
        every = config.train.eval_every
        if done == total_steps or (every and done % every == 0):
          # Blocks, and must: the next step donates (invalidates) this state's buffers.
          pending.update(evaluate(steps, state, data, batch_sharding))
      stop = preemption.requested(done)
      if stop or (save_every and done % save_every == 0 and done < total_steps):
        # Only a state whose own step passed its guard is saved (never one after a bad loss),
        # so read this step's flags now instead of after the next step.
        skipped += _check_step(config, step, jax.device_get(guard))
        guard = None
        if stop:
          break
        save(done)   # returns once the state is off the devices; the next step may donate it
    if guard is not None:
      skipped += _check_step(config, done - 1, jax.device_get(guard))
    if pending is not None:
      last_record = emit(pending)
    save(done)
    checkpoints.wait()
    if done < total_steps:
      logging.warning("stopped at step %d of %d on request; checkpoint saved in %s: rerun the "
                      "same command to resume", done, total_steps, checkpoints.directory)
  finally:
    preemption.close()
    checkpoints.close()   # waits for a save in flight: after an error, the last good step lands
    writer.close()
    data.close()
  if skipped:
    logging.warning("skipped %d batches holding NaN/inf rows", skipped)
  return last_record


def _check_step(config, step: int, flags) -> int:
  """Acts on a finished step's guard flags; returns 1 if its batch was skipped."""
  rows = int(flags["nonfinite_rows"])
  if rows:
    msg = f"step {step}: the batch holds {rows} rows with NaN/inf"
    if config.train.on_nonfinite == "stop":
      raise TrainingError(msg + "; not trained on (train.on_nonfinite=stop)")
    logging.warning("%s; batch skipped (train.on_nonfinite=skip)", msg)
    return 1
  if bool(flags["skipped"]):
    raise TrainingError(f"step {step}: the loss went non-finite (train/fvu={float(flags['fvu'])}, "
                        f"losses/auxk={float(flags['auxk'])}); the update was not applied")
  return 0
