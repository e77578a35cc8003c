"""Which latents fire: the dense encoder GEMM and top-k, over a latent-sharded encoder.

Selection is not differentiated (gradients flow through sparse.encode_at, which recomputes the
selected pre-activations), so this module is free to compute `pre` in bf16, in tiles, or in a fused
kernel. With the latents split over a mesh axis, each shard takes its local top-k, all-gathers only
those candidates (B x k x shards values, never B x n), and takes the global top-k of the candidates:
exactly the unsharded top-k, because every global winner is among its own shard's local top-k.
Past 2 shards the candidates are merged by exchange instead of gathered everywhere (_global_top_k):
2 x B x k per device per selection instead of B x k x shards.

Blocked encoder (tile > 0): pre[B, n_local] is the largest buffer of a step (B=1024, n=2^24 in f32
is 64 GiB), so it can instead be computed in column tiles of `tile` latents inside a scan that keeps
a running top-k: memory O(B x tile), same result. Ties go to the lower latent index everywhere (as
lax.top_k does), which is what keeps tiled, sharded and plain selection identical.
"""
import jax
import jax.numpy as jnp

NEG = -jnp.inf


def pre_activations(xc, w_enc, b_enc, compute_dtype):
  """xc [B, d] @ W_enc[n, d]^T + b_enc -> [B, n] in compute_dtype (the step's one dense GEMM)."""
  pre = jnp.einsum("bd,nd->bn", xc.astype(compute_dtype), w_enc.astype(compute_dtype),
                   preferred_element_type=jnp.float32)
  return (pre + b_enc).astype(compute_dtype)


def _merge(a, b, k):
  """Top-k of two candidate lists (a first: on ties its entries, the lower indices, win)."""
  v, pos = jax.lax.top_k(jnp.concatenate([a[0], b[0]], axis=1), k)
  return v, jnp.take_along_axis(jnp.concatenate([a[1], b[1]], axis=1), pos, axis=1)


