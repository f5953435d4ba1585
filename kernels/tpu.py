"""Pallas TPU (Mosaic) flash attention: forward, dK/dV and dQ kernels.

Inside the kernels the layout is [batch, heads, seq, head_dim] with head_dim
zero-padded to a multiple of 128 lanes. Every kernel has the grid
(batch, heads, outer block, inner step): the inner step j visits the j-th
non-empty block of the outer block's row (query-major: forward and dQ) or
column (key-major: dK/dV). Per-block tables from `masks.BlockLayout` are
scalar-prefetched into SMEM; the index maps read block `first + min(j, count-1)`
so steps past `count` ask for the block already in VMEM (no DMA) and the body
is skipped. Banded attention therefore costs O(seq * window), not O(seq^2).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import masks

LANES = 128
# Contract the last dims (q @ k.T) and the first dims (p.T @ dO).
_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))
_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


@dataclasses.dataclass(frozen=True)
class _Config:
  block_q: int
  block_k: int
  causal: bool
  window: int | None
  sm_scale: float
  has_segments: bool
  interpret: object


# ---------------------------------------------------------------- block tables

def _layout(seq_len, window, block_q, block_k):
  try:
    return masks.BlockLayout(seq_len, block_q, block_k, window)
  except ValueError as err:
    raise ValueError(f"attention over sequence length {seq_len} with block_q={block_q}, "
                     f"block_k={block_k}: {err}") from None


def visited_key_blocks(seq_len, window=None, block_q=128, block_k=128, causal=True):
  """Query-major visit tables: (first key block, key-block count) per query block.

  Returns (first, count, inner_extent) as int32 numpy arrays and an int; the
  forward and dQ grids have `inner_extent` steps per query block and compute
  only `count[i]` of them.
  """
  layout = _layout(seq_len, window, block_q, block_k)
  if not causal:
    first = np.zeros(layout.num_q_blocks, np.int32)
    count = np.full(layout.num_q_blocks, layout.num_k_blocks, np.int32)
    return first, count, layout.num_k_blocks
  first, count = layout.tables()
  return first, count, layout.max_key_blocks()


def visited_query_blocks(seq_len, window=None, block_q=128, block_k=128, causal=True):
  """Key-major visit tables for dK/dV: (first query block, count) per key block."""
  layout = _layout(seq_len, window, block_q, block_k)
  if not causal:
    first = np.zeros(layout.num_k_blocks, np.int32)
    count = np.full(layout.num_k_blocks, layout.num_q_blocks, np.int32)
    return first, count, layout.num_q_blocks
  first, count = layout.transposed_tables()
  return first, count, int(count.max())


def inner_block_index(j, first, count):
  """The block an index map asks for at inner step j: repeats the last one past count."""
  return first + jnp.minimum(j, count - 1)


# ---------------------------------------------------------------- masking

def _tile_mask(cfg, q_block, k_block, q_seg_ref, k_seg_ref, positional):
  """Boolean [block_q, block_k] mask, or None when every pair is visible.

  `positional` is False on tiles that `masks.tile_is_full` proves full, so those
  skip the iota arithmetic; segment ids are data and always compared.
  """
  ok = None
  if positional:
    shape = (cfg.block_q, cfg.block_k)
    q_pos = q_block * cfg.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
    k_pos = k_block * cfg.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
    ok = masks.visible(q_pos, k_pos, cfg.window)
  if cfg.has_segments:
    same = q_seg_ref[...] == k_seg_ref[...]  # [block_q, 1] vs [1, block_k]
    ok = same if ok is None else ok & same
  return ok


def _for_visited_tiles(cfg, q_block, k_block, step, active):
  """Run step(positional) on an active tile, with the iota mask only if partial."""
  if not cfg.causal:
    pl.when(active)(lambda: step(False))
    return
  full = masks.tile_is_full(q_block, k_block, cfg.block_q, cfg.block_k, cfg.window)
  pl.when(active & full)(lambda: step(False))
  pl.when(active & jnp.logical_not(full))(lambda: step(True))


def _scores(cfg, q, k, ok):
  s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.sm_scale
  if ok is not None:
    s = jnp.where(ok, s, -jnp.inf)
  return s


def _probabilities(s, lse):
  # Rows that see no key carry lse = -inf; +inf there makes every p exactly 0.
  lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
  return jnp.exp(s - lse)


# ---------------------------------------------------------------- forward

def _forward_kernel(cfg, first_ref, count_ref, q_ref, k_ref, v_ref, *refs):
  if cfg.has_segments:
    q_seg_ref, k_seg_ref, *refs = refs
  else:
    q_seg_ref = k_seg_ref = None
  o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
  q_block, j = pl.program_id(2), pl.program_id(3)
  count = count_ref[q_block]
  k_block = first_ref[q_block] + j

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def step(positional):
    ok = _tile_mask(cfg, q_block, k_block, q_seg_ref, k_seg_ref, positional)
    s = _scores(cfg, q_ref[...], k_ref[...], ok)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    # A row with nothing visible so far keeps m = -inf; shift by 0 to avoid inf - inf.
    m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_shift)
    alpha = jnp.exp(m_prev - m_shift)
    v = v_ref[...]
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_ref[...] = alpha * acc_ref[...] + jnp.dot(
        p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    m_ref[...] = m_new

  _for_visited_tiles(cfg, q_block, k_block, step, j < count)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_ref[...]
    empty = l == 0.0
    o_ref[...] = (acc_ref[...] / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
    lse = jnp.where(empty, -jnp.inf, m_ref[...] + jnp.log(jnp.where(empty, 1.0, l)))
    lse_ref[...] = _as_row(lse)


def _segment_specs(cfg, q_map, k_map):
  """BlockSpecs for q segment ids [B, T, 1] and key segment ids [B, 1, T]."""
  q_spec = pl.BlockSpec((pl.Squeezed(), cfg.block_q, 1),
                        lambda b, h, o, j, f, c: (b, q_map(o, j, f, c), 0))
  k_spec = pl.BlockSpec((pl.Squeezed(), 1, cfg.block_k),
                        lambda b, h, o, j, f, c: (b, 0, k_map(o, j, f, c)))
  return [q_spec, k_spec]


def _row_spec(block, width, block_map):
  """BlockSpec over a [B, H, T, width] array whose row block is block_map(o, j, f, c)."""
  return pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), block, width),
                      lambda b, h, o, j, f, c: (b, h, block_map(o, j, f, c), 0))


def _stat_spec(block, block_map):
  """BlockSpec over a per-row statistic [B, H, 1, T]: rows lie along lanes, compact in HBM."""
  return pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), 1, block),
                      lambda b, h, o, j, f, c: (b, h, 0, block_map(o, j, f, c)))


def _column(stat_ref):
  """A [1, block] statistic row as the [block, 1] column that broadcasts over scores."""
  return jnp.expand_dims(stat_ref[0], -1)


def _as_row(column):
  """[n, 1] -> [1, n] by a masked sublane sum: a plain transpose here needs a
  sublane gather, which v4 lacks; this runs once per query block."""
  n = column.shape[0]
  diagonal = (lax.broadcasted_iota(jnp.int32, (n, n), 0)
              == lax.broadcasted_iota(jnp.int32, (n, n), 1))
  return jnp.sum(jnp.where(diagonal, column, 0.0), axis=0, keepdims=True)


def _outer(o, j, first, count):
  return o


def _inner(o, j, first, count):
  return inner_block_index(j, first[o], count[o])


def _cost(cfg, q, visited_tiles, matmuls, io_arrays):
  b, h, _, d = q.shape
  pairs = b * h * visited_tiles * cfg.block_q * cfg.block_k
  return pl.CostEstimate(flops=2 * matmuls * pairs * d, transcendentals=pairs,
                         bytes_accessed=sum(x.size * x.dtype.itemsize for x in io_arrays))


def _like(x, shape, dtype):
  """An out_shape that varies over the same shard_map axes as x (check_vma needs it)."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(x).mat)


