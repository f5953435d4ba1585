"""Pallas TPU flash attention in interpret mode on CPU, against kernels.reference."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

import kernels
from kernels import masks, reference, tpu

# Out-of-bounds block reads raise, scratch starts as NaN so a missing init shows.
INTERPRET = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")
BATCH, HEADS = 2, 2


def _inputs(seq, head_dim, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (BATCH, seq, HEADS, head_dim)
  q, k, v, d_out = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
  return q, k, v, d_out


def _packed_segments(seq):
  """Batch row 0 holds three documents, row 1 one document."""
  cuts = np.array([seq // 3 + 5, 2 * seq // 3 + 1])
  row0 = np.searchsorted(cuts, np.arange(seq), side="right")
  return jnp.asarray(np.stack([row0, np.zeros(seq, int)]), jnp.int32)


def _compiled(fn, *args):
  # Interpret mode makes big CPU programs; XLA's cheap backend pipeline halves compile time.
  return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def _value_and_grads(attend, q, k, v, d_out):
  def run(q, k, v, d_out):
    out, pullback = jax.vjp(attend, q, k, v)
    return (out, *pullback(d_out))
  return _compiled(run, q, k, v, d_out)


def _assert_close(name, got, want, tol):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.all(np.isfinite(got)), f"{name}: non-finite values"
  scale = max(1.0, float(np.abs(want).max()))
  err = float(np.abs(got - want).max())
  assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol} * {scale:.3g}"


def _check_against_reference(seq, head_dim, dtype, *, window=None, segment_ids=None,
                             causal=True, sm_scale=None, block_q=32, block_k=32):
  q, k, v, d_out = _inputs(seq, head_dim, dtype)
  options = dict(causal=causal, window=window, segment_ids=segment_ids, sm_scale=sm_scale)
  kernel = functools.partial(tpu.attention, interpret=INTERPRET, block_q=block_q,
                             block_k=block_k, **options)
  # The band is passed to the reference unchanged, so window >= seq is checked too.
  spec = functools.partial(reference.attention, **options)
  got = _value_and_grads(kernel, q, k, v, d_out)
  want = _value_and_grads(spec, q, k, v, d_out)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert g.dtype == dtype and g.shape == q.shape
    _assert_close(name, g, w, tol)


# Full head-dim sweep on the hardest mask: a band narrower than the sequence
# (and not a block multiple) plus packed documents. Interpret mode pays per grid
# step, so blocks are few: 3 query and 3 key blocks.
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
def test_banded_with_segments_matches_reference_f32(head_dim):
  _check_against_reference(192, head_dim, jnp.float32, window=48,
                           segment_ids=_packed_segments(192), block_q=64, block_k=64)


@pytest.mark.parametrize("dtype, head_dim, seq, window, segmented, blocks", [
    (jnp.float32, 64, 192, None, False, (64, 64)),   # dense causal
    (jnp.float32, 96, 128, None, True, (64, 32)),    # dense + documents, block_q > block_k
    (jnp.bfloat16, 80, 192, 192, False, (64, 64)),   # window == seq
    (jnp.bfloat16, 128, 128, 64, True, (32, 64)),    # window a block multiple, block_q < block_k
])
def test_matches_reference(dtype, head_dim, seq, window, segmented, blocks):
  segments = _packed_segments(seq) if segmented else None
  _check_against_reference(seq, head_dim, dtype, window=window, segment_ids=segments,
                           block_q=blocks[0], block_k=blocks[1])


def test_non_causal_with_custom_scale_matches_reference():
  _check_against_reference(192, 64, jnp.float32, causal=False, sm_scale=0.3,
                           segment_ids=_packed_segments(192), block_q=64, block_k=64)


def test_rows_that_see_no_key_are_zero_with_zero_gradients():
  seq = 192
  q, k, v, d_out = _inputs(seq, 64, jnp.float32)
  k_ids = jnp.zeros((BATCH, seq), jnp.int32)
  q_ids = k_ids.at[:, 40:72].set(7)  # queries of a document with no keys
  attend = functools.partial(tpu.attention, segment_ids=(q_ids, k_ids), window=48,
                             interpret=INTERPRET, block_q=64, block_k=64)
  spec = functools.partial(reference.attention, segment_ids=(q_ids, k_ids), window=48)
  out, dq, dk, dv = _value_and_grads(attend, q, k, v, d_out)
  for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv),
                             _value_and_grads(spec, q, k, v, d_out)):
    _assert_close(name, got, want, 1e-5)
  assert np.all(np.asarray(out[:, 40:72]) == 0.0)
  assert np.all(np.asarray(dq[:, 40:72]) == 0.0)


def test_log_sum_exp_matches_reference():
  seq, head_dim = 128, 80
  q, k, _, _ = _inputs(seq, head_dim, jnp.float32)
  segments = _packed_segments(seq)
  out, lse = _compiled(functools.partial(
      tpu.attention_with_lse, window=40, segment_ids=segments, interpret=INTERPRET,
      block_q=32, block_k=32), q, k, q)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim ** -0.5
  ok = masks.dense_mask(seq, seq, 40)[None, None] & (
      segments[:, None, :, None] == segments[:, None, None, :])
  want = jax.nn.logsumexp(jnp.where(ok, s, -jnp.inf), axis=-1)
  assert lse.shape == (BATCH, HEADS, seq)
  _assert_close("lse", lse, want, 1e-5)
  _assert_close("out", out, reference.attention(q, k, q, window=40, segment_ids=segments), 1e-5)


def test_inside_shard_map_over_batch_and_heads():
  # Attention is independent per example and head, so each device runs the kernel on its shard.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
  spec = P("data", None, "tensor", None)
  q, k, v, d_out = _inputs(128, 64, jnp.float32)
  segments = _packed_segments(128)
  def local(q, k, v, ids):
    return tpu.attention(q, k, v, window=48, segment_ids=ids, interpret=INTERPRET,
                         block_q=64, block_k=64)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P("data", None)),
                          out_specs=spec)
  got = _value_and_grads(lambda q, k, v: sharded(q, k, v, segments), q, k, v, d_out)
  spec_fn = functools.partial(reference.attention, window=48, segment_ids=segments)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, _value_and_grads(spec_fn, q, k, v, d_out)):
    _assert_close(name, g, w, 1e-5)


# ---------------------------------------------------------------- block skipping

def test_banded_visits_window_over_block_plus_one_key_blocks():
  seq, window, block = 4096, 512, 128
  first, count, extent = tpu.visited_key_blocks(seq, window, block, block)
  steady = window // block + 1
  assert extent == steady == 5  # not seq / block = 32
  assert np.all(count[window // block:] == steady)
  assert np.all(count[:window // block] == np.arange(1, window // block + 1))
  # The visited blocks are exactly the non-empty tiles of the band.
  layout = masks.BlockLayout(seq, block, block, window)
  for qb in range(seq // block):
    visited = set(range(first[qb], first[qb] + count[qb]))
    nonempty = {kb for kb in range(seq // block) if layout.kind(qb, kb) != masks.EMPTY}
    assert visited == nonempty
  # dK/dV walks the same band key-major.
  _, k_count, k_extent = tpu.visited_query_blocks(seq, window, block, block)
  assert k_extent == steady and k_count.sum() == count.sum()


def test_dense_visits_the_causal_triangle():
  first, count, extent = tpu.visited_key_blocks(1024, None, 128, 128)
  assert extent == 8
  assert np.all(first == 0) and np.all(count == np.arange(1, 9))
  assert count.sum() == 8 * 9 // 2
  # A window as wide as the sequence is the same triangle.
  assert np.array_equal(tpu.visited_key_blocks(1024, 1024, 128, 128)[1], count)


def test_kernel_grid_has_band_extent_and_fetches_only_band_blocks():
  seq, window, block = 256, 64, 32
  points = []

  def record(token, grid_point, core):
    points.append(tuple(int(x) for x in grid_point))
    return token

  params = pltpu.InterpretParams(out_of_bounds_reads="raise", grid_point_recorder=record)
  q, k, v, _ = _inputs(seq, 64, jnp.float32)
  # Through the public entry point, which must route to this kernel.
  out = _compiled(functools.partial(kernels.attention, window=window, backend="tpu",
                                    interpret=params, block_q=block, block_k=block), q, k, v)
  _assert_close("out", out, reference.attention(q, k, v, window=window), 1e-5)
  first, count, extent = tpu.visited_key_blocks(seq, window, block, block)
  assert extent == window // block + 1 == 3
  num_q = seq // block
  assert len(points) == BATCH * HEADS * num_q * extent  # not num_q * num_q
  assert {p[3] for p in points} == set(range(extent))
  # The key block each grid step's index map fetches stays inside the band.
  for qb in range(num_q):
    fetched = {int(tpu.inner_block_index(j, first[qb], count[qb])) for j in range(extent)}
    lo, hi = masks.BlockLayout(seq, block, block, window).key_range(qb)
    assert fetched == set(range(lo, hi + 1))


# ---------------------------------------------------------------- bad input

def test_sequence_not_divisible_by_block_raises():
  q = jnp.zeros((1, 96, 2, 64), jnp.float32)
  with pytest.raises(ValueError, match=r"96.*block_q=64.*block_k=64"):
    tpu.attention(q, q, q, interpret=INTERPRET, block_q=64, block_k=64)
  with pytest.raises(ValueError, match=r"96.*block_k=64"):
    tpu.visited_key_blocks(96, None, 32, 64)


def test_bad_shapes_raise():
  q = jnp.zeros((1, 64, 2, 64), jnp.float32)
  with pytest.raises(ValueError, match="batch, seq, heads, head_dim"):
    tpu.attention(q, q[:, :32], q, interpret=INTERPRET)
  with pytest.raises(ValueError, match="segment_ids"):
    tpu.attention(q, q, q, segment_ids=jnp.zeros((1, 32), jnp.int32), interpret=INTERPRET)
  with pytest.raises(ValueError, match="window"):
    tpu.attention(q, q, q, causal=False, window=16, interpret=INTERPRET)
