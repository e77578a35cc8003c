"""Sweeps (jaxsae/sweep.py): several SAEs in one job, through the real CLI.

Three members: two that differ only in rate and seed (stacked, one vmapped step) and one of
another n (its own step). Each must end where the same config trained alone ends: bit for bit for
the member with a step of its own; for the stacked ones to float rounding (the vmapped GEMMs and
sums may be ordered differently by XLA), checked at rtol 1e-5 on the parameters after 120 steps.
"""
import json
import os
import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, run_cli
from test_cli import TINY
from test_resume import assert_same_state, read_state, wait_for

from jaxsae import sweep
from jaxsae.checkpoint_layout import checkpoint_dir, complete_steps

STEPS = 120
ARGS = [*TINY, "--config.train.log_every=20", "--config.checkpoint.every_steps=20",
        f"--config.train.steps={STEPS}"]
MEMBERS = {"lr=0.002": {"train.lr": 2e-3},
           "lr=0.006,seed=1": {"train.lr": 6e-3, "train.seed": 1},
           # A rate of its own: at its automatic one (0.0316 at d=32, the decoder's 0.047) this
           # tiny SAE is chaotic, and one top-k pick flipped by the mesh's reordered sums sets the
           # 2x4 run apart from the one-device run within 120 steps (both agree to 1e-6 at step 20)
           "lr=0.004,n=64": {"train.lr": 4e-3, "sae.n": 64}}
SWEEP = "--config.sweep=" + repr(list(MEMBERS.values()))


def _start(workdir, *args):
  """The CLI in the background, its output to a file (a full pipe would stall it)."""
  out = open(workdir + ".log", "w")
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  proc = subprocess.Popen([sys.executable, "-m", "jaxsae.main", *args, f"--workdir={workdir}"],
                          cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
  proc.log = out.name
  return proc


def _flags(overrides: dict) -> list:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _close(got: dict, want: dict, rtol: float):
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=rtol * 1e-2, err_msg=name)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("sweep") / "run")
  r = run_cli([*ARGS, SWEEP, f"--workdir={wd}"])
  assert r.returncode == 0, r.stderr[-3000:]
  return wd, r.stderr


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
  """Each member's config trained as a plain run."""
  out = {}
  for name, overrides in MEMBERS.items():
    wd = str(tmp_path_factory.mktemp("alone") / "run")
    r = run_cli([*ARGS, *_flags(overrides), f"--workdir={wd}"])
    assert r.returncode == 0, r.stderr[-3000:]
    out[name] = wd
  return out


def test_each_member_ends_where_it_would_alone(swept, alone):
  """On CPU each member runs its own step (sweep.resolve_stacking): bit for bit its run alone.
  The shared steps (vmap, loop) are tested below."""
  wd, _ = swept
  config = json.load(open(os.path.join(wd, "config.json")))
  assert config["resolved"]["sweep_stacking"] == "separate"
  assert config["resolved"]["sweep_stacking_source"] == "auto on cpu"
  assert sorted(os.listdir(os.path.join(wd, "members"))) == sorted(MEMBERS)
  for name, plain in alone.items():
    member = os.path.join(wd, "members", name)
    config = json.load(open(os.path.join(member, "config.json")))
    assert config["resolved"]["sweep_member"] == name
    assert config["sweep"] == [] and config["resolved"]["sweep_overrides"] == MEMBERS[name]
    got, want = read_state(member), read_state(plain)
    assert_same_state(got, want)   # the plain run's step: bit for bit
    records, plain_records = _records(member), _records(plain)
    assert [r["step"] for r in records] == [r["step"] for r in plain_records]
    assert "eval/fvu" in records[-1]
    for a, b in zip(records, plain_records):
      for key in ("train/fvu", "sparsity/dead_frac", "losses/auxk", "train/lr"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-7, err_msg=(name, key))
    np.testing.assert_allclose(records[-1]["eval/fvu"], plain_records[-1]["eval/fvu"], rtol=1e-4)
  table = sweep.summary_table(wd)
  for name in MEMBERS:
    assert name in table
  assert json.load(open(os.path.join(wd, "sweep.json")))["checkpointed_step"] == STEPS


