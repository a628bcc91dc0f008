"""The device mesh and the one table of logical-axis rules.

Models name the axes of every parameter and activation logically ("embed",
"mlp", "batch", ...). This table is the only place that says which mesh axis
each logical axis lives on, so a config changes parallelism by changing
`config.mesh` alone (MaxText's approach).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# The batch is split over every data-parallel axis; FSDP shards parameters over
# "fsdp" (their widest axis, "embed"), tensor parallelism splits heads and MLP.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    # Grouped-query key/value heads are few (1 for multi-query attention):
    # replicated rather than split over a tensor axis they may not divide.
    ("kv_heads", None),
    ("vocab", "tensor"),
    ("length", None),
    ("posemb", None),
    ("patch", None),
    ("classes", None),
)

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
  """Builds a Mesh from e.g. {"data": -1, "fsdp": 2}; one -1 takes the rest."""
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ValueError(
        f"config.mesh has unknown axes {sorted(unknown)}; valid axes are "
        f"{list(MESH_AXES)}, e.g. config.mesh = {{'data': -1, 'fsdp': 2}}.")
  devices = np.asarray(jax.devices() if devices is None else devices)
  sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh may have at most one -1 axis, got {free}.")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if devices.size % fixed:
      raise ValueError(
          f"config.mesh {dict(mesh_config)} needs a multiple of {fixed} "
          f"devices, but there are {devices.size}.")
    sizes[free[0]] = devices.size // fixed
  if math.prod(sizes.values()) != devices.size:
    raise ValueError(
        f"config.mesh {dict(mesh_config)} has {math.prod(sizes.values())} "
        f"devices, but there are {devices.size}; use -1 on one axis to take "
        "the rest.")
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  try:
    device_grid = jax.experimental.mesh_utils.create_device_mesh(
        shape, devices=devices.ravel())
  except Exception:  # Topology-aware layout is an optimisation only.
    device_grid = devices.reshape(shape)
  return Mesh(device_grid, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def logical_shardings(boxed_tree, mesh: Mesh):
  """NamedShardings for a tree whose leaves may be nn.LogicallyPartitioned."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def strip_boxes(boxed_tree):
  """The bare values of a tree of nn.LogicallyPartitioned, with no sharding
  constraint applied (so it also works on abstract shapes outside jit)."""
  return jax.tree.map(
      lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
      boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


@contextlib.contextmanager
def mesh_context(mesh: Mesh):
  """The mesh and the logical rules, so that the models' activation
  constraints (nn.with_logical_constraint) resolve while a step is traced."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
      nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    yield