def _segment_args(cfg, q_seg, k_seg):
  return [q_seg, k_seg] if cfg.has_segments else []


def _forward(cfg, q, k, v, q_seg, k_seg):
  """q, k, v [B, H, T, Dp] -> (out [B, H, T, Dp], lse [B, H, 1, T] float32)."""
  b, h, t, d = q.shape
  first, count, extent = visited_key_blocks(t, cfg.window, cfg.block_q, cfg.block_k, cfg.causal)
  in_specs = [_row_spec(cfg.block_q, d, _outer), _row_spec(cfg.block_k, d, _inner),
              _row_spec(cfg.block_k, d, _inner)]
  if cfg.has_segments:
    in_specs += _segment_specs(cfg, _outer, _inner)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, h, t // cfg.block_q, extent),
      in_specs=in_specs,
      out_specs=[_row_spec(cfg.block_q, d, _outer), _stat_spec(cfg.block_q, _outer)],
      scratch_shapes=[pltpu.VMEM((cfg.block_q, 1), jnp.float32),
                      pltpu.VMEM((cfg.block_q, 1), jnp.float32),
                      pltpu.VMEM((cfg.block_q, d), jnp.float32)])
  return pl.pallas_call(
      functools.partial(_forward_kernel, cfg),
      grid_spec=grid_spec,
      out_shape=[_like(q, q.shape, q.dtype), _like(q, (b, h, 1, t), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
      cost_estimate=_cost(cfg, q, int(count.sum()), 2, [q, k, v, q]),
      interpret=cfg.interpret,
      name="flash_attention_fwd",
  )(jnp.asarray(first), jnp.asarray(count), q, k, v, *_segment_args(cfg, q_seg, k_seg))


# ---------------------------------------------------------------- backward

def _split_backward_refs(cfg, refs):
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs = refs
  if cfg.has_segments:
    q_seg_ref, k_seg_ref, *refs = refs
  else:
    q_seg_ref = k_seg_ref = None
  return (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, k_seg_ref), refs


def _dkdv_kernel(cfg, first_ref, count_ref, *refs):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, k_seg_ref), refs = (
      _split_backward_refs(cfg, refs))
  dk_ref, dv_ref, dk_acc, dv_acc = refs
  k_block, j = pl.program_id(2), pl.program_id(3)
  count = count_ref[k_block]
  q_block = first_ref[k_block] + j

  @pl.when(j == 0)
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  def step(positional):
    ok = _tile_mask(cfg, q_block, k_block, q_seg_ref, k_seg_ref, positional)
    q, do = q_ref[...], do_ref[...]
    p = _probabilities(_scores(cfg, q, k_ref[...], ok), _column(lse_ref))
    dv_acc[...] += lax.dot_general(p.astype(do.dtype), do, _TN,
                                   preferred_element_type=jnp.float32)
    dp = lax.dot_general(do, v_ref[...], _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - _column(delta_ref))
    dk_acc[...] += lax.dot_general(ds.astype(q.dtype), q, _TN,
                                   preferred_element_type=jnp.float32)

  _for_visited_tiles(cfg, q_block, k_block, step, j < count)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_acc[...] * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(cfg, first_ref, count_ref, *refs):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, k_seg_ref), refs = (
      _split_backward_refs(cfg, refs))
  dq_ref, dq_acc = refs
  q_block, j = pl.program_id(2), pl.program_id(3)
  count = count_ref[q_block]
  k_block = first_ref[q_block] + j

  @pl.when(j == 0)
  def _init():
    dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

  def step(positional):
    ok = _tile_mask(cfg, q_block, k_block, q_seg_ref, k_seg_ref, positional)
    k = k_ref[...]
    p = _probabilities(_scores(cfg, q_ref[...], k, ok), _column(lse_ref))
    dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - _column(delta_ref))
    dq_acc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  _for_visited_tiles(cfg, q_block, k_block, step, j < count)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_acc[...] * cfg.sm_scale).astype(dq_ref.dtype)


