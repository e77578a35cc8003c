"""SAEs that train in one compiled step: one plain run, or a sweep's members that differ only in
their rate and seed (sweep.STACKABLE_FIELDS).

Every member sees the same batch (one host read, one transfer to the devices). How the members
share the step is chosen from the backend (sweep.resolve_stacking, logged): "vmap" stacks their
states on a leading axis and vmaps the step over it (one GEMM of all members' encoders: what fills
an accelerator that one small SAE leaves idle); "loop" keeps one state per member and runs their
steps one after the other inside one compiled program. Either way a member's update is its own
step's arithmetic, equal to the member trained alone to float rounding (tests/test_sweep.py).
With sweep_stacking="separate" (the CPU default) every member is a group of its own. A member whose loss goes non-finite is
frozen (its `active` flag off: no update, its step counter stays) while the others go on.
"""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsae import model, optim, plan, state as state_lib, stats
from jaxsae.step import StepFns


class Group:
  """configs: the members' configs (equal but for sweep.STACKABLE_FIELDS); init: the data's
  statistics (stats.InitStats, from train.init_statistics)."""

  def __init__(self, configs, spec: model.SaeSpec, specs, init: stats.InitStats,
               stacking: str = "vmap"):
    self.configs, self.size, self.spec = list(configs), len(configs), spec
    self.stacking = stacking if self.size > 1 else ""
    scale, b_pre, target, self.density = init
    # The data's scales every member starts from (for the logs; the state holds them too).
    self.input_scale, self.target_scale = float(scale), None if target is None else target[1]
    self.lrs = [optim.resolve_lr(c, self.density)[0] for c in configs]   # each member's peak
    self.tx = optim.make_optimizer(configs[0], self.lrs[0])
    keys = [jax.random.PRNGKey(c.train.seed) for c in configs]
    self.active = [True] * self.size
    self._compiled = None   # the train step, compiled at the first batch (train)
    if self.size == 1:
      self.state, self.shardings = state_lib.create(keys[0], spec, self.tx, specs, b_pre, scale,
                                                    target)
      self.steps = StepFns(configs[0], spec, specs, self.tx, self.shardings, self.lrs[0])
      return
    self._replicated = NamedSharding(specs.mesh, P())
    self._lrs = jnp.asarray(self.lrs, jnp.float32)
    self._hypers = self._make_hypers()
    if stacking == "loop":
      created = [state_lib.create(key, spec, self.tx, specs, b_pre, scale, target)
                 for key in keys]
      self.state, self.shardings = tuple(c[0] for c in created), created[0][1]
      self.steps = StepFns(configs[0], spec, specs, self.tx, self.shardings, self.lrs[0])
      self._train, self._eval = self.steps.looped(self.shardings, self.size)
      return
    self.state, self.shardings, self.stacked_shardings = state_lib.create_stacked(
        keys, spec, self.tx, specs, b_pre, scale, target)
    self.steps = StepFns(configs[0], spec, specs, self.tx, self.shardings, self.lrs[0])
    self._train, self._eval = self.steps.stacked(self.stacked_shardings)
    self._slice = jax.jit(lambda states, i: jax.tree.map(lambda a: a[i], states),
                          out_shardings=self.shardings)
    self._stack = jax.jit(lambda states: jax.tree.map(lambda *a: jnp.stack(a), *states),
                          out_shardings=self.stacked_shardings)

  def _make_hypers(self):
    return jax.device_put({"lr": self._lrs, "active": jnp.asarray(self.active)}, self._replicated)

  @property
  def running(self) -> bool:
    return any(self.active)

  def train(self, batch):
    """Dispatches one step of every member; returns (metrics, guard flags) as device arrays, with
    a leading member axis when stacked. The first call compiles the step ahead of time (once:
    the same program a jit call would build), which gives XLA's memory figure (compiled_bytes)."""
    args = (self.state, batch) if self.size == 1 else (self.state, batch, self._hypers)
    if self._compiled is None:
      self._compiled = (self.steps.train if self.size == 1 else self._train).lower(*args).compile()
    self.state, metrics, guard = self._compiled(*args)
    return metrics, guard

  def compiled_bytes(self) -> int | None:
    """Per-device bytes of the compiled train step (plan.compiled_peak), once train has run;
    None before, or where the backend gives no memory analysis."""
    try:
      return plan.compiled_peak(self._compiled) if self._compiled is not None else None
    except Exception:   # a backend without memory_analysis(), or one that leaves fields out
      return None

  def eval_sums(self, batch):
    return self.steps.eval(self.state, batch) if self.size == 1 else self._eval(self.state, batch)

  def w_decs(self) -> list:
    """Each member's decoder."""
    if self.stacking == "vmap":
      return list(self.state.params["W_dec"])
    return [s.params["W_dec"] for s in (self.state if self.stacking == "loop" else [self.state])]

  def member(self, tree, i: int):
    """Member i's part of a per-group tree of host values (metrics, guards, eval sums)."""
    return tree if self.size == 1 else jax.tree.map(lambda a: a[i], tree)

  def member_state(self, i: int):
    """Member i's TrainState on its own (unstacked) shardings: what its checkpoint holds."""
    if self.stacking == "vmap":
      return self._slice(self.state, i)
    return self.state[i] if self.stacking == "loop" else self.state

  def abstract_member(self):
    """ShapeDtypeStructs (with shardings) of one member's state: a restore target."""
    one = self.state[0] if self.stacking == "loop" else self.state
    cut = self.stacking == "vmap"
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape[cut:], a.dtype, sharding=s),
                        one, self.shardings)

  def free(self, keep=()):
    """Deletes the state's buffers (before a restore replaces it: never two states at once),
    but for the members in `keep` when each holds a state of its own (loop)."""
    if self.stacking == "loop":
      for i, state in enumerate(self.state):
        if i not in keep:
          jax.tree.map(lambda a: a.delete(), state)
      return
    jax.tree.map(lambda a: a.delete(), self.state)

  def set_states(self, states: list):
    """Takes the members' states (restored ones, on member shardings)."""
    if self.stacking == "vmap":
      self.state = self._stack(states)
    else:
      self.state = tuple(states) if self.stacking == "loop" else states[0]

  def stop(self, i: int):
    """Freezes member i: later steps leave its state as it is."""
    self.active[i] = False
    if self.size > 1:
      self._hypers = self._make_hypers()
