"""The device mesh and the partition specs of everything the step touches; both come from config.

Batch rows are split over config.mesh.batch_axes; the n latents (W_enc and W_dec rows, b_enc, the
optimizer moments and the dead-latent counters) over config.mesh.latent_axis; b_pre is replicated.
"""
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


class MeshError(ValueError):
  """A mesh or batch that does not fit the devices present; names the config fields."""


def resolve_shape(shape, num_devices: int):
  shape = [int(s) for s in shape]
  if shape.count(-1) > 1:
    raise MeshError(f"mesh.shape={tuple(shape)}: at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if known <= 0 or num_devices % known:
    raise MeshError(f"mesh.shape={tuple(shape)} does not divide the {num_devices} devices present")
  shape = [num_devices // known if s == -1 else s for s in shape]
  if math.prod(shape) > num_devices:
    raise MeshError(f"mesh.shape={tuple(shape)} needs {math.prod(shape)} devices; "
                    f"{num_devices} are present")
  return tuple(shape)


def create_mesh(mc, devices=None) -> Mesh:
  """Mesh of config.mesh: axes mc.axes with sizes mc.shape (one may be -1: the remaining devices)."""
  devices = jax.devices() if devices is None else devices
  if len(mc.shape) != len(mc.axes):
    raise MeshError(f"mesh.shape={tuple(mc.shape)} and mesh.axes={tuple(mc.axes)} differ in length")
  for name in (*mc.batch_axes, mc.latent_axis):
    if name not in mc.axes:
      raise MeshError(f"mesh axis {name!r} (mesh.batch_axes / mesh.latent_axis) is not in "
                      f"mesh.axes={tuple(mc.axes)}")
  shape = resolve_shape(mc.shape, len(devices))
  return jax.make_mesh(shape, tuple(mc.axes), axis_types=(AxisType.Auto,) * len(shape),
                       devices=devices[:math.prod(shape)])


class Specs:
  """Partition specs for one mesh config; `batch` for [B, d] data, `latent` for per-latent arrays."""

  def __init__(self, mesh: Mesh, mc):
    self.mesh = mesh
    self.batch_axes = tuple(mc.batch_axes)
    self.latent_axis = mc.latent_axis
    self.batch = P(self.batch_axes, None)
    self.latent = P(self.latent_axis)
    self.params = {"W_enc": P(self.latent_axis, None), "b_enc": P(self.latent_axis),
                   "W_dec": P(self.latent_axis, None), "b_pre": P()}

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
    if n % self.model_size:
      raise MeshError(f"sae.n={n} is not divisible by the {self.latent_axis!r} mesh axis "
                      f"(size {self.model_size}, mesh.shape)")
    if batch_size % self.data_size:
      raise MeshError(f"train.batch_size={batch_size} is not divisible by the batch mesh axes "
                      f"{self.batch_axes} (size {self.data_size}, mesh.shape)")
    if batch_size % process_count:
      raise MeshError(f"train.batch_size={batch_size} is not divisible by the {process_count} "
                      "processes")


def host_batch_to_global(local: np.ndarray, sharding: NamedSharding, global_rows: int):
  """Assembles every process's local rows into one global [global_rows, d] array on the mesh."""
  return jax.make_array_from_process_local_data(sharding, local, (global_rows, local.shape[1]))
