"""`python -m jaxsae.export` as a user runs it: real checkpoints in, files the field's loaders read out.

The encodes below are numpy reimplementations of SAELens's TopKSAE (top-k, then ReLU) and sparsify's
SparseCoder (ReLU, then top-k) applied to the exported tensors; they must match jaxsae's own encode
of the same raw inputs (jaxsae scales inputs by the input scale, the exports fold it in).
"""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from conftest import REPO, run_cli
from test_cli import TINY

from jaxsae import export as export_lib, model

SAELENS_CFG_KEYS = {"architecture", "d_in", "d_sae", "k", "dtype", "device", "apply_b_dec_to_input",
                    "normalize_activations", "metadata"}
META_KEYS = {"model", "hook", "d", "n", "k", "steps", "tokens", "metrics", "jaxsae_version",
             "input_scale"}


# Sets an address-space limit, then execs Python with the remaining arguments (a limit set in a
# preexec_fn would run Python code between fork and exec in this multithreaded test process).
CAPPED = ("import os, resource, sys; lim = int(sys.argv[1]) << 20; "
          "resource.setrlimit(resource.RLIMIT_AS, (lim, lim)); "
          "os.execv(sys.executable, [sys.executable] + sys.argv[2:])")


def run_python(*args, cap_mb=0, env=None):
  prefix = [sys.executable, "-c", CAPPED, str(cap_mb)] if cap_mb else [sys.executable]
  return subprocess.run([*prefix, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def run_export(*args, cap_mb=0, env=None):
  return run_python("-m", "jaxsae.export", *args, cap_mb=cap_mb, env=env)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A trained tiny run whose inputs are rescaled (data.normalize=unit), so folding is exercised."""
  wd = str(tmp_path_factory.mktemp("export") / "run")
  r = run_cli([*TINY, f"--workdir={wd}", "--config.train.steps=4", "--config.data.normalize=unit",
               "--config.checkpoint.every_steps=2", "--config.train.log_every=2"])
  assert r.returncode == 0, r.stderr[-3000:]
  return wd


@pytest.fixture(scope="module")
def jaxsae_ref(workdir):
  """jaxsae's encode/decode of raw inputs x, straight from the checkpoint's (scaled) params."""
  reader = export_lib.StepReader(workdir)
  params = {k: jnp.asarray(reader.read(f"params.{k}"))
            for k in ("W_enc", "b_enc", "W_dec", "b_pre", "b_dec")}
  s = reader.input_scale()
  assert abs(s - 1) > 0.05, "the fixture should exercise a non-trivial input scale"
  # b_dec steps faster than b_pre (model.py): the export must fold their difference into b_enc.
  assert np.abs(params["b_dec"] - params["b_pre"]).max() > 1e-3
  x = np.random.default_rng(7).normal(size=(256, reader.d)).astype(np.float32) * 3 / np.sqrt(s)
  vals, idx = model.encode(params, jnp.asarray(x * s), reader.k)
  z = np.zeros((len(x), reader.n), np.float32)
  np.put_along_axis(z, np.asarray(idx), np.asarray(vals), axis=1)
  x_hat = np.asarray(model.decode(params, vals, idx)) / s
  return {"x": x, "z": z, "x_hat": x_hat, "reader": reader}


def saelens_encode(x, w_enc, b_enc, b_dec, k):
  """SAELens TopKSAE.encode: relu(topk((x - b_dec) @ W_enc + b_enc)) (apply_b_dec_to_input)."""
  pre = (x - b_dec) @ w_enc + b_enc
  idx = np.argsort(-pre, axis=1, kind="stable")[:, :k]
  z = np.zeros_like(pre)
  np.put_along_axis(z, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0), axis=1)
  return z


def sparsify_encode(x, enc_w, enc_b, b_dec, k):
  """sparsify SparseCoder.encode: topk(relu((x - b_dec) @ encoder.weight^T + encoder.bias))."""
  pre = np.maximum((x - b_dec) @ enc_w.T + enc_b, 0)
  idx = np.argsort(-pre, axis=1, kind="stable")[:, :k]
  z = np.zeros_like(pre)
  np.put_along_axis(z, idx, np.take_along_axis(pre, idx, 1), axis=1)
  return z


def _check_metadata(meta: dict, reader):
  assert META_KEYS <= meta.keys(), META_KEYS - meta.keys()
  assert int(meta["d"]) == reader.d and int(meta["n"]) == reader.n and int(meta["k"]) == reader.k
  assert int(meta["steps"]) == 4 and int(meta["tokens"]) == 4 * 128
  metrics = meta["metrics"] if isinstance(meta["metrics"], dict) else json.loads(meta["metrics"])
  assert "eval/fvu" in metrics and "train/fvu" in metrics
  assert meta["model"] == "synthetic"


def test_saelens_export_matches_jaxsae(workdir, jaxsae_ref, tmp_path):
  out = tmp_path / "saelens"
  r = run_export(f"--workdir={workdir}", "--format=saelens", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  reader, x = jaxsae_ref["reader"], jaxsae_ref["x"]
  d, n = reader.d, reader.n
  t = load_file(out / "sae_weights.safetensors")
  assert {k: (v.shape, v.dtype) for k, v in t.items()} == {
      "W_enc": ((d, n), np.float32), "b_enc": ((n,), np.float32),
      "W_dec": ((n, d), np.float32), "b_dec": ((d,), np.float32)}
  cfg = json.loads((out / "cfg.json").read_text())
  assert set(cfg) == SAELENS_CFG_KEYS
  assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["k"], cfg["dtype"]) == \
      ("topk", d, n, reader.k, "float32")
  assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
  assert {"model_name", "hook_name"} <= cfg["metadata"].keys()
  _check_metadata(cfg["metadata"], reader)
  with safe_open(out / "sae_weights.safetensors", framework="numpy") as f:
    _check_metadata(f.metadata(), reader)

  z = saelens_encode(x, t["W_enc"], t["b_enc"], t["b_dec"], reader.k)
  np.testing.assert_allclose(z, jaxsae_ref["z"], rtol=1e-4, atol=1e-4)
  assert np.array_equal(z > 0, jaxsae_ref["z"] > 0)
  x_hat = z @ t["W_dec"] + t["b_dec"]   # SAELens decode
  np.testing.assert_allclose(x_hat, jaxsae_ref["x_hat"], rtol=1e-4, atol=1e-4)


def test_sparsify_export_matches_jaxsae(workdir, jaxsae_ref, tmp_path):
  out = tmp_path / "sparsify"
  r = run_export(f"--workdir={workdir}", "--format=sparsify", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  reader, x = jaxsae_ref["reader"], jaxsae_ref["x"]
  d, n = reader.d, reader.n
  t = load_file(out / "sae.safetensors")
  assert {k: v.shape for k, v in t.items()} == {
      "encoder.weight": (n, d), "encoder.bias": (n,), "W_dec": (n, d), "b_dec": (d,)}
  cfg = json.loads((out / "cfg.json").read_text())
  assert (cfg["activation"], cfg["num_latents"], cfg["k"], cfg["d_in"]) == ("topk", n, reader.k, d)
  assert {"expansion_factor", "normalize_decoder", "multi_topk", "skip_connection",
          "transcode"} <= cfg.keys()
  z = sparsify_encode(x, t["encoder.weight"], t["encoder.bias"], t["b_dec"], reader.k)
  np.testing.assert_allclose(z, jaxsae_ref["z"], rtol=1e-4, atol=1e-4)
  x_hat = z @ t["W_dec"] + t["b_dec"]
  np.testing.assert_allclose(x_hat, jaxsae_ref["x_hat"], rtol=1e-4, atol=1e-4)


def test_npz_has_gemma_scope_names_and_orientation(workdir, jaxsae_ref, tmp_path):
  out = tmp_path / "params.npz"
  r = run_export(f"--workdir={workdir}", "--format=npz", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  reader = jaxsae_ref["reader"]
  with np.load(out) as p:
    arrays = dict(p)
  assert {k: v.shape for k, v in arrays.items()} == {
      "W_enc": (reader.d, reader.n), "W_dec": (reader.n, reader.d), "b_enc": (reader.n,),
      "b_dec": (reader.d,)}
  z = saelens_encode(jaxsae_ref["x"], arrays["W_enc"], arrays["b_enc"], arrays["b_dec"], reader.k)
  np.testing.assert_allclose(z, jaxsae_ref["z"], rtol=1e-4, atol=1e-4)
  _check_metadata(json.loads((tmp_path / "params.metadata.json").read_text()), reader)


def test_bfloat16_export_is_the_float32_export_rounded(workdir, tmp_path):
  for dtype in ("float32", "bfloat16"):
    r = run_export(f"--workdir={workdir}", "--format=sparsify", f"--dtype={dtype}",
                   f"--out={tmp_path / dtype}")
    assert r.returncode == 0, r.stderr[-3000:]
  with open(tmp_path / "bfloat16" / "sae.safetensors", "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
  full = load_file(tmp_path / "float32" / "sae.safetensors")
  with safe_open(tmp_path / "bfloat16" / "sae.safetensors", framework="numpy") as f:
    for key, value in full.items():
      half = f.get_tensor(key)
      assert half.dtype == ml_dtypes.bfloat16 and half.shape == value.shape
      assert np.array_equal(half, value.astype(ml_dtypes.bfloat16)), key


def test_missing_step_lists_the_steps_that_exist(workdir, tmp_path):
  r = run_export(f"--workdir={workdir}", "--format=saelens", "--step=3", f"--out={tmp_path / 'x'}")
  assert r.returncode == 1
  assert "step 3" in r.stderr and "2, 4" in r.stderr, r.stderr[-2000:]
  r = run_export(f"--workdir={tmp_path / 'empty'}", "--format=saelens", f"--out={tmp_path / 'y'}")
  assert r.returncode == 1 and "no complete checkpoint" in r.stderr


def test_loads_in_real_saelens(workdir, jaxsae_ref, tmp_path):
  """SAELens itself, where installed (it pulls torch; CI need not have it)."""
  sae_lens = pytest.importorskip("sae_lens")
  torch = pytest.importorskip("torch")
  out = tmp_path / "saelens"
  assert run_export(f"--workdir={workdir}", "--format=saelens", f"--out={out}").returncode == 0
  sae = sae_lens.SAE.load_from_disk(str(out), device="cpu")
  with torch.no_grad():
    z = sae.encode(torch.from_numpy(jaxsae_ref["x"])).numpy()
    x_hat = sae.decode(torch.from_numpy(z)).numpy()
  np.testing.assert_allclose(z, jaxsae_ref["z"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(x_hat, jaxsae_ref["x_hat"], rtol=1e-4, atol=1e-4)


# ---- a dictionary larger than the memory the export may use ------------------------------------

CAP_MB = 700   # address-space cap (RLIMIT_AS) of the export process; its baseline is ~350-450 MB


def _big_checkpoint(workdir, n, d):
  """A checkpoint holding what export reads (params, input scale, run record) for a dictionary of
  2 x n x d float32: written through the same Checkpointer the trainer uses. It has the layout
  of checkpoints saved before b_dec existed (b_pre is both biases), which still export."""
  import jax.numpy as jnp
  from jaxsae import checkpoint
  w = (np.arange(n * d, dtype=np.int64) % 65521).astype(np.float32).reshape(n, d)
  state = {"params": {"W_enc": jnp.asarray(w), "W_dec": jnp.asarray(w) * 3,
                      "b_enc": jnp.arange(n, dtype=jnp.float32), "b_pre": jnp.ones(d)},
           "since_fired": jnp.zeros(n, jnp.int32), "input_scale": jnp.float32(2.0)}
  saver = checkpoint.Checkpointer(workdir)
  saver.save(1, state, {"step": 1}, {"config": {"sae": {"d": d, "n": n, "k": 8}}, "tokens": 128})
  saver.wait()
  saver.close()
  return w


def test_streamed_export_under_a_memory_cap(tmp_path):
  n, d = 1 << 18, 256                   # W_enc + W_dec: 512 MiB of float32
  wd = str(tmp_path / "big")
  w = _big_checkpoint(wd, n, d)

  env = {"MALLOC_ARENA_MAX": "2"}   # glibc reserves 64 MiB of address space per thread arena
  # The control: under the same cap, holding the dictionary whole fails.
  control = run_python("-c", "from jaxsae import export as E; r = E.StepReader('" + wd + "'); "
                       "a = r.read('params.W_enc'); b = r.read('params.W_dec'); print(a.sum())",
                       cap_mb=CAP_MB, env=env)
  assert control.returncode != 0 and ("bad_alloc" in control.stderr or "MemoryError" in
                                      control.stderr), "the cap must be too small for the dictionary"

  out = tmp_path / "out"
  r = run_export(f"--workdir={wd}", "--format=saelens", f"--out={out}", "--block_mb=8",
                 cap_mb=CAP_MB, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  with safe_open(out / "sae_weights.safetensors", framework="numpy") as f:
    enc, dec = f.get_slice("W_enc"), f.get_slice("W_dec")
    assert enc.get_shape() == [d, n] and dec.get_shape() == [n, d]
    for lo in (0, 77_777, n - 1000):      # bands across blocks and chunks, incl. the very end
      np.testing.assert_array_equal(enc[:, lo:lo + 1000], 2 * w[lo:lo + 1000].T)
      np.testing.assert_array_equal(dec[lo:lo + 1000], 3 * w[lo:lo + 1000] / 2)
    np.testing.assert_array_equal(f.get_tensor("b_dec"), np.full(d, 0.5, np.float32))
    np.testing.assert_array_equal(f.get_tensor("b_enc"), np.arange(n, dtype=np.float32))


# ---- BatchTopK: a JumpReLU at inference ---------------------------------------------------------

def test_batchtopk_exports_as_jumprelu(tmp_path):
  """A BatchTopK run exports as SAELens's "jumprelu" and as an npz with a threshold; every reader
  (numpy on the files, jaxsae.sae_io, SAELens where installed) encodes as the numpy JumpReLU of
  the checkpoint's own params; sparsify's format is refused with the reason."""
  from jaxsae import sae_io
  wd = str(tmp_path / "run")
  r = run_cli([*TINY, f"--workdir={wd}", "--config.train.steps=4", "--config.data.normalize=unit",
               "--config.sae.architecture=batchtopk", "--config.train.log_every=2"])
  assert r.returncode == 0, r.stderr[-3000:]
  reader = export_lib.StepReader(wd)
  p = {k: reader.read(f"params.{k}") for k in ("W_enc", "b_enc", "W_dec", "b_pre", "b_dec")}
  s, thr = reader.input_scale(), reader.threshold()
  assert thr > 0 and abs(s - 1) > 0.05
  x = np.random.default_rng(7).normal(size=(256, reader.d)).astype(np.float32) * 3 / np.sqrt(s)
  pre = (x * s - p["b_pre"]) @ p["W_enc"].T + p["b_enc"]
  z_ref = np.where(pre > thr, pre, 0.0)
  x_hat_ref = (z_ref @ p["W_dec"] + p["b_dec"]) / s
  l0 = (z_ref > 0).sum(axis=1)
  assert l0.min() < l0.max(), "a JumpReLU's rows hold different numbers of latents"

  out = tmp_path / "saelens"
  r = run_export(f"--workdir={wd}", "--format=saelens", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  cfg = json.loads((out / "cfg.json").read_text())
  assert cfg["architecture"] == "jumprelu" and "k" not in cfg
  assert cfg["metadata"]["architecture"] == "batchtopk"
  t = load_file(out / "sae_weights.safetensors")
  np.testing.assert_array_equal(t["threshold"], np.full(reader.n, thr, np.float32))
  file_pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
  z = np.maximum(file_pre, 0) * (file_pre > t["threshold"])   # SAELens JumpReLUSAE.encode
  np.testing.assert_allclose(z, z_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(z @ t["W_dec"] + t["b_dec"], x_hat_ref, rtol=1e-4, atol=1e-4)

  npz = tmp_path / "sae.npz"
  assert run_export(f"--workdir={wd}", "--format=npz", f"--out={npz}").returncode == 0
  for path in (wd, str(out), str(npz)):
    sae = sae_io.load(path)
    assert sae.k == 0 and np.all(sae.threshold == np.float32(thr)), path
    np.testing.assert_allclose(sae.encode_dense(x), z_ref, rtol=1e-4, atol=1e-4, err_msg=path)

  r = run_export(f"--workdir={wd}", "--format=sparsify", f"--out={tmp_path / 'sparsify'}")
  assert r.returncode == 1 and "BatchTopK" in r.stderr and "--format=saelens or npz" in r.stderr

  sae_lens = pytest.importorskip("sae_lens")
  torch = pytest.importorskip("torch")
  lens = sae_lens.SAE.load_from_disk(str(out), device="cpu")
  with torch.no_grad():
    z = lens.encode(torch.from_numpy(x)).numpy()
    x_hat = lens.decode(torch.from_numpy(z)).numpy()
  np.testing.assert_allclose(z, z_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(x_hat, x_hat_ref, rtol=1e-4, atol=1e-4)
