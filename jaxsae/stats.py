"""Statistics of a data sample that set up training: the input scale, the geometric median and
the element density."""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

NORMALIZE = ("d", "unit", "none")
NORMALIZE_ABOUT = ("mean", "zero")


class InitStats(NamedTuple):
  """What a run starts from, measured once on the init sample (train.init_statistics)."""
  scale: float            # the input scale (input_scale)
  b_pre: np.ndarray       # the geometric median of the scaled inputs
  target: Optional[tuple]  # a transcoder's (b_dec, target scale), else None
  density: float          # the inputs' element density (element_density): the automatic rate's


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
  mean_sq = _centred_sums(sample, about)[1] / max(len(sample), 1)
  if not np.isfinite(mean_sq) or mean_sq <= 0:
    raise ValueError(f"cannot normalize inputs: the init sample's mean squared norm is {mean_sq}")
  return float(np.sqrt(target / mean_sq))


def element_density(sample: np.ndarray) -> float:
  """E|x_i| / rms(x_i) over every element of the sample centred on its mean: how evenly the data
  spreads over its coordinates, sqrt(2/pi) = 0.80 for isotropic Gaussian rows, lower where a few
  coordinates or heavy tails hold the variance. Scale-free; what Adam's per-coordinate step sees
  (optim.py, the automatic rate)."""
  abs_sum, sq_sum = _centred_sums(sample, "mean")
  count = sample.size
  rms = float(np.sqrt(sq_sum / max(count, 1)))
  if not np.isfinite(rms) or rms <= 0:
    raise ValueError(f"cannot measure the data's density: the init sample's rms is {rms}")
  return abs_sum / count / rms


def _centred_sums(sample: np.ndarray, about: str, block_rows: int = 2048) -> tuple[float, float]:
  """(sum |x - c|, sum (x - c)^2) over every element, c the column means (about="mean") or 0
  ("zero"), in float64 a block of rows at a time: a float64 copy of a wide model's whole init
  sample (32k rows x d=16k) would be 4 GiB per temporary."""
  centre = sample.mean(axis=0, dtype=np.float64) if about == "mean" else 0.0
  abs_sum = sq_sum = 0.0
  for start in range(0, len(sample), block_rows):
    centred = sample[start:start + block_rows].astype(np.float64) - centre
    abs_sum += float(np.abs(centred).sum())
    sq_sum += float(np.square(centred).sum())
  return abs_sum, sq_sum


@jax.jit
def geometric_median(x, iters=64, eps=1e-6):
  """Weiszfeld iterations from the mean: the point minimizing the summed distance to the rows."""

  def body(_, y):
    w = 1.0 / jnp.maximum(jnp.linalg.norm(x - y, axis=1), eps)
    return (w @ x) / jnp.sum(w)

  return jax.lax.fori_loop(0, iters, body, jnp.mean(x, axis=0))
