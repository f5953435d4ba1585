"""Flash attention for GPUs: Pallas kernels with the Triton lowering.

Forward: one program per (query block, batch, head) keeps its query tile on
chip and streams key/value tiles through an online softmax in float32; it
writes the output and the log-sum-exp (base 2) that the backward reuses.
Backward: a dK/dV kernel (one program per key block, looping over the query
blocks that see it) and a dQ kernel (one program per query block, looping over
its key blocks), both recomputing probabilities from the saved log-sum-exp and
delta = rowsum(dO * O).

Every key loop runs only over the key blocks the mask leaves non-empty
(kernels.masks), so a band of width W costs O(T * W); tiles that are entirely
visible skip the element-wise mask. Head dims are padded with zeros to a power
of two (Triton tiles must be) and sequences to a multiple of the block sizes.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels import masks

_LOG2_E = math.log2(math.e)
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_MIN_BLOCK = 16  # smallest tile edge a Triton dot accepts


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static settings of one attention call (hashable: a custom_vjp nondiff arg)."""
  causal: bool
  window: int | None
  sm_scale: float
  seq_len: int          # true sequence length; positions >= seq_len are padding
  padded_len: int
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  num_warps: int | None
  num_stages: int | None
  interpret: bool

  @property
  def mask_padded_keys(self):
    # Causal masks already hide keys past the last real query; only the
    # all-visible mask needs to be told where the sequence ends.
    return not self.causal and self.padded_len > self.seq_len

  def compiler_params(self, head_dim, itemsize):
    warps = self.num_warps
    if warps is None:
      warps = 4 if head_dim <= 64 else 8
    stages = self.num_stages
    if stages is None:
      # Two-stage pipelining of 16-bit tiles fits shared memory; float32 tiles
      # are twice as large and only serve accuracy checks, so keep them single.
      stages = 2 if itemsize <= 2 else 1
    return pltriton.CompilerParams(num_warps=warps, num_stages=stages)


# ---------------------------------------------------------------- in-kernel helpers


def _three_ranges(first, last, full_first, full_last):
  """Split [first, last] into (masked, full, masked) half-open ranges.

  The full tiles form one contiguous run inside [first, last]; the partial
  tiles of the band's edge come before it and those of the diagonal after.
  """
  full_end = jnp.minimum(full_last, last) + 1
  full_start = jnp.minimum(jnp.maximum(full_first, first), full_end)
  return (first, full_start), (full_start, full_end), (full_end, last + 1)


def _key_ranges(q_block, block_q, block_k, cfg):
  num_k_blocks = cfg.padded_len // block_k
  if not cfg.causal:
    return ((0, 0), (0, num_k_blocks), (num_k_blocks, num_k_blocks))
  first, last = masks.key_block_bounds(q_block, block_q, block_k, cfg.window)
  full_first, full_last = masks.full_key_block_bounds(q_block, block_q, block_k, cfg.window)
  return _three_ranges(first, last, full_first, full_last)


def _query_ranges(k_block, block_q, block_k, cfg):
  num_q_blocks = cfg.padded_len // block_q
  if not cfg.causal:
    return ((0, 0), (0, num_q_blocks), (num_q_blocks, num_q_blocks))
  first, last = masks.query_block_bounds(k_block, block_q, block_k, num_q_blocks, cfg.window)
  full_first, full_last = masks.full_query_block_bounds(
      k_block, block_q, block_k, num_q_blocks, cfg.window)
  return _three_ranges(first, last, full_first, full_last)


def _dot(a, b, trans_a=False, trans_b=False):
  """2-D matmul accumulating in float32 (the Triton lowering takes dot_general as is).

  HIGHEST keeps float32 operands in IEEE float32 (Triton's default is TF32).
  """
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _tile_mask(q_start, k_start, block_q, block_k, cfg, positional, q_seg, k_seg):
  """Boolean [block_q, block_k] visibility of one tile, or None if all visible."""
  mask = None

  def both(a, b):
    return b if a is None else a & b

  if positional or cfg.mask_padded_keys:
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    if positional:
      mask = masks.visible(q_pos, k_pos, cfg.window)
    if cfg.mask_padded_keys:
      mask = both(mask, k_pos < cfg.seq_len)
  if q_seg is not None:
    mask = both(mask, q_seg[:, None] == k_seg[None, :])
  return mask


def _loop(ranges, body, carry):
  """Runs body(index, carry, masked) over the (masked, full, masked) ranges."""
  for (lo, hi), masked in zip(ranges, (True, False, True)):
    carry = lax.fori_loop(lo, hi, functools.partial(body, masked=masked), carry)
  return carry


