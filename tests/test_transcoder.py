"""Transcoders (data.target_path): a second store with the same rows is the target.

The sparse loss and gradients equal dense autodiff with and without the skip term; the pair of
stores is read row-aligned and mismatched stores are refused naming both; through the real CLI a
transcoder whose target is a fixed rotation of its input trains as well as an SAE on the input,
resumes bit-identically, and exports in the layouts SAELens and sparsify load.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, run_cli
from jaxsae import model, topk
from jaxsae.ops import Ops
from jaxsae.data.loader import open_store
from jaxsae.data.source import DataError
from jaxsae.data.store import Layout, StoreWriter
from jaxsae.checkpoint_layout import StepReader, checkpoint_dir

D, D_OUT, ROWS, C = 32, 24, 8192, 256


# ---- the loss ----------------------------------------------------------------------------------

def _problem(seed, skip, b=48, d=24, d_out=20, n=160):
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  params = model.init_params(ks[0], d, n, 0.1 * jax.random.normal(ks[1], (d,)),
                             b_dec=0.1 * jax.random.normal(ks[2], (d_out,)), skip=skip)
  params["b_enc"] = 0.1 * jax.random.normal(ks[3], (n,))
  if skip:
    params["W_skip"] = 0.1 * jax.random.normal(ks[4], (d_out, d))
  x = jax.random.normal(ks[5], (b, d)) * 1.5 + 0.3
  y = jax.random.normal(ks[6], (b, d_out)) + x[:, :d_out]
  dead = jax.random.uniform(ks[7], (n,)) < 0.3
  return params, x, y, dead


@pytest.mark.parametrize("architecture,skip", [("topk", False), ("topk", True),
                                               ("matryoshka_batchtopk", True)])
def test_sparse_backward_equals_dense_autodiff(architecture, skip):
  params, x, y, dead = _problem(0, skip)
  batch = architecture != "topk"
  spec = model.SaeSpec(d=24, n=160, k=6, k_aux=32, auxk_coef=1 / 32, dead_tokens=1,
                       multi_topk=False, architecture=architecture,
                       batchtopk_cap=20 if batch else 4, prefixes=(10, 40) if batch else (),
                       d_out=20, transcoder=True, skip=skip)
  total_var, _ = Ops().centred_sq_sum(y)
  xc = x - params["b_pre"]
  idx = topk.select(xc, params["W_enc"], params["b_enc"], spec.k_select)
  aux_idx, aux_ok = topk.select_aux(xc, params["W_enc"], params["b_enc"], dead, spec.k_aux)
  scale = jnp.minimum(jnp.sum(dead) / spec.k_aux, 1.0)
  sparse_loss = lambda p: model.loss_terms(p, x, idx, aux_idx, aux_ok, total_var, scale, spec,
                                           target=y)[0]
  loss, grads = jax.value_and_grad(sparse_loss)(params)
  dense, dgrads = jax.value_and_grad(model.dense_loss)(params, x, dead, total_var, spec, y)
  assert abs(float(loss) - float(dense)) <= 1e-5 * abs(float(dense))
  assert set(grads) == {"W_enc", "b_enc", "W_dec", "b_pre", "b_dec"} | ({"W_skip"} if skip else set())
  for name in params:
    assert float(jnp.linalg.norm(dgrads[name])) > 0, name
    rel = float(jnp.linalg.norm(grads[name] - dgrads[name]) / jnp.linalg.norm(dgrads[name]))
    assert rel < 1e-5, name


# ---- the pair of stores ------------------------------------------------------------------------

def _write(path, rows, tokens, chunk=C):
  w = StoreWriter(str(path), rows.shape[1], str(rows.dtype), {"tokens": "int32"},
                  Layout(chunk, 4 * chunk), {"model": "test", "hook": os.path.basename(path)})
  w.append(rows, tokens=tokens)
  w.finish({})
  return str(path)


def rotation_stores(root, d=D, d_out=D_OUT, rows=ROWS, seed=0):
  """x: sparse sums of 128 unit features (as an SAE sees them); y = 3 x R[:, :d_out] for a fixed
  random orthogonal R, plus a column that says which row it is (for alignment checks)."""
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(128, d))
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  acts = (rng.random((rows, 128)) < 4 / 128) * rng.exponential(1.0, (rows, 128))
  x = (acts @ feats + 0.01 * rng.normal(size=(rows, d))).astype(np.float32)
  r, _ = np.linalg.qr(rng.normal(size=(d, d)))
  y = (3 * x @ r[:, :d_out]).astype(np.float32)
  tokens = np.arange(rows, dtype=np.int32) % 997
  return _write(root / "x", x, tokens), _write(root / "y", y, tokens), x, y


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
  return rotation_stores(tmp_path_factory.mktemp("transcoder"))


def _open(x_path, y_path, **kw):
  args = dict(global_batch=512, eval_rows=1024, eval_batches=2, seed=3, epochs=0, group_chunks=4,
              num_threads=2, prefetch=2, allow_incomplete=False, process_index=0,
              process_count=1)
  return open_store(x_path, target_path=y_path, **dict(args, **kw))


def test_pair_is_read_row_aligned(stores):
  """Every batch row (train, eval, init sample) is x of some row beside y of the same row."""
  x_path, y_path, x, y = stores
  data = _open(x_path, y_path)
  assert (data.d, data.d_target) == (D, D_OUT)
  key = {row.tobytes(): i for i, row in enumerate(x)}
  batches = [next(data.train) for _ in range(20)] + list(data.eval_batches()) + [
      data.init_sample(700)]
  for batch in batches:
    assert batch.shape[1] == D + D_OUT
    rows = [key[r.tobytes()] for r in np.ascontiguousarray(batch[:, :D])]
    np.testing.assert_array_equal(batch[:, D:], y[rows])
  data.close()


def test_mismatched_stores_are_refused_naming_both(stores, tmp_path):
  x_path, y_path, x, y = stores
  short = _write(tmp_path / "short", y[:-C], np.arange(ROWS - C, dtype=np.int32) % 997)
  with pytest.raises(DataError, match=r"data.path=.*x has rows=8192 but data.target_path=.*short "
                                      r"has rows=7936"):
    _open(x_path, short)
  tokens = np.arange(ROWS, dtype=np.int32) % 997
  tokens[5000] += 1
  shifted = _write(tmp_path / "shifted", y, tokens)
  with pytest.raises(DataError, match=r"row 5000: column 'tokens' is .* in data.path=.*x but .* "
                                      r"in data.target_path=.*shifted"):
    _open(x_path, shifted)


# ---- through the CLI ---------------------------------------------------------------------------

def args(x_path, steps, *extra):
  return ["--config=configs/base.py", "--config.data.source=store", f"--config.data.path={x_path}",
          f"--config.sae.d={D}", "--config.sae.n=256", "--config.sae.k=4",
          f"--config.train.steps={steps}", "--config.train.batch_size=256",
          "--config.train.init_rows=4096", "--config.data.eval_rows=2048",
          "--config.sae.dead_tokens=10000", "--config.checkpoint.every_steps=0",
          f"--config.train.log_every={steps}", *extra]


def _eval_fvu(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f][-1]["eval/fvu"]


def test_rotated_target_trains_as_well_as_an_sae_on_the_input(stores, tmp_path):
  """y = 3 x R: the transcoder must learn x's features and rotate them. Its FVU on held-out rows
  is within a few percent of an SAE's on x after the same steps; the logs say what it is. (Its
  encoder and decoder start untied, so it needs more steps than the SAE to catch up: at 600 it
  was 8% behind with the default lazy Adam, 1% at 1200.)"""
  x_path, y_path, _, _ = stores
  fvu = {}
  for name, extra in (("sae", []), ("transcoder", [f"--config.data.target_path={y_path}",
                                                    f"--config.sae.d_out={D_OUT}"])):
    wd = str(tmp_path / name)
    r = run_cli(args(x_path, 1200, *extra, f"--workdir={wd}"))
    assert r.returncode == 0, r.stderr[-3000:]
    fvu[name] = _eval_fvu(wd)
  assert f"transcoder: {x_path} (d={D}) -> {y_path} (d_out={D_OUT})" in r.stderr
  resolved = json.load(open(os.path.join(wd, "config.json")))
  assert resolved["data"]["target_path"] == y_path
  assert fvu["sae"] < 0.3
  assert fvu["transcoder"] <= 1.05 * fvu["sae"], fvu


def test_config_errors_name_the_fields(stores, tmp_path):
  x_path, y_path, _, _ = stores
  for extra, needle in (
      (["--config.sae.skip=True"], "sae.skip=True is for transcoders"),
      (["--config.sae.d_out=7"], "sae.d_out=7 differs from sae.d=32 but data.target_path is unset"),
      ([f"--config.data.target_path={y_path}"],
       f"sae.d_out=0 ({D} wide) but the target store at {y_path} holds d={D_OUT}")):
    r = run_cli(args(x_path, 2, *extra, f"--workdir={tmp_path / 'bad'}"))
    assert r.returncode != 0 and needle in r.stderr, r.stderr[-2000:]


def _reference_output(workdir, x):
  """The checkpoint's transcoder on raw x, in numpy: raw target units."""
  r = StepReader(workdir)
  p = {name.split(".")[1]: r.read(name) for name in r.names if name.startswith("params.")}
  xs = x * r.input_scale()
  pre = (xs - p["b_pre"]) @ p["W_enc"].T + p["b_enc"]
  if r.has_threshold:
    z = np.where(pre > r.threshold(), pre, 0.0)
  else:
    kth = np.partition(pre, -r.k, axis=1)[:, -r.k][:, None]
    z = np.where(pre >= kth, np.maximum(pre, 0.0), 0.0)
  y = z @ p["W_dec"] + p["b_dec"] + (xs @ p["W_skip"].T if "W_skip" in p else 0.0)
  return y / r.target_scale()


