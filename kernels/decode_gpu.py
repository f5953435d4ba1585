"""Pallas GPU (Triton) decode attention: one query per row against its own KV cache.

One program per (row, head) keeps the row's query in registers and streams
its cache, in the model's layout [batch, heads, slots, head_dim], through an
online softmax in float32. The loop runs over `kernels.masks.cached_key_blocks`
of the row's own length only, so a row never loads the blocks past it. A
single query is a matrix-vector product: the scores and the weighted sum of
values are element-wise products and reductions (a Triton dot needs 16 rows).
Triton tiles are powers of two, so the head dim must be one (64 and 128 for
the GPT-3 sizes that have them); `kernels.decode_attention` sends other head
dims to the XLA path.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels import masks


def supports(head_dim):
  return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, *, block_k, sm_scale):
  length = lengths_ref[...]
  q = q_ref[...].astype(jnp.float32) * sm_scale  # [head_dim]

  def body(block, carry):
    m_prev, l_prev, acc = carry
    keys = pl.ds(block * block_k, block_k)
    k = k_ref[keys, :].astype(jnp.float32)  # [block_k, head_dim]
    s = jnp.sum(k * q[None, :], axis=1)
    s = jnp.where(block * block_k + jnp.arange(block_k) < length, s, -jnp.inf)
    m_next = jnp.maximum(m_prev, jnp.max(s))  # finite: the block's first key is seen
    p = jnp.exp(s - m_next)
    alpha = jnp.exp(m_prev - m_next)
    v = v_ref[keys, :].astype(jnp.float32)
    acc = alpha * acc + jnp.sum(p[:, None] * v, axis=0)
    return m_next, alpha * l_prev + jnp.sum(p), acc

  init = (jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.zeros(q.shape, jnp.float32))
  _, l, acc = lax.fori_loop(0, masks.cached_key_blocks(length, block_k), body, init)
  o_ref[...] = (acc / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def decode_attention(q, k, v, lengths, *, sm_scale=None, block_k=64, interpret=False,
                     num_warps=4, num_stages=2):
  """q [batch, heads, head_dim], k and v [batch, heads, slots, head_dim]; row b
  attends over slots [0, lengths[b]) and a row with length 0 gives 0. Key blocks
  are gcd(block_k, slots) slots, so they tile the cache exactly (a power of two:
  the slot count should be a multiple of 16); `interpret=True` runs on CPU."""
  batch, heads, slots, head_dim = k.shape
  if q.shape != (batch, heads, head_dim) or v.shape != k.shape:
    raise ValueError(f"decode attention takes q [batch, heads, head_dim] and k, v [batch, "
                     f"heads, slots, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
  if not supports(head_dim):
    raise ValueError(f"the Triton decode kernel needs a power-of-two head dim, got {head_dim}")
  block_k = math.gcd(block_k, slots)  # blocks tile the slots exactly
  scale = float(head_dim ** -0.5 if sm_scale is None else sm_scale)
  lengths = masks.cached_keys(lengths.astype(jnp.int32), slots)
  row = pl.BlockSpec((None, None, head_dim), lambda b, h: (b, h, 0))
  cache = pl.BlockSpec((None, None, slots, head_dim), lambda b, h: (b, h, 0, 0))
  return pl.pallas_call(
      functools.partial(_kernel, block_k=block_k, sm_scale=scale),
      grid=(batch, heads),
      in_specs=[pl.BlockSpec((None,), lambda b, h: (b,)), row, cache, cache],
      out_specs=row,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="decode_attention",
  )(lengths, q, k, v)
