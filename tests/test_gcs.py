"""Workdirs, exports and activation stores on gs://, for real, against a fake GCS server on 127.0.0.1
(tests/gcs_fake.py): TensorStore and Orbax reach it through TENSORSTORE_GCS_HTTP_URL, epath (gcsfs)
and tensorboardX (google-cloud-storage) through STORAGE_EMULATOR_HOST.

A run trained into gs://, killed with SIGKILL at a random moment and rerun, must end bit for bit
where an uninterrupted local run of the same command ends, and export from and to gs://.
"""
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from conftest import REPO, run_cli
from test_resume import assert_same_state, read_state
from test_cli import TINY

import gcs_fake
from jaxsae import export as export_lib, inspect as inspect_lib, paths, plot, sae_io
from jaxsae.checkpoint_layout import checkpoint_dir, complete_steps

BUCKET = "jaxsae-test"
STEPS = 100
ARGS = [*TINY, "--config.train.decay_frac=0", "--config.train.lr=3e-3",
        "--config.train.log_every=10", "--config.checkpoint.every_steps=10",
        "--config.data.eval_rows=0", f"--config.train.steps={STEPS}"]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The fake server, and this process's environment pointed at it; yields that environment."""
  import portpicker
  port = portpicker.pick_unused_port()
  log = tmp_path_factory.mktemp("gcs") / "server.log"
  with open(log, "w") as out:
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "gcs_fake.py"), str(port),
                             BUCKET], stdout=out, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 60
    while "ready" not in log.read_text():
      assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
      time.sleep(0.05)
    env = gcs_fake.env(port)
    with mock.patch.dict(os.environ, env):
      yield env
  finally:
    proc.kill()
    proc.wait()


def start(workdir, log_dir):
  """The CLI in the background (this process's environment reaches the fake server)."""
  out = open(os.path.join(log_dir, "killed.log"), "w")
  proc = subprocess.Popen([sys.executable, "-m", "jaxsae.main", *ARGS, f"--workdir={workdir}"],
                          cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu",
                               "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  proc.log = out.name
  return proc


def test_train_kill_9_resume_and_export_on_gcs(gcs, tmp_path):
  local = str(tmp_path / "local")
  r = run_cli([*ARGS, f"--workdir={local}"])
  assert r.returncode == 0, r.stderr[-3000:]
  reference = read_state(local)

  wd = f"gs://{BUCKET}/runs/a"
  ckpts = checkpoint_dir(wd)
  assert ckpts == f"gs://{BUCKET}/runs/a/checkpoints"   # not turned into a local path
  proc = start(wd, str(tmp_path))
  target = random.randrange(20, STEPS - 30, 10)
  deadline = time.time() + 180
  while (complete_steps(ckpts) or [0])[-1] < target:
    assert proc.poll() is None, open(proc.log).read()[-3000:]
    assert time.time() < deadline, "timed out"
    time.sleep(0.01)
  time.sleep(random.uniform(0, 0.05))
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  last = complete_steps(ckpts)[-1]
  assert 0 < last < STEPS, last

  r = run_cli([*ARGS, f"--workdir={wd}"])   # the same command
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resumed from step {last} " in r.stderr, r.stderr[-3000:]
  assert_same_state(reference, read_state(wd))
  assert complete_steps(ckpts)[-1] == STEPS

  root = paths.of(wd)
  config = json.loads((root / "config.json").read_text())
  assert config["train"]["steps"] == STEPS
  steps = [json.loads(line)["step"] for line in (root / "metrics.jsonl").read_text().splitlines()]
  assert steps == sorted(set(steps)) and steps[-1] == STEPS, steps   # trimmed on resume, no dupes
  assert [p.name for p in (root / "tb").iterdir() if p.name.startswith("events.out.tfevents")]
  assert not os.path.exists(os.path.join(REPO, "gs:")), "a gs:// path was written as a local one"

  # Exports: read from gs://, written to gs:// (saelens: safetensors + cfg.json; npz + metadata).
  out = f"gs://{BUCKET}/exports"
  export_lib.export(wd, "saelens", f"{out}/saelens")
  export_lib.export(wd, "npz", f"{out}/sae.npz")
  export_lib.export(local, "saelens", str(tmp_path / "saelens"))
  want = load_safetensors((tmp_path / "saelens" / "sae_weights.safetensors").read_bytes())
  got = load_safetensors(paths.of(f"{out}/saelens/sae_weights.safetensors").read_bytes())
  assert want.keys() == got.keys()
  for name in want:
    assert np.array_equal(want[name], got[name]), name
  cfg = json.loads(paths.of(f"{out}/saelens/cfg.json").read_text())
  assert cfg["metadata"]["checkpoint"] == f"{ckpts}/{STEPS}"
  with np.load(io.BytesIO(paths.of(f"{out}/sae.npz").read_bytes())) as z:
    assert np.array_equal(z["W_dec"], want["W_dec"])
  assert json.loads(paths.of(f"{out}/sae.metadata.json").read_text())["steps"] == STEPS
  # What evaluate reads a workdir through, and the pictures of the run, written beside it.
  sae = sae_io.load(wd)
  assert np.array_equal(sae.w_dec, want["W_dec"]) and sae.path == f"{ckpts}/{STEPS}"
  # Exports on the bucket read as the local export reads (through a temporary local copy).
  ref = sae_io.load(str(tmp_path / "saelens"))
  for url in (f"{out}/saelens", f"{out}/sae.npz"):
    got = sae_io.load(url)
    assert got.path == url and got.k == ref.k
    for name in ("w_enc", "b_enc", "w_dec", "b_dec"):
      np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=1e-5, atol=1e-6)
  with pytest.raises(sae_io.SaeError, match="no such file"):
    sae_io.load(f"{out}/missing.npz")
  paths.write_text(f"{out}/eval.json", json.dumps({"fvu": 0.5}))   # evaluate --json's writer
  assert json.loads(paths.read_text(f"{out}/eval.json")) == {"fvu": 0.5}
  _, meta, _ = inspect_lib.load(wd)
  assert meta["steps_saved"][-1] == STEPS and meta["metrics"]["step"] == STEPS
  written = plot.write_plots(wd)
  assert written and all(p.startswith(f"{wd}/plots/") and paths.of(p).stat().length > 0
                         for p in written), written


