"""The compiled train and eval steps.

The per-device work runs in shard_map: each device holds a slice of the batch and a slice of the
latents; selection, the sparse ops and their backward do their own collectives over the latent
axis (topk.py, sparse.py), and gradients are summed over the batch axes here. The optimizer update
is elementwise or row-local: optax's runs outside shard_map on the sharded arrays, the fused and
lazy sweeps (optim.fused_update; optim.StepOptimizer.per_shard) inside it, each device on its own
rows. check_vma=False because Pallas kernels inside shard_map need it; correctness does not rest on
it, since no psum is differentiated by autodiff (the custom VJPs do their own).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsae import config_check, knobs, model, optim, plan, topk
from jaxsae.ops import Ops
from jaxsae.sparse import localize
from jaxsae.state import TrainState

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def aux_sizes(k_aux: int, buckets: bool) -> tuple[int, ...]:
  """The AuxK widths a step may run: k_aux, and with buckets k_aux/8, k_aux/64 while >= 32.

  A step picks the smallest width that holds every dead latent (or k_aux when more are dead).
  With width >= number dead, the dead top-k picks every dead latent either way, and the extra
  picks of a wider run are masked to zero, so the loss and gradients are the same; the work
  (a second top-k, sparse ops over B x width pairs) shrinks with the width. Late in training only
  a few latents are dead, and k_aux=256 would cost 8x the k=32 pairs of the main term.
  """
  sizes = [k_aux]
  while buckets and sizes[0] // 8 >= 32:
    sizes.insert(0, sizes[0] // 8)
  return tuple(sizes)


class StepFns:
  """Builds the jitted steps for one config, mesh and optimizer. lr: the peak rate (the Group's,
  which knows the data's density; None: optim.resolve_lr's without it)."""

  def __init__(self, config, spec: model.SaeSpec, specs, tx, state_shardings,
               lr: float | None = None):
    self.spec, self.specs = spec, specs
    self.kernels, _ = config_check.resolve_kernels(config)
    self.axis = specs.latent_axis if specs.model_size > 1 else None
    # How the model's ops run on this mesh and backend, with the performance knobs (knobs.py)
    # resolved to the plain values the step is traced with. encoder_tile 0: pre[B, n_local] in
    # one piece (topk.py).
    self.ops = Ops(axis=self.axis, batch_axes=tuple(specs.batch_axes), kernels=self.kernels,
                   dense_op_ratio=knobs.dense_op_ratio(config)[0],
                   compute_dtype=DTYPES[config.compute_dtype],
                   encoder_tile=plan.resolve_encoder_tile(config, specs.data_size,
                                                          specs.model_size)[0])
    self.batch_size = config.train.batch_size
    self.aux_sizes = aux_sizes(spec.k_aux, knobs.auxk_buckets(config)[0])
    n_local = spec.n // specs.model_size
    compact = knobs.auxk_compact(config)[0]
    # (AuxK width, dead-list length or 0 for all latents) of each branch a step may take.
    self.aux_branches = [(0, 0)] + [
        (w, size) for w in self.aux_sizes
        for size in (topk.compact_sizes(n_local, w) if compact else ()) + (0,)]
    self.param_specs = jax.tree.map(lambda s: s.spec, state_shardings.params)
    self.lazy = optim.resolve_lazy(config)[0]   # optim.py: only the selected latent rows
    # The optimizer update, dense or the fused/lazy sweep (optim.StepOptimizer), as one call:
    # (grads, opt_state, params, touched or None, peak rate) -> (params, opt_state).
    self.optimizer = optim.make_step_optimizer(
        config, tx, kernels=self.kernels,
        chunk=optim.lazy_chunk_rows(n_local, self.batch_size, spec.k_select, specs.model_size))
    self._apply_optimizer = self.optimizer.update
    if self.optimizer.per_shard:   # each device sweeps its own rows (optim.StepOptimizer)
      opt_specs = jax.tree.map(lambda s: s.spec, state_shardings.opt_state)
      self._apply_optimizer = self._shard_map(
          self._apply_optimizer,
          (self.param_specs, opt_specs, self.param_specs, specs.latent, P()),
          (self.param_specs, opt_specs))
    # What a sweep may vary between the members stacked in one step (train.py): the peak rate,
    # and whether the member still trains (one whose loss went non-finite is frozen).
    lr = optim.resolve_lr(config)[0] if lr is None else lr
    self.hyper = {"lr": jnp.float32(lr), "active": jnp.bool_(True)}
    self.batch_sharding = NamedSharding(specs.mesh, specs.batch)
    replicated = NamedSharding(specs.mesh, P())
    self.train = jax.jit(
        lambda state, batch: self._train_step(state, batch, self.hyper,
                                              self.auxk(state.since_fired)),
        in_shardings=(state_shardings, self.batch_sharding),
        out_shardings=(state_shardings, replicated, replicated), donate_argnums=0)
    self.eval = jax.jit(self._eval_sums, in_shardings=(state_shardings, self.batch_sharding),
                        out_shardings=replicated)

  def looped(self, shardings, size: int):
    """(train, eval) for a tuple of `size` states, each on `shardings`: the members' own steps,
    one after the other, in one compiled program (no vmap): what a sweep's stacked members run
    on CPU (sweep.resolve_stacking). train takes hypers as for stacked(); metrics, guard flags
    and eval sums come back with a leading member axis."""
    replicated = NamedSharding(self.specs.mesh, P())
    states_in = tuple([shardings] * size)

    def train(states, batch, hypers):
      outs = [self._train_step(s, batch, jax.tree.map(lambda h: h[i], hypers),
                               self.auxk(s.since_fired)) for i, s in enumerate(states)]
      stack = lambda *trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
      return tuple(o[0] for o in outs), stack(*[o[1] for o in outs]), stack(*[o[2] for o in outs])

    def evaluate(states, batch):
      return jax.tree.map(lambda *a: jnp.stack(a), *[self._eval_sums(s, batch) for s in states])

    train = jax.jit(train, in_shardings=(states_in, self.batch_sharding, replicated),
                    out_shardings=(states_in, replicated, replicated), donate_argnums=0)
    evaluate = jax.jit(evaluate, in_shardings=(states_in, self.batch_sharding),
                       out_shardings=replicated)
    return train, evaluate

  def stacked(self, stacked_shardings):
    """(train, eval) for M states stacked on a leading axis (a sweep's members of one shape,
    train.py): one compiled step, vmapped over the members, sharing one batch. train takes the
    members' hypers ({"lr": [M], "active": [M]}); the AuxK branch is the widest any member needs
    (a wider branch gives the same update: aux_sizes), so it stays one branch, not all of them."""
    replicated = NamedSharding(self.specs.mesh, P())

    def train(states, batch, hypers):
      step = jax.vmap(self._train_step, in_axes=(0, None, 0, (None, 0)))
      return step(states, batch, hypers, self.auxk(states.since_fired))

    train = jax.jit(train, in_shardings=(stacked_shardings, self.batch_sharding, replicated),
                    out_shardings=(stacked_shardings, replicated, replicated), donate_argnums=0)
    evaluate = jax.jit(jax.vmap(self._eval_sums, in_axes=(0, None)),
                       in_shardings=(stacked_shardings, self.batch_sharding),
                       out_shardings=replicated)
    return train, evaluate

  # ---- per-device pieces (inside shard_map) -------------------------------------------------

  def _psum_batch(self, tree):
    return jax.lax.psum(tree, self.specs.batch_axes)

  def _marked(self, idx, ok, n_local, rows=None):
    """Local [n_local] int32, 1 for the latents this shard owns that idx selects where ok; with
    rows (a dead list), idx are positions in the global list and rows maps them to latents."""
    local, own = localize(idx, n_local if rows is None else rows.shape[0], self.axis)
    if rows is not None:
      local = jnp.take(rows, local)
    return jnp.zeros((n_local,), jnp.int32).at[local.reshape(-1)].max(
        (own & ok).reshape(-1).astype(jnp.int32))

  def auxk(self, since_fired):
    """(branch, num_dead) for since_fired [..., n] (leading axes: stacked members): the AuxK
    branch (aux_branch; the widest any member needs; 0 without AuxK) and each member's count of
    dead latents, which scales AuxK's term. Counted once, on the global array, before the
    shard_map: every shard takes the same branch and the same scale."""
    if not self.spec.k_aux:
      return jnp.int32(0), jnp.zeros(since_fired.shape[:-1], jnp.int32)
    dead = (since_fired >= self.spec.dead_tokens).astype(jnp.int32)
    num_dead = jnp.sum(dead, axis=-1)
    shards = dead.reshape(*dead.shape[:-1], self.specs.model_size, -1)   # latent shards
    return self.aux_branch(jnp.max(num_dead), jnp.max(jnp.sum(shards, axis=-1))), num_dead

  def aux_branch(self, num_dead, most):
    """Index into aux_branches: the narrowest AuxK width that holds num_dead (all shards' dead
    latents), then the shortest list that holds `most` (the most any one shard has), 0 last."""
    sizes = self.aux_sizes
    width = jnp.where(num_dead == 0, 0,
                      1 + jnp.searchsorted(jnp.asarray(sizes[:-1], jnp.int32), num_dead))
    width = jnp.asarray((0,) + sizes)[width]
    ok = [(w == width) & ((size == 0) | (most <= size)) for w, size in self.aux_branches]
    return jnp.argmax(jnp.stack(ok))   # the first that fits: lists are ascending, 0 comes last

  def _local_grads(self, params, x, y, since_fired, auxk):
    """x: this shard's inputs; y: its targets (x itself for an SAE); auxk: (the AuxK branch, the
    global count of dead latents), self.auxk's.

    The main selection, loss and gradient are traced once; only AuxK's (its selection among the
    dead latents, its term and that term's gradient) is in the branches of the switch. The AuxK
    term rebuilds the main residual held fixed (model.aux_term), so the two gradients add up to
    the gradient of the whole loss."""
    spec, ops = self.spec, self.ops
    n_local = since_fired.shape[0]
    total_var, _ = ops.centred_sq_sum(y)
    xc = x - params["b_pre"]
    idx = ops.select(xc, params["W_enc"], params["b_enc"], spec.k_select)
    (_, aux), grads = jax.value_and_grad(model.main_terms, has_aux=True)(
        params, x, idx, total_var, spec, ops, target=y)
    z = aux["z"]
    sums = {"sq": aux["sq"], "l0": jnp.sum(z > 0).astype(jnp.float32)}
    if spec.batchtopk:
      sums.update(threshold=aux["threshold"], at_cap=aux["at_cap"])
    latents = {"fired": self._marked(idx[:, :z.shape[1]], z > 0, n_local)}
    touched = None
    if self.lazy:   # the rows the lazy optimizer updates: every selection, main and AuxK
      # (BatchTopK: the kept candidates; the others have no gradient)
      touched = self._marked(idx, z > 0 if spec.batchtopk else True, n_local)
    auxk_sq = jnp.zeros((), jnp.float32)
    if spec.k_aux:
      branch, num_dead = auxk
      dead = since_fired >= spec.dead_tokens
      aux_scale = jnp.minimum(num_dead / spec.k_aux, 1.0)

      def add_auxk(k_aux, size, grads, touched):
        """grads and touched with AuxK's added: its picks among the dead latents of this shard's
        list of `size` (or of all of them: size 0), and the gradient of its term."""
        # Over a list, the selection is a GEMM over the listed rows only. Over all latents
        # (size 0), it is a second pass of the whole encoder GEMM, paid only on the steps that
        # take this branch: those with more dead latents on some shard than the longest list
        # holds (about n_local / 8), or with any dead and auxk_compact off. Taking the dead
        # columns of the main pass's pre[B, n_local] instead (un-tiled xla) would keep pre alive
        # into the switch: a peak of one more pre on every step (measured), which the memory
        # estimate that picks encoder_tile (plan.py) does not count.
        listed = topk.dead_list(dead, size) if size else None
        aux_idx, aux_ok = ops.select_aux(xc, params["W_enc"], params["b_enc"], dead, k_aux,
                                         listed=listed)
        rows = listed[0] if size else None
        (_, auxk_sq), aux_grads = jax.value_and_grad(model.aux_term, has_aux=True)(
            params, x, aux["resid"], aux_idx, aux_ok, total_var, aux_scale, spec, ops, rows)
        if touched is not None:
          touched = jnp.maximum(touched, self._marked(aux_idx, aux_ok, n_local, rows))
        return jax.tree.map(jnp.add, grads, aux_grads), auxk_sq, touched

      # AuxK's top-k costs as much as the main one: run it only when needed, only as wide as the
      # dead latents need (aux_sizes), and over a list of them when every shard has few
      # (topk.compact_sizes). The branch is the same on every shard (its ops hold collectives):
      # self.auxk, from the global counters; the list holds the most any shard has. Branch 0 (no
      # dead latent) passes the main gradient through: zeros added outside the switch would cost
      # a pass over every parameter's gradient on every step.
      no_auxk = lambda grads, touched: (grads, auxk_sq, touched)
      grads, auxk_sq, touched = jax.lax.switch(
          branch, [no_auxk] + [functools.partial(add_auxk, w, size)
                               for w, size in self.aux_branches[1:]], grads, touched)
    sums["auxk_sq"] = auxk_sq
    if touched is not None:
      latents["touched"] = touched
    threshold = sums.pop("threshold", None)   # already global (topk.kth_largest)
    grads, sums, latents = self._psum_batch((grads, sums, latents))
    sums["total_var"] = total_var
    if threshold is not None:
      sums["threshold"] = threshold
    return grads, sums, {name: count > 0 for name, count in latents.items()}

  def _local_eval(self, params, x, y, threshold):
    """Held-out sums; a BatchTopK SAE is scored as the JumpReLU it is at inference (its candidates
    above the state's threshold)."""
    spec, ops = self.spec, self.ops
    total_var, _ = ops.centred_sq_sum(y)
    width = spec.k_select if spec.batchtopk else spec.k
    idx = ops.select(x - params["b_pre"], params["W_enc"], params["b_enc"], width)
    plain = dataclasses.replace(spec, multi_topk=False)
    _, aux = model.main_terms(params, x, idx, total_var, plain, ops, threshold=threshold,
                              target=y)
    sums = self._psum_batch({"sq": aux["sq"], "l0": jnp.sum(aux["z"] > 0).astype(jnp.float32),
                             "rows": jnp.asarray(x.shape[0], jnp.float32)})
    return {**sums, "total_var": total_var}

  def _shard_map(self, fn, in_specs, out_specs):
    return jax.shard_map(fn, mesh=self.specs.mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)

  # ---- global steps (jitted) ----------------------------------------------------------------

  def _train_step(self, state: TrainState, batch, hyper, auxk):
    """One update, guarded: a batch with NaN/inf rows, or a non-finite loss, leaves the state as it
    was (only the step counter moves on); the guard flags tell the host, which decides to stop.
    hyper: the peak rate and whether to train at all (self.hyper); auxk: self.auxk's."""
    specs, spec = self.specs, self.spec
    finite_rows = jnp.all(jnp.isfinite(batch), axis=1)
    x, y = self._inputs(state, jnp.where(finite_rows[:, None], batch.astype(jnp.float32), 0.0))
    grads, sums, latents = self._shard_map(
        self._local_grads, (self.param_specs, specs.batch, specs.batch, specs.latent, P()),
        (self.param_specs, P(), specs.latent))(state.params, x, y, state.since_fired, auxk)
    nonfinite_rows = jnp.sum(~finite_rows)
    finite = jnp.isfinite(sums["sq"]) & jnp.isfinite(sums["auxk_sq"])
    ok = (nonfinite_rows == 0) & finite & hyper["active"]

    def update(state):
      # touched: only with lazy Adam (_local_grads); None updates every row.
      params, opt_state = self._apply_optimizer(grads, state.opt_state, state.params,
                                                latents.get("touched"), hyper["lr"])
      since = jnp.minimum(state.since_fired + self.batch_size, spec.dead_tokens)
      new = state.replace(params=params, opt_state=opt_state,
                          since_fired=jnp.where(latents["fired"], 0, since))
      if spec.batchtopk:   # the inference threshold: a running average of the batches' (model.py)
        beta = 1.0 - 1.0 / spec.threshold_ema_steps
        t = sums["threshold"]
        new = new.replace(threshold=jnp.where(state.step == 0, t,
                                              beta * state.threshold + (1 - beta) * t))
      return new

    new = jax.lax.cond(ok, update, lambda s: s, state)
    tv = sums["total_var"]
    metrics = {
        "train/fvu": sums["sq"] / tv,
        "train/l0": sums["l0"] / self.batch_size,
        "losses/mse": sums["sq"] / (self.batch_size * spec.d_out),
        "losses/auxk": sums["auxk_sq"] / tv,
        "sparsity/dead_frac": jnp.mean(new.since_fired >= spec.dead_tokens),
    }
    if self.lazy:
      metrics["sparsity/touched_frac"] = jnp.mean(latents["touched"])
    if spec.batchtopk:
      metrics["sparsity/threshold"] = sums["threshold"]
      metrics["sparsity/rows_at_cap"] = sums["at_cap"] / self.batch_size
    # A frozen member's step stays where it stopped; its flags report nothing new.
    guard = {"nonfinite_rows": nonfinite_rows, "skipped": ~finite & hyper["active"]}
    return new.replace(step=state.step + hyper["active"].astype(jnp.int32)), metrics, guard

  def _inputs(self, state: TrainState, batch):
    """(x, y) scaled: a transcoder's batch rows are its input and target side by side (the two
    stores' rows, data/paired.py); an SAE's target is its input."""
    if not self.spec.transcoder:
      x = batch * state.input_scale
      return x, x
    d = self.spec.d
    return batch[:, :d] * state.input_scale, batch[:, d:] * state.target_scale

  def _eval_sums(self, state: TrainState, batch):
    x, y = self._inputs(state, batch.astype(jnp.float32))
    specs = self.specs
    return self._shard_map(self._local_eval, (self.param_specs, specs.batch, specs.batch, P()),
                           P())(state.params, x, y, state.threshold)
