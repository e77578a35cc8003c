"""The step on a mesh of 8 fake devices equals the single-device step: the top-k indices (and the
AuxK picks), the loss, the gradients and the params after 3 steps, f32, relative 1e-5. Also: state
created sharded (optimizer moments included), and bad meshes refused with the fields named."""
import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxsae import mesh as mesh_lib, topk, train

STEPS = 3


def _select(steps, params, x, since_fired):
  """The step's selection (step.py _local_grads), exposed so indices can be compared."""
  spec, xc = steps.spec, x - params["b_pre"]
  idx = steps.ops.select(xc, params["W_enc"], params["b_enc"], spec.k_select)
  aux_idx, aux_ok = steps.ops.select_aux(xc, params["W_enc"], params["b_enc"],
                                         since_fired >= spec.dead_tokens, spec.k_aux)
  return idx, aux_idx, aux_ok


def _trace(config):
  """Per step: indices, AuxK picks, gradients, metrics; then the final params and counters."""
  run = train.setup(config)
  st, specs = run.steps, run.specs
  rows = P(specs.batch_axes, None)
  select = jax.jit(st._shard_map(functools.partial(_select, st),
                                 (st.param_specs, specs.batch, specs.latent), (rows, rows, rows)))
  grads = jax.jit(lambda params, x, y, since: st._shard_map(
      st._local_grads, (st.param_specs, specs.batch, specs.batch, specs.latent, P()),
      (st.param_specs, P(), specs.latent))(params, x, y, since, st.auxk(since)))
  state, out = run.state, []
  for _ in range(STEPS):
    batch = jax.device_put(next(run.data.train), run.batch_sharding)
    x, y = st._inputs(state, batch)
    rec = dict(zip(("idx", "aux_idx", "aux_ok"), select(state.params, x, state.since_fired)))
    rec["grads"] = grads(state.params, x, y, state.since_fired)[0]
    state, rec["metrics"], _ = st.train(state, batch)
    out.append(jax.device_get(rec))
  return jax.device_get(state), out


_REFERENCE = {}


def _reference(config, name="ref"):
  """The single-device run, computed once per module and `name` (every mesh compares against it)."""
  if name not in _REFERENCE:
    ref = config.copy_and_resolve_references()
    ref.mesh.shape, ref.encoder_tile = (1, 1), 0
    _REFERENCE[name] = _trace(ref)
  return _REFERENCE[name]


def _close(a, b, name):
  """Relative 1e-5 of the array's scale (elementwise relative error is meaningless near zero)."""
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b)) or 1.0),
                             err_msg=name)


def _assert_same_run(state, got, ref_state, ref):
  assert any(r["aux_ok"].any() for r in ref), "no dead latents: AuxK was not exercised"
  for step, (g, r) in enumerate(zip(got, ref)):
    np.testing.assert_array_equal(g["idx"], r["idx"], err_msg=f"top-k indices, step {step}")
    np.testing.assert_array_equal(g["aux_ok"], r["aux_ok"], err_msg=f"AuxK picks, step {step}")
    np.testing.assert_array_equal(np.where(r["aux_ok"], g["aux_idx"], -1),
                                  np.where(r["aux_ok"], r["aux_idx"], -1),
                                  err_msg=f"AuxK indices, step {step}")
    for key in ("train/fvu", "losses/auxk", "losses/mse", "train/l0", "sparsity/dead_frac"):
      _close(g["metrics"][key], r["metrics"][key], f"{key}, step {step}")
    for pname, grad in r["grads"].items():
      assert np.any(grad != 0), pname
      _close(g["grads"][pname], grad, f"gradient of {pname}, step {step}")
  for pname in ref_state.params:
    _close(state.params[pname], ref_state.params[pname], f"{pname} after {STEPS} steps")
  np.testing.assert_array_equal(state.since_fired, ref_state.since_fired)
  _close(state.opt_state[1][0].nu["W_enc"], ref_state.opt_state[1][0].nu["W_enc"], "Adam nu")


MESHES = {
    "1x8": dict(shape=(1, 8)),
    "2x4": dict(shape=(2, 4)),
    "4x2": dict(shape=(4, 2)),
    "8x1": dict(shape=(8, 1)),
    # room for a slice / DCN axis: the batch split over two axes
    "slice2x2x2": dict(shape=(2, 2, 2), axes=("slice", "data", "model"),
                       batch_axes=("slice", "data")),
    # the blocked encoder (tiles of 16 latents, 2 per shard) and its running top-k
    "2x4-tiled": dict(shape=(2, 4), tile=8),
    # At n_local = 64 the default train.dense_op_ratio runs AuxK's ops (and at 1x8 the main
    # ones) as dense GEMMs (ops.Ops.kernels_for); here every op gathers, as large n would.
    "2x4-gathers": dict(shape=(2, 4), dense_op_ratio=0),
}


