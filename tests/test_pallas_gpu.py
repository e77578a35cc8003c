"""GPU Pallas kernels (Pallas Triton: pallas_kernels/*_gpu.py).

On CPU every kernel is checked twice: run in interpret mode against its pure-JAX reference, and
cross-lowered for CUDA through the real Pallas -> Triton IR lowering (jax.export), which catches
what Triton refuses (non-power-of-2 blocks, unsupported ops). The whole train step with the GPU
flavour is compared with kernels=xla in test_pallas_kernels.py (parametrized by flavour).

The last section runs the kernels compiled on a GPU and is skipped elsewhere. conftest.py makes CPU
the default platform, so on a GPU machine run:  JAX_PLATFORMS=cuda python -m pytest tests/test_pallas_gpu.py
(the CPU-interpret tests then run compiled too).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from conftest import assert_pallas_step_equals_xla
from jaxsae import config_check, model, topk, train
from jaxsae.ops import Ops
from pallas_kernels import fused_adam_gpu, sparse_ops_gpu, topk_encoder_gpu

ON_GPU = jax.default_backend() == "gpu"
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# (B, K, d, n, blocks): the default blocks (one program), and ragged shapes with small blocks so
# that several programs run and every block overhangs the arrays (masked loads and stores).
SHAPES = {
    "even": (16, 4, 128, 64, {}, {}),
    "ragged": (13, 3, 72, 50, dict(token_block=4, latent_block=2, col_block=32),
               dict(row_block=16, pair_block=16, col_block=32)),
}


@pytest.fixture(autouse=True)
def f32_matmuls():
  """References at f32 precision: on a GPU, XLA's default f32 matmul is TF32 (no effect on CPU)."""
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture
def gpu_flavor(monkeypatch):
  """kernels=pallas runs the GPU kernels (interpret mode on CPU)."""
  monkeypatch.setattr(pallas_kernels, "FLAVOR", "gpu")


@pytest.fixture
def cuda_lowering(monkeypatch):
  """pallas_call with interpret=False, so that jax.export lowers it for CUDA from a CPU host."""
  monkeypatch.setattr(sparse_ops_gpu, "INTERPRET", False)


def _inputs(seed, dtype, b, k, d, n):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(ks[0], (b, d)).astype(dtype)
  w = jax.random.normal(ks[1], (n, d)).astype(dtype)
  c = jax.random.normal(ks[2], (b, k)).astype(dtype)
  idx = jax.random.randint(ks[3], (b, k), 0, n)   # repeats within a row allowed: still defined
  return x, w, c, idx


def _close(out, ref, dtype):
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert np.isfinite(out).all(), "an output element was never written (still NaN poison)"
  np.testing.assert_allclose(out, ref, rtol=TOL[dtype], atol=TOL[dtype] * np.abs(ref).max())


def _lowers_for_cuda(fn, *args):
  # The Triton lowering asks the device for its compute capability; from a CPU host (jax >= 0.11
  # refuses to guess) an abstract H100 answers.
  h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="cuda")
  with jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=h100)):
    exp = jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
            *args)
  assert "__gpu$xla.gpu.triton" in exp.mlir_module()


# ---- sparse primitives -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_kernels_equal_references(shape, dtype):
  b, k, d, n, gather, scatter = SHAPES[shape]
  x, w, c, idx = _inputs(0, dtype, b, k, d, n)
  _close(sparse_ops_gpu.gather_dot(x, w, idx, poison=True, **gather),
         sparse_ops_gpu.gather_dot_reference(x, w, idx), dtype)
  _close(sparse_ops_gpu.gather_sum(c, w, idx, poison=True, **gather),
         sparse_ops_gpu.gather_sum_reference(c, w, idx), dtype)
  _close(sparse_ops_gpu.scatter_outer(c, x, idx, n, poison=True, **scatter),
         sparse_ops_gpu.scatter_outer_reference(c, x, idx, n), dtype)


