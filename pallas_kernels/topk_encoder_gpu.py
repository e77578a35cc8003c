"""GPU version (Pallas Triton backend) of topk_encoder.topk: the exact top-k of xc W^T + b without
writing pre[B, n] to memory.

Triton has no sort or top_k, and extracting each tile's top-k by k rounds of (row max, mask out),
as the TPU kernel does, would cost about as much CUDA-core work as the tile's GEMM on the tensor
cores. Instead each program keeps a running top-k in registers and inserts only what beats it:

  program (i, s): tokens [i*tb, (i+1)*tb), columns [s*cs, (s+1)*cs) in tiles of tn
    running list: kp = next_pow2(k) (value, column) slots per row, unordered
    per tile: pre tile [tb, tn] = GEMM over d in bk pieces (f32 accumulate) + b
      while some row's best not-yet-taken tile entry beats its list's worst entry:
        that entry replaces the worst one (every row at once; rows with nothing to insert idle)
        (a row takes its tile's entries in order, so "not yet taken" is "below the last taken")
    at the end: the list sorted, its first k -> candidates [B, splits * k]
  topk(): lax.top_k over the candidates (one split: the list already is the answer)

"Beats" orders (value desc, column asc), which is lax.top_k's order (ties go to the lower
index), so the result is exact, ties included; the candidates are laid out in column order, so
lax.top_k's tie rule (lower position) picks the lower index across splits too.

Expected cost (H100, d=768, n=2^17, k=32, bf16; defaults tb=128, tn=128, bk=64, 8 warps, 8192
columns per split): the GEMM tile is the usual 128 x 128 x 64 Triton tile (~64 FLOP per byte from
L2), so the GEMM should run near a Triton matmul's speed, ~60-75% of the bf16 peak (B=4096:
~1.4-1.7 ms against XLA's 1.03 ms GEMM, which then still writes and re-reads pre, +0.72 ms, and
runs lax.top_k). The merge: past the first tiles a row's list changes about k/t times at tile t
of its split, so most tiles need the one check (4 row reductions over [tb, tn], ~10% of the tile's
tensor-core time) and an insertion round or two. While the list is not yet full, whole tiles go
in without comparisons (kp >= tn) or fill it by insertion (kp < tn: one tile, kp rounds). The
columns are split so that B/tb x splits programs fill the GPU (B=4096: 32 x 16 = 512).

AuxK uses the same kernel with a bias of -inf on live latents (jaxsae/topk.py). k_aux = 256 cuts
tb to 32 (LIST_ELEMS), so W streams through L2 4x as often as for the main top-k (~26 GB at
B=4096: expect a few ms), plus one insertion per dead latent while the lists fill. Next steps if it
matters: one GEMM pass feeding both lists, or a GEMM over the dead columns only.

compute_dtype f32 runs the GEMM at F32_DOT precision: HIGHEST is IEEE f32 FMAs on the CUDA cores
(exact, but ~15x slower than bf16 on the tensor cores; XLA's own f32 default on GPU is TF32, not
exact either); lax.DotAlgorithmPreset.TF32_TF32_F32_X3 (lowers too) is near-f32 on the tensor
cores. bf16 rounds xc and W to bf16 and accumulates in f32, as the TPU kernel: use it on GPU.
Triton backend (deprecated since jax 0.11, still in 0.11.2; Mosaic GPU is the future, migration
left for later); see sparse_ops_gpu.py for the conventions (whole-array refs, masks, INTERPRET).
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import sparse_ops_gpu
from pallas_kernels.topk_encoder import topk_reference  # noqa: F401

NEG = -jnp.inf
PLACEHOLDER = 1 << 30     # initial list entries (-inf, PLACEHOLDER + slot) lose to every column
TAKEN = (1 << 31) - 1     # an entry already emitted
# Rows x slots of the running list: each of its two arrays is 32 registers a thread at 8 warps.
# k <= 32 gets 128-row tiles (the GEMM reads W once per 128 tokens); k_aux = 256 gets 32 rows.
LIST_ELEMS = 8192
# The widest list: k = 1024 keeps 16 rows x 1024 slots (64 registers a thread per array, with
# the tile and the GEMM's operands: spilling). jaxsae/config_check.py refuses more.
MAX_K = 1024
F32_DOT = jax.lax.Precision.HIGHEST   # the GEMM's precision when compute_dtype is f32 (see above)


def _blocks(bsz, n, d, k, row_tile, col_tile, depth_tile, col_split):
  pow2 = sparse_ops_gpu._pow2
  kp = pow2(k)
  tn = pow2(col_tile)
  # Triton's dot wants every dimension >= 16.
  tb = row_tile or max(16, min(128, LIST_ELEMS // kp, pow2(bsz)))
  bk = depth_tile or max(16, min(64, pow2(d)))
  tiles = pl.cdiv(max(col_split, kp), tn)   # per split; a split holds at least a full list
  tiles = min(tiles, pl.cdiv(n, tn))
  return kp, tb, tn, bk, tiles


def tile_candidates(xc, w, b, k, *, row_tile=None, col_tile=128, depth_tile=None, col_split=8192,
                    num_warps=None, num_stages=3, compute_dtype=jnp.float32, poison=False):
  """Kernel: each (token block, column split)'s top-k, sorted -> values, indices [B, splits * k].
  The tile sizes, num_warps (None: 8 for tiles of 8192+ elements, else 4) and num_stages are
  Triton's knobs (bench/kernels.py --topk_sweep times them on a GPU).
  poison: the outputs start as NaN and -1 (aliased inputs), so unwritten elements show (tests)."""
  bsz, d = xc.shape
  n = w.shape[0]
  if not 0 < k <= min(n, MAX_K):
    raise ValueError(f"k={k}: the GPU top-k kernel takes 0 < k <= min(n={n}, MAX_K={MAX_K})")
  kp, tb, tn, bk, tiles = _blocks(bsz, n, d, k, row_tile, col_tile, depth_tile, col_split)
  cs = tiles * tn
  splits = pl.cdiv(n, cs)
  fill_tiles = kp // tn   # kp >= tn: the first kp / tn tiles are the list, no comparisons
  prec = F32_DOT if compute_dtype == jnp.float32 else None

  def kernel(x_ref, w_ref, b_ref, *refs):
    v_out, i_out = refs[-2:]   # after the poison inputs, if any
    rows = pl.program_id(0) * tb + jnp.arange(tb)
    rm = rows < bsz
    s = pl.program_id(1)
    slot = jax.lax.broadcasted_iota(jnp.int32, (tb, kp), 1)
    n_tiles = jnp.minimum(pl.cdiv(n - s * cs, tn), tiles)   # the last split may be short

    def tile_pre(t):
      cols = s * cs + t * tn + jnp.arange(tn)
      cm = cols < n

      def depth(c, acc):
        dd = c * bk + jnp.arange(bk)
        dm = dd < d
        xv = plt.load(x_ref.at[rows[:, None], dd[None, :]], mask=rm[:, None] & dm[None, :],
                      other=0).astype(compute_dtype)
        wv = plt.load(w_ref.at[cols[:, None], dd[None, :]], mask=cm[:, None] & dm[None, :],
                      other=0).astype(compute_dtype)
        return acc + jax.lax.dot_general(xv, wv, (((1,), (1,)), ((), ())), precision=prec,
                                         preferred_element_type=jnp.float32)

      acc = jax.lax.fori_loop(0, pl.cdiv(d, bk), depth, jnp.zeros((tb, tn), jnp.float32))
      bias = plt.load(b_ref.at[cols], mask=cm, other=NEG).astype(jnp.float32)
      # Columns past n are -inf with indices >= n: they rank below every real column.
      pre = jnp.where(cm[None, :], acc + bias[None, :], NEG)
      return pre, cols[None, :]

    def fill(t, lst):
      """Tile t (< kp / tn) goes whole into slots [t*tn, (t+1)*tn)."""
      pre, cols = tile_pre(t)
      spread = lambda a: jnp.broadcast_to(a[:, None, :], (tb, kp // tn, tn)).reshape(tb, kp)
      cols = jnp.broadcast_to(cols, (tb, tn))
      here = slot // tn == t
      return jnp.where(here, spread(pre), lst[0]), jnp.where(here, spread(cols), lst[1])

    def worst(lv, li):
      """The list's last entry in (value desc, column asc) order: min value, then max column."""
      wv = jnp.min(lv, axis=1)
      return wv, jnp.max(jnp.where(lv == wv[:, None], li, -1), axis=1)

    def insert(t, lst):
      pre, cols = tile_pre(t)

      def best(cv, ci):
        """Each row's best tile entry below its ceiling (cv, ci) in (value desc, column asc)
        order. A row takes its tile's entries in that order, so the ceiling -- the last entry
        taken -- marks everything taken so far; no [tb, tn] mask has to live in registers."""
        below = (pre < cv[:, None]) | ((pre == cv[:, None]) & (cols > ci[:, None]))
        vals = jnp.where(below, pre, NEG)
        bv = jnp.max(vals, axis=1)
        bi = jnp.min(jnp.where(below & (vals == bv[:, None]), cols, TAKEN), axis=1)
        return bv, bi

      def beats(bv, bi, wv, wi):
        return (bi < TAKEN) & ((bv > wv) | ((bv == wv) & (bi < wi)))

      def more(c):
        return jnp.max(c[-1].astype(jnp.int32)) > 0

      def step(c):
        lv, li, cv, ci, wv, wi, bv, bi, go = c
        hit = go[:, None] & (lv == wv[:, None]) & (li == wi[:, None])   # one slot per row
        lv = jnp.where(hit, bv[:, None], lv)
        li = jnp.where(hit, bi[:, None], li)
        cv, ci = jnp.where(go, bv, cv), jnp.where(go, bi, ci)
        wv, wi = worst(lv, li)
        bv, bi = best(cv, ci)
        return lv, li, cv, ci, wv, wi, bv, bi, beats(bv, bi, wv, wi)

      # Ceiling (+inf, -1): every entry is below it; padding rows get (-inf, TAKEN): none is.
      cv = jnp.where(rm, jnp.inf, NEG)
      ci = jnp.where(rm, -1, TAKEN)
      wv, wi = worst(*lst)
      bv, bi = best(cv, ci)
      # The first check is the cheap skip: a tile none of whose rows beats its list costs the GEMM
      # and these reductions only.
      c = jax.lax.while_loop(more, step, (*lst, cv, ci, wv, wi, bv, bi, beats(bv, bi, wv, wi)))
      return c[0], c[1]

    lst = (jnp.full((tb, kp), NEG, jnp.float32), PLACEHOLDER + slot)
    nfill = jnp.minimum(fill_tiles, n_tiles)
    if fill_tiles:
      lst = jax.lax.fori_loop(0, nfill, fill, lst)
    lv, li = jax.lax.fori_loop(nfill, n_tiles, insert, lst)

    def emit(j, c):
      """Output slot j: the list's best remaining entry."""
      lv, li, ov, oi = c
      bv = jnp.max(lv, axis=1)
      bi = jnp.min(jnp.where(lv == bv[:, None], li, TAKEN), axis=1)
      out = slot == j
      ov = jnp.where(out, bv[:, None], ov)
      oi = jnp.where(out, bi[:, None], oi)
      taken = li == bi[:, None]
      return jnp.where(taken, NEG, lv), jnp.where(taken, TAKEN, li), ov, oi

    _, _, ov, oi = jax.lax.fori_loop(0, k, emit, (lv, li, jnp.zeros_like(lv), jnp.zeros_like(li)))
    at = (rows[:, None], s * k + slot)
    m = rm[:, None] & (slot < k)
    plt.store(v_out.at[at], ov, mask=m)
    plt.store(i_out.at[at], oi, mask=m)

  shapes = [jax.ShapeDtypeStruct((bsz, splits * k), jnp.float32),
            jax.ShapeDtypeStruct((bsz, splits * k), jnp.int32)]
  # W is cast here, not per tile: every token block streams all of W through L2, so bf16 halves
  # that traffic for one extra pass over W in HBM (XLA does the same on the xla path).
  args = [xc.astype(compute_dtype), w.astype(compute_dtype), b]
  aliases = {}
  if poison:
    args += [jnp.full(shapes[0].shape, jnp.nan, jnp.float32), jnp.full(shapes[1].shape, -1)]
    aliases = {3: 0, 4: 1}
  return pl.pallas_call(
      kernel, out_shape=shapes, grid=(pl.cdiv(bsz, tb), splits), input_output_aliases=aliases,
      interpret=sparse_ops_gpu._interpret(),
      compiler_params=plt.CompilerParams(
          num_warps=num_warps or (8 if max(tn, kp) * tb >= 8192 else 4), num_stages=num_stages),
  )(*args)


def topk(xc, w, b, k, **tiles):
  """Exact top-k of xc W^T + b without materializing it: (values [B, k], indices [B, k])."""
  cand_v, cand_i = tile_candidates(xc, w, b, k, **tiles)
  if cand_v.shape[1] == k:   # one split: its sorted list is the answer
    return cand_v, cand_i
  vals, pos = jax.lax.top_k(cand_v, k)
  return vals, jnp.take_along_axis(cand_i, pos, axis=1)