def _local_top_k(xc, w_enc, b_enc, k, compute_dtype, tile, kernels):
  """Top-k (values, indices local to the shard) of the pre-activations of w_enc's rows: the GEMM,
  whole, in tiles, or in the Pallas kernel (the GEMM with a top-k epilogue: pre never leaves the
  chip). A bias of -inf leaves a latent out (AuxK's live latents, a dead list's padding): it is
  picked only when fewer than k others are left, at -inf."""
  if kernels == "pallas":
    import pallas_kernels  # only this path needs Pallas
    if pallas_kernels.flavor() == "gpu":
      from pallas_kernels import topk_encoder_gpu as topk_encoder
    else:
      from pallas_kernels import topk_encoder
    return topk_encoder.topk(xc, w_enc, b_enc, k, compute_dtype=compute_dtype)
  n = w_enc.shape[0]
  if not tile or max(tile, k) >= n:
    return jax.lax.top_k(pre_activations(xc, w_enc, b_enc, compute_dtype), k)
  tile = max(tile, k)   # a tile must hold a whole candidate list

  def tile_top_k(start, first_new):
    """Tile [start, start + tile); columns before first_new were seen already (the last tile is
    shifted back to fit, so it overlaps its predecessor) and cannot be picked again."""
    w = jax.lax.dynamic_slice_in_dim(w_enc, start, tile)
    b = jax.lax.dynamic_slice_in_dim(b_enc, start, tile)
    pre = pre_activations(xc, w, b, compute_dtype)
    v, i = jax.lax.top_k(jnp.where(start + jnp.arange(tile) >= first_new, pre, NEG), k)
    return v, i + start

  def body(best, t):
    return _merge(best, tile_top_k(jnp.minimum(t * tile, n - tile), t * tile), k), None

  # The first tile seeds the running list, so it always holds real (lowest-index) entries.
  best, _ = jax.lax.scan(body, tile_top_k(0, 0), jnp.arange(1, -(-n // tile)))
  return best


def compact_sizes(n_local: int, k_aux: int) -> tuple[int, ...]:
  """The dead-list lengths AuxK may run over instead of all n_local latents: powers of two near
  n_local/64 and n_local/8 that hold at least k_aux (a step takes the smallest that holds every
  shard's dead latents, or all latents when more are dead)."""
  sizes = []
  for frac in (64, 8):
    size = 1 << max(n_local // frac, 1).bit_length() - 1
    if k_aux <= size < n_local and size not in sizes:
      sizes.append(size)
  return tuple(sizes)


def dead_list(dead, size: int):
  """The first `size` dead latents of this shard, ascending (so ties still go to the lower
  index), and which entries are real (the rest is padding, row 0)."""
  ids = jnp.nonzero(dead, size=size, fill_value=0)[0].astype(jnp.int32)
  return ids, jnp.arange(size) < jnp.sum(dead)


def exchanges(batch: int, shards: int) -> bool:
  """Whether the global top-k merges by exchange (all-to-all, then gather the winners) rather than
  by gathering every shard's candidates everywhere: over more than 2 shards (at 2 the two move the
  same bytes), when the batch splits evenly over them."""
  return shards > 2 and batch % shards == 0


def candidate_bytes(batch: int, k: int, shards: int) -> int:
  """Bytes one device receives per global top-k (f32 values + int32 indices) over `shards` latent
  shards: by gathering, every shard's k candidates of all `batch` rows (batch * k * shards); by
  exchange, every shard's candidates of its batch / shards rows, then the k winners of all rows
  (2 * batch * k, whatever the shard count)."""
  if shards <= 1:
    return 0
  return 8 * (2 * batch * k if exchanges(batch, shards) else batch * k * shards)


def _global_top_k(vals, idx, k, axis, n_local):
  """Global top-k from every shard's local candidates (local indices in): only these move.

  Gathering them all to every shard moves B x k x shards per device: at 16M latents over 64
  shards with AuxK's k_aux=2048 and B=8192, 8 GiB a step. So past 2 shards each shard instead
  merges the candidates of B / shards rows (an all-to-all brings it every shard's candidates of
  those rows) and the k winners of every row are gathered: 2 x B x k per device (256 MiB there).
  Same candidates in the same order per row (shard order = index order: ties still go low), so
  the same picks either way."""
  if axis is None:
    return vals, idx
  shards = jax.lax.axis_size(axis)
  idx = idx + jax.lax.axis_index(axis) * n_local
  b, local_k = vals.shape
  if exchanges(b, shards):
    def to_owner(a):   # [B, k_l] -> [B / shards, shards * k_l]: my rows, every shard's candidates
      # The barrier keeps the all-to-all's operand layout from reaching back into the local
      # top-k: XLA:CPU then lowers that top-k as a full sort of [B, n_local] (twice its memory).
      a = jax.lax.optimization_barrier(a)
      a = jax.lax.all_to_all(a.reshape(shards, b // shards, local_k), axis, 0, 0, tiled=True)
      return a.transpose(1, 0, 2).reshape(b // shards, shards * local_k)
    cand_v, cand_i = to_owner(vals), to_owner(idx)
  else:
    cand_v = jax.lax.all_gather(vals, axis, axis=1, tiled=True)   # [B, k * shards]
    cand_i = jax.lax.all_gather(idx, axis, axis=1, tiled=True)
  vals, pos = jax.lax.top_k(cand_v, k)
  idx = jnp.take_along_axis(cand_i, pos, axis=1)
  if exchanges(b, shards):
    vals, idx = (jax.lax.all_gather(a, axis, axis=0, tiled=True) for a in (vals, idx))
  return vals, idx


def select(xc, w_enc, b_enc, k, *, axis=None, compute_dtype=jnp.float32, tile=0, kernels="xla"):
  """Indices [B, k] (global) of the top-k latents of each row.

  xc [B, d], w_enc [n_local, d] and b_enc [n_local] are this shard's (all of them when axis is
  None); tile > 0 computes pre in column tiles of that many latents; kernels="pallas" computes it
  tile by tile in a Pallas kernel that keeps only each tile's top-k.
  """
  n_local = w_enc.shape[0]
  # A shard smaller than k offers all its latents; the gathered candidates still number >= k.
  local = _local_top_k(xc, w_enc, b_enc, min(k, n_local), compute_dtype, tile, kernels)
  return _global_top_k(*local, k, axis, n_local)[1]


def select_aux(xc, w_enc, b_enc, dead, k_aux, *, axis=None, compute_dtype=jnp.float32, tile=0,
               kernels="xla", listed=None):
  """AuxK's picks: the top-k_aux *dead* latents of each row, as (aux_idx [B, k_aux], aux_ok
  [B, k_aux]); aux_ok is False for picks that are not dead (fewer than k_aux dead latents are
  available; their index is arbitrary). Arguments as select's; dead [n_local] is this shard's.

  A selection of its own, live latents left out by a bias of -inf: over all latents, a second
  pass of the encoder GEMM. listed: this shard's dead list, dead_list(dead, size) (the caller
  makes sure no shard has more than size dead); the picks are then among its rows, by a GEMM
  over those rows of the encoder only, and aux_idx are positions in the global list, shard s's
  list being [s * size, (s + 1) * size): the index space of model.aux_term's aux_rows.
  """
  keep = dead
  if listed is not None:
    ids, keep = listed
    w_enc, b_enc = jnp.take(w_enc, ids, axis=0), jnp.take(b_enc, ids)
  n_local = w_enc.shape[0]
  local = _local_top_k(xc, w_enc, jnp.where(keep, b_enc, NEG), min(k_aux, n_local), compute_dtype,
                       tile, kernels)
  vals, idx = _global_top_k(*local, k_aux, axis, n_local)
  return idx, vals > NEG


def kth_largest(v, kth, axes=None):
  """The kth largest of the nonnegative float32 values v over every shard of the mesh `axes` (the
  counts are psum'd; v itself never moves): BatchTopK's threshold over the global batch.

  Bisection on the values' bit patterns, which for nonnegative floats (+0.0, not -0.0) order as
  int32 as the values do: hi - lo halves each round from 2^31, so 31 rounds of one count each give
  the exact kth largest, however the values are spread. kth must be at most the total count.
  """
  bits = jax.lax.bitcast_convert_type(v.astype(jnp.float32), jnp.int32)

  def count(t):
    c = jnp.sum(bits >= t, dtype=jnp.int32)
    return jax.lax.psum(c, axes) if axes else c

  def halve(_, bounds):   # count(>= lo) >= kth > count(>= hi)
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    ok = count(mid) >= kth
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  above_inf = jnp.int32(0x7F800001)
  lo, _ = jax.lax.fori_loop(0, 31, halve, (jnp.int32(0), above_inf))
  return jax.lax.bitcast_convert_type(lo, jnp.float32)
