"""Adam with the recipe's learning-rate scaling, and the decoder-norm constraint.

Decoder rows live on the unit sphere: before each update the gradient of every W_dec row loses its
component along that row (it would only change the norm), and after the update rows are
renormalized. Both are row-local, so they work unchanged on latent-sharded weights.
"""
import math

import jax.numpy as jnp
import optax

from jaxsae import model


def default_lr(n: int) -> float:
  """1e-4 at n = 2^14, scaled as 1/sqrt(n / 2^14) (Gao et al. 2024)."""
  return 1e-4 / math.sqrt(n / 2 ** 14)


def learning_rate(train, n: int):
  """Constant schedule at train.lr (or the n-scaled default), optional warmup and final decay."""
  lr = train.lr if train.lr is not None else default_lr(n)
  decay_steps = int(train.steps * train.decay_frac)
  flat = max(train.steps - train.warmup_steps - decay_steps, 0)
  parts, bounds = [], []
  if train.warmup_steps:
    parts.append(optax.linear_schedule(0.0, lr, train.warmup_steps))
    bounds.append(train.warmup_steps)
  parts.append(optax.constant_schedule(lr))
  if decay_steps:
    bounds.append(train.warmup_steps + flat)
    parts.append(optax.linear_schedule(lr, 0.0, decay_steps))
  return optax.join_schedules(parts, bounds) if bounds else parts[0]


def project_decoder_grads() -> optax.GradientTransformation:
  """Removes from each W_dec row's gradient its component parallel to the row."""

  def update(updates, state, params):
    w, g = params["W_dec"], updates["W_dec"]
    g = g - jnp.sum(g * w, axis=1, keepdims=True) * w
    return {**updates, "W_dec": g}, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config) -> optax.GradientTransformation:
  t = config.train
  return optax.chain(
      project_decoder_grads(),
      optax.adam(learning_rate(t, config.sae.n), b1=t.b1, b2=t.b2, eps=t.eps))


def renormalize_decoder(params):
  return {**params, "W_dec": model.unit_rows(params["W_dec"])}