def test_scatter_long_run_and_rows_no_pair_selects():
  """Every pair on one latent: its program loops over all B*K pairs (pair_block at a time, the
  last one partial), and every other row must come out as zeros, not left unwritten."""
  x, _, c, _ = _inputs(2, jnp.float32, 13, 5, 72, 50)
  idx = jnp.full((13, 5), 37, jnp.int32)
  out = np.asarray(sparse_ops_gpu.scatter_outer(c, x, idx, 50, poison=True, row_block=16,
                                                pair_block=16, col_block=32))
  assert np.isfinite(out).all() and not out[np.arange(50) != 37].any()
  np.testing.assert_allclose(out[37], np.asarray(c.sum(1) @ x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sparse_kernels_lower_for_cuda(cuda_lowering, dtype):
  b, k, d, n, gather, scatter = SHAPES["ragged"]
  x, w, c, idx = _inputs(0, dtype, b, k, d, n)
  _lowers_for_cuda(sparse_ops_gpu.gather_dot, x, w, idx)
  _lowers_for_cuda(sparse_ops_gpu.gather_sum, c, w, idx)
  _lowers_for_cuda(functools.partial(sparse_ops_gpu.scatter_outer, n=n), c, x, idx)
  # The default blocks at the benchmark's widths (shapes only: nothing runs).
  big = [jax.ShapeDtypeStruct(s, t) for s, t in
         (((4096, 768), dtype), ((131072, 768), dtype), ((4096, 32), jnp.int32))]
  _lowers_for_cuda(sparse_ops_gpu.gather_dot, *big)
  _lowers_for_cuda(functools.partial(sparse_ops_gpu.scatter_outer, n=131072),
                   jax.ShapeDtypeStruct((4096, 32), jnp.float32), big[0], big[2])


# ---- fused Adam --------------------------------------------------------------------------------

# The sweep against optax over steps is in tests/test_fused_adam.py (parametrized by flavour).

def test_fused_adam_bf16_moments():
  ks = jax.random.split(jax.random.PRNGKey(1), 4)
  w, g = jax.random.normal(ks[0], (24, 40)), jax.random.normal(ks[1], (24, 40))
  mu = jax.random.normal(ks[2], (24, 40)).astype(jnp.bfloat16)
  nu = jnp.abs(jax.random.normal(ks[3], (24, 40))).astype(jnp.bfloat16)
  h = fused_adam_gpu.hyper(1e-3, 0.9, 0.999, 1e-8, 3)
  out = fused_adam_gpu.adam_rows(w, g, mu, nu, h, project=True, renorm=True)
  ref = fused_adam_gpu.adam_rows_reference(w, g, mu, nu, h, project=True, renorm=True)
  for a, b in zip(out, ref):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2,
                               atol=1e-6)


def test_fused_adam_lowers_for_cuda(cuda_lowering):
  """The dense sweep and the lazy one (train.lazy_optimizer; tests/test_lazy_optimizer.py runs it
  in interpret mode)."""
  h = fused_adam_gpu.hyper(1e-3, 0.9, 0.999, 1e-8, 1)
  for shape in ((50, 72), (131072, 768)):
    w = jax.ShapeDtypeStruct(shape, jnp.float32)
    flags = dict(project=True, renorm=True)
    _lowers_for_cuda(functools.partial(fused_adam_gpu.adam_rows, **flags), w, w, w, w, h)
    ids = jax.ShapeDtypeStruct((shape[0] // 8,), jnp.int32)
    _lowers_for_cuda(functools.partial(fused_adam_gpu.adam_rows_lazy, **flags), w, w, w, w, h,
                     ids)


# ---- top-k encoder ---------------------------------------------------------------------------

def _topk_inputs(seed, b, d, n):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (b, d)), jax.random.normal(ks[1], (n, d)),
          jax.random.normal(ks[2], (n,)))


# (B, d, n, k, tiles): kp < tn (the first tile fills the list by insertion); kp >= tn (whole
# tiles fill it); several splits; ragged B, d, n; several d steps; one split (no final top_k).
TOPK_CASES = [
    (16, 32, 256, 4, dict(col_tile=64, col_split=64)),
    (13, 40, 250, 8, dict(col_tile=16, col_split=64)),
    (13, 40, 250, 32, dict(col_tile=16, col_split=64, row_tile=16)),
    (16, 80, 200, 8, dict(col_tile=32, col_split=64, depth_tile=16)),
    (16, 32, 256, 8, {}),
]


@pytest.mark.parametrize("case", range(len(TOPK_CASES)))
def test_topk_exact(case):
  """The reference's indices, in its order, and its values to f32 rounding (the tiles' products
  round differently from the reference's one product). The candidates start as NaN / -1: an
  unwritten one would show in the values or as index -1."""
  b, d, n, k, tiles = TOPK_CASES[case]
  x, w, bias = _topk_inputs(case, b, d, n)
  vals, idx = topk_encoder_gpu.topk(x, w, bias, k, poison=True, **tiles)
  ref_v, ref_i = topk_encoder_gpu.topk_reference(x, w, bias, k)
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_i))
  np.testing.assert_allclose(np.asarray(vals), np.asarray(ref_v), rtol=1e-5, atol=1e-5)
  cand_v, cand_i = topk_encoder_gpu.tile_candidates(x, w, bias, k, poison=True, **tiles)
  assert not np.isnan(np.asarray(cand_v)).any() and (np.asarray(cand_i) >= 0).all()


