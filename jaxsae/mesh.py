"""The device mesh and the partition specs of everything the step touches; both come from config.

Batch rows are split over config.mesh.batch_axes; the n latents (W_enc and W_dec rows, b_enc, the
optimizer moments and the dead-latent counters) over config.mesh.latent_axis; b_pre and b_dec are
replicated.

Multi-slice / multi-host room: with config.mesh.dcn_shape set, mesh.shape is the shape *within* one
slice (fast interconnect) and dcn_shape the shape *across* slices (data-centre network), axis by
axis: axes=("slice", "data", "model"), shape=(1, -1, 8), dcn_shape=(4, 1, 1),
batch_axes=("slice", "data") keeps the latent collectives inside a slice. Where the devices do not
come in several slices (CPU, GPU) each process counts as one.
"""
import functools
import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


class MeshError(ValueError):
  """A mesh or batch that does not fit the devices present; names the config fields."""


def resolve_shape(shape, num_devices: int, field: str = "mesh.shape"):
  shape = [int(s) for s in shape]
  if shape.count(-1) > 1:
    raise MeshError(f"{field}={tuple(shape)}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in shape):
    raise MeshError(f"{field}={tuple(shape)}: sizes must be positive (or one -1)")
  known = math.prod(s for s in shape if s != -1)
  if known > num_devices:
    raise MeshError(f"{field}={tuple(shape)} needs {known} devices; {num_devices} are present")
  if -1 in shape and num_devices % known:
    raise MeshError(f"{field}={tuple(shape)}: the other axes ({known} devices) do not divide the "
                    f"{num_devices} devices present")
  return tuple(num_devices // known if s == -1 else s for s in shape)


def _check_names(mc):
  if len(mc.shape) != len(mc.axes):
    raise MeshError(f"mesh.shape={tuple(mc.shape)} and mesh.axes={tuple(mc.axes)} differ in length")
  if len(set(mc.axes)) != len(mc.axes):
    raise MeshError(f"mesh.axes={tuple(mc.axes)} repeats a name")
  for name in (*mc.batch_axes, mc.latent_axis):
    if name not in mc.axes:
      raise MeshError(f"mesh axis {name!r} (mesh.batch_axes / mesh.latent_axis) is not in "
                      f"mesh.axes={tuple(mc.axes)}")
  if mc.latent_axis in mc.batch_axes:
    raise MeshError(f"mesh.latent_axis={mc.latent_axis!r} is also in mesh.batch_axes")
  if mc.dcn_shape and len(mc.dcn_shape) != len(mc.axes):
    raise MeshError(f"mesh.dcn_shape={tuple(mc.dcn_shape)} and mesh.axes={tuple(mc.axes)} differ "
                    "in length")


def create_mesh(mc, devices=None) -> Mesh:
  """Mesh of config.mesh: axes mc.axes with sizes mc.shape (one may be -1: the remaining devices),
  times mc.dcn_shape across slices when that is set."""
  devices = jax.devices() if devices is None else list(devices)
  _check_names(mc)
  axis_types = (AxisType.Auto,) * len(mc.axes)   # Explicit axes reject top-k over a sharded n
  dcn = tuple(int(s) for s in mc.dcn_shape) if mc.dcn_shape else ()
  if not dcn or math.prod(dcn) == 1:
    shape = resolve_shape(mc.shape, len(devices))
    return jax.make_mesh(shape, tuple(mc.axes), axis_types=axis_types,
                         devices=devices[:math.prod(shape)])
  # Multi-slice TPUs number their slices; elsewhere (CPU, GPU: one "slice") each process is one.
  by_slice = len({getattr(d, "slice_index", 0) for d in devices}) > 1
  granules = len({d.slice_index if by_slice else d.process_index for d in devices})
  if math.prod(dcn) != granules:
    raise MeshError(f"mesh.dcn_shape={dcn} spans {math.prod(dcn)} slices; there are {granules} "
                    f"({'slices' if by_slice else 'processes'})")
  ici = resolve_shape(mc.shape, len(devices) // granules)
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not by_slice)
  return Mesh(grid, tuple(mc.axes), axis_types=axis_types)


class Specs:
  """Partition specs for one mesh config; `batch` for [B, d] data, `latent` for per-latent arrays."""

  def __init__(self, mesh: Mesh, mc):
    self.mesh = mesh
    self.batch_axes = tuple(mc.batch_axes)
    self.latent_axis = mc.latent_axis
    self.batch = P(self.batch_axes, None)
    self.latent = P(self.latent_axis)

  def params_of(self, names) -> dict:
    """Specs of the named parameters: the per-latent ones split over the latent axis, the rest
    (b_pre, b_dec, a transcoder's W_skip) replicated."""
    latent = {"W_enc": P(self.latent_axis, None), "b_enc": P(self.latent_axis),
              "W_dec": P(self.latent_axis, None)}
    return {name: latent.get(name, P()) for name in names}

  @property
  def data_size(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.batch_axes)

  @property
  def model_size(self) -> int:
    return self.mesh.shape[self.latent_axis]

  def named(self, spec_tree):
    return jax.tree.map(lambda s: NamedSharding(self.mesh, s), spec_tree,
                        is_leaf=lambda s: isinstance(s, P))

  def check(self, n: int, batch_size: int, process_count: int = 1):
    """Refuses shapes the mesh cannot split evenly, naming the config fields."""
    del process_count  # what each process feeds is checked by batch_layout
    if n % self.model_size:
      raise MeshError(f"sae.n={n} is not divisible by the {self.latent_axis!r} mesh axis "
                      f"(mesh.latent_axis, size {self.model_size} from mesh.shape)")
    if batch_size % self.data_size:
      raise MeshError(f"train.batch_size={batch_size} is not divisible by the batch mesh axes "
                      f"{self.batch_axes} (mesh.batch_axes, size {self.data_size} from mesh.shape)")
    batch_layout(NamedSharding(self.mesh, self.batch))


@functools.lru_cache(maxsize=None)
def batch_layout(sharding: NamedSharding) -> tuple[int, int]:
  """(index, count): this process feeds block `index` of `count` equal row blocks of each batch.

  Processes whose devices hold the same rows (the batch is replicated over the latent axis, which
  may cross processes) get the same block and must read the same data: the data sources are given
  (index, count) in place of (process_index, process_count).
  """
  rows = sharding.mesh.devices.size   # a stand-in batch: every batch split is a divisor of it
  ranges = {}   # process -> the row ranges its devices hold
  for device, index in sharding.devices_indices_map((rows, 1)).items():
    ranges.setdefault(device.process_index, set()).add(index[0].indices(rows)[:2])
  spans = {}
  for proc, held in ranges.items():
    lo, hi = min(a for a, _ in held), max(b for _, b in held)
    if sum(b - a for a, b in held) != hi - lo:
      raise MeshError(f"the batch rows of process {proc} are not contiguous on this mesh: "
                      "list the batch axes first in mesh.axes")
    spans[proc] = (lo, hi)
  distinct = sorted(set(spans.values()))
  size = rows // len(distinct)
  if any((a, b) != (i * size, (i + 1) * size) for i, (a, b) in enumerate(distinct)):
    raise MeshError(f"processes hold unequal or overlapping parts of the batch ({distinct} of "
                    f"{rows}): check mesh.shape / mesh.dcn_shape")
  return distinct.index(spans[jax.process_index()]), len(distinct)


def host_batch_to_global(local: np.ndarray, sharding: NamedSharding, global_rows: int = 0):
  """Assembles every process's local rows into one global [global_rows, d] array on the mesh.

  `local` is this process's block of the batch (batch_layout); global_rows defaults to the local
  rows times the number of blocks.
  """
  global_rows = global_rows or local.shape[0] * batch_layout(sharding)[1]
  return jax.make_array_from_process_local_data(sharding, local, (global_rows, local.shape[1]))
