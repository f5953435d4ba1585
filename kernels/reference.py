"""Pure-JAX attention: the readable specification every kernel is tested against."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import masks


def attention(q, k, v, *, causal=True, window=None, segment_ids=None, sm_scale=None):
  """Softmax attention over [batch, seq, heads, head_dim], float32 inside.
  Rows that see no key give 0."""
  b, tq, h, d = q.shape
  tk = k.shape[1]
  if sm_scale is None:
    sm_scale = d ** -0.5
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * sm_scale
  if causal:
    ok = masks.dense_mask(tq, tk, window)[None, None]
  else:
    ok = jnp.ones((1, 1, tq, tk), bool)
  if segment_ids is not None:
    q_seg, k_seg = (segment_ids, segment_ids) if not isinstance(segment_ids, tuple) else segment_ids
    ok = ok & (q_seg[:, None, :, None] == k_seg[:, None, None, :])
  s = jnp.where(ok, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  # softmax does not depend on the shift: no gradient through the max
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(l == 0, 1.0, l)
  out = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32))
  return out.astype(q.dtype)


def decode_attention(q, k, v, lengths, *, sm_scale=None, block_k=128):
  """One query per row against its KV cache: q [batch, heads, head_dim], k and v
  [batch, heads, slots, head_dim] (the cache's own layout); row b sees slots
  [0, lengths[b]) (`masks.cached_keys`). float32 inside; a row that sees no key
  gives 0.

  It reads key blocks only up to the longest row: a loop over blocks of
  `block_k` slots, as many as the longest row needs, with an online softmax. A
  block past a row's own length adds exactly nothing to it (its scores are
  -inf, its max and sum stay bit for bit), so a row's result does not depend on
  the other rows.
  """
  batch, _, slots, head_dim = k.shape
  block_k = min(block_k, slots)
  scale = head_dim ** -0.5 if sm_scale is None else sm_scale
  num_blocks = masks.cached_key_blocks(jnp.max(lengths), block_k)
  dot = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)

  def body(i, carry):
    m, l, acc = carry
    # The last block may start early (slots % block_k != 0); keys it repeats are masked.
    start = jnp.minimum(i * block_k, slots - block_k)
    index = start + jnp.arange(block_k)
    ok = (index[None, :] >= i * block_k) & (index[None, :] < lengths[:, None])
    keys = jax.lax.dynamic_slice_in_dim(k, start, block_k, axis=2)
    values = jax.lax.dynamic_slice_in_dim(v, start, block_k, axis=2)
    s = dot("bhd,bhkd->bhk", q, keys) * scale
    s = jnp.where(ok[:, None, :], s, -jnp.inf)
    m_next = jnp.maximum(m, jnp.max(s, axis=-1))
    shift = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # nothing seen yet: exp gives 0
    p = jnp.exp(s - shift[..., None])
    alpha = jnp.exp(m - shift)
    l = alpha * l + jnp.sum(p, axis=-1)
    acc = alpha[..., None] * acc + dot("bhk,bhkd->bhd", p.astype(values.dtype), values)
    return m_next, l, acc

  heads = q.shape[1]
  init = (jnp.full((batch, heads), -jnp.inf, jnp.float32), jnp.zeros((batch, heads), jnp.float32),
          jnp.zeros((batch, heads, head_dim), jnp.float32))
  _, l, acc = jax.lax.fori_loop(0, num_blocks, body, init)
  return (acc / jnp.where(l == 0, 1.0, l)[..., None]).astype(q.dtype)


def attention_by_blocks(q, k, v, *, causal=True, window=None, segment_ids=None, sm_scale=None,
                        block=32):
  """attention() computed only over the key blocks each query block can see: the
  decoders' prefill on CPU, where `attention` spends most of its time on the
  softmax of pairs the mask leaves empty. Forward only (the loops' bounds are
  data). Query block i reads key blocks from the first one any of its queries sees
  (the band's start, and the earliest key of the queries' own segments: packed
  prompts skip each other) to its causal last, with an online softmax, float32
  inside. Self-attention: q, k, v [batch, seq, heads, head_dim], one segment_ids.
  Blocks of 32: on the 2-core CPU a 512-token pack of three prompts takes 4.8 ms
  a layer against `attention`'s 24 (64: 6.8, 128: 10), 2,048 tokens 135 against 684."""
  if not causal or isinstance(segment_ids, tuple) or k.shape[1] != q.shape[1]:
    return attention(q, k, v, causal=causal, window=window, segment_ids=segment_ids,
                     sm_scale=sm_scale)
  b, t, h, d = q.shape
  dtype = q.dtype
  scale = d ** -0.5 if sm_scale is None else sm_scale
  block = min(block, t)
  padded = -(-t // block) * block  # pad keys sit after every query: the causal mask hides them
  pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - t)) + ((0, 0),) * (x.ndim - 2))
  q, k, v = (pad(x.astype(jnp.float32)) for x in (q, k, v))
  seg = pad(jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids)
  # The first position of each query's segment: no key before it is visible.
  first = jnp.argmax(seg[:, :, None] == seg[:, None, :], axis=2)
  dot = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)

  def query_block(i, out):
    rows = i * block + jnp.arange(block)
    qb = jax.lax.dynamic_slice_in_dim(q, i * block, block, axis=1)
    q_seg = jax.lax.dynamic_slice_in_dim(seg, i * block, block, axis=1)
    lo, hi = masks.key_block_bounds(i, block, block, window)
    lo = jnp.maximum(lo, jnp.min(jax.lax.dynamic_slice_in_dim(first, i * block, block, 1)) // block)

    def key_block(j, carry):
      m, l, acc = carry
      kb, vb, k_seg = (jax.lax.dynamic_slice_in_dim(x, j * block, block, axis=1)
                       for x in (k, v, seg))
      cols = j * block + jnp.arange(block)
      ok = masks.visible(rows[:, None], cols[None, :], window)[None]
      ok = ok & (q_seg[:, :, None] == k_seg[:, None, :])  # [b, q, k]
      s = jnp.where(ok[:, None], dot("bqhd,bkhd->bhqk", qb, kb) * scale, -jnp.inf)
      m_next = jnp.maximum(m, jnp.max(s, axis=-1))
      shift = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # nothing seen yet: exp gives 0
      p = jnp.exp(s - shift[..., None])
      alpha = jnp.exp(m - shift)
      l = alpha * l + jnp.sum(p, axis=-1)
      acc = alpha[..., None] * acc + dot("bhqk,bkhd->bhqd", p, vb)
      return m_next, l, acc

    init = (jnp.full((b, h, block), -jnp.inf, jnp.float32), jnp.zeros((b, h, block), jnp.float32),
            jnp.zeros((b, h, block, d), jnp.float32))
    _, l, acc = jax.lax.fori_loop(lo, hi + 1, key_block, init)
    result = acc / jnp.where(l == 0, 1.0, l)[..., None]
    return jax.lax.dynamic_update_slice_in_dim(out, jnp.swapaxes(result, 1, 2), i * block, axis=1)

  out = jax.lax.fori_loop(0, padded // block, query_block, jnp.zeros_like(q))
  return out[:, :t].astype(dtype)
