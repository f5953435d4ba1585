"""The mesh (paxgpt/model/sharding.py): ICI x DCN axes over several slices, the
`stage` axis, and the errors of sizes that do not fit the devices or slices."""
import dataclasses
import importlib.util

import jax
import numpy as np
import pytest

from paxgpt.model import sharding

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (abstract TPU devices)")


@dataclasses.dataclass(frozen=True)
class _Device:
  """What the hybrid mesh reads of a CPU/GPU device: its process, no slice_index."""
  id: int
  process_index: int
  platform: str = "cpu"
  device_kind: str = "cpu"


def test_processes_are_slices_only_when_dcn_is_given():
  devices = [_Device(i, i // 4) for i in range(8)]
  assert sharding.device_slices(devices) == ([devices], "one slice")
  groups, source = sharding.device_slices(devices, process_is_slice=True)
  assert source == "process" and groups == [devices[:4], devices[4:]]


def test_two_process_slices_put_the_dcn_axis_outermost_in_each_mesh_axis():
  devices = [_Device(i, i // 4) for i in range(8)]
  ici, dcn = sharding.resolve_hybrid(8, {"fsdp": 4}, {"data": 2}, 2, "process")
  assert ici == {"data": 1, "fsdp": 4, "tensor": 1} and dcn == {"data": 2, "fsdp": 1,
                                                                "tensor": 1}
  grid = sharding.hybrid_grid(devices, ici, dcn, 2, "process")
  assert grid.shape == (2, 4, 1)
  assert [[d.process_index for d in row] for row in grid[:, :, 0]] == [[0] * 4, [1] * 4]
  # fsdp across slices instead: each slice holds one half of the fsdp axis.
  ici, dcn = sharding.resolve_hybrid(8, {"fsdp": 4}, {"fsdp": 2, "data": 1}, 2, "process")
  grid = sharding.hybrid_grid(devices, ici, dcn, 2, "process")
  assert grid.shape == (1, 8, 1)
  assert [d.process_index for d in grid[0, :, 0]] == [0] * 4 + [1] * 4


def test_stage_axis_leads_only_when_there_are_stages():
  assert tuple(sharding.make_mesh(fsdp=8).axis_names) == ("data", "fsdp", "tensor")
  mesh = sharding.mesh_from_flag("stage:2,data:1,fsdp:4,tensor:1")
  assert tuple(mesh.axis_names) == ("stage", "data", "fsdp", "tensor")
  assert sharding.stage_count(mesh) == 2 and sharding.stage_count(sharding.make_mesh()) == 1
  ici, dcn = sharding.resolve_hybrid(16, {"fsdp": -1}, {"stage": 2}, 2)
  assert ici == {"stage": 1, "data": 1, "fsdp": 8, "tensor": 1}
  assert dcn == {"stage": 2, "data": 1, "fsdp": 1, "tensor": 1}
  # The pipelined layout's names map onto the stage axis.
  partitioner = sharding.Partitioner(mesh)
  assert tuple(partitioner.spec(("layer_repeats", "stage", "layers", "embed"))) == (
      None, "stage", None, "fsdp")


@pytest.mark.parametrize("ici, dcn, slices, message", [
    ({"fsdp": 4}, {"data": 4}, 2, r"--dcn data:4 needs 4 slices but there are 2 "
                                  r"\(slices: one per process\)"),
    ({"fsdp": 4}, {"data": 3}, 2, r"--dcn data:3 needs 3 slices"),
    ({"fsdp": -1}, {"data": -1, "stage": -1}, 2, r"--dcn data:-1,stage:-1: at most one axis"),
    ({"fsdp": 8}, {"data": 2}, 2, r"mesh data:1,fsdp:8,tensor:1 needs 8 devices per slice but "
                                  r"there are 4"),
])
def test_sizes_that_do_not_fit_the_slices_name_the_flag(ici, dcn, slices, message):
  with pytest.raises(sharding.MeshError, match=message):
    sharding.resolve_hybrid(8, ici, dcn, slices, "process")


def test_dcn_in_one_process_is_one_slice():
  with pytest.raises(sharding.MeshError, match=r"--dcn data:2 needs 2 slices but there are 1"):
    sharding.mesh_from_flag("fsdp:4", dcn="data:2")
  mesh = sharding.mesh_from_flag("data:1,fsdp:8,tensor:1", dcn="data:1")
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}


def test_bad_flag_text():
  with pytest.raises(sharding.MeshError, match=r"--dcn=pipe:2: expected a list"):
    sharding.parse_mesh_flag("pipe:2", "--dcn")
  with pytest.raises(sharding.MeshError, match="expected a list"):
    sharding.parse_mesh_flag("data:1,data:2")


@needs_libtpu
def test_tpu_slices_from_slice_index_default_to_data_parallelism_across_them():
  from paxgpt.training import plan
  devices = plan.topology_devices("v5e", "2x2", num_slices=2)
  mesh = sharding.mesh_from_flag("data:1,fsdp:4,tensor:1", devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert sharding.dcn_sizes(mesh) == {"data": 2, "fsdp": 1, "tensor": 1}
  grid = np.asarray(mesh.devices)
  assert {d.slice_index for d in grid[0].flat} == {0}
  assert {d.slice_index for d in grid[1].flat} == {1}
  staged = sharding.mesh_from_flag("fsdp:4", devices, dcn="stage:2")
  assert dict(staged.shape) == {"stage": 2, "data": 1, "fsdp": 4, "tensor": 1}
  assert sharding.dcn_sizes(staged)["stage"] == 2
  with pytest.raises(sharding.MeshError, match=r"--dcn data:4 needs 4 slices but there are 2 "
                                               r"\(slices: the devices' slice_index\)"):
    sharding.mesh_from_flag("fsdp:4", devices, dcn="data:4")
  single = plan.topology_devices("v5e", "2x2")
  with pytest.raises(sharding.MeshError, match=r"needs 2 slices but there are 1"):
    sharding.mesh_from_flag("fsdp:2", single, dcn="data:2")
  assert jax.devices()[0].platform == "cpu"
