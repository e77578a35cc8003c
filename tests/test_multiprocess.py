"""A real 2-process run on this machine (coordinator on 127.0.0.1, 2 CPU devices per process, gloo
collectives) trains 3 steps through the real CLI and matches the single-process run.

Two meshes: the batch split across the processes (a "slice" axis over processes, as dcn_shape
lays out multi-slice TPUs) and the latents split across them (each process then feeds the whole
batch: the candidate all-gather and the x_hat psum cross processes). Process 0 alone writes files;
both log. Data come from an .npy file, whose global batches do not depend on the process count.

Last, a SIGTERM to one process of a launch/local.sh run: both stop at one step, save, and the
rerun ends bit for bit where an uninterrupted 2-process run ends.
"""
import json
import os
import subprocess
import sys

import numpy as np
import portpicker
import pytest

from conftest import REPO, run_cli

STEPS = 3
ARGS = ["--config=configs/quickstart.py", "--config.data.source=npy", "--config.sae.d=32",
        "--config.sae.n=128", "--config.sae.k=4", "--config.train.batch_size=256",
        "--config.train.init_rows=1024", "--config.data.eval_rows=512",
        f"--config.train.steps={STEPS}", "--config.train.log_every=1",
        "--config.sae.dead_tokens=256", "--config.checkpoint.every_steps=0"]
MESHES = {
    "batch-across-processes": ["--config.mesh.axes=('slice','data','model')",
                               "--config.mesh.shape=(1,1,2)", "--config.mesh.dcn_shape=(2,1,1)",
                               "--config.mesh.batch_axes=('slice','data')"],
    "latents-across-processes": ["--config.mesh.shape=(1,4)"],
}


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
  from jaxsae.data import synthetic
  feats = synthetic.features(64, 32, 1)
  probs = synthetic.frequencies(64, 4.0, 0.5)
  x = synthetic.sample(feats, probs, 0.01, 4096, np.random.default_rng(0))
  path = str(tmp_path_factory.mktemp("mp") / "acts.npy")
  np.save(path, x.astype(np.float32))
  return path


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def single(acts, tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("single"))
  r = run_cli([*ARGS, f"--config.data.path={acts}", "--config.mesh.shape=(1,1)",
               f"--workdir={wd}"])
  assert r.returncode == 0, r.stderr[-3000:]
  return _records(wd)


def _two_processes(args, workdir):
  port = portpicker.pick_unused_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "jaxsae.main", *args, f"--workdir={workdir}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  try:
    outs = [p.communicate(timeout=240) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [(p.returncode, err) for p, (_, err) in zip(procs, outs)]


@pytest.mark.parametrize("mesh", list(MESHES))
def test_two_processes_match_one(acts, single, tmp_path, mesh):
  wd = str(tmp_path / "run")
  results = _two_processes([*ARGS, f"--config.data.path={acts}", *MESHES[mesh]], wd)
  for i, (rc, err) in enumerate(results):
    assert rc == 0, f"process {i}:\n{err[-3000:]}"
    assert "process %d of 2" % i in err and f"step {STEPS}/{STEPS}" in err, err[-2000:]
  config = json.load(open(os.path.join(wd, "config.json")))
  assert config["resolved"]["process_count"] == 2
  assert np.prod(list(config["resolved"]["mesh_shape"].values())) == 4
  records = _records(wd)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1)), "process 1 wrote metrics too"
  assert "eval/fvu" in records[-1]    # held-out FVU of the final params
  for got, ref in zip(records, single):
    assert got.keys() == ref.keys()
    for key in ref:
      if not key.startswith("perf/"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, err_msg=f"{key} step {ref['step']}")


def test_partial_distributed_flags_are_refused(tmp_path):
  r = run_cli([*ARGS, "--config.data.path=unused.npy", f"--workdir={tmp_path}",
               "--coordinator_address=127.0.0.1:1234"])
  assert r.returncode == 1
  assert "--num_processes / JAX_NUM_PROCESSES" in r.stderr, r.stderr[-2000:]
  assert "--process_id / JAX_PROCESS_ID" in r.stderr


