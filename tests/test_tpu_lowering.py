"""The Mosaic TPU kernels lower for a real TPU target, not only in interpret mode.

Interpret mode runs any block shape; a TPU does not. Here every TPU-flavour Pallas kernel (sparse
ops, fused and lazy Adam, the top-k encoder, AuxK's top-k over all latents and over dead lists) and
the whole `kernels=pallas` train step are exported with `jax.export(..., platforms=["tpu"])` from
this CPU host, at the per-device shapes of every shipped config and of the tests: the Pallas ->
Mosaic lowering then applies the TPU rules (blocks' last two dimensions multiples of (8, 128) or
the whole array, 1-D blocks a multiple of 1024 or a power of two >= 128, ...). The Mosaic compiler
proper (libtpu) is not on a CPU host: what it alone checks (VMEM use, layouts) is not tested here.

The chip the lowering asks about (it reads the sublane/lane counts) is a v5p, given as an abstract
device, as tests/test_pallas_gpu.py gives an H100 to the Triton lowering.

The GPU flavour's kernels are cross-lowered for CUDA (Pallas -> Triton) at the same shapes, for the
configs kernels=pallas accepts on a GPU (config_check: every list at most topk_encoder_gpu.MAX_K).

A second check walks each kernel's pallas_call and adds up what it keeps in SMEM (scalar-prefetched
arrays, SMEM blocks twice for double buffering, SMEM scratch): SMEM is ~1 MiB and fixed, so no
kernel may put an array there whose length grows with B*K or n. A third adds up its VMEM blocks and
scratch, which must stay under the default scoped VMEM limit whatever d, n and k are (the values a
kernel body holds are Mosaic's to place and are not counted).
"""
import dataclasses
import importlib
import math

import jax
import jax.numpy as jnp
import pytest
from jax.extend import core as jex_core
from jax.sharding import NamedSharding

import pallas_kernels
from jaxsae import mesh as mesh_lib, model, optim, state as state_lib, step as step_lib, topk
from pallas_kernels import fused_adam, sparse_ops, topk_encoder

V5P = jax.sharding.AbstractDevice(device_kind="TPU v5p", num_cores=1, platform="tpu")
SMEM_BUDGET = 64 << 10   # bytes per kernel; the chip has ~1 MiB, shared with Mosaic's own use
VMEM_BUDGET = 12 << 20   # blocks (double-buffered) + scratch per kernel: under the smallest default
                         # scoped VMEM limit (16 MiB), with room for Mosaic's own values

# Shipped configs and the (data, model) mesh each is written for (the config docstrings).
CONFIGS = {"quickstart": (1, 1), "smollm2_fixture": (1, 1), "base": (1, 1),
           "gpt2_small": (1, 1), "dict_1m": (1, 8), "dict_16m": (1, 64)}


@pytest.fixture(autouse=True)
def tpu_target(monkeypatch):
  """Kernels are lowered for TPU (not interpreted), the TPU flavour is picked."""
  monkeypatch.setattr(sparse_ops, "INTERPRET", False)
  monkeypatch.setattr(pallas_kernels, "FLAVOR", "tpu")


def sds(*shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def export_tpu(fn, *args):
  """jax.export for TPU; raises what the Pallas TPU lowering refuses."""
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("tpu",),
                                                                abstract_device=V5P)):
    exp = jax.export.export(fn if hasattr(fn, "lower") else jax.jit(fn), platforms=["tpu"])(*args)
  assert exp.platforms == ("tpu",)
  assert "tpu_custom_call" in exp.mlir_module()
  return exp


@dataclasses.dataclass(frozen=True)
class Shapes:
  """What one device of a config's mesh runs."""
  name: str
  b: int          # tokens per device
  d: int
  n: int          # latents per device
  k: int          # k_select (4k under Multi-TopK)
  k_aux: int
  aux_widths: tuple   # AuxK widths a step may run (step.aux_sizes)
  lists: tuple        # (AuxK width, dead-list length) pairs AuxK may run over (compact_sizes)
  lazy_chunk: int


def config_of(name):
  return importlib.import_module(f"configs.{name}").get_config()


def shapes_of(name, c, mesh) -> Shapes:
  data, model_size = mesh
  spec = model.SaeSpec.from_config(c)
  b, n = c.train.batch_size // data, spec.n // model_size
  widths = step_lib.aux_sizes(spec.k_aux, True) if spec.k_aux else ()
  lists = sorted({(w, s) for w in widths for s in topk.compact_sizes(n, min(w, n))})
  return Shapes(name, b, spec.d, n, spec.k_select, min(spec.k_aux, n), widths, tuple(lists),
                optim.lazy_chunk_rows(n, c.train.batch_size, spec.k_select, model_size))


def all_shapes():
  out = [shapes_of(name, config_of(name), mesh) for name, mesh in CONFIGS.items()]
  # The kernel tests' shapes (tests/test_pallas_kernels.py, test_topk_kernel.py, the tiny steps).
  out.append(Shapes("tests", 16, 128, 64, 4, 8, (8,), (), 16))
  out.append(Shapes("tests-topk", 16, 32, 256, 16, 16, (16,), (), 32))
  return out