def _key_tile(cfg, k_ref, v_ref, k_seg_ref, k_block, block_k, q, q_start, q_seg, scale, masked):
  """Key block `k_block`: its keys, values, base-2 scores against `q` with the
  mask applied, and the mask (None for a tile inside the mask)."""
  k_start = k_block * block_k
  k = k_ref[pl.ds(k_start, block_k), :]
  v = v_ref[pl.ds(k_start, block_k), :]
  s = _dot(q, k, trans_b=True) * scale
  k_seg = None if k_seg_ref is None else k_seg_ref[pl.ds(k_start, block_k)]
  mask = _tile_mask(q_start, k_start, q.shape[0], block_k, cfg, masked, q_seg, k_seg)
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  return k, v, s, mask


# ---------------------------------------------------------------- kernels


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, o_ref, lse_ref, *, cfg):
  block_q, block_k = cfg.block_q, cfg.block_k
  # Longest query blocks (the causal bottom rows) are launched first.
  q_block = pl.num_programs(0) - 1 - pl.program_id(0)
  q_start = q_block * block_q
  q = q_ref[...]
  q_seg = None if q_seg_ref is None else q_seg_ref[pl.ds(q_start, block_q)]
  scale = cfg.sm_scale * _LOG2_E  # scores in base 2: exp2 is the cheap instruction

  def body(k_block, carry, masked):
    acc, m_prev, l_prev = carry
    _, v, s, mask = _key_tile(cfg, k_ref, v_ref, k_seg_ref, k_block, block_k, q, q_start,
                              q_seg, scale, masked)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    if mask is not None:
      # A row that has seen no key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
      m_shift = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    else:
      m_shift = m_next
    correction = jnp.exp2(m_prev - m_shift)
    p = jnp.exp2(s - m_shift[:, None])
    l_next = correction * l_prev + jnp.sum(p, axis=1)
    acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_next, l_next

  acc = jnp.zeros((block_q, q.shape[-1]), jnp.float32)
  m = jnp.full((block_q,), -jnp.inf, jnp.float32)
  l = jnp.zeros((block_q,), jnp.float32)
  acc, m, l = _loop(_key_ranges(q_block, block_q, block_k, cfg), body, (acc, m, l))
  empty = l == 0.0  # rows that see no key: output 0
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  # +inf makes the backward's exp2(s - lse) exactly 0 for such rows.
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, k_seg_ref,
                 dk_ref, dv_ref, *, cfg):
  block_q, block_k = cfg.block_q_bwd, cfg.block_k_bwd
  k_block = pl.program_id(0)
  k_start = k_block * block_k
  k = k_ref[...]
  v = v_ref[...]
  k_seg = None if k_seg_ref is None else k_seg_ref[pl.ds(k_start, block_k)]
  scale = cfg.sm_scale * _LOG2_E

  def body(q_block, carry, masked):
    dk, dv = carry
    q_start = q_block * block_q
    rows = pl.ds(q_start, block_q)
    q = q_ref[rows, :]
    do = do_ref[rows, :]
    lse = lse_ref[rows]
    delta = delta_ref[rows]
    s = _dot(q, k, trans_b=True) * scale
    q_seg = None if q_seg_ref is None else q_seg_ref[rows]
    mask = _tile_mask(q_start, k_start, block_q, block_k, cfg, masked, q_seg, k_seg)
    if mask is not None:
      s = jnp.where(mask, s, -jnp.inf)
    p = jnp.exp2(s - lse[:, None])
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
    dp = _dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  zeros = jnp.zeros((block_k, k.shape[-1]), jnp.float32)
  dk, dv = _loop(_query_ranges(k_block, block_q, block_k, cfg), body, (zeros, zeros))
  dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, k_seg_ref,
               dq_ref, *, cfg):
  block_q, block_k = cfg.block_q_bwd, cfg.block_k_bwd
  q_block = pl.num_programs(0) - 1 - pl.program_id(0)
  q_start = q_block * block_q
  rows = pl.ds(q_start, block_q)
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[rows]
  delta = delta_ref[rows]
  q_seg = None if q_seg_ref is None else q_seg_ref[rows]
  scale = cfg.sm_scale * _LOG2_E

  def body(k_block, dq, masked):
    k, v, s, _ = _key_tile(cfg, k_ref, v_ref, k_seg_ref, k_block, block_k, q, q_start, q_seg,
                           scale, masked)
    p = jnp.exp2(s - lse[:, None])
    ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jnp.zeros((block_q, q.shape[-1]), jnp.float32)
  dq = _loop(_key_ranges(q_block, block_q, block_k, cfg), body, dq)
  dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