def _backward(cfg, q, k, v, q_seg, k_seg, out, lse, d_out):
  b, h, t, d = q.shape
  # delta_i = sum_d dO * O = sum_j P_ij dP_ij, the softmax-backward row term.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[:, :, None, :]
  args = [q, k, v, d_out, lse, delta, *_segment_args(cfg, q_seg, k_seg)]
  params = pltpu.CompilerParams(dimension_semantics=_SEMANTICS)

  # dK/dV: outer axis over key blocks, inner over the query blocks that see them.
  first, count, extent = visited_query_blocks(t, cfg.window, cfg.block_q, cfg.block_k, cfg.causal)
  q_rows = lambda width: _row_spec(cfg.block_q, width, _inner)
  k_rows = lambda width: _row_spec(cfg.block_k, width, _outer)
  q_stat = _stat_spec(cfg.block_q, _inner)
  in_specs = [q_rows(d), k_rows(d), k_rows(d), q_rows(d), q_stat, q_stat]
  if cfg.has_segments:
    in_specs += _segment_specs(cfg, _inner, _outer)
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, t // cfg.block_k, extent), in_specs=in_specs,
          out_specs=[k_rows(d), k_rows(d)],
          scratch_shapes=[pltpu.VMEM((cfg.block_k, d), jnp.float32)] * 2),
      out_shape=[_like(k, k.shape, k.dtype), _like(v, v.shape, v.dtype)],
      compiler_params=params,
      cost_estimate=_cost(cfg, q, int(count.sum()), 4, [q, k, v, d_out, k, v]),
      interpret=cfg.interpret,
      name="flash_attention_dkdv",
  )(jnp.asarray(first), jnp.asarray(count), *args)

  # dQ: outer axis over query blocks, inner over their visible key blocks.
  first, count, extent = visited_key_blocks(t, cfg.window, cfg.block_q, cfg.block_k, cfg.causal)
  q_rows = lambda width: _row_spec(cfg.block_q, width, _outer)
  k_rows = lambda width: _row_spec(cfg.block_k, width, _inner)
  q_stat = _stat_spec(cfg.block_q, _outer)
  in_specs = [q_rows(d), k_rows(d), k_rows(d), q_rows(d), q_stat, q_stat]
  if cfg.has_segments:
    in_specs += _segment_specs(cfg, _outer, _inner)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, t // cfg.block_q, extent), in_specs=in_specs,
          out_specs=q_rows(d),
          scratch_shapes=[pltpu.VMEM((cfg.block_q, d), jnp.float32)]),
      out_shape=_like(q, q.shape, q.dtype),
      compiler_params=params,
      cost_estimate=_cost(cfg, q, int(count.sum()), 3, [q, k, v, d_out, q]),
      interpret=cfg.interpret,
      name="flash_attention_dq",
  )(jnp.asarray(first), jnp.asarray(count), *args)
  return dq, dk, dv