# ---- SIGTERM to one process of a 2-process run ---------------------------------------------------

RESUME_STEPS = 300
RESUME_ARGS = ["--config=configs/quickstart.py", "--config.sae.d=32", "--config.sae.n=128",
               "--config.sae.k=4", "--config.data.synthetic.num_features=64",
               "--config.train.batch_size=128", "--config.train.init_rows=512",
               "--config.data.eval_rows=0", "--config.train.decay_frac=0",
               # a fixed lr and no warmup: the automatic ones depend on train.steps, which the
               # interrupted run (1e6) and the rerun (300) do not share
               "--config.train.lr=3e-3", "--config.train.warmup_steps=0",
               "--config.train.log_every=25", "--config.checkpoint.every_steps=0"]


def _local(workdir, steps, **popen):
  """launch/local.sh: 2 processes x 1 CPU device (the batch split across the processes)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen(["bash", "launch/local.sh", "--processes=2", "--devices=1", "--",
                           *RESUME_ARGS, f"--workdir={workdir}", f"--config.train.steps={steps}"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **popen)


def _state(workdir):
  from jaxsae.checkpoint_layout import StepReader
  reader = StepReader(workdir)
  return {name: reader.read(name) for name in reader.names}


def _process_pids(launcher_pid):
  """{process_id: pid} of the jaxsae processes local.sh started."""
  out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(launcher_pid)],
                       capture_output=True, text=True).stdout
  return {int(line.split("--process_id=")[1].split()[0]): int(line.split()[0])
          for line in out.splitlines() if "jaxsae.main" in line}


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_exactly(tmp_path):
  """A SIGTERM to process 1 alone (a preemption notice reaching one host): JAX's preemption sync
  picks one step for both, both save there and exit 0, and the rerun of the same command ends
  bit for bit where an uninterrupted 2-process run ends."""
  import signal
  import time

  from jaxsae.checkpoint_layout import checkpoint_dir, complete_steps
  ref_dir, wd = str(tmp_path / "reference"), str(tmp_path / "run")
  ref = _local(ref_dir, RESUME_STEPS)
  out = ref.communicate(timeout=300)[0]
  assert ref.returncode == 0, out[-3000:]

  run = _local(wd, 1_000_000)
  try:
    metrics = os.path.join(wd, "metrics.jsonl")
    deadline = time.time() + 240
    while not (os.path.exists(metrics) and os.path.getsize(metrics)):
      assert run.poll() is None and time.time() < deadline, run.stdout.read()[-3000:]
      time.sleep(0.05)
    pids = _process_pids(run.pid)
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[1], signal.SIGTERM)
    out = run.communicate(timeout=240)[0]
  finally:
    if run.poll() is None:
      run.kill()
  assert run.returncode == 0, out[-3000:]
  stopped = []
  for i in range(2):
    log = open(os.path.join(wd, "logs", f"process_{i}.log")).read()
    found = [line for line in log.splitlines() if "stopped at step" in line]
    assert len(found) == 1, log[-3000:]
    stopped.append(int(found[0].split("stopped at step ")[1].split()[0]))
  assert stopped[0] == stopped[1], f"the processes stopped at different steps: {stopped}"
  saved = complete_steps(checkpoint_dir(wd))
  assert saved == [stopped[0]] and 25 <= saved[0] < RESUME_STEPS, (saved, stopped)

  again = _local(wd, RESUME_STEPS)
  out = again.communicate(timeout=300)[0]
  assert again.returncode == 0, out[-3000:]
  assert f"resumed from step {saved[0]} " in open(os.path.join(wd, "logs", "process_0.log")).read()
  a, b = _state(ref_dir), _state(wd)
  assert a.keys() == b.keys()
  for name in a:
    assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
  records = _records(wd)
  assert [r["step"] for r in records] == list(range(25, RESUME_STEPS + 1, 25))