SHAPES = {s.name: s for s in all_shapes()}


def kernel_programs(s: Shapes, gpu: bool = False):
  """(label, fn, abstract args) of every kernel a step of these shapes calls, TPU flavour (or GPU:
  the *_gpu modules)."""
  if gpu:
    from pallas_kernels import fused_adam_gpu as adam, sparse_ops_gpu as ops
    from pallas_kernels import topk_encoder_gpu as enc
  else:
    adam, ops, enc = fused_adam, sparse_ops, topk_encoder
  i32 = jnp.int32
  x, w, bias = sds(s.b, s.d), sds(s.n, s.d), sds(s.n)
  widths = sorted({s.k, *s.aux_widths})   # the main top-k, AuxK at each of its widths
  progs = [(f"topk k={kk}", lambda x, w, b, kk=kk: enc.topk(x, w, b, kk), (x, w, bias))
           for kk in widths]
  for width, size in s.lists:   # AuxK over a dead list: the encoder rows of the list only
    progs.append((f"AuxK k_aux={width} list {size}",
                  lambda x, w, b, width=width: enc.topk(x, w, b, width),
                  (x, sds(size, s.d), sds(size))))
  for kk in widths:
    idx, c = sds(s.b, kk, dtype=i32), sds(s.b, kk)
    progs += [(f"gather_dot K={kk}", ops.gather_dot, (x, w, idx)),
              (f"gather_sum K={kk}", ops.gather_sum, (c, w, idx)),
              (f"scatter_outer K={kk}",
               lambda c, x, idx: ops.scatter_outer(c, x, idx, s.n), (c, x, idx))]
  h = sds(8)
  for p in (False, True):   # W_enc; W_dec (projected and renormalized)
    progs.append((f"adam_rows project={p}",
                  lambda *a, p=p: adam.adam_rows(*a, project=p, renorm=p), (w, w, w, w, h)))
  progs.append((f"adam_rows_lazy {s.lazy_chunk} ids",
                lambda *a: adam.adam_rows_lazy(*a, project=True, renorm=True),
                (w, w, w, w, h, sds(s.lazy_chunk, dtype=i32))))
  return progs


def lower_all(name, progs, lower):
  """lower(fn, *args) for every program; one report names every one that fails."""
  failures = []
  for label, fn, args in progs:
    try:
      lower(fn, *args)
    except Exception as e:
      failures.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
  assert not failures, f"{name} {SHAPES[name]}:\n" + "\n".join(failures)


@pytest.mark.parametrize("name", list(SHAPES))
def test_every_kernel_lowers_for_tpu(name):
  lower_all(name, kernel_programs(SHAPES[name]), export_tpu)


def _pallas_calls(jaxpr):
  """Every pallas_call in a jaxpr, nested ones (in jit, scan, cond, custom_vjp) included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      yield eqn
      continue
    for p in eqn.params.values():
      for j in (p if isinstance(p, (list, tuple)) else (p,)):
        if isinstance(j, jex_core.ClosedJaxpr):
          yield from _pallas_calls(j.jaxpr)
        elif isinstance(j, jex_core.Jaxpr):
          yield from _pallas_calls(j)


def _nbytes(aval) -> int:
  aval = getattr(aval, "inner_aval", aval)
  return jnp.dtype(aval.dtype).itemsize * math.prod(aval.shape)


def _in_smem(aval) -> bool:
  return "smem" in str(getattr(aval, "memory_space", "")).lower()


def smem_bytes(eqn) -> int:
  """SMEM a pallas_call holds: scalar-prefetched operands, SMEM blocks (x2: double-buffered) and
  SMEM scratch."""
  gm = eqn.params["grid_mapping"]
  total = sum(_nbytes(v.aval) for v in eqn.invars[:gm.num_index_operands])
  total += sum(2 * _nbytes(bm.block_aval) for bm in gm.block_mappings if _in_smem(bm.block_aval))
  kernel = eqn.params["jaxpr"]
  scratch = kernel.invars[len(kernel.invars) - gm.num_scratch_operands:]
  return total + sum(_nbytes(v.aval) for v in scratch if _in_smem(v.aval))


def vmem_bytes(eqn) -> int:
  """VMEM a pallas_call holds: its pipelined (VMEM) blocks, x2 for double buffering, and VMEM
  scratch."""
  gm = eqn.params["grid_mapping"]
  pipelined = lambda aval: not any(m in str(aval.memory_space).lower()
                                   for m in ("any", "smem", "hbm", "semaphore"))
  total = sum(2 * _nbytes(bm.block_aval) for bm in gm.block_mappings if pipelined(bm.block_aval))
  kernel = eqn.params["jaxpr"]
  scratch = kernel.invars[len(kernel.invars) - gm.num_scratch_operands:]
  return total + sum(_nbytes(v.aval) for v in scratch
                     if "vmem" in str(getattr(v.aval, "memory_space", "")).lower())


def _use(name, measure):
  """{kernel label: the most `measure` gives over its pallas_calls} at config `name`'s shapes."""
  seen = {}
  for label, fn, args in kernel_programs(SHAPES[name]):
    for eqn in _pallas_calls(jax.make_jaxpr(fn)(*args).jaxpr):
      seen[label] = max(seen.get(label, 0), measure(eqn))
  assert len(seen) == len(kernel_programs(SHAPES[name]))
  return seen