def _differentiable(cfg):
  """The kernels wired into one custom_vjp function of padded [B, H, T, Dp] arrays."""

  @jax.custom_vjp
  def attend(q, k, v, q_seg, k_seg):
    return _forward(cfg, q, k, v, q_seg, k_seg)[0]

  def attend_fwd(q, k, v, q_seg, k_seg):
    out, lse = _forward(cfg, q, k, v, q_seg, k_seg)
    return out, (q, k, v, q_seg, k_seg, out, lse)

  def attend_bwd(residuals, d_out):
    q, k, v, q_seg, k_seg, out, lse = residuals
    dq, dk, dv = _backward(cfg, q, k, v, q_seg, k_seg, out, lse, d_out)
    return dq, dk, dv, None, None

  attend.defvjp(attend_fwd, attend_bwd)
  return attend


# ---------------------------------------------------------------- public API

def _prepare(q, k, v, causal, window, segment_ids, sm_scale, interpret, block_q, block_k):
  """Validate, then return (config, padded kernel inputs, head_dim)."""
  if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
    raise ValueError(f"q, k, v must all be [batch, seq, heads, head_dim]; got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  batch, seq_len, _, head_dim = q.shape
  if not causal and window is not None:
    raise ValueError(f"window={window} requires causal=True")
  masks.check_window(window)
  if window is not None and window >= seq_len:
    window = None  # a band as wide as the sequence is the dense causal mask
  # A (query ids, key ids) pair is accepted too, as in kernels.reference.
  seg_pair = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
  for ids in seg_pair if segment_ids is not None else ():
    if getattr(ids, "shape", None) != (batch, seq_len):
      raise ValueError(f"segment_ids must be [batch, seq] = {(batch, seq_len)} arrays, "
                       f"got {getattr(ids, 'shape', ids)}")
  block_q, block_k = min(block_q, seq_len), min(block_k, seq_len)
  if seq_len % block_q or seq_len % block_k:
    raise ValueError(f"sequence length {seq_len} of q {q.shape} is not a multiple of "
                     f"block_q={block_q} and block_k={block_k}; pad the sequence or pick "
                     "block sizes that divide it")
  if interpret is True:
    interpret = pltpu.InterpretParams()
  cfg = _Config(block_q=block_q, block_k=block_k, causal=bool(causal),
                window=None if window is None else int(window),
                sm_scale=float(head_dim ** -0.5 if sm_scale is None else sm_scale),
                has_segments=segment_ids is not None, interpret=interpret)
  # Zero-padding head_dim to whole lanes leaves q.k and p@v unchanged.
  pad = [(0, 0)] * 3 + [(0, -head_dim % LANES)]
  to_kernel = lambda x: jnp.pad(jnp.transpose(x, (0, 2, 1, 3)), pad)
  q_seg = k_seg = None
  if segment_ids is not None:
    q_ids, k_ids = (ids.astype(jnp.int32) for ids in seg_pair)
    q_seg, k_seg = q_ids[:, :, None], k_ids[:, None, :]
  return cfg, (to_kernel(q), to_kernel(k), to_kernel(v), q_seg, k_seg), head_dim


def attention(q, k, v, *, causal=True, window=None, segment_ids=None, sm_scale=None,
              interpret=False, block_q=128, block_k=128):
  """Flash attention over [batch, seq, heads, head_dim] on TPU, differentiable.

  window=None is dense causal, window=W banded causal (j <= i and i - j < W),
  causal=False lets every query see every key; segment_ids [batch, seq] (or a
  (query ids, key ids) pair) keep packed documents apart, and a row that sees
  no key gives 0. `interpret`
  (True or a `pltpu.InterpretParams`) runs the kernels on CPU. On real TPUs
  block_q should be a multiple of 16 (bf16 sublane tiling) and, with
  segment_ids, block_k a multiple of 128 (key ids lie along lanes).
  """
  cfg, args, head_dim = _prepare(q, k, v, causal, window, segment_ids, sm_scale, interpret,
                                 block_q, block_k)
  out = _differentiable(cfg)(*args)
  return jnp.transpose(out[..., :head_dim], (0, 2, 1, 3))


def attention_with_lse(q, k, v, *, causal=True, window=None, segment_ids=None, sm_scale=None,
                       interpret=False, block_q=128, block_k=128):
  """The forward kernel alone: (out [batch, seq, heads, head_dim], lse [batch, heads, seq]).

  lse is the float32 log-sum-exp of each row's scaled scores (-inf where a row
  sees no key); not differentiable.
  """
  cfg, args, head_dim = _prepare(q, k, v, causal, window, segment_ids, sm_scale, interpret,
                                 block_q, block_k)
  out, lse = _forward(cfg, *args)
  return jnp.transpose(out[..., :head_dim], (0, 2, 1, 3)), lse[:, :, 0]