def _export(*flags):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "jaxsae.export", *flags], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_skip_transcoder_resumes_and_exports(tmp_path):
  """d_out = d (an MLP's in and out), sae.skip: the run resumed from an earlier checkpoint ends
  bit-identical; sparsify's layout (TopK) and SAELens's jumprelu_skip_transcoder (BatchTopK) load
  in those libraries and compute what the checkpoint computes; what they cannot hold is refused."""
  x_path, y_path, x, _ = rotation_stores(tmp_path, d_out=D)
  x = x[:128]
  tc = [f"--config.data.target_path={y_path}", "--config.sae.skip=True"]
  wd = str(tmp_path / "run")
  r = run_cli(args(x_path, 30, *tc, "--config.checkpoint.every_steps=10", "--config.train.lr=3e-3",
                   f"--workdir={wd}"))
  assert r.returncode == 0, r.stderr[-3000:]
  reader = StepReader(wd)
  full = {name: reader.read(name) for name in reader.names}
  assert {"params.W_skip", "params.b_dec", "target_scale"} <= full.keys()
  assert np.any(full["params.W_skip"] != 0)
  copy = str(tmp_path / "copy")
  shutil.copytree(wd, copy)
  for step in (20, 30):
    shutil.rmtree(os.path.join(checkpoint_dir(copy), str(step)))
  r = run_cli(args(x_path, 30, *tc, "--config.checkpoint.every_steps=10", "--config.train.lr=3e-3",
                   f"--workdir={copy}"))
  assert r.returncode == 0 and "resumed from step 10 " in r.stderr, r.stderr[-3000:]
  resumed = StepReader(copy)
  for name in full:
    np.testing.assert_array_equal(resumed.read(name), full[name], err_msg=name)

  want = _reference_output(wd, x)
  out = tmp_path / "sparsify"
  r = _export(f"--workdir={wd}", "--format=sparsify", f"--out={out}")
  assert r.returncode == 0, r.stderr
  cfg = json.loads((out / "cfg.json").read_text())
  assert cfg["transcode"] is True and cfg["skip_connection"] is True
  r = _export(f"--workdir={wd}", "--format=saelens", f"--out={tmp_path / 'no'}")
  assert r.returncode == 1 and "TopK transcoder" in r.stderr and "--format=sparsify or npz" in r.stderr
  npz = np.load(_npz(wd, tmp_path))
  assert npz["W_skip"].shape == (D, D)

  btk = str(tmp_path / "btk")
  r = run_cli(args(x_path, 20, *tc, "--config.sae.architecture=batchtopk", f"--workdir={btk}"))
  assert r.returncode == 0, r.stderr[-3000:]
  lens_dir = tmp_path / "saelens"
  r = _export(f"--workdir={btk}", "--format=saelens", f"--out={lens_dir}")
  assert r.returncode == 0, r.stderr
  assert json.loads((lens_dir / "cfg.json").read_text())["architecture"] == \
      "jumprelu_skip_transcoder"

  torch = pytest.importorskip("torch")
  sparsify = pytest.importorskip("sparsify")
  coder = sparsify.SparseCoder.load_from_disk(str(out))
  with torch.no_grad():
    got = coder(torch.from_numpy(x)).sae_out.numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  sae_lens = pytest.importorskip("sae_lens")
  lens = sae_lens.SAE.load_from_disk(str(lens_dir), device="cpu")
  with torch.no_grad():
    got = lens(torch.from_numpy(x)).numpy()
  want = _reference_output(btk, x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _npz(workdir, tmp_path):
  out = tmp_path / "tc.npz"
  r = _export(f"--workdir={workdir}", "--format=npz", f"--out={out}")
  assert r.returncode == 0, r.stderr
  return out


def test_narrower_target_exports_only_as_npz(stores, tmp_path):
  """d_out < d: sparsify's layout cannot hold it (refused, naming npz); the npz computes what the
  checkpoint computes, and jaxsae.sae_io refuses to read it as an SAE."""
  from jaxsae import sae_io
  x_path, y_path, x, _ = stores
  wd = str(tmp_path / "run")
  r = run_cli(args(x_path, 10, f"--config.data.target_path={y_path}",
                   f"--config.sae.d_out={D_OUT}", f"--workdir={wd}"))
  assert r.returncode == 0, r.stderr[-3000:]
  r = _export(f"--workdir={wd}", "--format=sparsify", f"--out={tmp_path / 'no'}")
  assert r.returncode == 1 and f"d=32 to d_out={D_OUT}" in r.stderr and "--format=npz" in r.stderr
  path = _npz(wd, tmp_path)
  z = np.load(path)
  x = x[:64]
  pre = x @ z["W_enc"] + z["b_enc"]   # b_pre is folded into b_enc: the input goes in uncentred
  kth = np.partition(pre, -4, axis=1)[:, -4][:, None]
  codes = np.where(pre >= kth, np.maximum(pre, 0.0), 0.0)
  want = _reference_output(wd, x)
  np.testing.assert_allclose(codes @ z["W_dec"] + z["b_dec"], want, rtol=1e-4,
                             atol=1e-4 * np.abs(want).max())
  for source in (wd, str(path)):
    with pytest.raises(sae_io.SaeError, match="transcoder"):
      sae_io.load(source)
