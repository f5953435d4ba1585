"""Compile the Pallas TPU kernels with the real TPU compiler (Mosaic), no TPU needed.

libtpu gives abstract single-chip devices via `get_topology_desc`; lowering and
compiling for them runs Pallas' Mosaic lowering and libtpu's compiler, which
check tiling and VMEM budgets that interpret mode does not.
"""
import functools
import os

import pytest

# libtpu takes a machine-wide lockfile when it loads; let several test
# processes (and pytest-xdist workers) share it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
pytest.importorskip("libtpu", reason="libtpu is not installed, so there is no TPU compiler")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.experimental.pallas import tpu as pltpu  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from kernels import reference, tpu  # noqa: E402

pytestmark = pytest.mark.tpu_compile

SINGLE_CHIP = {"v4": "v4:1x1x1", "v5e": "v5e:1x1", "v5p": "v5p:1x1x1", "v6e": "v6e:1x1"}
KERNELS = ("flash_attention_fwd", "flash_attention_dkdv", "flash_attention_dq")
HEAD_DIMS = (64, 80, 96, 128)  # every GPT-3 size


@functools.cache
def _chip(generation):
  # One host per chip: the default host bounds (2x2x1) do not divide a 1x1 slice.
  topology = topologies.get_topology_desc(topology_name=SINGLE_CHIP[generation],
                                          platform="tpu", chips_per_host_bounds=[1, 1, 1])
  return topology.devices[0]


def _abstract(shape, dtype, device):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.SingleDeviceSharding(device))


def _compile(generation, fn, *, batch=2, seq=1024, heads=2, head_dim=128,
             dtype=jnp.bfloat16, segmented=False):
  device = _chip(generation)
  x = _abstract((batch, seq, heads, head_dim), dtype, device)
  ids = _abstract((batch, seq), jnp.int32, device) if segmented else None
  return jax.jit(fn).lower(x, x, x, ids).compile()


def _loss_and_grads(**options):
  def loss(q, k, v, ids):
    return jnp.sum(tpu.attention(q, k, v, segment_ids=ids, **options).astype(jnp.float32))
  return jax.value_and_grad(loss, argnums=(0, 1, 2))


def _mosaic_kernels(compiled):
  text = compiled.as_text()
  return {name for name in KERNELS if name in text and "tpu_custom_call" in text}


@pytest.mark.parametrize("window", [None, 256])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_forward_and_backward_compile_for_v5p(head_dim, window):
  compiled = _compile("v5p", _loss_and_grads(window=window), head_dim=head_dim)
  assert _mosaic_kernels(compiled) == set(KERNELS)
  memory = compiled.memory_analysis()
  # Flash attention never holds a seq x seq matrix: temporaries stay far below it.
  assert memory.temp_size_in_bytes < 2 * 2 * 1024 * 1024 * 4


@pytest.mark.parametrize("generation", ["v4", "v5e", "v6e"])
def test_every_head_dim_and_mask_compiles_for_other_generations(generation):
  # One program per generation holds forward and backward of dense and banded
  # attention (with segment ids) for every GPT-3 head dim: one compile, not eight.
  device = _chip(generation)
  inputs = {d: _abstract((1, 512, 2, d), jnp.bfloat16, device) for d in HEAD_DIMS}
  ids = _abstract((1, 512), jnp.int32, device)

  def every_variant(inputs, ids):
    return {f"{d}/{w}": _loss_and_grads(window=w)(x, x, x, ids)
            for d, x in inputs.items() for w in (None, 256)}
  text = jax.jit(every_variant).lower(inputs, ids).compile().as_text()
  calls = [line for line in text.splitlines() if "tpu_custom_call" in line]
  for name in KERNELS:  # each kernel once per (head dim, mask) variant
    assert sum(name in line for line in calls) >= 2 * len(HEAD_DIMS), name


def test_forward_compiles_and_banded_costs_seq_times_window():
  def forward(window):
    return lambda q, k, v, ids: tpu.attention(q, k, v, window=window, segment_ids=ids)

  seq, window, block, head_dim = 2048, 256, 128, 64
  costs = {}
  for w in (None, window):
    compiled = _compile("v5e", forward(w), seq=seq, head_dim=head_dim, segmented=True)
    assert _mosaic_kernels(compiled) == {"flash_attention_fwd"}
    costs[w] = compiled.cost_analysis()["flops"]
  # The kernel's cost estimate: two matmuls over every visited tile, head_dim padded to 128.
  tiles = {w: int(tpu.visited_key_blocks(seq, w, block, block)[1].sum()) for w in costs}
  for w, flops in costs.items():
    assert flops == 2 * 2 * 2 * 2 * tiles[w] * block * block * 128
  assert tiles[None] == 16 * 17 // 2 and tiles[window] == 1 + 2 + 14 * 3