def test_topk_ties_go_to_the_lower_index():
  """Latents with identical rows and biases tie exactly; lax.top_k puts the lower index first.
  Copies sit in the same tile, in another tile and in another split, across the k-th place."""
  x, w, bias = _topk_inputs(5, 16, 32, 256)
  winners = jnp.array([3, 7, 100])
  w, bias = w.at[winners].multiply(3.0), bias.at[winners].add(5.0)
  src = jnp.array([3, 3, 3, 100, 100, 7])
  dst = jnp.array([5, 70, 200, 101, 250, 180])
  w, bias = w.at[dst].set(w[src]), bias.at[dst].set(bias[src])   # exact copies of the winners
  ref_v, ref_i = topk_encoder_gpu.topk_reference(x, w, bias, 6)
  assert (np.diff(np.asarray(ref_v), axis=1) == 0).any(), "the test needs exact ties"
  vals, idx = topk_encoder_gpu.topk(x, w, bias, 6, col_tile=32, col_split=128)
  assert (np.diff(np.asarray(vals), axis=1) == 0).any(), "the kernel's copies tie too"
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_i))
  # Values agree to rounding only: the CPU matmul's blocking differs between a [16, 32] x [32, 32]
  # tile and the reference's whole [16, 256] product; within one computation copies tie exactly.
  np.testing.assert_allclose(np.asarray(vals), np.asarray(ref_v), rtol=1e-6)


def test_topk_masked_bias_selects_dead_latents_only():
  """AuxK: bias -inf on live latents. 12 dead latents, k=16: all 12, then -inf fillers; the
  fillers are the lowest-index live latents, as lax.top_k picks them."""
  x, w, b = _topk_inputs(2, 16, 32, 256)
  dead = np.zeros(256, bool)
  dead[np.random.default_rng(0).choice(256, 12, replace=False)] = True
  masked = jnp.where(dead, b, -jnp.inf)
  vals, idx = topk_encoder_gpu.topk(x, w, masked, 16, col_tile=16, col_split=64, poison=True)
  ref_v, ref_i = topk_encoder_gpu.topk_reference(x, w, masked, 16)
  assert np.isfinite(np.asarray(vals)).sum(1).tolist() == [12] * 16
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_i))
  np.testing.assert_allclose(np.asarray(vals), np.asarray(ref_v), rtol=1e-5, atol=1e-5)


def test_topk_bf16_compute_matches_bf16_values():
  x, w, b = _topk_inputs(3, 16, 32, 256)
  vals, idx = topk_encoder_gpu.topk(x, w, b, 4, col_tile=64, col_split=128,
                                    compute_dtype=jnp.bfloat16)
  pre = jnp.einsum("bd,nd->bn", x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                   preferred_element_type=jnp.float32) + b
  ref_v, ref_i = jax.lax.top_k(pre, 4)
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_i))
  np.testing.assert_allclose(np.asarray(vals), np.asarray(ref_v), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16])
def test_topk_lowers_for_cuda(cuda_lowering, compute_dtype):
  x, w, b = _topk_inputs(0, 13, 40, 250)
  for k, tiles in ((8, dict(col_tile=16, col_split=64)), (32, dict(col_tile=16)), (200, {})):
    _lowers_for_cuda(functools.partial(topk_encoder_gpu.topk, k=k, compute_dtype=compute_dtype,
                                       **tiles), x, w, b)
  sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)   # the benchmark's shapes, main and AuxK
  for k in (32, 256):
    _lowers_for_cuda(functools.partial(topk_encoder_gpu.topk, k=k, compute_dtype=compute_dtype),
                     sds(4096, 768), sds(131072, 768), sds(131072))


# ---- through jaxsae: gradients, selection, the train step, config_check ----------------------

# Selection and gradients through jaxsae with the GPU flavour: tests/test_pallas_kernels.py.