def test_members_are_runs_for_export_and_inspect(swept, tmp_path):
  wd, _ = swept
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = str(tmp_path / "sae.npz")
  r = subprocess.run(["python", "-m", "jaxsae.export", f"--workdir={wd}/members/lr=0.004,n=64",
                      "--format=npz", f"--out={out}"], cwd=REPO, env=env, capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  assert np.load(out)["W_dec"].shape == (64, 32)
  r = subprocess.run(["python", "-m", "jaxsae.inspect", wd], cwd=REPO, env=env,
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.strip().splitlines()
  assert lines[0].split()[:3] == ["member", "peak", "lr"] and len(lines) == 1 + len(MEMBERS)
  assert all(line.rstrip().endswith("ok") for line in lines[1:])


def test_kill_9_mid_sweep_then_rerun_is_bit_identical(swept, tmp_path):
  reference, _ = swept
  wd = str(tmp_path / "run")
  proc = _start(wd, *ARGS, SWEEP)
  state = lambda: sweep.read_state(wd) or {}
  wait_for(lambda: (state().get("checkpointed_step") or 0) >= 40, proc, poll=0.001)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  committed = state()["checkpointed_step"]
  assert 40 <= committed < STEPS
  r = run_cli([*ARGS, SWEEP, f"--workdir={wd}"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resumed from step {committed} " in r.stderr, r.stderr[-3000:]
  for name in MEMBERS:
    assert_same_state(read_state(os.path.join(reference, "members", name)),
                      read_state(os.path.join(wd, "members", name)))
    steps = [rec["step"] for rec in _records(os.path.join(wd, "members", name))]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS   # no duplicated records


@pytest.mark.parametrize("override, needle", [
    ("{'train.batch_size': 64}", "sets train.batch_size"),
    ("{'data.synthetic.seed': 2}", "sets data.synthetic.seed"),
    ("{'mesh.shape': (2, 4)}", "sets mesh.shape"),
    ("{'sae.kk': 2}", "no config field 'sae.kk' (did you mean sae.k"),
    ("{'sae.k': 1000}", "sweep member 0 (k=1000): invalid config:\n  sae.k=1000 must satisfy"),
])
def test_a_bad_member_is_refused_before_anything_is_built(tmp_path, override, needle):
  wd = tmp_path / "run"
  r = run_cli([*ARGS, f"--config.sweep=[{override}]", f"--workdir={wd}"])
  assert r.returncode == 1
  assert needle in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr and not wd.exists()


@pytest.mark.parametrize("stacking", ["vmap", "loop"])
def test_a_member_whose_loss_diverges_stops_alone(alone, tmp_path, stacking):
  wd = str(tmp_path / "run")
  args = [*ARGS, "--config.sweep=[{'train.lr': 2e-3}, {'train.lr': 1e30, 'name': 'huge'}]",
          f"--config.sweep_stacking={stacking}", f"--workdir={wd}"]   # frozen in the shared step
  r = run_cli(args)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "[huge] step 1: the loss went non-finite" in r.stderr, r.stderr[-3000:]
  stopped = sweep.read_state(wd)["stopped"]
  assert list(stopped) == ["huge"] and stopped["huge"]["step"] == 1
  assert not complete_steps(checkpoint_dir(os.path.join(wd, "members", "huge")))
  # its partner in the stacked step trains on, as it would alone
  _close(read_state(os.path.join(wd, "members", "lr=0.002")), read_state(alone["lr=0.002"]),
         rtol=1e-5)
  assert "stopped at step 1" in sweep.summary_table(wd)
  # rerun: the stopped member stays stopped, nothing is trained again
  r = run_cli(args)
  assert r.returncode == 0 and "[huge] stopped earlier" in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("stacking", ["vmap", "loop"])
def test_shared_step_members_end_where_they_would_alone(alone, tmp_path, stacking):
  """vmap (the GPU and TPU default) and loop: the two members of equal shapes share one compiled
  step. Equal to each run alone to rtol 1e-5 on the parameters after 120 steps, not bit for bit:
  alone, the rate is a constant that XLA folds into the update; shared, a per-member value (and
  under vmap XLA may order the GEMMs' sums otherwise)."""
  wd = str(tmp_path / "run")
  r = run_cli([*ARGS, SWEEP, f"--config.sweep_stacking={stacking}", f"--workdir={wd}"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"share one compiled step: {stacking} (set in the config)" in r.stderr
  for name in MEMBERS:
    _close(read_state(os.path.join(wd, "members", name)), read_state(alone[name]), rtol=1e-5)


@pytest.mark.parametrize("stacking", ["vmap", "loop"])
def test_sweep_on_a_2x4_mesh_matches_one_device(swept, tmp_path, stacking):
  reference, _ = swept
  mesh = str(tmp_path / "mesh")
  r = run_cli([*ARGS, SWEEP, "--config.mesh.shape=(2,4)", f"--config.sweep_stacking={stacking}",
               f"--workdir={mesh}"], devices=8)
  assert r.returncode == 0, r.stderr[-3000:]
  for name in MEMBERS:
    _close(read_state(os.path.join(mesh, "members", name)),
           read_state(os.path.join(reference, "members", name)), rtol=1e-4)


def test_sweep_on_two_processes_matches_one(tmp_path):
  """launch/local.sh, 2 processes x 1 device, the batch split across them. On an .npy file: the
  synthetic source draws each process's rows itself, so its stream depends on the process count."""
  from jaxsae.data import synthetic
  acts = str(tmp_path / "acts.npy")
  feats, probs = synthetic.features(64, 32, 1), synthetic.frequencies(64, 4.0, 0.5)
  np.save(acts, synthetic.sample(feats, probs, 0.01, 4096, np.random.default_rng(0)).astype(
      np.float32))
  args = [*ARGS, SWEEP, "--config.data.source=npy", f"--config.data.path={acts}"]
  one = str(tmp_path / "one")
  r = run_cli([*args, f"--workdir={one}"])
  assert r.returncode == 0, r.stderr[-3000:]
  two = str(tmp_path / "two")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  p = subprocess.Popen(["bash", "launch/local.sh", "--processes=2", "--devices=1", "--", *args,
                        f"--workdir={two}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    out, _ = p.communicate(timeout=400)
  finally:   # a hung run must not outlive the test: its processes are in local.sh's session
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
  assert p.returncode == 0, out[-3000:]
  for name in MEMBERS:
    _close(read_state(os.path.join(two, "members", name)),
           read_state(os.path.join(one, "members", name)), rtol=1e-4)


def test_a_sweep_that_does_not_fit_names_the_members_to_drop(tmp_path):
  """The planner counts every member: each fits the device alone, together they do not."""
  from configs import quickstart
  from jaxsae import plan
  c = quickstart.get_config()
  c.sae.d, c.sae.k, c.train.batch_size, c.sae.n = 32, 4, 128, 16384
  big = plan.estimate(plan.Problem.from_config(c), 1, 1).peak
  wd = tmp_path / "run"
  r = run_cli([*ARGS, "--config.sweep=[{'sae.n': 16384}, {'sae.n': 128}]",
               f"--config.mesh.device_memory={big}", f"--workdir={wd}"])
  assert r.returncode == 1
  assert "the sweep does not fit in device memory" in r.stderr, r.stderr[-2000:]
  assert "drop these members or move them to another job: n=16384\n" in r.stderr
  assert not wd.exists()


def stacked_params(config, kernels: str, steps: int = 5, stacking: str = "vmap") -> dict:
  """Two members sharing one step (rates 2e-3, 6e-3), trained `steps` steps with `kernels`: their
  parameters, [2, ...] per name."""
  import jax
  from jaxsae import mesh as mesh_lib, train
  config.kernels, config.sweep_stacking = kernels, stacking
  config.sweep = [{"train.lr": 2e-3}, {"train.lr": 6e-3}]
  _, specs, data, groups, _ = train._build(config, sweep.members(config, ""))
  (group,) = groups
  assert group.size == 2
  sharding = jax.sharding.NamedSharding(specs.mesh, specs.batch)
  try:
    for _ in range(steps):
      group.train(mesh_lib.host_batch_to_global(next(data.train), sharding))
  finally:
    data.close()
  return jax.device_get(jax.tree.map(lambda *a: jnp.stack(a),
                                    *[group.member_state(i).params for i in range(2)]))


@pytest.mark.parametrize("stacking", ["vmap", "loop"])
def test_stacked_members_run_the_pallas_kernels(tiny_config, stacking):
  """The shared step through the Pallas kernels (interpret mode here; tests/test_pallas_gpu.py
  compiles them on a GPU), vmapped or looped: kernels=pallas equals kernels=xla."""
  _close(stacked_params(tiny_config, "pallas", stacking=stacking),
         stacked_params(tiny_config.copy_and_resolve_references(), "xla", stacking=stacking),
         rtol=1e-5)


def test_sigterm_saves_every_member_at_one_step_and_exits_0(tmp_path):
  wd = str(tmp_path / "run")
  args = [*TINY, "--config.train.lr=3e-3", "--config.train.decay_frac=0",
          "--config.train.log_every=25", "--config.checkpoint.every_steps=0", SWEEP]
  proc = _start(wd, *args, "--config.train.steps=1000000")
  wait_for(lambda: any(os.path.exists(os.path.join(wd, "members", m, "metrics.jsonl")) and
                       os.path.getsize(os.path.join(wd, "members", m, "metrics.jsonl"))
                       for m in MEMBERS), proc)
  os.kill(proc.pid, signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, open(proc.log).read()[-3000:]
  saved = sweep.read_state(wd)["checkpointed_step"]
  for name in MEMBERS:
    assert complete_steps(checkpoint_dir(os.path.join(wd, "members", name))) == [saved]
  r = run_cli([*args, f"--config.train.steps={saved + 10}", f"--workdir={wd}"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resumed from step {saved} " in r.stderr
  assert sweep.read_state(wd)["checkpointed_step"] == saved + 10
