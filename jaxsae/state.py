"""The train state, its shardings, and its creation directly on the mesh (nothing is replicated
first and resharded later: the init is compiled with the state's out_shardings)."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsae import model


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 []
  params: dict             # W_enc [n, d], b_enc [n], W_dec [n, d_out], b_pre [d], b_dec [d_out],
                           # all float32 (+ a skip transcoder's W_skip [d_out, d]: model.py)
  opt_state: Any
  since_fired: jax.Array   # int32 [n]: tokens since each latent last fired, saturating at dead_tokens
  input_scale: jax.Array   # float32 []: raw activations are multiplied by this before encoding
  # BatchTopK's inference threshold (float32 [], model.py); None (no leaf, nothing checkpointed)
  # for the other architectures, so their checkpoints keep their layout.
  threshold: Any = None
  target_scale: Any = None  # a transcoder's: raw targets times this are what it rebuilds; None
                            # for an SAE (its target is its input, scaled by input_scale)


def state_specs(abstract: TrainState, tx, specs) -> TrainState:
  """PartitionSpecs for every leaf: optimizer moments follow their parameters."""
  params = specs.params_of(abstract.params)
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, params,
                              transform_non_params=lambda _: P(),
                              is_leaf=lambda s: isinstance(s, P))
  replicated = lambda leaf: None if leaf is None else P()
  return TrainState(step=P(), params=params, opt_state=opt, since_fired=specs.latent,
                    input_scale=P(), threshold=replicated(abstract.threshold),
                    target_scale=replicated(abstract.target_scale))


def _init_fn(spec: model.SaeSpec, tx):
  """init(key, b_pre, input_scale, target) -> TrainState; target = (b_dec, target_scale) for a
  transcoder, None for an SAE."""
  def init(key, b_pre, input_scale, target=None):
    b_dec, target_scale = target if spec.transcoder else (None, None)
    params = model.init_params(key, spec.d, spec.n, b_pre, spec.encoder_init_norm, b_dec,
                               spec.skip)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      since_fired=jnp.zeros((spec.n,), jnp.int32),
                      input_scale=jnp.asarray(input_scale, jnp.float32),
                      threshold=jnp.zeros((), jnp.float32) if spec.batchtopk else None,
                      target_scale=None if target_scale is None else
                      jnp.asarray(target_scale, jnp.float32))
  return init


def zero_target(spec: model.SaeSpec):
  """A stand-in (b_dec, target_scale) of the right shapes for a transcoder; None for an SAE."""
  return (jnp.zeros((spec.d_out,), jnp.float32), 1.0) if spec.transcoder else None


def abstract(spec: model.SaeSpec, tx, specs) -> tuple[TrainState, TrainState]:
  """(the state as ShapeDtypeStructs carrying their shardings, the NamedShardings): what a step
  can be compiled against without allocating anything (plan.py, benchmarks)."""
  shapes = jax.eval_shape(_init_fn(spec, tx), jax.random.PRNGKey(0),
                          jnp.zeros((spec.d,), jnp.float32), 1.0, zero_target(spec))
  shardings = specs.named(state_specs(shapes, tx, specs))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, shardings), shardings


def create(key, spec: model.SaeSpec, tx, specs, b_pre, input_scale, target=None):
  """Returns (state laid out on specs.mesh, its NamedShardings); target: a transcoder's (b_dec,
  target_scale), see _init_fn."""
  init = _init_fn(spec, tx)
  target = zero_target(spec) if spec.transcoder and target is None else target
  shapes = jax.eval_shape(init, key, b_pre, input_scale, target)
  shardings = specs.named(state_specs(shapes, tx, specs))
  state = jax.jit(init, out_shardings=shardings)(key, b_pre, input_scale, target)
  return state, shardings


def stacked_shardings(shardings: TrainState) -> TrainState:
  """The shardings of M states stacked on a new leading axis (a sweep's members, sweep.py): that
  axis whole on every device, the others as before."""
  return jax.tree.map(lambda s: NamedSharding(s.mesh, P(None, *s.spec)), shardings)


def create_stacked(keys, spec: model.SaeSpec, tx, specs, b_pre, input_scale, target=None):
  """M states (one per key) stacked on a leading axis, made on the mesh as create() makes one;
  returns (stacked state, one member's NamedShardings, the stacked NamedShardings)."""
  init = _init_fn(spec, tx)
  target = zero_target(spec) if spec.transcoder and target is None else target
  shapes = jax.eval_shape(init, keys[0], b_pre, input_scale, target)
  shardings = specs.named(state_specs(shapes, tx, specs))
  stacked = stacked_shardings(shardings)
  state = jax.jit(jax.vmap(init, in_axes=(0, None, None, None)), out_shardings=stacked)(
      jnp.stack(keys), b_pre, input_scale, target)
  return state, shardings, stacked
