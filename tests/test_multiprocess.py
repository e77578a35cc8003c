"""A real 2-process run on this machine (coordinator on 127.0.0.1, 2 CPU devices per process, gloo
collectives) trains 3 steps through the real CLI and matches the single-process run.

Two meshes: the batch split across the processes (a "slice" axis over processes, as dcn_shape
lays out multi-slice TPUs) and the latents split across them (each process then feeds the whole
batch: the candidate all-gather and the x_hat psum cross processes). Process 0 alone writes files;
both log. Data come from an .npy file, whose global batches do not depend on the process count.
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