def test_gpu_flavour_step_pieces_lower_for_cuda(gpu_flavor, cuda_lowering):
  """Selection (main + AuxK) and the loss gradient through the custom VJPs, as one program, at
  the benchmark's widths: what a GPU compiles for a train step's per-device work."""
  d, n, b, k, k_aux = 768, 131072, 4096, 32, 256
  spec = model.SaeSpec(d=d, n=n, k=k, k_aux=k_aux, auxk_coef=1 / 32, dead_tokens=1,
                       multi_topk=False)
  sds = lambda *s, t=jnp.float32: jax.ShapeDtypeStruct(s, t)
  params = {"W_enc": sds(n, d), "W_dec": sds(n, d), "b_enc": sds(n), "b_pre": sds(d),
            "b_dec": sds(d)}

  def grads(params, x, dead):
    xc = x - params["b_pre"]
    kw = dict(compute_dtype=jnp.bfloat16, kernels="pallas")
    idx = topk.select(xc, params["W_enc"], params["b_enc"], k, **kw)
    aidx, aok = topk.select_aux(xc, params["W_enc"], params["b_enc"], dead, k_aux, **kw)
    tv, _ = Ops().centred_sq_sum(x)
    return jax.grad(lambda p: model.loss_terms(p, x, idx, aidx, aok, tv, 1.0, spec,
                                               Ops(kernels="pallas"))[0])(params)

  _lowers_for_cuda(grads, params, sds(b, d), sds(n, t=jnp.bool_))


def test_config_check_on_gpu(tiny_config, monkeypatch):
  """kernels=pallas is accepted on a GPU backend, up to the top-k kernel's widest list."""
  tiny_config.kernels = "pallas"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  config_check.validate(tiny_config)
  tiny_config.sae.n, tiny_config.sae.k = 8192, topk_encoder_gpu.MAX_K + 1
  with pytest.raises(config_check.ConfigError, match="on GPU.*registers"):
    config_check.validate(tiny_config)
  monkeypatch.setattr(jax, "default_backend", lambda: "metal")
  with pytest.raises(config_check.ConfigError, match="no metal version"):
    config_check.validate(tiny_config)


def test_auto_kernels_by_backend(tiny_config, monkeypatch):
  """kernels=auto: pallas on a GPU (xla there only for a top-k wider than the kernel's list),
  xla on TPU and CPU; an explicit choice is kept. The step builds what was resolved."""
  tiny_config.kernels = "auto"
  for backend, want in (("cpu", "xla"), ("tpu", "xla"), ("gpu", "pallas")):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert config_check.resolve_kernels(tiny_config) == (want, f"auto on {backend}")
  tiny_config.sae.n, tiny_config.sae.k = 8192, topk_encoder_gpu.MAX_K + 1
  kernels, why = config_check.resolve_kernels(tiny_config)
  assert kernels == "xla" and f"wider than the Pallas kernel's {topk_encoder_gpu.MAX_K}" in why
  config_check.validate(tiny_config)   # auto never picks what validate would refuse
  tiny_config.kernels = "xla"
  assert config_check.resolve_kernels(tiny_config) == ("xla", "set in the config")


def test_auto_kernels_builds_the_pallas_step_on_gpu(tiny_config, gpu_flavor, monkeypatch):
  """On a GPU backend, kernels=auto builds the Pallas step (the fused optimizer is the sign);
  on CPU the xla one. (The GPU backend is faked: the step is built, not run.)"""
  tiny_config.kernels = "auto"
  tiny_config.train.lazy_optimizer = False   # lazy Adam takes the fused sweep on xla too
  run = train.setup(tiny_config)
  assert run.steps.kernels == "xla" and not run.steps.optimizer.per_shard
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  steps = train.StepFns(tiny_config, run.spec, run.specs, run.tx, run.shardings)
  assert steps.kernels == "pallas" and steps.optimizer.per_shard


# ---- compiled on a GPU (skipped elsewhere) ---------------------------------------------------

on_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU (JAX_PLATFORMS=cuda)")
BENCH = dict(b=4096, k=32, d=768, n=131072)


@on_gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_sparse_kernels_at_benchmark_shapes(dtype):
  b, k, d, n = BENCH["b"], BENCH["k"], BENCH["d"], BENCH["n"]
  x, w, c, idx = _inputs(6, dtype, b, k, d, n)
  _close(jax.jit(functools.partial(sparse_ops_gpu.gather_dot, poison=True))(x, w, idx),
         sparse_ops_gpu.gather_dot_reference(x, w, idx), dtype)
  _close(jax.jit(functools.partial(sparse_ops_gpu.gather_sum, poison=True))(c, w, idx),
         sparse_ops_gpu.gather_sum_reference(c, w, idx), dtype)
  scat = jax.jit(functools.partial(sparse_ops_gpu.scatter_outer, n=n, poison=True))
  out = scat(c, x, idx)
  _close(out, sparse_ops_gpu.scatter_outer_reference(c, x, idx, n), dtype)
  # No atomics: the same inputs give the same bits.
  np.testing.assert_array_equal(np.asarray(scat(c, x, idx)), np.asarray(out))


