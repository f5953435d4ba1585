"""The mesh and the logical axis rules: the one place names become shardings.

Model code names every parameter and activation axis with the logical names
below; this module maps them onto the mesh axes (`data`, `fsdp`, `tensor`).
Nothing else in paxgpt writes a PartitionSpec.
"""
from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from paxgpt.errors import UsageError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Kept as data (MaxText's base.yml, t5x's rules).
# `activation_*` names are for activations. The residual stream between blocks
# (`activation_embed`) is split over `tensor` like MaxText's: a block gathers it
# before its first matmuls and reduce-scatters its output projections, the two
# halves of the all-reduce plain tensor parallelism does, so the collectives
# move the same bytes while each device keeps 1/tensor of every saved layer input.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_vocab", "tensor"),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_heads", "tensor"),
    ("cache_kv", None),
)


def mesh_axes_of(logical_axis, rules=LOGICAL_AXIS_RULES):
  """The mesh axes (a tuple, maybe empty) a logical axis is split over."""
  axes = nn.logical_to_mesh_axes((logical_axis,), rules)[0]
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def shard_count(logical_axis, axis_sizes, rules=LOGICAL_AXIS_RULES):
  """How many shards a logical axis has on a mesh of `axis_sizes` ({name: size});
  needs no devices, so plans for meshes that do not exist here use it too."""
  return math.prod(axis_sizes[a] for a in mesh_axes_of(logical_axis, rules))


def check_divisible(what, size, logical_axis, axis_sizes, rules=LOGICAL_AXIS_RULES):
  """Raise MeshError unless `size` divides evenly over `logical_axis`'s shards."""
  n = shard_count(logical_axis, axis_sizes, rules)
  if size % n:
    axes = "x".join(mesh_axes_of(logical_axis, rules))
    raise MeshError(f"{what}={size} is not divisible by the {axes} mesh axis size {n}")


def local_shape(shape, logical_axes, axis_sizes, rules=LOGICAL_AXIS_RULES):
  """The shape of one device's shard (ceil division, as XLA pads)."""
  logical_axes = tuple(logical_axes) + (None,) * (len(shape) - len(logical_axes))
  return tuple(-(-d // (1 if name is None else shard_count(name, axis_sizes, rules)))
               for d, name in zip(shape, logical_axes))


def logical_leaves(boxed_tree):
  """[(leaf, logical axis names)] of a tree of flax `LogicallyPartitioned`
  boxes; an unboxed leaf has no names (replicated)."""
  specs = jax.tree.leaves(nn.get_partition_spec(boxed_tree),
                          is_leaf=lambda x: isinstance(x, PartitionSpec))
  leaves = jax.tree.leaves(nn.unbox(boxed_tree))
  return [(leaf, tuple(spec)) for leaf, spec in zip(leaves, specs, strict=True)]


def with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree`'s shapes and dtypes carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class MeshError(UsageError):
  """A mesh that does not fit the devices (reported by the CLI as exit code 2)."""


def resolve_mesh_shape(num_devices, data=1, fsdp=-1, tensor=1):
  """Mesh axis sizes with at most one -1 ("the rest of the devices") filled in."""
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise MeshError(f"mesh {_fmt(sizes)}: at most one axis may be -1")
  for a, s in sizes.items():
    if s != -1 and (int(s) != s or s < 1):
      raise MeshError(f"mesh {_fmt(sizes)}: axis {a} must be a positive integer or -1")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise MeshError(f"mesh {_fmt(sizes)} does not divide the {num_devices} devices")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise MeshError(f"mesh {_fmt(sizes)} needs {fixed} devices but there are {num_devices}")
  return tuple(int(sizes[a]) for a in MESH_AXES)


def _fmt(sizes):
  return ",".join(f"{a}:{s}" for a, s in sizes.items())


def parse_mesh_flag(text):
  """'data:1,fsdp:8,tensor:1' -> dict; axes left out keep their defaults."""
  out = {}
  for part in filter(None, text.split(",")):
    name, _, value = part.partition(":")
    if name not in MESH_AXES or not value.lstrip("-").isdigit():
      raise MeshError(f"--mesh={text}: expected a list like data:1,fsdp:8,tensor:1")
    out[name] = int(value)
  return out


@gin.configurable
def make_mesh(data=1, fsdp=-1, tensor=1, devices=None):
  """A Mesh over (data, fsdp, tensor); -1 takes the devices left over."""
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(len(devices), data, fsdp, tensor)
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def mesh_from_flag(text=None, devices=None):
  """The mesh of a `--mesh=data:1,fsdp:8,tensor:1` flag (None: gin's make_mesh)."""
  return make_mesh(**(parse_mesh_flag(text) if text else {}), devices=devices)


class Partitioner:
  """Owns the mesh and the rules; turns logical names into NamedShardings."""

  def __init__(self, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    self.mesh = mesh
    self.rules = tuple(rules)

  @property
  def axis_sizes(self):
    return dict(self.mesh.shape)

  def spec(self, logical_axes) -> PartitionSpec:
    return nn.logical_to_mesh_axes(tuple(logical_axes), self.rules)

  def sharding(self, logical_axes) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(logical_axes))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def shards(self, logical_axis):
    """How many shards `logical_axis` has on this mesh."""
    return shard_count(logical_axis, self.axis_sizes, self.rules)

  def abstract(self, boxed_tree):
    """A boxed tree (flax `LogicallyPartitioned` leaves) as unboxed
    ShapeDtypeStructs carrying their shardings: what restore and lower take."""
    return with_shardings(nn.unbox(boxed_tree), self.tree_shardings(boxed_tree))

  def tree_shardings(self, boxed_tree):
    """Shardings for a tree whose leaves are flax `LogicallyPartitioned` boxes
    (e.g. from `jax.eval_shape(model.init, ...)`); unboxed leaves are replicated."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, self.mesh, self.rules)

  @contextlib.contextmanager
  def activate(self):
    """Context for tracing model code: the mesh and the rules are in scope so
    `nn.with_logical_constraint` inside the model resolves."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield self

  def check_divisible(self, what, size, logical_axis):
    check_divisible(what, size, logical_axis, self.axis_sizes, self.rules)


def shard_map_logical(fn, in_logical, out_logical):
  """Run `fn` per shard, its arguments split by logical names under the active
  mesh and rules (`Partitioner.activate`). Kernels that see one device's data
  (Pallas on TPU/GPU) go through this when the mesh has more than one device;
  with no mesh or a single device it calls `fn` directly."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn
  to_spec = lambda names: None if names is None else nn.logical_to_mesh_axes(names)
  in_specs = tuple(to_spec(n) for n in in_logical)
  out_specs = to_spec(out_logical)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
