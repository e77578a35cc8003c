"""Killed, preempted and resumed training runs, through the real CLI and real signals.

Every resumed run must end with exactly (bit for bit) the state of an uninterrupted run of the same
command: same data order, same updates. The lr is fixed and constant (train.lr, decay_frac=0; the
automatic one depends on train.steps) so that a run stopped by SIGTERM can be resumed with a
different train.steps and still be compared.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, run_cli
from test_cli import TINY

from jaxsae.checkpoint_layout import StepReader, checkpoint_dir, complete_steps

STEPS = 300
ARGS = [*TINY, "--config.train.decay_frac=0", "--config.train.lr=3e-3",
        "--config.train.log_every=25", "--config.checkpoint.every_steps=25",
        "--config.data.eval_rows=0"]


def start(workdir, *extra):
  """The CLI in the background; output to files (a full pipe would stall it)."""
  out = open(os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + ".log"), "w")
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  proc = subprocess.Popen([sys.executable, "-m", "jaxsae.main", *ARGS, f"--workdir={workdir}",
                           *extra], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
  proc.log = out.name
  return proc


def wait_for(condition, proc, timeout=180, poll=0.01):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, open(proc.log).read()[-3000:]
    assert time.time() < deadline, "timed out"
    time.sleep(poll)


def read_state(workdir) -> dict:
  reader = StepReader(workdir)
  return {name: reader.read(name) for name in reader.names}


def assert_same_state(a: dict, b: dict):
  assert a.keys() == b.keys()
  for name in a:
    assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def metric_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run's final state."""
  wd = str(tmp_path_factory.mktemp("reference") / "run")
  r = run_cli([*ARGS, f"--workdir={wd}", f"--config.train.steps={STEPS}"])
  assert r.returncode == 0, r.stderr[-3000:]
  # Saved every 25 steps and at the end; checkpoint.max_to_keep (3) bounds what is kept.
  assert complete_steps(checkpoint_dir(wd)) == [STEPS - 50, STEPS - 25, STEPS]
  return read_state(wd)


def test_kill_9_at_a_random_moment_then_rerun(reference, tmp_path):
  wd = str(tmp_path / "run")
  proc = start(wd, f"--config.train.steps={STEPS}")
  ckpts = checkpoint_dir(wd)
  # A random moment inside training, whatever the machine's speed (a fixed delay outlived the
  # whole run on a quiet machine): past a random checkpoint, plus a random few milliseconds.
  target = random.randrange(25, STEPS - 75, 25)
  wait_for(lambda: (complete_steps(ckpts) or [0])[-1] >= target, proc, poll=0.001)
  delay = random.uniform(0, 0.05)
  time.sleep(delay)
  assert proc.poll() is None, f"finished within {delay:.3f}s of step {target}"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  last = complete_steps(ckpts)[-1]
  assert 0 < last < STEPS, (delay, last)

  r = run_cli([*ARGS, f"--workdir={wd}", f"--config.train.steps={STEPS}"])   # the same command
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resumed from step {last} " in r.stderr, (delay, r.stderr[-3000:])
  assert_same_state(reference, read_state(wd))
  steps = metric_steps(wd)
  assert steps == sorted(set(steps)) and steps[-1] == STEPS   # no duplicated records


def test_kill_9_mid_save_never_uses_the_half_written_step(reference, tmp_path):
  wd = str(tmp_path / "run")
  ckpts = checkpoint_dir(wd)
  proc = start(wd, f"--config.train.steps={STEPS}", "--config.checkpoint.every_steps=1")
  tmp = lambda: [n for n in os.listdir(ckpts) if "tmp" in n] if os.path.isdir(ckpts) else []
  wait_for(lambda: complete_steps(ckpts) and tmp(), proc, poll=0.001)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  torn = tmp()
  assert torn, "the kill should land while a save is being written"
  last = complete_steps(ckpts)[-1]
  assert all(int(name.split(".")[0]) > last for name in torn)

  r = run_cli([*ARGS, f"--workdir={wd}", f"--config.train.steps={STEPS}"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resumed from step {last} " in r.stderr, r.stderr[-3000:]
  assert not tmp(), "unfinished saves are cleaned up"
  assert_same_state(reference, read_state(wd))


def test_sigterm_saves_exits_0_and_resumes_exactly(reference, tmp_path):
  wd = str(tmp_path / "run")
  proc = start(wd, "--config.train.steps=1000000", "--config.checkpoint.every_steps=0")
  wait_for(lambda: os.path.exists(os.path.join(wd, "metrics.jsonl"))
           and os.path.getsize(os.path.join(wd, "metrics.jsonl")), proc)
  os.kill(proc.pid, signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, open(proc.log).read()[-3000:]
  saved = complete_steps(checkpoint_dir(wd))
  assert len(saved) == 1 and 25 <= saved[0] < STEPS, saved   # every_steps=0: only the SIGTERM save
  assert f"stopped at step {saved[0]} of 1000000" in open(proc.log).read()

  r = run_cli([*ARGS, f"--workdir={wd}", f"--config.train.steps={STEPS}"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resumed from step {saved[0]} " in r.stderr
  assert_same_state(reference, read_state(wd))


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka_batchtopk"])
def test_batchtopk_resumes_bit_identical_with_its_threshold(tmp_path, architecture):
  """A BatchTopK (or Matryoshka) run's state holds its inference threshold: resumed from an
  earlier checkpoint (the later ones deleted, as a kill before them would leave it), the run ends
  bit-identical."""
  import shutil
  args = [*ARGS, f"--config.sae.architecture={architecture}", "--config.train.steps=60",
          "--config.checkpoint.every_steps=20"]
  wd = str(tmp_path / "run")
  r = run_cli([*args, f"--workdir={wd}"])
  assert r.returncode == 0, r.stderr[-3000:]
  full = read_state(wd)
  assert "threshold" in full and float(full["threshold"]) > 0
  copy = str(tmp_path / "copy")
  shutil.copytree(wd, copy)
  for step in (40, 60):
    shutil.rmtree(os.path.join(checkpoint_dir(copy), str(step)))
  r = run_cli([*args, f"--workdir={copy}"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step 20 " in r.stderr
  assert_same_state(full, read_state(copy))
