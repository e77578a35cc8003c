"""The memory planner: its command line, its verdicts, its agreement with XLA's compiled figure,
and the training job refusing a run that cannot fit."""
import math
import os
import subprocess
import sys

import jax
import optax
import pytest

from configs import base
from conftest import REPO, run_cli
from jaxsae import plan

HEADLINE = ["--d=4096", "--n=16777216", "--k=64", "--batch=8192"]


def _plan_cli(*args):
  return subprocess.run([sys.executable, "-m", "jaxsae.plan", *args], cwd=REPO, text=True,
                        capture_output=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_prints_the_table_and_a_verdict():
  r = _plan_cli(*HEADLINE, "--devices=64", "--device-memory=95GiB")
  assert r.returncode == 0, r.stderr
  for row in ("params", "optimizer state", "gradients", "activations", "peak", "fits"):
    assert row in r.stdout, row
  # params: W_enc + W_dec = 2 * 2^24 * 4096 * 4 bytes over 64 devices = 8 GiB each
  assert "params                    8.00 GiB" in r.stdout, r.stdout
  assert "optimizer state          16.00 GiB" in r.stdout, r.stdout


def test_batchtopk_candidates_are_planned_from_the_config_and_the_cli():
  """BatchTopK selects batchtopk_cap x k candidates per row: the planner counts that width (4x the
  candidates exchanged over the latent shards), from a config and from the command line alike."""
  c = base.get_config()
  c.sae.architecture, c.sae.batchtopk_cap = "batchtopk", 4
  p = plan.Problem.from_config(c)
  assert p.selected == 4 * c.sae.k
  plain = plan.estimate(plan.Problem(d=768, n=32768, k=32, batch=4096, k_aux=256), 1, 8)
  batch = plan.estimate(plan.Problem(d=768, n=32768, k=32, batch=4096, k_aux=256, k_select=128),
                        1, 8)
  assert batch.comm["top-k candidates"][0] == 4 * plain.comm["top-k candidates"][0]
  r = _plan_cli("--d=768", "--n=32768", "--k=32", "--batch=4096", "--devices=8",
                "--device-memory=24GiB", "--architecture=batchtopk")
  assert r.returncode == 0 and "k=32 (128 selected per row)" in r.stdout, r.stdout


def test_cli_names_the_smallest_mesh_that_fits():
  r = _plan_cli(*HEADLINE, "--devices=16", "--device-memory=80GB")
  assert r.returncode == 1 and "DOES NOT FIT" in r.stdout, r.stdout
  p = plan.Problem(d=4096, n=2**24, k=64, batch=8192, k_aux=2048)
  small = plan.smallest_fitting(p, 80 * 10**9)
  assert f"smallest mesh that fits: {small.devices} devices as (data={small.data}, " \
         f"model={small.model})" in r.stdout, r.stdout
  # It fits, and no mesh with fewer devices does (brute force over every split).
  assert plan.estimate(p, small.data, small.model).peak <= 80 * 10**9
  for devices in range(1, small.devices):
    for m in range(1, devices + 1):
      if devices % m == 0 and p.n % m == 0 and p.batch % (devices // m) == 0:
        assert plan.estimate(p, devices // m, m).peak > 80 * 10**9, (devices, m)


def test_bf16_moments_halve_the_optimizer_state():
  p = plan.Problem(d=4096, n=2**24, k=64, batch=8192, k_aux=2048)
  fp32 = plan.estimate(p, 1, 64).rows
  bf16 = plan.estimate(plan.dataclasses.replace(p, opt_state="bfloat16"), 1, 64).rows
  assert bf16["optimizer state"] * 2 == fp32["optimizer state"]
  r = _plan_cli(*HEADLINE, "--devices=64", "--device-memory=95GiB", "--optimizer-state=bf16")
  assert r.returncode == 0 and "optimizer state           8.00 GiB" in r.stdout, r.stdout


def test_cli_rejects_bad_input():
  r = _plan_cli(*HEADLINE, "--devices=64", "--device-memory=lots")
  assert r.returncode == 2 and "--device-memory" in r.stderr
  r = _plan_cli(*HEADLINE, "--devices=64", "--device-memory=95GiB", "--mesh=3x3")
  assert r.returncode == 2 and "--mesh=3x3 has 9 devices" in r.stderr


def test_parse_bytes():
  assert plan.parse_bytes("95GiB") == 95 * 2**30
  assert plan.parse_bytes("80GB") == 80 * 10**9
  assert plan.parse_bytes("1.5 TiB") == int(1.5 * 2**40)
  assert plan.parse_bytes("4096") == 4096
  with pytest.raises(ValueError):
    plan.parse_bytes("95 GiBs")


def test_gather_bound_matches_the_kernels():
  from pallas_kernels import sparse_ops
  assert plan.GATHER_ELEMS == sparse_ops.MAX_GATHER_ELEMS


# Each regime the model distinguishes: pre dominant (AuxK copy), tiled, optimizer dominant,
# gathered rows dominant, bf16 moments, Multi-TopK on a data-parallel mesh, the lazy optimizer
# (its gathered rows small: the gradients' reduction sets the peak).
CASES = {
    "pre+auxk": dict(d=64, n=2**20, k=32, batch=1024, shape=(1, 8)),
    "tiled": dict(d=64, n=2**20, k=32, batch=1024, shape=(1, 8), tile=4096),
    "optimizer": dict(d=768, n=32768, k=32, batch=4096, shape=(8, 1), k_aux=0),
    "gathers": dict(d=768, n=32768, k=32, batch=4096, shape=(2, 4)),
    "bf16": dict(d=16, n=2**20, k=32, batch=256, shape=(2, 4), tile=4096, opt="bfloat16"),
    "multi_topk": dict(d=128, n=2**16, k=16, batch=2048, shape=(4, 2), multi=True),
    "lazy": dict(d=1024, n=2**16, k=32, batch=256, shape=(2, 4), k_aux=0, lazy=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_plan_within_20_percent_of_compiled_step(name):
  cs = CASES[name]
  c = base.get_config()
  c.sae.d, c.sae.n, c.sae.k, c.sae.k_aux = cs["d"], cs["n"], cs["k"], cs.get("k_aux", -1)
  c.sae.multi_topk = cs.get("multi", False)
  c.train.batch_size, c.mesh.shape, c.encoder_tile = cs["batch"], cs["shape"], cs.get("tile", 0)
  c.train.opt_state_dtype = cs.get("opt", "float32")
  c.train.lazy_optimizer = cs.get("lazy", False)
  planned = plan.estimate(plan.Problem.from_config(c), *cs["shape"]).peak
  compiled = plan.compiled_peak(plan.compile_step(c))
  assert abs(planned / compiled - 1) <= 0.2, (planned / 2**20, compiled / 2**20)


@pytest.mark.parametrize("transcoder", [False, True])
def test_planned_parameters_are_the_states(transcoder):
  """The plan's parameter and optimizer rows are the bytes one device holds of the state the
  job makes (state.abstract on the mesh): a skip transcoder's W_dec [n, d_out] and W_skip
  [d_out, d] included, which a count kept by hand had planned as an SAE's."""
  from jaxsae import mesh as mesh_lib, model, optim, state as state_lib
  c = base.get_config()
  c.sae.d, c.sae.n, c.mesh.shape = 48, 1024, (2, 4)
  if transcoder:
    c.data.target_path, c.sae.d_out, c.sae.skip = "/target", 80, True
  spec = model.SaeSpec.from_config(c)
  specs = mesh_lib.Specs(mesh_lib.create_mesh(c.mesh), c.mesh)
  state, shardings = state_lib.abstract(spec, optim.make_optimizer(c), specs)
  on_device = lambda tree, shard: sum(
      math.prod(sh.shard_shape(a.shape)) * a.dtype.itemsize
      for a, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shard)))
  rows = plan.estimate(plan.Problem.from_config(c), 2, 4).rows
  assert rows["params"] == on_device(state.params, shardings.params)
  assert ("W_skip" in state.params) == transcoder
  adam = lambda tree: [p for p in jax.tree.leaves(
      tree, is_leaf=lambda p: isinstance(p, optax.ScaleByAdamState))
      if isinstance(p, optax.ScaleByAdamState)]
  (moments,), (moment_shardings,) = adam(state.opt_state), adam(shardings.opt_state)
  assert rows["optimizer state"] == sum(on_device(getattr(moments, m), getattr(moment_shardings, m))
                                        for m in ("mu", "nu"))


def test_training_refuses_a_run_that_does_not_fit(tmp_path):
  wd = str(tmp_path / "run")
  r = run_cli(["--config=configs/quickstart.py", "--config.sae.d=32", "--config.sae.n=128",
               "--config.sae.k=4", "--config.data.synthetic.num_features=64",
               "--config.train.batch_size=128", "--config.train.init_rows=512",
               "--config.train.steps=2", "--config.mesh.device_memory=64KiB", f"--workdir={wd}"])
  assert r.returncode == 1
  for needle in ("does not fit in device memory", "mesh.device_memory", "optimizer state",
                 "peak", "DOES NOT FIT"):
    assert needle in r.stderr, (needle, r.stderr[-2000:])
  assert not os.path.exists(os.path.join(wd, "metrics.jsonl"))


def test_plan_shows_the_candidates_each_step_moves():
  """configs/dict_16m.py on 64 latent shards: AuxK's k_aux=2048 candidates of 8192 rows, exchanged
  (all-to-all, winners gathered) instead of gathered from every shard: 256 MiB instead of 8 GiB
  per device per step. Over 2 shards they are gathered (the same bytes either way)."""
  p = plan.Problem(d=4096, n=2**24, k=64, batch=8192, k_aux=2048, encoder_tile=32768)
  wide = plan.estimate(p, 1, 64)
  assert wide.comm == {"top-k candidates": (8 * 2**20, 256 * 2**20),
                       "AuxK candidates": (256 * 2**20, 8 * 2**30)}
  text = plan.table(wide, 95 * 2**30)
  assert "exchanged (all-to-all)" in text
  assert "AuxK candidates         256.00 MiB   (gathered from every shard: 8.00 GiB)" in text
  narrow = plan.estimate(p, 32, 2)
  assert narrow.comm["AuxK candidates"] == (256 * 2 * 2048 * 8,) * 2
  assert "gathered from every shard):" in plan.table(narrow, 95 * 2**30)
  assert "latent axis" not in plan.table(plan.estimate(p, 64, 1), 95 * 2**30)
