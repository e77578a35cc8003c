"""What the compiled sharded step communicates: never a [B, n] array, only the top-k candidates
and [B, d]-sized partial sums over the latent axis (read from the optimized HLO). Over 2 latent
shards the candidates are gathered ([B_local, k * shards]); over more they are exchanged
(all-to-all of [B_local / shards, k] pieces) and only the k winners of each row gathered."""
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import base
from jaxsae import hlo, mesh as mesh_lib, plan

D, N, K, B = 16, 8192, 8, 512
MESH = (2, 4)
B_LOCAL, N_LOCAL = B // MESH[0], N // MESH[1]


def _config(tile=0, mesh=MESH):
  c = base.get_config()
  c.sae.d, c.sae.n, c.sae.k, c.sae.k_aux = D, N, K, 8
  c.train.batch_size, c.mesh.shape, c.encoder_tile = B, mesh, tile
  return c


def _batch_by_latent(colls, mesh=MESH):
  """Collectives moving an array at least as large as one device's pre[B_local, n_local]."""
  return [c for c in colls if c.largest >= (B // mesh[0]) * (N // mesh[1])]


@pytest.mark.parametrize("mesh", [MESH, (4, 2)])
@pytest.mark.parametrize("tile", [0, 512])
def test_step_never_moves_a_batch_by_latent_array(tile, mesh):
  b_local, shards = B // mesh[0], mesh[1]
  colls = hlo.collectives(plan.compile_step(_config(tile, mesh)).as_text())
  assert colls, "no collectives found: the HLO parser is broken"
  assert not _batch_by_latent(colls, mesh), _batch_by_latent(colls, mesh)
  # What does cross the latent axis: candidates (values and indices), for top-k and for AuxK, and
  # nothing bigger than them or than a partial x_hat [B_local, d].
  gathers = [c for c in colls if c.kind == "all-gather"]
  exchanged = [c for c in colls if c.kind == "all-to-all"]
  if shards > 2:   # each shard merges B_local / shards rows, then the winners are gathered
    assert {s for c in exchanged for _, s in c.arrays} == {(1, b_local // shards, K)}
    assert {s for c in gathers for _, s in c.arrays} == {(b_local, K)}
    # B_local x k 4-byte values and as many indices, for top-k and for AuxK: whatever the shards
    assert sum(c.bytes for c in exchanged if "branch_1" in c.op_name) == 4 * b_local * K * 4
  else:            # every shard's candidates of every row, to every shard
    assert not exchanged
    assert {s for c in gathers for _, s in c.arrays} == {(b_local, K * shards)}
  assert len(gathers) >= 3   # top-k indices (its values are unused), AuxK values + indices
  latent_sums = [c for c in colls if c.kind == "all-reduce" and "branch_" in c.op_name]
  assert latent_sums and all(c.largest <= b_local * D for c in latent_sums)


def test_detector_flags_a_naive_sharded_top_k():
  """The check above can fail: plain jit of top-k over a latent-sharded GEMM (Auto axes) does
  all-gather the whole pre-activation, and the detector sees it."""
  mesh = mesh_lib.create_mesh(_config().mesh)
  x = jax.ShapeDtypeStruct((B, D), jnp.float32, sharding=NamedSharding(mesh, P("data", None)))
  w = jax.ShapeDtypeStruct((N, D), jnp.float32, sharding=NamedSharding(mesh, P("model", None)))
  naive = jax.jit(lambda x, w: jax.lax.top_k(x @ w.T, K)[1])
  colls = hlo.collectives(naive.lower(x, w).compile().as_text())
  assert _batch_by_latent(colls), colls


def test_blocked_encoder_bounds_memory():
  """pre[B_local, n_local] dominates the untiled step; tiles of 512 latents shrink XLA's
  temporaries to the size of the optimizer pass."""
  c = _config()
  c.sae.n, c.train.batch_size, c.mesh.shape = 2**18, 1024, (1, 8)   # pre: 1024 x 32768 f32
  whole = plan.compile_step(c).memory_analysis().temp_size_in_bytes
  c.encoder_tile = 512
  tiled = plan.compile_step(c).memory_analysis().temp_size_in_bytes
  pre = 1024 * 2**15 * 4
  assert whole >= 2 * pre          # pre and its AuxK-masked copy
  assert tiled < whole / 4, (tiled, whole)
