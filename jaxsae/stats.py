"""Statistics of a data sample that set up training: the input scale and the geometric median."""
import jax
import jax.numpy as jnp
import numpy as np

NORMALIZE = ("d", "unit", "none")
NORMALIZE_ABOUT = ("mean", "zero")


def input_scale(sample: np.ndarray, normalize: str, about: str = "mean") -> float:
  """One constant s so that s * x has mean squared norm d ("d"), 1 ("unit"), or s = 1 ("none").

  The norm is measured about the sample's mean (`about="mean"`) or about zero ("zero"). About the
  mean, the scale sees only what the SAE has to encode: b_pre absorbs the offset, and a residual
  stream whose norm is mostly a constant vector (SmolLM2: 107 of 154) would otherwise be shrunk
  until its varying part is small against Adam's fixed step on the biases.
  """
  if normalize == "none":
    return 1.0
  target = sample.shape[1] if normalize == "d" else 1.0
  centred = sample.astype(np.float64)
  if about == "mean":
    centred = centred - centred.mean(axis=0)
  mean_sq = float(np.mean(np.sum(np.square(centred), axis=1)))
  if not np.isfinite(mean_sq) or mean_sq <= 0:
    raise ValueError(f"cannot normalize inputs: the init sample's mean squared norm is {mean_sq}")
  return float(np.sqrt(target / mean_sq))


@jax.jit
def geometric_median(x, iters=64, eps=1e-6):
  """Weiszfeld iterations from the mean: the point minimizing the summed distance to the rows."""

  def body(_, y):
    w = 1.0 / jnp.maximum(jnp.linalg.norm(x - y, axis=1), eps)
    return (w @ x) / jnp.sum(w)

  return jax.lax.fori_loop(0, iters, body, jnp.mean(x, axis=0))
