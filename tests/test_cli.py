"""The real command line into a temp workdir, as a user runs it."""
import json
import os
import re

import numpy as np
import pytest

from conftest import run_cli
from jaxsae import knobs

REQUIRED_KEYS = {"step", "tokens", "train/fvu", "train/explained_variance", "train/l0",
                 "sparsity/dead_frac", "losses/mse", "losses/auxk", "perf/tokens_per_sec"}
TINY = ["--config=configs/quickstart.py", "--config.sae.d=32", "--config.sae.n=128",
        "--config.sae.k=4", "--config.data.synthetic.num_features=64",
        "--config.train.batch_size=128", "--config.train.init_rows=512",
        "--config.data.eval_rows=256"]


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_two_step_run_writes_config_and_metrics(tmp_path):
  wd = str(tmp_path / "run")
  r = run_cli([*TINY, f"--workdir={wd}", "--config.train.steps=2", "--config.train.log_every=1"])
  assert r.returncode == 0, r.stderr[-3000:]
  config = json.load(open(os.path.join(wd, "config.json")))
  assert config["sae"]["n"] == 128 and config["train"]["steps"] == 2
  assert config["resolved"]["k_aux"] == 16
  # batch x k = 512 >= n = 128: every latent is selected about 4 times a step, so Adam is lazy
  assert config["resolved"]["lazy_optimizer"] is True
  assert "lazy Adam (automatic: batch x k = 512 >= n = 128)" in r.stderr
  # The performance knobs, chosen by the system: logged once each with why, and recorded.
  res = config["resolved"]
  assert (res["encoder_tile"], res["dense_op_ratio"], res["auxk_buckets"], res["auxk_compact"],
          res["direct_read"], res["retain_freed_memory"]) == (0, 16, True, True, False, False)
  for key, field in knobs.FIELDS.items():
    assert res[key + "_source"].startswith("automatic: "), (key, res[key + "_source"])
    assert r.stderr.count(f"  {field} ") == 1 and res[key + "_source"] in r.stderr, field
  records = _records(wd)
  assert [r["step"] for r in records] == [1, 2]
  for rec in records:
    assert REQUIRED_KEYS <= rec.keys(), REQUIRED_KEYS - rec.keys()
    assert rec["tokens"] == rec["step"] * 128
  assert {"eval/fvu", "eval/l0", "eval/gt_mmcs", "eval/gt_recovered_frac"} <= records[-1].keys()
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(wd, "tb")))
  assert "step 2/2" in r.stderr and "tok/s" in r.stderr and "ETA" in r.stderr
  # The planner checked against the compiler, once: XLA's figure for the compiled step beside
  # the plan's (which over-counts a step this small: its fixed costs dominate), no warning.
  (line,) = [l for l in r.stderr.splitlines() if "memory per device: the compiled step" in l]
  ratio = float(re.search(r"\(([0-9.]+)x\)", line).group(1))
  assert 0.5 <= ratio <= 1.2 and line.startswith("I"), line
  # The end-of-run summary: what it saw, how it scored, where it is, what to run next.
  fvu = records[-1]["eval/fvu"]
  assert "finished: 2 steps, 256 tokens (a generated stream; 256 rows held out)" in r.stderr
  assert f"eval/fvu {fvu:.4g}" in r.stderr and os.path.join(wd, "checkpoints") in r.stderr
  assert f"python -m jaxsae.export --workdir={wd} --format=saelens" in r.stderr