@pytest.mark.parametrize("name", ["dict_16m", "gpt2_small"])
def test_smem_use_is_bounded(name):
  """At the largest shapes (16M latents: B=8192, k_aux=2048; gpt2_small: B=16384 on one chip) each
  kernel keeps at most SMEM_BUDGET in SMEM: indices arrive in bounded pieces."""
  over = {label: b for label, b in _use(name, smem_bytes).items() if b > SMEM_BUDGET}
  assert not over, f"kernels over {SMEM_BUDGET} bytes of SMEM: {over}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vmem_use_is_bounded(name):
  """Blocks and scratch stay under VMEM_BUDGET at every config (at d=4096 a whole [2048, d] f32
  block of W in the top-k kernel alone would be 64 MiB double-buffered)."""
  over = {label: b for label, b in _use(name, vmem_bytes).items() if b > VMEM_BUDGET}
  assert not over, f"kernels over {VMEM_BUDGET >> 20} MiB of VMEM: {over}"


@pytest.fixture
def cpu_devices_as_v5p(monkeypatch):
  """A train step brings its own (CPU device) mesh, which an abstract TPU device cannot replace:
  there the lowering's chip query for device kind "cpu" is answered with a v5p's figures."""
  from jax._src.pallas.mosaic import tpu_info
  monkeypatch.setitem(tpu_info.registry, "cpu",
                      lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5P, 1))


def export_step(c):
  """The real jitted train step of config c, exported for TPU against abstract state."""
  spec = model.SaeSpec.from_config(c)
  mesh = mesh_lib.create_mesh(c.mesh)
  specs = mesh_lib.Specs(mesh, c.mesh)
  tx = optim.make_optimizer(c)
  state, shardings = state_lib.abstract(spec, tx, specs)
  batch = jax.ShapeDtypeStruct((c.train.batch_size, spec.d), jnp.float32,
                               sharding=NamedSharding(mesh, specs.batch))
  steps = step_lib.StepFns(c, spec, specs, tx, shardings)
  exp = jax.export.export(steps.train, platforms=["tpu"])(state, batch)
  assert "tpu_custom_call" in exp.mlir_module()
  return exp


@pytest.mark.parametrize("name", list(CONFIGS))
def test_train_step_lowers_for_tpu(name, cpu_devices_as_v5p):
  """The whole kernels=pallas step (every AuxK branch, the fused optimizer) of each shipped config,
  on one device of its mesh: n and the batch are what one device holds (the kernels see the same
  shapes as in the sharded step; the sharded program itself is the next test)."""
  c = config_of(name)
  data, model_size = CONFIGS[name]
  k_aux = model.SaeSpec.from_config(c).k_aux     # resolved on the full n, as the real run does
  c.kernels, c.mesh.shape, c.mesh.dcn_shape = "pallas", (1, 1), ()
  c.sae.n //= model_size
  c.sae.k_aux = k_aux
  c.train.batch_size //= data
  if c.train.opt_state_dtype != "float32":
    c.train.opt_state_dtype = "float32"   # the fused Pallas sweep: fp32 moments
  export_step(c)


@pytest.mark.parametrize("mesh,lazy", [((2, 2), False), ((2, 2), True), ((1, 4), False)])
def test_sharded_train_step_lowers_for_tpu(tiny_config, mesh, lazy, cpu_devices_as_v5p):
  """kernels=pallas, AuxK on every step, dense or lazy optimizer; candidates gathered over 2
  latent shards, exchanged (all-to-all) over 4."""
  c = tiny_config
  c.kernels, c.mesh.shape = "pallas", mesh
  c.sae.dead_tokens = 1
  c.train.lazy_optimizer = lazy
  export_step(c)


# ---- the GPU flavour: cross-lowered for CUDA (Pallas Triton) at the same config shapes ----------

def _gpu_configs():
  """The shipped configs kernels=pallas accepts on GPU (config_check: widest list <= MAX_K)."""
  from pallas_kernels import topk_encoder_gpu
  return [name for name, s in SHAPES.items() if max(s.k, s.k_aux) <= topk_encoder_gpu.MAX_K]


@pytest.mark.parametrize("name", _gpu_configs())
def test_gpu_kernels_lower_for_cuda(name, monkeypatch):
  """Every GPU kernel a step of these shapes calls lowers through Pallas -> Triton for CUDA (an
  abstract H100 answers the lowering's device query, as in tests/test_pallas_gpu.py)."""
  from test_pallas_gpu import _lowers_for_cuda
  from pallas_kernels import sparse_ops_gpu
  monkeypatch.setattr(sparse_ops_gpu, "INTERPRET", False)
  lower_all(name, kernel_programs(SHAPES[name], gpu=True), _lowers_for_cuda)
