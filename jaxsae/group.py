"""SAEs that train in one compiled step: one plain run, or a sweep's members that differ only in
their rate and seed (sweep.STACKABLE_FIELDS), stacked on a leading axis and vmapped over.

Every member sees the same batch (one host read, one transfer to the devices). A stacked member's
update is its own step's arithmetic, vmapped: equal to the member trained alone up to the order
in which XLA sums (tests/test_sweep.py measures it). A member whose loss goes non-finite is frozen
(its `active` flag off: no update, its step counter stays) while the others go on.
"""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsae import model, optim, state as state_lib
from jaxsae.step import StepFns


class Group:
  """configs: the members' configs (equal but for sweep.STACKABLE_FIELDS); init: the data's
  (input scale, b_pre, target) from train.init_statistics."""

  def __init__(self, configs, spec: model.SaeSpec, specs, init):
    self.configs, self.size, self.spec = list(configs), len(configs), spec
    scale, b_pre, target = init
    self.tx = optim.make_optimizer(configs[0])
    keys = [jax.random.PRNGKey(c.train.seed) for c in configs]
    self.active = [True] * self.size
    if self.size == 1:
      self.state, self.shardings = state_lib.create(keys[0], spec, self.tx, specs, b_pre, scale,
                                                    target)
      self.steps = StepFns(configs[0], spec, specs, self.tx, self.shardings)
      return
    self.state, self.shardings, self.stacked_shardings = state_lib.create_stacked(
        keys, spec, self.tx, specs, b_pre, scale, target)
    self.steps = StepFns(configs[0], spec, specs, self.tx, self.shardings)
    self._train, self._eval = self.steps.stacked(self.stacked_shardings)
    self._replicated = NamedSharding(specs.mesh, P())
    self._lrs = jnp.asarray([optim.resolve_lr(c)[0] for c in configs], jnp.float32)
    self._hypers = self._make_hypers()
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
    a leading member axis when stacked."""
    if self.size == 1:
      self.state, metrics, guard = self.steps.train(self.state, batch)
    else:
      self.state, metrics, guard = self._train(self.state, batch, self._hypers)
    return metrics, guard

  def eval_sums(self, batch):
    return self.steps.eval(self.state, batch) if self.size == 1 else self._eval(self.state, batch)

  def member(self, tree, i: int):
    """Member i's part of a per-group tree of host values (metrics, guards, eval sums)."""
    return tree if self.size == 1 else jax.tree.map(lambda a: a[i], tree)

  def member_state(self, i: int):
    """Member i's TrainState on its own (unstacked) shardings: what its checkpoint holds."""
    return self.state if self.size == 1 else self._slice(self.state, i)

  def abstract_member(self):
    """ShapeDtypeStructs (with shardings) of one member's state: a restore target."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape[self.size > 1:], a.dtype,
                                                          sharding=s),
                        self.state, self.shardings)

  def free(self):
    """Deletes the state's buffers (before a restore replaces it: never two states at once)."""
    jax.tree.map(lambda a: a.delete(), self.state)

  def set_states(self, states: list):
    """Takes the members' states (restored ones, on member shardings)."""
    self.state = states[0] if self.size == 1 else self._stack(states)

  def stop(self, i: int):
    """Freezes member i: later steps leave its state as it is."""
    self.active[i] = False
    if self.size > 1:
      self._hypers = self._make_hypers()
