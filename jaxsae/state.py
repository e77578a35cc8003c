"""The train state, its shardings, and its creation directly on the mesh (nothing is replicated
first and resharded later: the init is compiled with the state's out_shardings)."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from jaxsae import model


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 []
  params: dict             # W_enc [n, d], b_enc [n], W_dec [n, d], b_pre [d], all float32
  opt_state: Any
  since_fired: jax.Array   # int32 [n]: tokens since each latent last fired, saturating at dead_tokens
  input_scale: jax.Array   # float32 []: raw activations are multiplied by this before encoding
  # BatchTopK's inference threshold (float32 [], model.py); None (no leaf, nothing checkpointed)
  # for the other architectures, so their checkpoints keep their layout.
  threshold: Any = None


def state_specs(abstract: TrainState, tx, specs) -> TrainState:
  """PartitionSpecs for every leaf: optimizer moments follow their parameters."""
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, specs.params,
                              transform_non_params=lambda _: P(),
                              is_leaf=lambda s: isinstance(s, P))
  return TrainState(step=P(), params=specs.params, opt_state=opt, since_fired=specs.latent,
                    input_scale=P(), threshold=None if abstract.threshold is None else P())


def _init_fn(spec: model.SaeSpec, tx):
  def init(key, b_pre, input_scale):
    params = model.init_params(key, spec.d, spec.n, b_pre, spec.encoder_init_norm)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      since_fired=jnp.zeros((spec.n,), jnp.int32),
                      input_scale=jnp.asarray(input_scale, jnp.float32),
                      threshold=jnp.zeros((), jnp.float32) if spec.batchtopk else None)
  return init


def abstract(spec: model.SaeSpec, tx, specs) -> tuple[TrainState, TrainState]:
  """(the state as ShapeDtypeStructs carrying their shardings, the NamedShardings): what a step
  can be compiled against without allocating anything (plan.py, benchmarks)."""
  shapes = jax.eval_shape(_init_fn(spec, tx), jax.random.PRNGKey(0),
                          jnp.zeros((spec.d,), jnp.float32), 1.0)
  shardings = specs.named(state_specs(shapes, tx, specs))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, shardings), shardings


def create(key, spec: model.SaeSpec, tx, specs, b_pre, input_scale):
  """Returns (state laid out on specs.mesh, its NamedShardings)."""
  init = _init_fn(spec, tx)
  shapes = jax.eval_shape(init, key, b_pre, input_scale)
  shardings = specs.named(state_specs(shapes, tx, specs))
  state = jax.jit(init, out_shardings=shardings)(key, b_pre, input_scale)
  return state, shardings