@pytest.fixture
def config(tiny_config):
  tiny_config.sae.n = 256            # with dead_tokens of one batch, some latents die after
  tiny_config.sae.dead_tokens = 256  # step 1 and the sharded AuxK path runs at steps 2 and 3
  # Adam's recipe eps (6.25e-10) turns a gradient element that is pure cancellation (~1e-9, its
  # value set by summation order) into a step of 0.85 lr or 0.86 lr: params would then differ by
  # 1e-5 for reasons that are not sharding. A larger eps keeps the comparison well-conditioned.
  tiny_config.train.eps = 1e-6
  return tiny_config


@pytest.mark.parametrize("name", list(MESHES))
def test_mesh_matches_single_device(config, name):
  ref_state_and_ref = _reference(config)
  m = MESHES[name]
  config.mesh.shape = m["shape"]
  config.mesh.axes = m.get("axes", config.mesh.axes)
  config.mesh.batch_axes = m.get("batch_axes", config.mesh.batch_axes)
  config.encoder_tile = m.get("tile", 0)
  config.train.dense_op_ratio = m.get("dense_op_ratio", config.train.dense_op_ratio)
  _assert_same_run(*_trace(config), *ref_state_and_ref)


@pytest.mark.parametrize("shape,architecture", [((1, 8), "batchtopk"), ((2, 4), "batchtopk"),
                                                ((8, 1), "batchtopk"),
                                                ((2, 4), "matryoshka_batchtopk")])
def test_batchtopk_mesh_matches_single_device(config, shape, architecture):
  """BatchTopK's threshold is the global batch's B*k-th largest candidate, counted over the data
  shards (topk.kth_largest) from candidates merged over the latent shards: the same run. Matryoshka
  masks by global latent index, so its prefixes span the latent shards."""
  config.sae.architecture, config.sae.batchtopk_cap = architecture, 3
  ref_state, ref = _reference(config, architecture)
  config.mesh.shape = shape
  state, got = _trace(config)
  _assert_same_run(state, got, ref_state, ref)
  for g, r in zip(got, ref):
    for key in ("sparsity/threshold", "sparsity/rows_at_cap"):
      _close(g["metrics"][key], r["metrics"][key], key)
  assert any(r["metrics"]["sparsity/rows_at_cap"] > 0 for r in ref)   # the cap is exercised
  assert np.ptp([r["metrics"]["sparsity/threshold"] for r in ref]) > 0
  _close(state.threshold, ref_state.threshold, "inference threshold")


@pytest.mark.parametrize("shape", [(1, 8), (2, 4), (8, 1)])
def test_skip_transcoder_mesh_matches_single_device(config, shape, tmp_path_factory):
  """A transcoder's b_dec and W_skip are replicated; its target rows travel beside the input's
  (data/paired.py) and are split over the batch axes with them."""
  from test_transcoder import rotation_stores
  if "transcoder" not in _REFERENCE:
    _REFERENCE["stores"] = rotation_stores(tmp_path_factory.mktemp("tc"), d=32, d_out=24,
                                           rows=4096)
  x_path, y_path, _, _ = _REFERENCE["stores"]
  config.data.source, config.data.path, config.data.target_path = "store", x_path, y_path
  config.sae.d_out, config.sae.skip = 24, True
  ref_state, ref = _reference(config, "transcoder")
  config.mesh.shape = shape
  state, got = _trace(config)
  _assert_same_run(state, got, ref_state, ref)
  assert {"b_dec", "W_skip"} <= set(state.params)


def test_residual_auxk_norm_matches_single_device(config):
  """sae.auxk_norm="residual" divides AuxK by the residual's variance over the *global* batch, a
  psum over both batch axes: the batch split over two axes must give the single-device run."""
  config.sae.auxk_norm = "residual"
  ref = config.copy_and_resolve_references()
  ref.mesh.shape = (1, 1)
  config.mesh.shape, config.mesh.axes = (2, 2, 2), ("slice", "data", "model")
  config.mesh.batch_axes = ("slice", "data")
  _assert_same_run(*_trace(config), *_trace(ref))