# ---------------------------------------------------------------- pallas_call wrappers


def _specs(cfg, head_dim):
  """BlockSpecs shared by the kernels; grids are (block index, batch, head)."""
  n = cfg.padded_len

  def tile(rows):
    return pl.BlockSpec((None, rows, None, head_dim), lambda i, b, h: (b, i, h, 0))

  whole = pl.BlockSpec((None, n, None, head_dim), lambda i, b, h: (b, 0, h, 0))
  whole_rows = pl.BlockSpec((None, None, n), lambda i, b, h: (b, h, 0))
  segments = pl.BlockSpec((None, n), lambda i, b, h: (b, 0))
  return tile, whole, whole_rows, segments


def _reversed_tile(rows, head_dim, num_blocks):
  # Matches the kernels' reversed query-block order (longest rows first).
  return pl.BlockSpec((None, rows, None, head_dim),
                      lambda i, b, h: (b, num_blocks - 1 - i, h, 0))


def _forward(q, k, v, q_seg, k_seg, cfg):
  batch, n, heads, head_dim = q.shape
  num_q_blocks = n // cfg.block_q
  _, whole, _, segments = _specs(cfg, head_dim)
  seg_spec = None if q_seg is None else segments
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, cfg=cfg),
      grid=(num_q_blocks, batch, heads),
      in_specs=[_reversed_tile(cfg.block_q, head_dim, num_q_blocks), whole, whole,
                seg_spec, seg_spec],
      out_specs=[
          _reversed_tile(cfg.block_q, head_dim, num_q_blocks),
          pl.BlockSpec((None, None, cfg.block_q),
                       lambda i, b, h: (b, h, num_q_blocks - 1 - i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, n), jnp.float32)],
      compiler_params=cfg.compiler_params(head_dim, q.dtype.itemsize),
      interpret=cfg.interpret,
      name="flash_attention_forward",
  )(q, k, v, q_seg, k_seg)
  return out, lse


def _backward(q, k, v, q_seg, k_seg, out, lse, d_out, cfg):
  batch, n, heads, head_dim = q.shape
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32))
  tile, whole, whole_rows, segments = _specs(cfg, head_dim)
  seg_spec = None if q_seg is None else segments
  params = cfg.compiler_params(head_dim, q.dtype.itemsize)
  args = (q, k, v, d_out, lse, delta, q_seg, k_seg)

  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, cfg=cfg),
      grid=(n // cfg.block_k_bwd, batch, heads),
      in_specs=[whole, tile(cfg.block_k_bwd), tile(cfg.block_k_bwd), whole,
                whole_rows, whole_rows, seg_spec, seg_spec],
      out_specs=[tile(cfg.block_k_bwd), tile(cfg.block_k_bwd)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params,
      interpret=cfg.interpret,
      name="flash_attention_dkdv",
  )(*args)

  num_q_blocks = n // cfg.block_q_bwd
  q_tile = _reversed_tile(cfg.block_q_bwd, head_dim, num_q_blocks)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(num_q_blocks, batch, heads),
      in_specs=[q_tile, whole, whole, q_tile, whole_rows, whole_rows, seg_spec, seg_spec],
      out_specs=q_tile,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params,
      interpret=cfg.interpret,
      name="flash_attention_dq",
  )(*args)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, k_seg, cfg):
  return _forward(q, k, v, q_seg, k_seg, cfg)[0]


def _flash_fwd(q, k, v, q_seg, k_seg, cfg):
  out, lse = _forward(q, k, v, q_seg, k_seg, cfg)
  return out, (q, k, v, q_seg, k_seg, out, lse)


def _flash_bwd(cfg, residuals, d_out):
  q, k, v, q_seg, k_seg, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, q_seg, k_seg, out, lse, d_out, cfg)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------- public entry points


def _check_block(name, size):
  if size < _MIN_BLOCK or size & (size - 1):
    raise ValueError(f"{name}={size} must be a power of two >= {_MIN_BLOCK} (Triton tiles)")


def _fit_block(size, seq_len):
  # Never make a tile larger than the (power-of-two rounded) sequence.
  return max(_MIN_BLOCK, min(size, pl.next_power_of_2(seq_len)))


