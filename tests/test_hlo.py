"""What the compiled sharded step communicates: never a [B, n] array, only the top-k candidates
and [B, d]-sized partial sums over the latent axis (read from the optimized HLO). Over 2 latent
shards the candidates are gathered ([B_local, k * shards]); over more they are exchanged
(all-to-all of [B_local / shards, k] pieces) and only the k winners of each row gathered."""
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import base
from jaxsae import hlo, mesh as mesh_lib, plan, step as step_lib, topk

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
    # B_local x k 4-byte values and as many indices, whatever the shards: top-k's once, outside
    # the AuxK switch (hlo.by_branch's "common"), and AuxK's in its branches
    groups = hlo.by_branch(exchanged)
    assert sum(c.bytes for c in groups["common"]) == 2 * b_local * K * 4
    assert sum(c.bytes for c in groups["branch_1"]) == 2 * b_local * K * 4
    assert not groups["branch_0"]
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
  # pre, once: AuxK over all latents computes its own (live latents masked by a -inf bias) after
  # the main selection has freed it, rather than a masked copy beside it
  assert pre <= whole < 1.5 * pre, whole / pre
  assert tiled < whole / 4, (tiled, whole)


def _encoder_ops(text, b_local, n_local, k):
  """(encoder GEMMs [B_local, n_local], top-k's of k from [B_local, n_local]) in optimized HLO."""
  shapes, gemms, top_ks = {}, 0, 0
  for line in text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$", line)
    if not m:
      continue
    name, result, op, operands = m.groups()
    shapes[name] = [tuple(int(s) for s in dims.split(",") if s)
                    for dims in re.findall(r"\[([0-9,]*)\]", result)]
    if op == "dot" and shapes[name] == [(b_local, n_local)]:
      gemms += 1
    if "top" in line.lower() and shapes[name][:1] == [(b_local, k)] and (
        op in ("sort", "custom-call") or "TopK" in line):
      operand = re.match(r"%([^,) ]+)", operands)
      top_ks += bool(operand) and shapes.get(operand.group(1), [()])[0] == (b_local, n_local)
  return gemms, top_ks


@pytest.mark.parametrize("k_aux,mesh", [(32, (1, 1)), (256, (1, 1)), (256, (2, 2))])
def test_main_selection_is_compiled_once_whatever_the_auxk_branches(k_aux, mesh):
  """The encoder GEMM and the main top-k are outside the AuxK switch: one main top-k in the
  compiled step however many AuxK branches (widths x dead lists) it holds, and besides the main
  GEMM only those of AuxK over all latents, one per width (its second pass; lists GEMM their
  rows only)."""
  c = _config(mesh=mesh)
  c.sae.k_aux, c.train.dense_op_ratio = k_aux, 0   # no dense [B, n] GEMMs in the sparse ops
  c.train.auxk_buckets = c.train.auxk_compact = True
  b_local, n_local = B // mesh[0], N // mesh[1]
  widths = step_lib.aux_sizes(k_aux, True)
  # (no dead latent) + each AuxK width over each dead list and over all latents
  branches = 1 + sum(len(topk.compact_sizes(n_local, w)) + 1 for w in widths)
  assert branches >= 4
  text = plan.compile_step(c).as_text()
  assert len(re.search(r"branch_computations=\{([^}]*)\}", text).group(1).split(",")) == branches
  assert _encoder_ops(text, b_local, n_local, K) == (1 + len(widths), 1)