def test_activation_store_on_gcs(gcs):
  """The store is TensorStore through and through: written and read back bit for bit on gs://."""
  from jaxsae.data.store import Layout, Store, StoreWriter
  x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
  path = f"gs://{BUCKET}/stores/s"
  w = StoreWriter(path, 8, "float32", {}, Layout(chunk_rows=16, shard_rows=64), {"test": True})
  w.append(x[:150])
  w.commit({"next": 150})
  w.append(x[150:])
  w.finish({"next": 300})
  store = Store(path)
  assert store.files is None   # the fast local reader is for local stores only
  assert np.array_equal(store.read(0, 300), x)


# Every module that reads or writes a workdir, and what may not appear in it: builtin open(),
# os.path and os file calls, glob, shutil (a URL is not a local path). A writer that needs a
# seekable local file takes one from paths.local_output (export.py's os.open/os.pwrite).
WORKDIR_MODULES = ("train.py", "checkpoint.py", "metrics.py", "export.py", "plot.py")
# inspect.py and sae_io.py read a gs:// workdir through jaxsae.paths too; their os.path calls are on
# local files only (a tokenizer; exports, which are read from a local copy).
FORBIDDEN = re.compile(r"(?<![\w.])open\(|\bos\.path\.|\bos\.(makedirs|mkdir|listdir|scandir|walk|"
                       r"replace|rename|remove|unlink|stat)\(|\bglob\.|\bshutil\.")


def test_no_local_file_calls_on_workdir_paths():
  bad = []
  for name in WORKDIR_MODULES:
    with open(os.path.join(REPO, "jaxsae", name)) as f:
      for i, line in enumerate(f, 1):
        code = line.split("#")[0]
        if FORBIDDEN.search(code) and not code.lstrip().startswith(('"', "'")):
          bad.append(f"jaxsae/{name}:{i}: {line.strip()}")
  assert not bad, "use jaxsae.paths / etils.epath instead:\n" + "\n".join(bad)


def test_file_urls_are_local_paths(tmp_path):
  """file:// is the local disk, through the same code as a plain path."""
  url = f"file://{tmp_path}/run/"
  assert paths.normalize(url) == str(tmp_path / "run") and not paths.is_url(url)
  assert checkpoint_dir(url) == checkpoint_dir(str(tmp_path / "run")) == f"{tmp_path}/run/checkpoints"
  assert paths.kvstore_url(tmp_path / "run") == f"file://{tmp_path}/run/"
  paths.write_text(f"file://{tmp_path}/a.json", "{}")
  assert os.listdir(tmp_path) == ["a.json"] and paths.read_text(tmp_path / "a.json") == "{}"
  assert paths.read_text(tmp_path / "missing.json") is None
