"""Checkpoints: restore onto other meshes, refusal of an incompatible workdir, a failed save, and
a non-finite loss, each leaving the last complete checkpoint usable."""
import os
import subprocess
import sys

import jax
import numpy as np

from conftest import REPO, run_cli
from test_cli import TINY

from jaxsae import checkpoint, train
from jaxsae.checkpoint_layout import StepReader, checkpoint_dir, complete_steps

ARGS = [*TINY, "--config.train.decay_frac=0", "--config.train.lr=3e-3",
        "--config.train.log_every=2", "--config.checkpoint.every_steps=2"]


def test_restore_onto_other_meshes_is_bit_exact(tiny_config, tmp_path):
  tiny_config.mesh.shape = (4, 2)
  saved = train.setup(tiny_config)
  assert dict(saved.mesh.shape) == {"data": 4, "model": 2}
  saver = checkpoint.Checkpointer(str(tmp_path))
  saver.save(7, saved.state, {"step": 7}, {"config": tiny_config.to_dict()})
  saver.wait()
  want = jax.tree.leaves(jax.device_get(saved.state))
  for shape in [(2, 4), (1, 1)]:
    tiny_config.mesh.shape = shape
    target = train.setup(tiny_config)
    got = saver.restore(target.state)
    assert got.step == 7 and got.data == {"step": 7}
    for a, b, like in zip(jax.tree.leaves(got.state), want, jax.tree.leaves(target.state)):
      assert a.sharding == like.sharding, (shape, a.sharding, like.sharding)
      assert np.array_equal(np.asarray(a), b)
  saver.close()


def test_training_continues_on_another_mesh(tmp_path):
  """Saved by 8 devices as a (4, 2) mesh, resumed and trained on by one device, through the CLI."""
  wd = str(tmp_path / "run")
  for devices, mesh, steps in [(8, "4,2", 2), (1, "1,1", 4)]:
    r = run_cli([*ARGS, f"--workdir={wd}", f"--config.mesh.shape=({mesh})",
                 f"--config.train.steps={steps}"], devices=devices)
    assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step 2 " in r.stderr
  assert complete_steps(checkpoint_dir(wd)) == [2, 4]


def test_incompatible_workdir_is_refused(tmp_path):
  wd = str(tmp_path / "run")
  assert run_cli([*ARGS, f"--workdir={wd}", "--config.train.steps=2"]).returncode == 0
  config_json = open(os.path.join(wd, "config.json")).read()
  for flag, needle in [("--config.sae.n=256", "sae.n: 128 -> 256"),
                       ("--config.sae.d=48", "sae.d: 32 -> 48")]:
    r = run_cli([*ARGS, f"--workdir={wd}", "--config.train.steps=4", flag])
    assert r.returncode == 1
    assert needle in r.stderr and "refusing to resume" in r.stderr, r.stderr[-2000:]
    assert complete_steps(checkpoint_dir(wd)) == [2]
    assert open(os.path.join(wd, "config.json")).read() == config_json   # refused before writing


def test_checkpoint_from_before_b_dec_is_refused_not_touched(tmp_path):
  """A checkpoint saved before the SAE had its own output bias (params.b_dec) cannot be resumed:
  refused before anything is set up, naming what it lacks, and left as it was (it still exports:
  test_export's large checkpoint has that layout)."""
  import jax.numpy as jnp
  wd = str(tmp_path / "run")
  d, n = 32, 128
  state = {"params": {"W_enc": jnp.ones((n, d)), "W_dec": jnp.ones((n, d)),
                      "b_enc": jnp.zeros(n), "b_pre": jnp.zeros(d)},
           "since_fired": jnp.zeros(n, jnp.int32), "input_scale": jnp.float32(1.0)}
  saver = checkpoint.Checkpointer(wd)
  saver.save(2, state, {"step": 2}, {"config": {"sae": {"d": d, "n": n, "k": 8}}, "tokens": 64,
                                     "jaxsae_version": "0.1.0+old"})
  saver.wait()
  saver.close()
  r = run_cli([*ARGS, f"--workdir={wd}", "--config.train.steps=4"])
  assert r.returncode == 1
  assert "params.b_dec" in r.stderr and "cannot resume" in r.stderr, r.stderr[-2000:]
  assert "0.1.0+old" in r.stderr
  assert complete_steps(checkpoint_dir(wd)) == [2]
  assert not os.path.exists(os.path.join(wd, "config.json"))


def _capped_cli(args, fsize_bytes):
  """The CLI with a file-size limit (RLIMIT_FSIZE): a write past it fails with EFBIG, like a full
  disk. The limit is set in a small launcher that then execs Python (no preexec_fn after fork)."""
  launcher = ("import os, resource, sys; lim = int(sys.argv[1]); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim)); "
              "os.execv(sys.executable, [sys.executable, '-m', 'jaxsae.main'] + sys.argv[2:])")
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  return subprocess.run([sys.executable, "-c", launcher, str(fsize_bytes), *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
  wd = str(tmp_path / "run")
  big = [*ARGS, f"--workdir={wd}", "--config.sae.n=1024"]   # state files well above the cap
  assert run_cli([*big, "--config.train.steps=2"]).returncode == 0
  r = _capped_cli([*big, "--config.train.steps=4"], 32 << 10)
  assert r.returncode == 1, r.stderr[-3000:]
  assert "saving checkpoint step 4" in r.stderr and "failed" in r.stderr, r.stderr[-3000:]
  assert "the last complete checkpoint, step 2, is intact" in r.stderr
  assert complete_steps(checkpoint_dir(wd)) == [2]
  r = run_cli([*big, "--config.train.steps=4"])   # space again: it resumes from step 2
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step 2 " in r.stderr
  assert complete_steps(checkpoint_dir(wd)) == [2, 4]


def test_nonfinite_loss_stops_with_the_last_good_checkpoint(tmp_path):
  """A finite row whose square overflows float32 makes one step's loss NaN: the run stops naming
  the step and statistic, and no checkpoint of that step or later is written."""
  rows, eval_rows, batch = 4096, 256, 128
  x = np.random.default_rng(0).normal(size=(rows, 32)).astype(np.float32)
  # NpyBatches: step i of epoch 0 takes rows perm[i*batch:(i+1)*batch] of the training split.
  # The row is kept out of the init sample (source.open_npy), so init statistics stay sane.
  perm = np.random.default_rng([0, 0]).permutation(rows - eval_rows)
  init = np.random.default_rng(1).choice(rows - eval_rows, size=256, replace=False)
  step = next(s for s in range(5, 40) if perm[s * batch] not in init)
  x[perm[step * batch]] = 1e20
  path = tmp_path / "acts.npy"
  np.save(path, x)
  wd = str(tmp_path / "run")
  r = run_cli([*ARGS, f"--workdir={wd}", "--config.data.source=npy", f"--config.data.path={path}",
               f"--config.data.eval_rows={eval_rows}", "--config.train.init_rows=256",
               "--config.train.steps=20"])
  assert r.returncode == 1
  assert f"step {step}: the loss went non-finite (train/fvu=nan" in r.stderr, r.stderr[-3000:]
  # Saved every 2 steps; step s's state is saved as checkpoint s + 1 (steps are counted from 0).
  assert complete_steps(checkpoint_dir(wd))[-1] == step - step % 2
  reader = StepReader(wd)
  for name in reader.names:
    assert np.all(np.isfinite(reader.read(name))), name
