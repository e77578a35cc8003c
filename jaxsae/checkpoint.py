"""Checkpoints in the workdir: what makes a run resumable, preemptible and exportable.

One checkpoint step, workdir/checkpoints/<step>/, holds three Orbax items:

  state  the TrainState (params, Adam moments, step, dead-latent counters, input scale): each
         process writes the shards it owns (StandardSave: OCDBT + zarr); restored onto any mesh by
         passing abstract arrays that carry the *new* shardings
  data   every process's data-iterator position, one JSON file per process (process_<i>-of-<n>.json)
  run    JSON: the resolved config, the data's metadata (model, hook), the last metrics, versions

Orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it once complete, so a process
killed mid-save leaves a temporary folder that is never read (the next run deletes it), never a
half-written step. Saves are asynchronous: the caller waits only for the device-to-host copy (after
which the train step may donate the state's buffers), the files are written in the background.
The only randomness of a run is its init (train.seed, recorded in the config); no RNG is stored.
"""
import dataclasses
import importlib.metadata
import json
import signal
import threading
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from absl import logging
from etils import epath

from jaxsae import paths
# The on-disk layout, which export.py also reads (without JAX).
from jaxsae.checkpoint_layout import StepReader, checkpoint_dir, complete_steps

# Array chunks on disk are at most this large, so export and inspect read them a block at a time.
CHUNK_BYTES = 64 << 20

# Config fields that define what a checkpoint *is*: resuming with another value would mix two SAEs
# or two data streams in one run, so it is refused. Other fields (steps, lr, mesh, logging, kernels,
# loader threads...) may change between a run and its resumption; the changes are logged.
IDENTITY_FIELDS = ("sae.d", "sae.n", "sae.k", "sae.k_aux", "sae.multi_topk", "sae.architecture",
                   "sae.batchtopk_cap", "sae.matryoshka_prefixes", "sae.d_out", "sae.skip",
                   "train.batch_size", "data.source", "data.path",
                   "data.shuffle_seed", "data.normalize", "data.target_path")
# Fields added since runs began recording their config: what a run that lacks them trained with.
LEGACY_DEFAULTS = {"sae.architecture": "topk", "sae.batchtopk_cap": 4,
                   "sae.matryoshka_prefixes": [1 / 16, 1 / 4], "sae.d_out": 0,
                   "sae.skip": False, "data.target_path": "", "sweep": [],
                   "sweep_stacking": "auto"}
IDENTITY_PREFIXES = ("data.synthetic.",)


class _QuietOrbax(logging.logging.Filter):
  """Orbax logs a dozen INFO lines per save through absl's shared logger; they would drown the
  step log. Its warnings and errors still show."""

  def filter(self, record):
    return record.levelno > logging.logging.INFO or "/orbax/" not in record.pathname


logging.get_absl_logger().addFilter(_QuietOrbax())


class CheckpointError(RuntimeError):
  """A checkpoint cannot be written or used; says what is on disk and what to do."""


def version() -> str:
  try:
    return importlib.metadata.version("jaxsae")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


# ---- the data item: one JSON file of iterator state per process --------------------------------

