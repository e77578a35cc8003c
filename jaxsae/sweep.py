"""A sweep: several SAEs trained in one job on one read of the activations (train.py).

`config.sweep` is a list of override dicts applied to the base config, one member each:

  --config.sweep="[{'train.lr': 2e-3}, {'train.lr': 6e-3}, {'sae.k': 16}]"

or in a config file, `c.sweep = sweep.grid({"train.lr": [2e-3, 6e-3], "train.seed": [0, 1]})`.
A member may change anything that leaves the data stream and the loop alone (n, k, lr, seed,
architecture, AuxK, the schedule's shape...); one that sets a field of STREAM_FIELDS is refused
before anything is built. Each member trains in WORKDIR/members/<name>/ exactly as a plain run
would there (config.json, metrics.jsonl, TensorBoard events, checkpoints: export, evaluate and
inspect take it as a run). WORKDIR/config.json holds the sweep's own config, WORKDIR/sweep.json the
members, which of them stopped (a non-finite loss stops one member alone) and the last step at
which every member's checkpoint was complete (what a resumed sweep restarts from).

Config files import grid(): this module imports no JAX (config_check, which does, only where a
sweep is checked).
"""
import dataclasses
import difflib
import itertools
import json
import math
from typing import Any

from jaxsae import paths

# Fields every member shares: the data stream (what it reads, in what batches, scaled how), the
# loop (its length, logging, evaluation, checkpoints) and the devices. A prefix ends with ".".
STREAM_FIELDS = ("data.", "train.batch_size", "train.steps", "sae.d", "mesh.", "checkpoint.",
                 "train.log_every", "train.eval_every", "train.on_nonfinite", "sweep",
                 "sweep_stacking")
STACKINGS = ("auto", "vmap", "loop", "separate")
# Fields in which members stacked into one compiled step may differ: per-member values inside the
# step (the rate: StepFns.hyper) or only at init. Members that differ in anything else (n, k, the
# architecture, Adam's betas...) each get a step of their own in the same loop.
STACKABLE_FIELDS = ("train.lr", "train.seed", "name")


@dataclasses.dataclass
class Member:
  name: str        # "" for a plain run; else its folder under WORKDIR/members
  config: Any      # the member's full config (its `sweep` field empty)
  workdir: str
  overrides: dict


def grid(axes: dict = None, **more) -> list:
  """Every combination of the values: grid({"train.lr": [1e-3, 2e-3], "sae.k": [16, 32]}) is four
  override dicts, the last axis varying fastest."""
  axes = {**(axes or {}), **more}
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, (tuple, list)):
    return "-".join(_fmt(v) for v in value)
  return str(value)


def _names(overrides: list) -> list:
  """Folder names from the overrides: 'lr=0.002,k=16' (a field's last part, or its whole path where
  two fields end alike); an override's own 'name' wins; {} is 'base'."""
  keys = {k for o in overrides for k in o if k != "name"}
  short = {k: k.rsplit(".", 1)[-1] for k in keys}
  clash = {s for s in short.values() if list(short.values()).count(s) > 1}
  out = []
  for o in overrides:
    if "name" in o:
      out.append(str(o["name"]))
      continue
    parts = [f"{k if short[k] in clash else short[k]}={_fmt(v)}" for k, v in o.items()]
    out.append(",".join(parts) or "base")
  return out


def _set(config, field: str, value, where: str):
  from jaxsae import config_check
  node, *path, leaf = [config] + field.split(".")
  for part in path:
    if part not in node or not hasattr(node[part], "keys"):
      raise config_check.ConfigError(f"{where}: no config field {field!r}")
    node = node[part]
  if leaf not in node:
    near = difflib.get_close_matches(leaf, list(node.keys()), n=3)
    hint = f" (did you mean {', '.join('.'.join(path + [k]) for k in near)}?)" if near else ""
    raise config_check.ConfigError(f"{where}: no config field {field!r}{hint}")
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise config_check.ConfigError(f"{where}: {field}={value!r}: {e}") from None


