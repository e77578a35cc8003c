"""A sweep against its members run one after the other: total tokens/s, summed over the members.

  python bench/sweep.py                                   # d=576 n=4096 k=32 B=4096, 4 rates
  python bench/sweep.py --store=/tmp/jaxsae/smollm2-135m-L15 --steps=100 --lrs=2e-3,4e-3,8e-3,1.6e-2

Both sides run jaxsae.train.train_and_evaluate in this process, into temp workdirs: the sweep as
one job (config.sweep, one list of rates), then each member's config as a plain job, one after the
other. Reported per side: wall time of the whole job (set-up, compile, statistics, training, the
final eval, checkpoints: what a user waits for) and the steady-state rate, from the metrics of the
log intervals after the first (compilation excluded): tokens/s of one member times the members
trained at once. The ratio sweep / sequential is the speed-up. The sequential side pays no
process start-up or JAX import per member, which favours it.

Data: --store (an activation store, e.g. the fixture's) or, without one, the built-in synthetic
data at d=576. With --results=bench/RESULTS.md appends a row there.
"""
import datetime
import os
import sys
import tempfile
import time

from absl import app, flags

_STORE = flags.DEFINE_string("store", "", "activation store; '': synthetic data at --d")
_D = flags.DEFINE_integer("d", 576, "input width (synthetic data)")
_N = flags.DEFINE_integer("n", 4096, "latents")
_K = flags.DEFINE_integer("k", 32, "active latents")
_B = flags.DEFINE_integer("batch", 4096, "tokens per step")
_STEPS = flags.DEFINE_integer("steps", 60, "steps per member")
_LRS = flags.DEFINE_list("lrs", ["2e-3", "4e-3", "8e-3", "1.6e-2"], "the members' rates")
_RESULTS = flags.DEFINE_string("results", "", "append the result as a table row to this file "
                               "(e.g. bench/RESULTS.md); '': print only")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_config():
  sys.path.insert(0, REPO)
  from configs import base
  c = base.get_config()
  c.sae.n, c.sae.k = _N.value, _K.value
  c.train.steps, c.train.batch_size = _STEPS.value, _B.value
  c.train.log_every = max(1, _STEPS.value // 10)   # ten intervals: the first (compiling) is dropped
  c.checkpoint.every_steps = 0
  c.data.eval_rows, c.data.eval_batches = 4 * _B.value, 4
  if _STORE.value:
    from jaxsae.data.store import Store
    c.data.source, c.data.path = "store", _STORE.value
    c.sae.d = Store(_STORE.value).d
  else:
    c.data.source, c.sae.d = "synthetic", _D.value
    c.data.synthetic.num_features = 4 * _D.value
  return c


def steady(workdir: str, skip: int = 1) -> float:
  """tokens/s of one member over the log intervals after the first `skip` (compilation)."""
  import json
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f][skip:]
  tokens = sum(r["tokens"] - p["tokens"] for p, r in zip(records, records[1:]))
  seconds = sum((r["tokens"] - p["tokens"]) / r["perf/tokens_per_sec"]
                for p, r in zip(records, records[1:]))
  return tokens / seconds


def main(argv):
  del argv
  import jax
  from jaxsae import train
  lrs = [float(x) for x in _LRS.value]
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    c = base_config()
    c.sweep = [{"train.lr": lr} for lr in lrs]
    t = time.perf_counter()
    train.train_and_evaluate(c, os.path.join(tmp, "sweep"))
    wall = time.perf_counter() - t
    member = os.path.join(tmp, "sweep", "members", os.listdir(os.path.join(tmp, "sweep",
                                                                          "members"))[0])
    out["sweep"] = (wall, len(lrs) * steady(member))
    walls, rates = [], []
    for i, lr in enumerate(lrs):
      c = base_config()
      c.train.lr = lr
      t = time.perf_counter()
      train.train_and_evaluate(c, os.path.join(tmp, f"alone{i}"))
      walls.append(time.perf_counter() - t)
      rates.append(steady(os.path.join(tmp, f"alone{i}")))
    # one after the other: the steady rate of the sequence is the harmonic combination
    out["sequential"] = (sum(walls), len(lrs) / sum(1 / r for r in rates))
  from jaxsae import sweep
  stacking = "%s (%s)" % sweep.resolve_stacking(base_config())
  tokens = len(lrs) * _STEPS.value * _B.value
  data = f"store {_STORE.value}" if _STORE.value else f"synthetic d={_D.value}"
  print(f"{len(lrs)}-member rate sweep, n={_N.value} k={_K.value} B={_B.value}, {_STEPS.value} "
        f"steps each, {data}, {jax.devices()[0].platform}, jax {jax.__version__}, "
        f"sweep_stacking {stacking}")
  print(f"{'':12}{'wall s':>9}{'tokens/s (whole job)':>22}{'tokens/s (steady)':>20}")
  for name, (wall, rate) in out.items():
    print(f"{name:12}{wall:9.1f}{tokens / wall:22,.0f}{rate:20,.0f}")
  ratio_wall = out["sequential"][0] / out["sweep"][0]
  ratio_steady = out["sweep"][1] / out["sequential"][1]
  print(f"sweep / sequential: {ratio_wall:.2f}x whole job, {ratio_steady:.2f}x steady state")
  if _RESULTS.value:
    line = (f"| {datetime.date.today()} | {jax.devices()[0].device_kind} | jax {jax.__version__} | "
            f"{len(lrs)} rates, d={base_config().sae.d} n={_N.value} k={_K.value} B={_B.value}, "
            f"{_STEPS.value} steps, {data}, stacking {stacking} | {tokens / out['sweep'][0]:,.0f} / "
            f"{tokens / out['sequential'][0]:,.0f} ({ratio_wall:.2f}x) | {out['sweep'][1]:,.0f} / "
            f"{out['sequential'][1]:,.0f} ({ratio_steady:.2f}x) | `python bench/sweep.py "
            f"{' '.join(sys.argv[1:])}` |\n")
    with open(_RESULTS.value, "a") as f:
      f.write(line)


if __name__ == "__main__":
  app.run(main)