class IteratorStateHandler(ocp.CheckpointHandler):
  """Like grain's checkpoint handler, but for the JSON-serializable dict of any BatchIterator's
  get_state(), snapshotted when the save is called (so a background write never races the loop)."""

  def _file(self, directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def save(self, directory: epath.Path, args: "DataSave"):
    self._file(directory).write_text(json.dumps(args.state, indent=1))

  def restore(self, directory: epath.Path, args: "DataRestore" = None) -> dict:
    path = self._file(directory)
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir())
      raise CheckpointError(f"{path} is missing (found {found}): the checkpoint was written by a "
                            "different number of processes; resume with the same process count")
    return json.loads(path.read_text())

  def metadata(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  state: dict


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  pass


# ---- config compatibility ----------------------------------------------------------------------

def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return out


def config_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
  """(identity fields that differ, other fields that differ), each as 'field: saved -> current'."""
  old, new = _flatten(saved), _flatten(current)
  refused, changed = [], []
  for key in sorted(set(old) | set(new)):
    if key.startswith("resolved."):
      continue
    a, b = old.get(key, LEGACY_DEFAULTS.get(key, "<unset>")), new.get(key, "<unset>")
    if a != b:
      line = f"{key}: {a!r} -> {b!r}"
      (refused if key in IDENTITY_FIELDS or key.startswith(IDENTITY_PREFIXES) else changed).append(
          line)
  return refused, changed


def check_compatible(workdir: str, config_dict: dict) -> Optional[int]:
  """Refuses to resume from a checkpoint of another SAE or data stream; returns the latest complete
  step (None: nothing to resume). Reads JSON only and creates nothing, so it runs before setup."""
  if not complete_steps(checkpoint_dir(workdir)):
    return None
  reader = StepReader(workdir)
  if not reader.has_b_dec:
    raise CheckpointError(
        f"{checkpoint_dir(workdir)} holds step {reader.step} saved by jaxsae "
        f"{reader.run.get('jaxsae_version') or '(unknown version)'}, from before the SAE had its "
        "own output bias params.b_dec; this version cannot resume it. It still exports "
        "(python -m jaxsae.export reads it); to train on, use a new --workdir or the jaxsae "
        "that wrote it.")
  refused, changed = config_changes(reader.run["config"], config_dict)
  if refused:
    raise CheckpointError(
        f"{checkpoint_dir(workdir)} holds step {reader.step} of an incompatible run; refusing to "
        "resume it with this config:\n  " + "\n  ".join(refused) +
        "\nUse a new --workdir, or the original values to resume.")
  if changed:
    logging.warning("resuming step %d with changed config fields:\n  %s", reader.step,
                    "\n  ".join(changed))
  return reader.step


# ---- the manager -------------------------------------------------------------------------------

@dataclasses.dataclass
class Restored:
  step: int
  state: Any        # TrainState on the target shardings
  data: dict        # this process's iterator state
  run: dict         # the "run" item: config, data metadata, metrics, versions


def abstract_like(tree):
  """ShapeDtypeStructs carrying each array's sharding: the restore target."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


class Checkpointer:
  """Saves and restores (state, data position, run description) in workdir/checkpoints."""

  def __init__(self, workdir: str, max_to_keep: int = 3, async_save: bool = True,
               name: str = ""):
    """name: distinct per Checkpointer of one job (a sweep's members): the processes' barriers
    are keyed by it, else two managers saving the same step would share one barrier."""
    self.directory = checkpoint_dir(workdir)
    self._mngr = ocp.CheckpointManager(
        self.directory, item_names=("state", "data", "run"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
            create=True, multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=name or None),
            # Folders of saves that never completed (killed mid-write) are deleted on start.
            cleanup_tmp_directories=True))
    self._in_flight: Optional[int] = None   # step of the last save whose completion is unconfirmed

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def restore(self, like_state, step: Optional[int] = None) -> Restored:
    """Restores a step (default: the latest) onto the shardings of `like_state`, which may be
    abstract (ShapeDtypeStructs with shardings) or real arrays of the target layout."""
    step = self.latest_step() if step is None else step
    target = abstract_like(like_state)
    got = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=DataRestore(), run=ocp.args.JsonRestore()))
    return Restored(step=step, state=got.state, data=got.data, run=got.run)

  def discard_after(self, step) -> list:
    """Deletes the complete steps after `step` (None: all); returns them. A sweep's members save
    together, and a step is the sweep's only once every member's is complete (train.py): a kill
    between leaves some members one step ahead, which the resumed sweep drops and saves again."""
    self._mngr.reload()   # what is on disk now
    late = [s for s in self._mngr.all_steps() if step is None or s > step]
    for s in late:
      self._mngr.delete(s)
    return late

  def save(self, step: int, state, data_state: dict, run: dict):
    """Starts saving a step; returns once the state is copied off the devices."""
    if step in self._mngr.all_steps():   # e.g. a finished run started again
      return
    try:
      self._mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state, save_args=jax.tree.map(
              lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), state)),
          data=DataSave(data_state),
          run=ocp.args.JsonSave(run)))
    except Exception as e:  # noqa: BLE001 - a background error of the previous save surfaces here
      raise self._failure(self._in_flight or step, e) from e
    self._in_flight = step

  def check(self):
    """Raises CheckpointError if a background save has failed (non-blocking)."""
    try:
      self._mngr.check_for_errors()
    except Exception as e:  # noqa: BLE001
      raise self._failure(self._in_flight, e) from e

  def wait(self):
    """Blocks until every started save is complete on disk."""
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._failure(self._in_flight, e) from e
    self._in_flight = None

  def close(self):
    """Waits for saves in flight. After an error elsewhere the last good step still lands; a
    save's own failure was already raised by save/check/wait, so here it is only logged."""
    try:
      self._mngr.close()
    except Exception as e:  # noqa: BLE001
      logging.error("%s", self._failure(self._in_flight, e))

  def _failure(self, step, error) -> CheckpointError:
    done = [s for s in complete_steps(self.directory) if step is None or s < step]
    kept = (f"the last complete checkpoint, step {done[-1]}, is intact: rerun the same command to "
            "resume from it" if done else "no earlier checkpoint exists")
    text = (str(error).strip().splitlines() or [""])[0]
    if len(text) > 300:   # the cause (e.g. "No space left on device") is at the end
      text = "..." + text[-280:]
    return CheckpointError(f"saving checkpoint step {step} to {self.directory} failed "
                           f"({type(error).__name__}: {text}); {kept}")


# ---- preemption --------------------------------------------------------------------------------

class Preemption:
  """Notices a request to stop (SIGTERM: TPU preemption, SLURM time limit, `docker stop`, kill).

  One process: a SIGTERM handler sets a flag that the loop reads after each step, then the loop
  saves and returns normally (exit 0). Several processes must stop at the same step, so there
  JAX's preemption sync point decides instead (its distributed runtime watches for SIGTERM).
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("received signal %d: saving a checkpoint after this step, then stopping", signum)
    self._event.set()

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


# ---- workdir housekeeping ----------------------------------------------------------------------

def trim_metrics(workdir: str, step: int):
  """Drops metrics.jsonl records past `step` (logged after the checkpoint a run resumes from), so
  the resumed run's records follow on without duplicates."""
  path = paths.join(workdir, "metrics.jsonl")
  text = paths.read_text(path)
  if text is None:
    return
  lines = text.splitlines(keepends=True)
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        keep.append(line)
    except (ValueError, KeyError):   # a line cut short by a kill
      pass
  if len(keep) != len(lines):
    paths.write_text(path, "".join(keep))
