"""The mesh and the logical axis rules: the one place names become shardings.

Model code names every parameter and activation axis with the logical names
below; this module maps them onto the mesh axes (`data`, `fsdp`, `tensor`, and
`stage` when a run pipelines its layers: paxgpt/model/pipeline.py).
Nothing else in paxgpt writes a PartitionSpec.

Several slices (TPU pods joined over the data-center network, DCN): every mesh
axis has an ICI size (within a slice: `--mesh`) and a DCN size (across slices:
`--dcn`; default: data parallelism over all slices); the axis spans ICI x DCN
devices and `make_mesh` lays it out with mesh_utils.create_hybrid_device_mesh.
Slices are the devices' `slice_index` (TPU); devices without one (CPU, GPU)
count each process as a slice when `--dcn` is given. The logical rules do not
change: an axis is an axis, wherever its devices are.
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
# The pipeline's axis: outermost, so that it may span slices or nodes. A mesh has
# it only when it is larger than 1 (every other mesh keeps the three axes above).
STAGE_AXIS = "stage"
HYBRID_AXES = (STAGE_AXIS,) + MESH_AXES

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


# The pipelined layout of the stacked periods (paxgpt/model/pipeline.py):
# [repeats, stages, periods per stage, ...], stages split over the `stage` axis,
# and the activations in flight, one per stage. Only a mesh with a stage axis
# meets these names.
STAGE_AXIS_RULES = (
    ("stage", STAGE_AXIS),
    ("layer_repeats", None),
    ("activation_stage", STAGE_AXIS),
)


def mesh_axes_of(logical_axis, rules=LOGICAL_AXIS_RULES):
  """The mesh axes (a tuple, maybe empty) a logical axis is split over."""
  axes = nn.logical_to_mesh_axes((logical_axis,), rules)[0]
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def shard_count(logical_axis, axis_sizes, rules=LOGICAL_AXIS_RULES):
  """How many shards a logical axis has on a mesh of `axis_sizes` ({name: size});
  needs no devices, so plans for meshes that do not exist here use it too."""
  return math.prod(axis_sizes.get(a, 1) for a in mesh_axes_of(logical_axis, rules))


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
  sizes = _resolve(num_devices, {"data": data, "fsdp": fsdp, "tensor": tensor}, "mesh",
                   "devices")
  return tuple(sizes[a] for a in MESH_AXES)


def _resolve(count, sizes, what, unit):
  """`sizes` ({axis: size}) with at most one -1 filled in so that they multiply to
  `count` `unit`s (devices or slices); MeshError naming `what` otherwise."""
  sizes = dict(sizes)
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise MeshError(f"{what} {_fmt(sizes)}: at most one axis may be -1")
  for a, s in sizes.items():
    if s != -1 and (int(s) != s or s < 1):
      raise MeshError(f"{what} {_fmt(sizes)}: axis {a} must be a positive integer or -1")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if count % fixed:
      raise MeshError(f"{what} {_fmt(sizes)} does not divide the {count} {unit}")
    sizes[free[0]] = count // fixed
  elif fixed != count:
    raise MeshError(f"{what} {_fmt(sizes)} needs {fixed} {unit} but there are {count}")
  return {a: int(s) for a, s in sizes.items()}


def _fmt(sizes):
  return ",".join(f"{a}:{s}" for a, s in sizes.items())


def parse_mesh_flag(text, flag="--mesh"):
  """'data:1,fsdp:8,tensor:1' (or with stage:N) -> dict; axes left out keep their defaults."""
  out = {}
  for part in filter(None, text.split(",")):
    name, _, value = part.partition(":")
    if name not in HYBRID_AXES or not value.lstrip("-").isdigit() or name in out:
      raise MeshError(f"{flag}={text}: expected a list like data:1,fsdp:8,tensor:1 "
                      f"(axes {', '.join(HYBRID_AXES)})")
    out[name] = int(value)
  return out


def device_slices(devices, process_is_slice=False):
  """`devices` grouped by slice, in slice order, and what told them apart: the
  devices' slice_index (TPU, or other devices whose slice_index tells several
  apart); without one, each process (`process_is_slice`) or one slice of all."""
  indices = {getattr(d, "slice_index", None) for d in devices}
  if None not in indices and (len(indices) > 1 or devices[0].platform == "tpu"):
    key, source = (lambda d: d.slice_index), "slice_index"
  elif process_is_slice:
    key, source = (lambda d: d.process_index), "process"
  else:
    return [list(devices)], "one slice"
  groups = {}
  for d in devices:
    groups.setdefault(key(d), []).append(d)
  return [groups[k] for k in sorted(groups)], source


def resolve_hybrid(num_devices, ici, dcn, num_slices, slices_from="slice_index"):
  """({axis: ICI size}, {axis: DCN size}) over the axes the mesh has (`stage`
  only when it is larger than 1). `ici`: sizes within a slice (stage, data and
  tensor default 1, fsdp -1); `dcn`: sizes across slices (None: data over all)."""
  try:
    dcn = _resolve(num_slices, {"data": -1} if dcn is None else dict(dcn), "--dcn", "slices")
  except MeshError as e:
    how = {"slice_index": "the devices' slice_index",
           "process": "one per process"}.get(slices_from, slices_from)
    raise MeshError(f"{e} (slices: {how})") from None
  ici = {"data": 1, "fsdp": -1, "tensor": 1, **ici}
  if ici.get("stage", 1) == 1:  # a stage axis of 1 is no axis (and no word in messages)
    ici.pop("stage", None)
  ici = _resolve(num_devices // num_slices, ici, "mesh",
                 "devices" + (" per slice" if num_slices > 1 else ""))
  stages = ici.get("stage", 1) * dcn.get("stage", 1)
  axes = HYBRID_AXES if stages > 1 else MESH_AXES
  return ({a: ici.get(a, 1) for a in axes}, {a: dcn.get(a, 1) for a in axes})


def _slice_grid(shape, devices):
  try:
    from jax.experimental import mesh_utils
    return mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    return np.asarray(devices).reshape(shape)


@gin.configurable
def make_mesh(data=1, fsdp=-1, tensor=1, devices=None, stage=1, dcn=None):
  """A Mesh over (data, fsdp, tensor), led by `stage` when the run pipelines;
  -1 takes the devices left over (in each slice). `dcn` ({axis: size}, e.g.
  {"data": 4}) spreads axes over slices, each axis then spanning its ICI size x
  its DCN size; None: data parallelism over the slices of TPU devices."""
  devices = jax.devices() if devices is None else list(devices)
  slices, source = device_slices(devices, process_is_slice=dcn is not None)
  if len({len(s) for s in slices}) > 1:
    raise MeshError(f"the {len(slices)} slices (by {source}) hold different numbers of "
                    f"devices: {sorted({len(s) for s in slices})}")
  ici, dcn = resolve_hybrid(len(devices), {"stage": stage, "data": data, "fsdp": fsdp,
                                           "tensor": tensor}, dcn, len(slices), source)
  return Mesh(hybrid_grid(devices, ici, dcn, len(slices), source), tuple(ici))


def hybrid_grid(devices, ici, dcn, num_slices, slices_from):
  """The devices as an array of shape ICI x DCN per axis (`resolve_hybrid`'s
  sizes): within one slice the topology-aware device mesh, across slices
  mesh_utils.create_hybrid_device_mesh (slices by slice_index, or processes)."""
  if num_slices == 1:
    return _slice_grid(tuple(ici.values()), devices)
  from jax.experimental import mesh_utils
  return mesh_utils.create_hybrid_device_mesh(
      tuple(ici.values()), tuple(dcn.values()), devices,
      process_is_granule=slices_from == "process", allow_split_physical_axes=True)


def mesh_from_flag(text=None, devices=None, dcn=None):
  """The mesh of `--mesh=data:1,fsdp:8,tensor:1` and `--dcn=data:4` flags
  (no --mesh: gin's make_mesh)."""
  kwargs = parse_mesh_flag(text) if text else {}
  if dcn:
    kwargs["dcn"] = parse_mesh_flag(dcn, "--dcn")
  return make_mesh(**kwargs, devices=devices)


def dcn_sizes(mesh):
  """{axis: how many slices it spans} of a mesh (all 1 within one slice)."""
  grid, sizes = np.asarray(mesh.devices), {}
  for i, axis in enumerate(mesh.axis_names):
    line = grid[(0,) * i + (slice(None),) + (0,) * (grid.ndim - i - 1)]
    sizes[axis] = len({getattr(d, "slice_index", None) for d in line})
  return sizes


def stage_count(mesh):
  """Pipeline stages of a mesh: its `stage` axis (1 when it has none)."""
  return dict(mesh.shape).get(STAGE_AXIS, 1)


class Partitioner:
  """Owns the mesh and the rules; turns logical names into NamedShardings."""

  def __init__(self, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    self.mesh = mesh
    self.rules = tuple(rules) + tuple(r for r in STAGE_AXIS_RULES if r not in rules)

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