@pytest.mark.parametrize("opt_dtype", ["float32", "bfloat16"])
def test_state_is_created_sharded(config, opt_dtype):
  """W_enc, W_dec, b_enc, both Adam moments and the counters each hold n / 4 rows per device."""
  config.mesh.shape = (2, 4)
  config.train.opt_state_dtype = opt_dtype
  run = train.setup(config)
  adam = run.state.opt_state[1][0]
  sharded = {**{f"params/{k}": v for k, v in run.state.params.items()},
             **{f"mu/{k}": v for k, v in adam.mu.items()},
             **{f"nu/{k}": v for k, v in adam.nu.items()},
             "since_fired": run.state.since_fired}
  for name, arr in sharded.items():
    if name.endswith(("b_pre", "b_dec")):
      assert arr.sharding.is_fully_replicated, name
      continue
    assert arr.sharding.spec[0] == "model", (name, arr.sharding.spec)
    assert {s.data.shape[0] for s in arr.addressable_shards} == {256 // 4}, name
  moments = [*adam.mu.values(), *adam.nu.values()]
  assert {m.dtype.name for m in moments} == {opt_dtype}


def _setup_error(config, match):
  with pytest.raises(mesh_lib.MeshError, match=match):
    train.setup(config)


def test_n_not_divisible_by_model_axis(config):
  config.mesh.shape = (1, 3)
  config.sae.n = 128
  _setup_error(config, r"sae\.n=128 .*'model' mesh axis .*size 3")


def test_mesh_larger_than_devices(config):
  config.mesh.shape = (4, 4)
  _setup_error(config, r"mesh\.shape=\(4, 4\) needs 16 devices; 8 are present")


def test_batch_not_divisible_by_data_axis(config):
  config.mesh.shape = (3, 1)
  config.train.batch_size = 256
  _setup_error(config, r"train\.batch_size=256 .*batch mesh axes \('data',\).*size 3")


def test_unknown_batch_axis(config):
  config.mesh.batch_axes = ("rows",)
  _setup_error(config, r"'rows' \(mesh\.batch_axes / mesh\.latent_axis\) is not in mesh\.axes")


@pytest.mark.parametrize("tile", [1, 7, 64, 333, 999])
def test_blocked_selection_equals_plain(tile):
  """Tiles that do not divide n (the last one overlaps its predecessor), tiles smaller than k:
  the running top-k gives exactly lax.top_k's indices, AuxK picks included."""
  ks = jax.random.split(jax.random.PRNGKey(tile), 4)
  n = 1000
  xc, w = jax.random.normal(ks[0], (64, 16)), jax.random.normal(ks[1], (n, 16))
  b = 0.1 * jax.random.normal(ks[2], (n,))
  for dead in (jax.random.uniform(ks[3], (n,)) < 0.3,       # plenty of dead latents
               np.isin(np.arange(n), [5, 500, 999])):        # fewer dead than k_aux
    both = lambda xc, w, b, tile: (topk.select(xc, w, b, 8, tile=tile),
                                   *topk.select_aux(xc, w, b, dead, 32, tile=tile))
    plain = both(xc, w, b, 0)
    tiled = jax.jit(functools.partial(both, tile=tile))(xc, w, b)
    np.testing.assert_array_equal(tiled[0], plain[0], err_msg=f"idx, tile={tile}")
    np.testing.assert_array_equal(tiled[2], plain[2], err_msg=f"aux_ok, tile={tile}")
    np.testing.assert_array_equal(np.where(plain[2], tiled[1], -1), np.where(plain[2], plain[1], -1),
                                  err_msg=f"aux_idx, tile={tile}")


@pytest.mark.parametrize("path", ["xla", "xla-tiled", "pallas-tpu", "pallas-gpu"])
def test_auxk_over_the_dead_list_equals_over_all_latents(path, monkeypatch):
  """listed: AuxK's top-k over a list of the dead latents (64 or 512 long for n=4096) picks
  exactly what the top-k over all n picks, on every path, whenever the list holds them all."""
  import pallas_kernels
  kernels, tile = ("pallas", 0) if path.startswith("pallas") else ("xla", 1000 * path.endswith("tiled"))
  if kernels == "pallas":
    monkeypatch.setattr(pallas_kernels, "FLAVOR", path.split("-")[1])
  n, k_aux = 4096, 32
  assert topk.compact_sizes(n, k_aux) == (64, 512)
  ks = jax.random.split(jax.random.PRNGKey(11), 4)
  xc, w = jax.random.normal(ks[0], (16, 16)), jax.random.normal(ks[1], (n, 16))
  b = 0.1 * jax.random.normal(ks[2], (n,))
  order = np.asarray(jax.random.permutation(ks[3], n))
  sel = jax.jit(lambda dead, size: (
      topk.select(xc, w, b, 8, tile=tile, kernels=kernels),
      *topk.select_aux(xc, w, b, dead, k_aux, tile=tile, kernels=kernels,
                       listed=topk.dead_list(dead, size) if size else None)),
      static_argnums=1)
  for num_dead in (0, 20, 64, 300):   # none, fewer than k_aux, a full 64-list, the 512-list
    dead = np.isin(np.arange(n), order[:num_dead])
    full = sel(dead, 0)
    assert int(np.sum(full[2])) == 16 * min(num_dead, k_aux)
    for size in (64, 512):
      if num_dead > size:
        continue
      idx, pos, ok = sel(dead, size)
      ids = np.asarray(topk.dead_list(dead, size)[0])
      what = f"{num_dead} dead, list {size}"
      np.testing.assert_array_equal(idx, full[0], err_msg=f"idx, {what}")
      np.testing.assert_array_equal(ok, full[2], err_msg=f"aux_ok, {what}")
      np.testing.assert_array_equal(np.where(ok, ids[np.asarray(pos)], -1),
                                    np.where(ok, full[1], -1), err_msg=f"aux_idx, {what}")
