"""Where metrics go: metrics.jsonl and TensorBoard events in the workdir (process 0), and a one-line
step log on every process. Keys are fixed; benchmarks and dashboards read them."""
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

# Every log record carries these keys (eval/* only where evaluated).
TRAIN_KEYS = ("step", "tokens", "train/fvu", "train/explained_variance", "train/l0",
              "sparsity/dead_frac", "losses/mse", "losses/auxk", "perf/tokens_per_sec",
              "perf/data_wait_frac")


class Writer:
  """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool):
    self._enabled = enabled
    self._jsonl = self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # lazy: only process 0 writes events
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, record: dict):
    if not self._enabled:
      return
    self._jsonl.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(key, value, record["step"])

  def close(self):
    if self._enabled:
      self._jsonl.close()
      self._tb.close()


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def step_line(record: dict, total_steps: int, eta_s: float) -> str:
  line = (f"step {record['step']}/{total_steps} | {record['perf/tokens_per_sec']:,.0f} tok/s | "
          f"fvu {record['train/fvu']:.4f} | l0 {record['train/l0']:.1f} | "
          f"dead {100 * record['sparsity/dead_frac']:.1f}% | ETA {_duration(eta_s)}")
  evals = [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("eval/")]
  return " | ".join([line] + evals)


class Interval:
  """Averages per-step device metrics over a logging interval and times it.

  Steps hand in their metrics as device arrays; nothing is fetched until `summary`, which the
  loop calls after the *next* step is dispatched, so the device never idles for a log line.
  """

  def __init__(self):
    self.reset()

  def reset(self):
    self._metrics, self._start, self._wait = [], time.perf_counter(), 0.0

  def add(self, metrics, data_wait_s: float):
    self._metrics.append(metrics)
    self._wait += data_wait_s

  def summary(self, step: int, tokens: int, batch_size: int) -> dict:
    values = jax.device_get(self._metrics)
    elapsed = time.perf_counter() - self._start
    record = {"step": step, "tokens": tokens}
    for key in values[0]:
      record[key] = float(np.mean([v[key] for v in values]))
    record["train/explained_variance"] = 1.0 - record["train/fvu"]
    record["perf/tokens_per_sec"] = len(values) * batch_size / max(elapsed, 1e-9)
    record["perf/data_wait_frac"] = self._wait / max(elapsed, 1e-9)
    self.reset()
    return record


@jax.jit
def ground_truth_recovery(w_dec, truth, threshold=0.9):
  """eval/gt_mmcs: mean over true features of the best cosine with any decoder row;
  eval/gt_recovered_frac: the fraction whose best cosine exceeds threshold."""
  best = jnp.max(truth @ w_dec.T, axis=1)  # decoder rows are unit norm; so are the true features
  return {"eval/gt_mmcs": jnp.mean(best), "eval/gt_recovered_frac": jnp.mean(best > threshold)}
