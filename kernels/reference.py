"""Pure-JAX attention: the readable specification every kernel is tested against."""
from __future__ import annotations

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