def test_dry_run_checks_and_prints_the_choices_without_writing(tmp_path):
  wd = str(tmp_path / "dry")
  r = run_cli([*TINY, f"--workdir={wd}", "--dry_run", "--config.encoder_tile=64",
               "--config.train.auxk_compact=False"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert not os.path.exists(wd)   # nothing written, nothing trained
  out = r.stdout
  # The performance knobs: a value set is honoured (the plan is of the tiled step), the rest chosen.
  assert "encoder_tile=64" in out and "encoder_tile              64      (set in the config)" in out
  assert "train.auxk_compact        False   (set in the config)" in out
  assert "train.auxk_buckets        True    (automatic: " in out
  assert "memory plan:" in out and "fits (" in out and f"workdir {wd}: a new run" in out
  assert "data synthetic: a generated stream, 800 steps of 128, 256 rows held out, d=32" in out
  assert "learning rate" in out and "automatic: 0.0096 x sqrt(576/d=32)" in out
  assert "lazy Adam" in out and "kernels" in out and "auto on cpu" in out
  # What the run would refuse, the dry run refuses, with the same one-line error.
  r = run_cli([*TINY, "--dry_run", "--config.mesh.device_memory=4KiB"])
  assert r.returncode == 1 and "does not fit in device memory" in r.stderr, r.stderr[-2000:]
  r = run_cli([*TINY, "--dry_run", "--config.sae.k=1000"])
  assert r.returncode == 1 and "sae.k" in r.stderr, r.stderr[-2000:]
  r = run_cli(TINY)   # and a real run still needs a workdir
  assert r.returncode != 0 and "--workdir is required" in r.stderr


def test_dry_run_of_a_store_counts_its_passes(tmp_path):
  rows = np.random.default_rng(0).standard_normal((4096, 32)).astype(np.float32)
  np.save(tmp_path / "acts.npy", rows)
  r = run_cli([*TINY, "--dry_run", "--config.data.source=npy",
               f"--config.data.path={tmp_path / 'acts.npy'}", "--config.data.eval_rows=1024",
               "--config.train.steps=48"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "3,072 training rows (2.00 passes in 48 steps of 128), 1,024 held out" in r.stdout


def _fails_before_training(args, tmp_path, *needles):
  wd = str(tmp_path / "bad")
  r = run_cli([*args, f"--workdir={wd}", "--config.train.steps=2"])
  assert r.returncode != 0
  for needle in needles:
    assert needle in r.stderr, r.stderr[-2000:]
  assert not os.path.exists(os.path.join(wd, "metrics.jsonl"))
  return r


@pytest.mark.parametrize("k,needle", [(200, "sae.k=200"), (0, "sae.k=0"), (-3, "sae.k=-3")])
def test_bad_k_is_refused(tmp_path, k, needle):
  _fails_before_training([*TINY, f"--config.sae.k={k}"], tmp_path, needle, "0 < k <= sae.n=128")


def test_bad_encoder_init_norm_is_refused(tmp_path):
  _fails_before_training([*TINY, "--config.sae.encoder_init_norm=0.0"], tmp_path,
                         "sae.encoder_init_norm=0.0 must be positive")


def test_bad_decoder_lr_ratio_is_refused(tmp_path):
  _fails_before_training([*TINY, "--config.train.decoder_lr_ratio=0.0"], tmp_path,
                         "train.decoder_lr_ratio=0.0 must be positive")


def test_bad_architecture_settings_are_refused_together(tmp_path):
  _fails_before_training(
      [*TINY, "--config.sae.architecture=matryoshka_batchtopk", "--config.sae.multi_topk=True",
       "--config.sae.batchtopk_cap=100", "--config.sae.matryoshka_prefixes=(0.5, 0.25)"],
      tmp_path, "sae.multi_topk=True is for architecture='topk'", "sae.batchtopk_cap=100",
      "sae.matryoshka_prefixes=(0.5, 0.25)")
  _fails_before_training([*TINY, "--config.sae.architecture=jumprelu"], tmp_path,
                         "sae.architecture='jumprelu': expected one of")


def test_unknown_config_field_is_refused(tmp_path):
  _fails_before_training([*TINY, "--config.sae.nn=4"], tmp_path, "nn")


@pytest.mark.parametrize("args, line", [
    (["--config=configs/quickstart.py", "--config.train.step=10"],
     "jaxsae: error: no such config field 'step' in a --config.* override; "
     "Did you mean \"steps\" instead of \"step\"?"),
    (["--config=configs/nope.py"],
     "jaxsae: error: --config=configs/nope.py: cannot load it ([Errno 2] No such file or "
     "directory: 'configs/nope.py')"),
])
def test_a_typo_in_the_config_flags_is_one_line(tmp_path, args, line):
  r = run_cli([*args, f"--workdir={tmp_path / 'run'}"])
  assert r.returncode == 1 and r.stderr.strip() == line, r.stderr[-3000:]


def test_an_error_is_printed_once_without_the_backend_probe_line(tmp_path):
  """With JAX left to choose its backend (JAX_PLATFORMS unset, as for a user), stderr holds the
  error once, not again as a log line, and not JAX's quiet "Unable to initialize backend 'tpu'"
  probe line; a dry run that succeeds prints no such line either."""
  wd = str(tmp_path / "run")
  r = run_cli([*TINY, "--config.sae.k=200", f"--workdir={wd}"], env={"JAX_PLATFORMS": ""})
  assert r.returncode == 1 and r.stderr.strip() == (
      "jaxsae: error: invalid config:\n  sae.k=200 must satisfy 0 < k <= sae.n=128"), r.stderr
  r = run_cli([*TINY, "--dry_run"], env={"JAX_PLATFORMS": ""})
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Unable to initialize backend" not in r.stderr + r.stdout, r.stderr[-3000:]


def test_pallas_kernels_on_cpu_need_the_interpret_switch(tmp_path):
  """kernels=pallas on CPU would emulate the kernels (Pallas interpret mode, for tests): refused
  before anything is written or compiled, naming the field and the fix, unless
  JAXSAE_PALLAS_INTERPRET is set (tests/conftest.py sets it for the kernel tests)."""
  wd = str(tmp_path / "run")
  args = [*TINY, "--config.kernels=pallas", f"--workdir={wd}", "--config.train.steps=2",
          "--config.checkpoint.every_steps=0"]
  r = run_cli(args, env={"JAXSAE_PALLAS_INTERPRET": "0"})
  assert r.returncode == 1 and not os.path.exists(wd), r.stderr[-3000:]
  assert r.stderr.strip() == (
      "jaxsae: error: invalid config:\n  kernels=pallas on CPU would run the Pallas kernels in "
      "interpret mode, a slow emulation for testing them: use kernels=xla or auto (or set "
      "JAXSAE_PALLAS_INTERPRET=1 to test the kernels)"), r.stderr[-3000:]
  r = run_cli(args, env={"JAXSAE_PALLAS_INTERPRET": "1"})
  assert r.returncode == 0, r.stderr[-3000:]
  assert "kernels=pallas (set in the config)" in r.stderr


def test_data_dimension_mismatch_is_refused(tmp_path):
  path = tmp_path / "acts.npy"
  np.save(path, np.random.default_rng(0).normal(size=(2048, 24)).astype(np.float32))
  _fails_before_training([*TINY, "--config.data.source=npy", f"--config.data.path={path}"],
                         tmp_path, "d=24", "sae.d=32", str(path))


def _nan_data(tmp_path):
  x = np.random.default_rng(0).normal(size=(4096, 32)).astype(np.float32)
  x[300, 5] = np.nan  # the train rows are shuffled, so this row lands in some batch of epoch 0
  x[1700, 0] = np.inf
  path = tmp_path / "nan.npy"
  np.save(path, x)
  return [*TINY, "--config.data.source=npy", f"--config.data.path={path}",
          "--config.data.eval_rows=256", "--config.train.init_rows=256"]


def test_nonfinite_batch_stops_the_run(tmp_path):
  r = run_cli([*_nan_data(tmp_path), f"--workdir={tmp_path / 'w'}", "--config.train.steps=30"])
  assert r.returncode == 1
  assert "rows with NaN/inf" in r.stderr and "train.on_nonfinite=stop" in r.stderr


def test_nonfinite_batch_is_skipped_and_counted(tmp_path):
  wd = tmp_path / "w"
  r = run_cli([*_nan_data(tmp_path), f"--workdir={wd}", "--config.train.steps=30",
               "--config.train.on_nonfinite=skip", "--config.train.log_every=10"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "skipped 2 batches holding NaN/inf rows" in r.stderr
  assert all(np.isfinite(rec["train/fvu"]) for rec in _records(wd))


def test_automatic_lr_is_deterministic_and_logged(tmp_path):
  """No train.lr: two runs of the same config and data choose the same rate, from the shapes and
  the data's element density, and say so in config.json (with its source and the density) and in
  every metrics record (train/lr)."""
  from jaxsae import optim
  got = []
  for name in ("a", "b"):
    wd = str(tmp_path / name)
    r = run_cli([*TINY, f"--workdir={wd}", "--config.train.steps=4", "--config.train.log_every=1",
                 "--config.checkpoint.every_steps=0"])
    assert r.returncode == 0, r.stderr[-3000:]
    resolved = json.load(open(os.path.join(wd, "config.json")))["resolved"]
    got.append((resolved, [rec["train/lr"] for rec in _records(wd)]))
    assert "learning rate" in r.stderr and "automatic" in r.stderr
  (resolved, rates), again = got
  assert got[1] == got[0]
  density = resolved["data_density"]   # the synthetic data's elements: nearly Gaussian
  assert 0.7 < density < 0.82 and f"density={density:.3f}" in resolved["lr_source"]
  lr = optim.default_lr(32, 4, 128, 128, 4, density)
  assert lr < optim.default_lr(32, 4, 128, 128, 4)
  assert resolved["lr"] == pytest.approx(lr) and resolved["lr_source"].startswith("automatic")
  assert f"density={density:.3f}" in r.stderr
  assert resolved["warmup_steps"] == 0   # 5% of 4 steps rounds to none
  assert resolved["b_pre_lr_ratio_source"].startswith("automatic") and "b_pre at" in r.stderr
  # The default kernels=auto, resolved for this backend, is recorded and logged too.
  assert (resolved["kernels"], resolved["kernels_source"]) == ("xla", "auto on cpu")
  assert "kernels=xla (auto on cpu)" in r.stderr
  # Linear decay to 0 over the run: the rate each logged step ran at.
  assert rates == pytest.approx([lr, 0.75 * lr, 0.5 * lr, 0.25 * lr], rel=1e-6)


def test_own_store_config_reads_d_and_dtype_from_the_store(tmp_path):
  """configs/store.py:PATH: d and dtype from the store (d=48 float32, which no config pins),
  about one pass by default; a path that is not a store is one line."""
  import subprocess
  import sys
  rows = np.random.default_rng(0).standard_normal((8192, 48)).astype(np.float32)
  np.save(tmp_path / "acts.npy", rows)
  store = str(tmp_path / "store")
  r = subprocess.run([sys.executable, "-m", "jaxsae.dump", f"--from-npy={tmp_path / 'acts.npy'}",
                      f"--out={store}", "--chunk_rows=512", "--shard_rows=4096",
                      "--progress=false"],
                     capture_output=True, text=True, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-3000:]
  small = ["--config.sae.n=256", "--config.sae.k=8", "--config.train.batch_size=512",
           "--config.train.init_rows=512", "--config.data.eval_rows=1024"]
  r = run_cli([f"--config=configs/store.py:{store}", *small, "--dry_run"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert (f"data {store}: 7,168 training rows (1.00 passes in 14 steps of 512), 1,024 held out, "
          "d=48 float32") in r.stdout
  wd = str(tmp_path / "run")
  r = run_cli([f"--config=configs/store.py:{store}", *small, f"--workdir={wd}",
               "--config.train.steps=3", "--config.checkpoint.every_steps=0"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.load(open(os.path.join(wd, "config.json")))["sae"]["d"] == 48
  assert "finished: 3 steps" in r.stderr
  r = run_cli([f"--config=configs/store.py:{tmp_path}", f"--workdir={wd}"])
  assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
      f"jaxsae: error: --config: {tmp_path} is not an activation store (it has no "
      "metadata.json): make one with python -m jaxsae.dump")


def test_console_script_help_lists_the_flags():
  """`jaxsae-train --help` shows the flags, as `python -m jaxsae.main --help` does (absl lists the
  flags of the module named by argv[0], which for a console script is its wrapper)."""
  import shutil
  import subprocess
  script = shutil.which("jaxsae-train")
  if script is None:
    pytest.skip("jaxsae-train is not installed (pip install -e .)")
  r = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert "Traceback" not in r.stderr, r.stderr[-2000:]   # (absl's --help exits with status 1)
  for flag in ("--config", "--workdir", "--[no]dry_run", "--num_processes"):
    assert flag in r.stdout + r.stderr, flag
