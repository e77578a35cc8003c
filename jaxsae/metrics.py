"""Where metrics go: metrics.jsonl and TensorBoard events in the workdir (process 0), optionally a
Weights & Biases run (config.metrics.wandb_project), and a one-line step log on every process. Keys
are fixed; benchmarks and dashboards read them."""
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import paths

# Every log record carries these keys (eval/* only where evaluated).
TRAIN_KEYS = ("step", "tokens", "train/fvu", "train/explained_variance", "train/l0",
              "sparsity/dead_frac", "losses/mse", "losses/auxk", "perf/tokens_per_sec",
              "perf/data_wait_frac")


class Writer:
  """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard.

  A local metrics.jsonl is appended to line by line. An object in a bucket (gs://) cannot be
  appended to: its records are kept and the whole object rewritten, at most every
  `rewrite_every_s` seconds (GCS allows about one write a second to an object) and on flush().
  """

  def __init__(self, workdir: str, enabled: bool, rewrite_every_s: float = 10.0,
               wandb_project: str = "", run_name: str = "", run_config: dict | None = None):
    self._enabled = enabled
    self._jsonl = self._tb = self._wandb = None
    self._remote = paths.is_url(workdir)
    self._path = paths.join(workdir, "metrics.jsonl")
    self._rewrite_every_s, self._written_at, self._dirty = rewrite_every_s, 0.0, False
    if enabled:
      from tensorboardX import SummaryWriter  # lazy: only process 0 writes events
      if self._remote:
        self._text = paths.read_text(self._path) or ""
      else:
        self._jsonl = paths.of(self._path).open("a")
      # tensorboardX writes gs:// (google-cloud-storage) and s3:// (boto3) itself.
      self._tb = SummaryWriter(paths.join(workdir, "tb"))
      if wandb_project:
        self._wandb = _wandb_run(workdir, wandb_project, run_name, run_config)

  def write(self, record: dict):
    if not self._enabled:
      return
    line = json.dumps(record) + "\n"
    if self._remote:
      self._text += line
      self._dirty = True
      if time.monotonic() - self._written_at >= self._rewrite_every_s:
        self.flush()
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    scalars = {key: value for key, value in record.items()
               if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)}
    for key, value in scalars.items():
      self._tb.add_scalar(key, value, record["step"])
    if self._wandb is not None:
      self._wandb.log(scalars, step=record["step"])

  def flush(self):
    """Everything written so far is in metrics.jsonl (the loop calls it before each checkpoint)."""
    if self._enabled and self._remote and self._dirty:
      paths.write_text(self._path, self._text)
      self._written_at, self._dirty = time.monotonic(), False

  def close(self):
    if self._enabled:
      self.flush()
      if self._jsonl is not None:
        self._jsonl.close()
      self._tb.close()
      if self._wandb is not None:
        self._wandb.finish()


def _wandb_run(workdir: str, project: str, name: str, config: dict | None):
  """A W&B run that mirrors the TensorBoard scalars. Where it sends them is wandb's own setting:
  online after `wandb login`, or WANDB_MODE=offline (no network; `wandb sync` uploads later). Its
  files go in WORKDIR/wandb (a gs:// workdir: ./wandb, as wandb writes local files only)."""
  import wandb   # the optional extra: pip install -e ".[wandb]"; config_check refuses it missing
  # reinit="create_new": a sweep's members each log to a run of their own, all in this process.
  return wandb.init(project=project, name=name or paths.of(workdir).name, config=config,
                    dir=None if paths.is_url(workdir) else workdir, reinit="create_new")


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
    for key in values[0]:   # a float, or per member of a sweep's stacked step (train.py)
      mean = np.mean([v[key] for v in values], axis=0)
      record[key] = float(mean) if np.ndim(mean) == 0 else mean
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