def _prepare(q, k, v, causal, window, segment_ids, sm_scale, interpret, block_q, block_k,
             block_q_bwd, block_k_bwd, num_warps, num_stages):
  """Checks inputs, pads sequence and head dim; returns padded operands and config."""
  if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
    raise ValueError(f"q, k, v must all be [batch, seq, heads, head_dim]; got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _FLOAT_DTYPES:
    raise ValueError(f"q, k, v must share one of float32/bfloat16/float16; got "
                     f"{q.dtype}, {k.dtype}, {v.dtype}")
  if not causal and window is not None:
    raise ValueError("window requires causal=True")
  masks.check_window(window)
  batch, seq_len, _, head_dim = q.shape
  if window is not None and window >= seq_len:
    window = None  # a band as wide as the sequence is the dense causal mask
  block_q_bwd = block_q if block_q_bwd is None else block_q_bwd
  block_k_bwd = block_k if block_k_bwd is None else block_k_bwd
  blocks = dict(block_q=block_q, block_k=block_k, block_q_bwd=block_q_bwd,
                block_k_bwd=block_k_bwd)
  for name, size in blocks.items():
    _check_block(name, size)
  blocks = {name: _fit_block(size, seq_len) for name, size in blocks.items()}
  step = max(blocks.values())  # powers of two: the largest is a multiple of all
  padded_len = -(-seq_len // step) * step

  q_seg = k_seg = None
  if segment_ids is not None:
    q_seg, k_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids,) * 2
    for name, seg in (("q segment_ids", q_seg), ("kv segment_ids", k_seg)):
      if seg.shape != (batch, seq_len) or not jnp.issubdtype(seg.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer [batch, seq] = {(batch, seq_len)}, got "
                         f"{seg.shape} {seg.dtype}")
    q_seg, k_seg = (jnp.pad(s.astype(jnp.int32), ((0, 0), (0, padded_len - seq_len)))
                    for s in (q_seg, k_seg))

  padded_dim = max(_MIN_BLOCK, pl.next_power_of_2(head_dim))
  pad = ((0, 0), (0, padded_len - seq_len), (0, 0), (0, padded_dim - head_dim))
  q, k, v = (jnp.pad(x, pad) if any(p[1] for p in pad) else x for x in (q, k, v))
  cfg = _Config(causal=causal, window=window,
                sm_scale=float(head_dim ** -0.5 if sm_scale is None else sm_scale),
                seq_len=seq_len, padded_len=padded_len, num_warps=num_warps,
                num_stages=num_stages, interpret=bool(interpret), **blocks)
  return q, k, v, q_seg, k_seg, cfg


def attention(q, k, v, *, causal=True, window=None, segment_ids=None, sm_scale=None,
              interpret=False, block_q=64, block_k=64, block_q_bwd=None, block_k_bwd=None,
              num_warps=None, num_stages=None):
  """Flash attention over [batch, seq, heads, head_dim], differentiable.

  window=None is dense causal, window=W banded causal (key j visible from query
  i iff j <= i and i - j < W), causal=False all-visible. segment_ids [batch,
  seq] int (or a (query_ids, key_ids) pair) also requires equal ids. Rows that
  see no key give 0. Any sequence length and head dim work (padded inside);
  block sizes are powers of two >= 16; the backward uses block_q_bwd/block_k_bwd
  (default: the forward's). `interpret=True` runs the kernels on CPU.
  """
  seq_len, head_dim = q.shape[1], q.shape[-1]
  q, k, v, q_seg, k_seg, cfg = _prepare(
      q, k, v, causal, window, segment_ids, sm_scale, interpret, block_q, block_k,
      block_q_bwd, block_k_bwd, num_warps, num_stages)
  out = _flash(q, k, v, q_seg, k_seg, cfg)
  return out[:, :seq_len, :, :head_dim]


def attention_with_lse(q, k, v, *, causal=True, window=None, segment_ids=None,
                       sm_scale=None, interpret=False, block_q=64, block_k=64,
                       num_warps=None, num_stages=None):
  """Forward only: (output, log-sum-exp [batch, heads, seq] in natural log).

  A row that sees no key has log-sum-exp -inf (log of an empty sum).
  """
  seq_len, head_dim = q.shape[1], q.shape[-1]
  q, k, v, q_seg, k_seg, cfg = _prepare(
      q, k, v, causal, window, segment_ids, sm_scale, interpret, block_q, block_k,
      None, None, num_warps, num_stages)
  out, lse2 = _forward(q, k, v, q_seg, k_seg, cfg)
  lse = jnp.where(jnp.isinf(lse2), -jnp.inf, lse2 / _LOG2_E)
  return out[:, :seq_len, :, :head_dim], lse[:, :, :seq_len]
