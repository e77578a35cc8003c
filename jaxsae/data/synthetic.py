"""Synthetic activations with known ground truth: sparse non-negative features in superposition.

x = sum_i c_i f_i + noise, with F unit features f_i in d < F dimensions (superposition), feature i
active with probability p_i ~ rank^-freq_exponent (uneven frequencies, `active` expected per sample),
and magnitudes c_i ~ U[0.5, 1.5]. An SAE that learns the f_i as decoder rows has found the truth.
"""
import numpy as np

from jaxsae.data.source import BatchIterator, Data


def features(num_features: int, d: int, seed: int) -> np.ndarray:
  f = np.random.default_rng([seed, 0]).standard_normal((num_features, d)).astype(np.float32)
  return f / np.linalg.norm(f, axis=1, keepdims=True)


def frequencies(num_features: int, active: float, exponent: float) -> np.ndarray:
  p = np.arange(1, num_features + 1, dtype=np.float64) ** -exponent
  return np.minimum(p * active / p.sum(), 1.0)


def sample(feats, probs, noise, rows, rng) -> np.ndarray:
  on = rng.random((rows, len(probs)), dtype=np.float32) < probs.astype(np.float32)
  coef = on * rng.uniform(0.5, 1.5, size=on.shape).astype(np.float32)
  x = coef @ feats
  x += noise * rng.standard_normal(x.shape, dtype=np.float32)
  return x


class SyntheticBatches(BatchIterator):
  """Batch i of process p is drawn from its own seeded stream: deterministic and resumable."""

  def __init__(self, feats, probs, noise, local_batch, seed, stream, process_index):
    self._args = (feats, probs, noise, local_batch)
    self._seed, self._stream, self._p = seed, stream, process_index
    self._step = 0

  def __next__(self):
    rng = np.random.default_rng([self._seed, self._stream, self._p, self._step])
    self._step += 1
    return sample(*self._args, rng)

  def get_state(self):
    return {"step": self._step}

  def set_state(self, state):
    self._step = int(state["step"])


def create(cfg, d: int, global_batch: int, eval_rows: int, eval_batches: int,
           process_index: int, process_count: int) -> Data:
  feats = features(cfg.num_features, d, cfg.seed)
  probs = frequencies(cfg.num_features, cfg.active, cfg.freq_exponent)
  local = global_batch // process_count
  train = SyntheticBatches(feats, probs, cfg.noise, local, cfg.seed, 1, process_index)

  def eval_iter():
    it = SyntheticBatches(feats, probs, cfg.noise, local, cfg.seed, 2, process_index)
    for _ in range(min(eval_batches, max(1, eval_rows // global_batch))):
      yield next(it)

  def init_sample(count):
    return sample(feats, probs, cfg.noise, count, np.random.default_rng([cfg.seed, 3]))

  return Data(d=d, dtype="float32", train=train, eval_batches=eval_iter if eval_rows else None,
              init_sample=init_sample, ground_truth=feats, eval_rows=eval_rows,
              metadata={"source": "synthetic", "num_features": cfg.num_features,
                        "active": cfg.active})