@on_gpu
@pytest.mark.parametrize("lazy", [False, True])
def test_gpu_fused_adam_at_benchmark_shapes(lazy):
  """The dense sweep; the lazy one over ~1/10 of the rows, where the others keep their bits."""
  ks = jax.random.split(jax.random.PRNGKey(7), 5)
  shape = (BENCH["n"], BENCH["d"])
  w = model.unit_rows(jax.random.normal(ks[0], shape))
  g = jax.random.normal(ks[1], shape)
  mu, nu = 0.1 * jax.random.normal(ks[2], shape), jnp.abs(jax.random.normal(ks[3], shape))
  args = [w, g, mu, nu, fused_adam_gpu.hyper(1e-4, 0.9, 0.999, 6.25e-10, 5)]
  kernel, reference = fused_adam_gpu.adam_rows, fused_adam_gpu.adam_rows_reference
  keep = np.zeros(shape[0], bool)
  if lazy:
    touched = jax.random.uniform(ks[4], (shape[0],)) < 0.1
    keep = ~np.asarray(touched)
    args.append(jnp.nonzero(touched, size=shape[0] // 8, fill_value=shape[0])[0].astype(jnp.int32))
    kernel, reference = fused_adam_gpu.adam_rows_lazy, fused_adam_gpu.adam_rows_lazy_reference
  flags = dict(project=True, renorm=True)
  ref = jax.jit(functools.partial(reference, **flags))(*args)
  out = jax.jit(functools.partial(kernel, **flags))(*args)
  for a, b, old in zip(out, ref, (w, mu, nu)):
    np.testing.assert_array_equal(np.asarray(a)[keep], np.asarray(old)[keep])
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@on_gpu
@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("k", [32, 256])
def test_gpu_topk_at_benchmark_shapes(compute_dtype, k):
  """Compiled, the kernel's GEMM sums in another order than XLA's: values must match the exact
  top-k values within f32 rounding, and each index must carry its value (indices may differ
  only where values tie to rounding)."""
  x, w, b = _topk_inputs(8, BENCH["b"], BENCH["d"], BENCH["n"])
  if k == 256:   # AuxK: -inf bias on the ~97% live latents
    b = jnp.where(jax.random.uniform(jax.random.PRNGKey(9), b.shape) < 0.03, b, -jnp.inf)
  vals, idx = jax.jit(functools.partial(topk_encoder_gpu.topk, k=k,
                                        compute_dtype=compute_dtype))(x, w, b)
  pre = jnp.einsum("bd,nd->bn", x.astype(compute_dtype), w.astype(compute_dtype),
                   preferred_element_type=jnp.float32) + b
  ref_v, _ = jax.lax.top_k(pre, k)
  vals, idx = np.asarray(vals), np.asarray(idx)
  finite = np.isfinite(np.asarray(ref_v))
  np.testing.assert_array_equal(np.isfinite(vals), finite)
  np.testing.assert_allclose(vals[finite], np.asarray(ref_v)[finite], rtol=1e-5, atol=1e-4)
  picked = np.asarray(jnp.take_along_axis(pre, jnp.asarray(idx), axis=1))
  np.testing.assert_allclose(picked[finite], vals[finite], rtol=1e-5, atol=1e-4)
  assert all(len(set(r)) == k for r in idx), "an index was selected twice"


@on_gpu
@pytest.mark.parametrize("architecture,lazy", [("topk", False), ("topk", None),
                                               ("batchtopk", None)])
def test_gpu_train_20_steps_pallas_equals_xla(tiny_config, architecture, lazy):
  """The whole step compiled on the GPU, 20 steps: kernels=pallas (Triton top-k GEMM, sparse ops,
  fused Adam) against kernels=xla, at test_pallas_kernels.py's CPU tolerance; also BatchTopK
  (its 4k candidates through the top-k kernel, the threshold's bisection). n=64 keeps the k-th
  and (k+1)-th pre-activations far apart, so different summation orders cannot flip a selection."""
  tiny_config.sae.d, tiny_config.sae.n = 72, 64   # d no power of 2: the blocks overhang and mask
  tiny_config.train.batch_size = 32
  tiny_config.sae.dead_tokens = 32
  tiny_config.sae.architecture = architecture
  tiny_config.train.lazy_optimizer = lazy   # None: lazy here (batch x k = 128 >= n = 64)
  assert_pallas_step_equals_xla(tiny_config, steps=20)


@on_gpu
def test_gpu_stacked_sweep_step_with_pallas_equals_xla(tiny_config):
  """A sweep's two members vmapped through the compiled GPU kernels (test_sweep.stacked_params)."""
  from test_sweep import stacked_params
  got, want = stacked_params(tiny_config, "pallas", 20), stacked_params(tiny_config, "xla", 20)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