def test_shard_map_over_four_chips_compiles():
  # Several chips: the kernels run per shard inside shard_map (batch on 'data', heads on 'tensor').
  devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
  mesh = Mesh(np.array(devices).reshape(2, 2), ("data", "tensor"))
  spec, id_spec = P("data", None, "tensor", None), P("data", None)
  x = jax.ShapeDtypeStruct((4, 1024, 8, 128), jnp.bfloat16, sharding=NamedSharding(mesh, spec))
  ids = jax.ShapeDtypeStruct((4, 1024), jnp.int32, sharding=NamedSharding(mesh, id_spec))

  def loss(q, k, v, ids):
    local = lambda q, k, v, ids: tpu.attention(q, k, v, window=256, segment_ids=ids)
    out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, id_spec),
                        out_specs=spec)(q, k, v, ids)
    return jnp.sum(out.astype(jnp.float32))

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, x, x, ids).compile()
  assert _mosaic_kernels(compiled) == set(KERNELS)
  assert compiled.input_shardings[0][0].spec == spec


def test_broken_tiling_runs_in_interpret_mode_but_fails_tpu_compile():
  # Key segment ids lie along lanes, so with segment ids block_k must be a
  # multiple of 128; block_k=64 is fine for the interpreter, not for Mosaic.
  options = dict(window=96, block_q=64, block_k=64)
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (1, 256, 2, 128), jnp.float32) for key in keys)
  ids = jnp.asarray(np.repeat([[0, 1]], 128, axis=1), jnp.int32)
  got = jax.jit(lambda q, k, v, ids: tpu.attention(
      q, k, v, segment_ids=ids, interpret=pltpu.InterpretParams(), **options))(q, k, v, ids)
  want = reference.attention(q, k, v, window=96, segment_ids=ids)
  np.testing.assert_allclose(got, want, atol=1e-5)
  with pytest.raises(ValueError, match="divisible by 8 and 128"):
    _compile("v5e", lambda q, k, v, ids: tpu.attention(q, k, v, segment_ids=ids, **options),
             batch=1, seq=256, segmented=True)


def test_oversized_blocks_run_in_interpret_mode_but_overflow_vmem():
  # Two 256-row blocks of head_dim 4096 per row: the double-buffered pipeline needs
  # ~20 MiB of VMEM, over v5e's 16 MiB scoped limit.
  options = dict(block_q=256, block_k=256)
  keys = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(key, (1, 512, 1, 4096), jnp.float32) for key in keys)
  got = jax.jit(lambda q, k, v: tpu.attention(
      q, k, v, interpret=pltpu.InterpretParams(), **options))(q, k, v)
  np.testing.assert_allclose(got, reference.attention(q, k, v), atol=1e-5)
  with pytest.raises(jax.errors.JaxRuntimeError, match="vmem"):
    _compile("v5e", lambda q, k, v, ids: tpu.attention(q, k, v, **options),
             batch=1, seq=512, heads=1, head_dim=4096)


def test_tpu_topology_coexists_with_fake_cpu_devices():
  compiled = _compile("v6e", _loss_and_grads(window=None), seq=256, head_dim=64)
  assert _mosaic_kernels(compiled) == set(KERNELS)
  assert jax.devices()[0].platform == "cpu"
  assert len(jax.devices("cpu")) == 8
  # CPU computation still runs in the same process after TPU compilation.
  assert float(jax.jit(lambda x: (x * 2).sum())(jnp.arange(4.0))) == 12.0


@pytest.mark.parametrize("generation", ["v5e", "v5p"])
def test_decode_kernel_compiles_for_every_head_dim_and_both_caches(generation):
  # The engine's decode step: 64 rows, a dense cache of 2048 slots and a banded ring
  # of 256, every GPT-3 head dim, bf16; one program per generation.
  from kernels import decode_tpu
  device = _chip(generation)
  lengths = _abstract((64,), jnp.int32, device)
  # 96 heads of 128 (GPT-3 175B on one chip's share without tensor parallelism) take
  # shorter key blocks to fit VMEM.
  shapes = [(8, d, slots) for d in HEAD_DIMS for slots in (2048, 256)] + [(96, 128, 2048)]
  inputs = {shape: (_abstract((64, shape[0], shape[1]), jnp.bfloat16, device),
                    _abstract((64, shape[0], shape[2], shape[1]), jnp.bfloat16, device))
            for shape in shapes}

  def every_variant(inputs, lengths):
    return {"/".join(map(str, shape)): decode_tpu.decode_attention(q, k, k, lengths)
            for shape, (q, k) in inputs.items()}
  compiled = jax.jit(every_variant).lower(inputs, lengths).compile()
  calls = [line for line in compiled.as_text().splitlines() if "tpu_custom_call" in line]
  assert sum("decode_attention" in line for line in calls) == len(inputs)
