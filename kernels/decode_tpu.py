"""Pallas TPU (Mosaic) decode attention: one query per row against its own KV cache.

The cache keeps the model's layout [batch, heads, slots, head_dim], so a decode
step passes it as is (no transpose, no head-dim padding: a block's last two
dims are whole key blocks and the whole head dim). The grid is (batch, key
block); a step holds every head of one row's key block in VMEM. Each row's
length (`kernels.masks.cached_keys`) is scalar-prefetched into SMEM, and the
key/value index maps clamp the block index to the row's last block: the steps
past a row's length ask for the block already in VMEM, so no DMA is issued for
them, and their body is skipped (as MaxText's ragged attention and JAX's paged
attention do). A row therefore costs the blocks it fills, not the buffer.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import masks

# Contract the head dim of [heads, 1, d] queries with [heads, block, d] keys, per head.
_QK = (((2,), (2,)), ((0,), (0,)))
_PV = (((2,), (1,)), ((0,), (0,)))
VMEM_BLOCK_BYTES = 2 * 2**20


def _kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *, block_k,
            sm_scale):
  row, block = pl.program_id(0), pl.program_id(1)
  length = lengths_ref[row]

  @pl.when(block == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(block * block_k < length)
  def _step():
    q = q_ref[...]  # [heads, 1, d]
    s = lax.dot_general(q, k_ref[...], _QK, preferred_element_type=jnp.float32) * sm_scale
    key = block * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 2)
    s = jnp.where(key < length, s, -jnp.inf)
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=2, keepdims=True))  # finite: key 0 is seen
    p = jnp.exp(s - m_next)
    alpha = jnp.exp(m_prev - m_next)
    v = v_ref[...]
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=2, keepdims=True)
    acc_ref[...] = alpha * acc_ref[...] + lax.dot_general(
        p.astype(v.dtype), v, _PV, preferred_element_type=jnp.float32)
    m_ref[...] = m_next

  @pl.when(block == pl.num_programs(1) - 1)
  def _finish():
    l = l_ref[...]
    o_ref[...] = (acc_ref[...] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def decode_attention(q, k, v, lengths, *, sm_scale=None, block_k=256, interpret=False):
  """q [batch, heads, head_dim], k and v [batch, heads, slots, head_dim]; row b
  attends over slots [0, lengths[b]) and a row with length 0 gives 0.

  Key blocks are at most block_k slots (fewer for rows of many heads, see
  VMEM_BLOCK_BYTES) and tile the cache exactly (gcd with the slot count); on a
  real TPU that should be a multiple of 16 (bf16 sublane tiling): a cache of a
  multiple of 128 slots. `interpret` (True or
  a `pltpu.InterpretParams`) runs the kernel on CPU.
  """
  batch, heads, slots, head_dim = k.shape
  if q.shape != (batch, heads, head_dim) or v.shape != k.shape:
    raise ValueError(f"decode attention takes q [batch, heads, head_dim] and k, v [batch, "
                     f"heads, slots, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
  # A step holds every head's key and value blocks, double-buffered: keep a block
  # near VMEM_BLOCK_BYTES so that wide rows (many heads) fit v5e's 16 MiB of scoped VMEM.
  fits = max(8, VMEM_BLOCK_BYTES // (heads * head_dim * k.dtype.itemsize))
  block_k = math.gcd(min(block_k, 1 << (fits.bit_length() - 1)), slots)  # tiles the slots
  if interpret is True:
    interpret = pltpu.InterpretParams()
  scale = float(head_dim ** -0.5 if sm_scale is None else sm_scale)
  lengths = masks.cached_keys(lengths.astype(jnp.int32), slots)

  def kv_block(row, block, lengths_ref):
    last = jnp.maximum(masks.cached_key_blocks(lengths_ref[row], block_k) - 1, 0)
    return row, 0, jnp.minimum(block, last), 0

  row_spec = pl.BlockSpec((pl.Squeezed(), heads, 1, head_dim), lambda r, b, n: (r, 0, 0, 0))
  kv_spec = pl.BlockSpec((pl.Squeezed(), heads, block_k, head_dim), kv_block)
  itemsize = k.dtype.itemsize
  out = pl.pallas_call(
      functools.partial(_kernel, block_k=block_k, sm_scale=scale),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(batch, slots // block_k),
          in_specs=[row_spec, kv_spec, kv_spec], out_specs=row_spec,
          scratch_shapes=[pltpu.VMEM((heads, 1, 1), jnp.float32),
                          pltpu.VMEM((heads, 1, 1), jnp.float32),
                          pltpu.VMEM((heads, 1, head_dim), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((batch, heads, 1, head_dim), q.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=4 * batch * heads * slots * head_dim, transcendentals=batch * heads * slots,
          bytes_accessed=2 * k.size * itemsize + 2 * q.size * q.dtype.itemsize),
      interpret=interpret,
      name="decode_attention",
  )(lengths, q[:, :, None, :], k, v)
  return out[:, :, 0, :]