def members(config, workdir: str) -> list:
  """The members of config's sweep (each checked as a config of its own), or the one plain run."""
  from jaxsae import config_check
  if not config.get("sweep"):
    return [Member(name="", config=config, workdir=workdir, overrides={})]
  if config.get("sweep_stacking", "auto") not in STACKINGS:
    raise config_check.ConfigError(
        f"sweep_stacking={config.sweep_stacking!r}: expected one of {STACKINGS}")
  for i, o in enumerate(config.sweep):
    if not hasattr(o, "keys") or not all(isinstance(k, str) for k in o.keys()):
      raise config_check.ConfigError(
          f"sweep[{i}] = {o!r}: each member is a dict of overrides, e.g. {{'train.lr': 2e-3}}")
  overrides = [dict(o) for o in config.sweep]
  names = _names(overrides)
  out = []
  for i, (o, name) in enumerate(zip(overrides, names)):
    where = f"sweep member {i} ({name})"
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
      raise config_check.ConfigError(f"{where}: name {name!r} cannot be a folder name")
    for field in o:
      if field == "name":
        continue
      if any(field == s or (s.endswith(".") and field.startswith(s)) for s in STREAM_FIELDS):
        raise config_check.ConfigError(
            f"{where} sets {field}: every member of a sweep shares the data stream, the loop and "
            f"the mesh ({', '.join(STREAM_FIELDS)}); run a separate job for it")
    member = config.copy_and_resolve_references()
    with member.unlocked():
      member.sweep = ()
      for field, value in o.items():
        if field != "name":
          _set(member, field, value, where)
    try:
      config_check.validate(member)
    except config_check.ConfigError as e:
      raise config_check.ConfigError(f"{where}: {e}") from None
    out.append(Member(name=name, config=member, workdir=paths.join(workdir, "members", name),
                      overrides={k: v for k, v in o.items() if k != "name"}))
  seen = [m.name for m in out]
  dupes = sorted({n for n in seen if seen.count(n) > 1})
  if dupes:
    raise config_check.ConfigError(f"sweep members share the names {dupes}: give each a distinct "
                                   "'name' in its override dict")
  return out


def resolve_stacking(config) -> tuple:
  """(how members that could share a step run, why): config.sweep_stacking, else "separate" on
  CPU and "vmap" on GPU and TPU, where one batched GEMM fills the chip that one small SAE leaves
  idle (group.py; not yet measured on one). On the 2-core CPU no variant beat the members run one
  after the other (steady state vmap 0.81x, loop 0.83x, separate 0.81x: bench/history.md, tenth
  session); separate is the one whose members are bit for bit their runs alone."""
  setting = config.get("sweep_stacking", "auto")
  if setting != "auto":
    return setting, "set in the config"
  import jax
  backend = jax.default_backend()
  return ("separate" if backend == "cpu" else "vmap"), f"auto on {backend}"


def stack_key(member: Member, stacking: str = "vmap") -> str:
  """Members with equal keys run stacked in one compiled step: their configs agree everywhere but
  STACKABLE_FIELDS (with stacking "separate", each member has a step of its own)."""
  if stacking == "separate":
    return member.name
  flat = dict(_flatten(member.config.to_dict()))
  for field in STACKABLE_FIELDS:
    flat.pop(field, None)
  return json.dumps(flat, sort_keys=True, default=str)


def _flatten(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


# ---- WORKDIR/sweep.json -------------------------------------------------------------------------

def state_path(workdir: str) -> str:
  return paths.join(workdir, "sweep.json")


def read_state(workdir: str):
  """The sweep's record (members, stopped, checkpointed_step), or None where there is none."""
  text = paths.read_text(state_path(workdir))
  return None if text is None else json.loads(text)


def write_state(workdir: str, state: dict):
  paths.write_text(state_path(workdir), json.dumps(state, indent=2, sort_keys=True))


# ---- the summary table --------------------------------------------------------------------------

COLUMNS = (("lr", "peak lr", "{:.3g}"), ("step", "step", "{:d}"),
           ("eval/fvu", "eval FVU", "{:.4f}"), ("eval/l0", "eval L0", "{:.1f}"),
           ("train/fvu", "train FVU", "{:.4f}"), ("sparsity/dead_frac", "dead", "{:.1%}"))


def last_record(workdir: str) -> dict:
  text = paths.read_text(paths.join(workdir, "metrics.jsonl")) or ""
  record = {}
  for line in text.splitlines():
    try:
      record = json.loads(line)
    except ValueError:   # a line cut short by a kill
      pass
  return record


def summary_table(workdir: str) -> str:
  """One row per member: its last logged metrics and whether it stopped early."""
  state = read_state(workdir)
  if state is None:
    raise FileNotFoundError(f"{state_path(workdir)} not found: {workdir} is not a sweep")
  rows = [["member"] + [title for _, title, _ in COLUMNS] + ["status"]]
  for name in state["members"]:
    folder = paths.join(workdir, "members", name)
    config = json.loads(paths.read_text(paths.join(folder, "config.json")) or "{}")
    record = {**last_record(folder), "lr": config.get("resolved", {}).get("lr")}
    cells = [name]
    for key, _, fmt in COLUMNS:
      value = record.get(key)
      ok = isinstance(value, (int, float)) and math.isfinite(value)
      cells.append(fmt.format(int(value) if fmt == "{:d}" else value) if ok else "-")
    stopped = state.get("stopped", {}).get(name)
    cells.append(f"stopped at step {stopped['step']}: {stopped['reason']}" if stopped else "ok")
    rows.append(cells)
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
