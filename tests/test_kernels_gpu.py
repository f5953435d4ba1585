"""Pallas GPU (Triton) flash attention against the pure-JAX reference.

On CPU the kernels run with interpret=True; `test_compiled_on_gpu` runs the
same comparisons compiled when a CUDA GPU is present, and
`test_lowers_to_triton` checks on any machine that every kernel lowers to
Triton IR (cross-platform lowering for 'cuda', no GPU needed).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import bench, gpu, masks, reference

ON_GPU = jax.default_backend() == "gpu"
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _inputs(dtype, seq_len, head_dim, batch=2, heads=2, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  shape = (batch, seq_len, heads, head_dim)
  q, k, v, d_out = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
  return q, k, v, d_out


def _compare(dtype, seq_len, head_dim, *, window=None, segments=False, causal=True,
             interpret=True, tolerance=None, **blocks):
  """Output and dq, dk, dv of the kernel match the reference within tolerance."""
  q, k, v, d_out = _inputs(dtype, seq_len, head_dim)
  segment_ids = bench.packed_segment_ids(q.shape[0], seq_len) if segments else None
  got, expected = bench.values_and_grads("gpu", q, k, v, d_out, causal=causal, window=window,
                                         segment_ids=segment_ids, interpret=interpret,
                                         **blocks)
  tol = tolerance or TOLERANCE[dtype]
  for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
    assert g.shape == e.shape and g.dtype == e.dtype, name
    g, e = np.asarray(g, np.float32), np.asarray(e, np.float32)
    assert np.all(np.isfinite(g)), name
    # Scale by the magnitude: gradients of long rows grow with the sequence.
    np.testing.assert_allclose(g, e, atol=tol * max(1.0, np.abs(e).max()), rtol=tol,
                               err_msg=f"{name} {dtype.__name__} window={window}")


# (dtype, seq_len, head_dim, window, segments, blocks): every head dim, both
# dtypes, dense / banded / band as wide as the sequence, with and without
# segment ids, square and rectangular tiles, at least 3 key blocks each.
CASES = [
    (jnp.float32, 64, 64, None, False, dict(block_q=16, block_k=16)),
    (jnp.float32, 96, 80, 24, True, dict(block_q=16, block_k=32)),
    (jnp.float32, 64, 96, 64, True, dict(block_q=16, block_k=16)),
    (jnp.float32, 96, 128, 40, False, dict(block_q=32, block_k=16)),
    (jnp.float32, 64, 64, 16, False, dict(block_q=16, block_k=16, block_q_bwd=32, block_k_bwd=16)),
    (jnp.bfloat16, 96, 64, 24, True, dict(block_q=32, block_k=16)),
    (jnp.bfloat16, 64, 128, None, True, dict(block_q=16, block_k=16)),
    (jnp.bfloat16, 64, 80, 20, False, dict(block_q=16, block_k=16)),
]


@pytest.mark.parametrize("dtype,seq_len,head_dim,window,segments,blocks", CASES,
                         ids=[f"{d.__name__}-T{t}-D{h}-W{w}-seg{s}" for d, t, h, w, s, _ in CASES])
def test_matches_reference(dtype, seq_len, head_dim, window, segments, blocks):
  _compare(dtype, seq_len, head_dim, window=window, segments=segments, **blocks)


@pytest.mark.parametrize("causal,window", [(True, 20), (False, None)])
def test_sequence_not_multiple_of_block_is_padded(causal, window):
  # 72 = 4.5 blocks of 16: padded keys must stay invisible, also without the causal mask.
  _compare(jnp.float32, 72, 64, causal=causal, window=window, segments=True,
           block_q=16, block_k=32)


def test_rows_that_see_no_key_are_zero_with_zero_gradients():
  q, k, v, d_out = _inputs(jnp.float32, 64, 64)
  kv_ids = jnp.zeros((2, 64), jnp.int32)
  q_ids = kv_ids.at[:, 40:50].set(7)  # rows 40..49 match no key
  out, vjp = jax.vjp(lambda q, k, v: gpu.attention(
      q, k, v, segment_ids=(q_ids, kv_ids), interpret=True, block_q=16, block_k=16), q, k, v)
  dq, dk, dv = vjp(d_out)
  for x in (out, dq, dk, dv):
    assert np.all(np.isfinite(np.asarray(x)))
  np.testing.assert_array_equal(np.asarray(out[:, 40:50]), 0.0)
  np.testing.assert_array_equal(np.asarray(dq[:, 40:50]), 0.0)
  expected, ref_vjp = jax.vjp(
      lambda q, k, v: reference.attention(q, k, v, segment_ids=(q_ids, kv_ids)), q, k, v)
  for got, want in zip((out, dq, dk, dv), (expected, *ref_vjp(d_out))):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
  _, lse = gpu.attention_with_lse(q, k, v, segment_ids=(q_ids, kv_ids), interpret=True,
                                  block_q=16, block_k=16)
  assert np.all(np.asarray(lse[:, :, 40:50]) == -np.inf)


def test_log_sum_exp_matches_reference():
  q, k, v, _ = _inputs(jnp.float32, 64, 64)
  window = 24
  out, lse = gpu.attention_with_lse(q, k, v, window=window, interpret=True,
                                    block_q=16, block_k=16)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") * 64 ** -0.5
  s = jnp.where(masks.dense_mask(64, 64, window), s, -jnp.inf)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(jax.nn.logsumexp(s, axis=-1)),
                             atol=2e-5)
  np.testing.assert_allclose(np.asarray(out), np.asarray(reference.attention(
      q, k, v, window=window)), atol=2e-5)


def test_entry_point_dispatches_to_gpu_kernels():
  q, k, v, _ = _inputs(jnp.float32, 48, 64)
  options = dict(window=16, segment_ids=bench.packed_segment_ids(2, 48))
  out = kernels.attention(q, k, v, backend="gpu", interpret=True, block_q=16, block_k=16,
                          **options)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(gpu.attention(
      q, k, v, interpret=True, block_q=16, block_k=16, **options)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(reference.attention(
      q, k, v, **options)), atol=2e-5)


@pytest.mark.parametrize("window", [None, 1, 16, 24, 40, 100])
@pytest.mark.parametrize("block_q,block_k", [(16, 16), (16, 32), (32, 16)])
def test_loop_ranges_visit_exactly_the_nonempty_tiles(window, block_q, block_k):
  """The masked/full/masked split covers the non-empty tiles once; the middle is FULL."""
  seq_len = 128
  layout = masks.BlockLayout(seq_len, block_q, block_k, window)
  cfg = gpu._prepare(*[jnp.zeros((1, seq_len, 1, 16))] * 3, True, window, None, None, True,
                     block_q, block_k, None, None, None, None)[-1]

  def visits(ranges):
    return [(masked, i) for (lo, hi), masked in zip(ranges, (True, False, True))
            for i in range(int(lo), int(hi))]

  for qb in range(layout.num_q_blocks):
    seen = visits(gpu._key_ranges(qb, block_q, block_k, cfg))
    assert sorted(i for _, i in seen) == [
        kb for kb in range(layout.num_k_blocks) if layout.kind(qb, kb) != masks.EMPTY]
    for masked, kb in seen:
      assert masked == (layout.kind(qb, kb) != masks.FULL), (qb, kb)
  for kb in range(layout.num_k_blocks):
    seen = visits(gpu._query_ranges(kb, block_q, block_k, cfg))
    assert sorted(i for _, i in seen) == [
        qb for qb in range(layout.num_q_blocks) if layout.kind(qb, kb) != masks.EMPTY]
    for masked, qb in seen:
      assert masked == (layout.kind(qb, kb) != masks.FULL), (qb, kb)


def test_banded_visits_grow_linearly():
  # Banded work is O(T * W), dense O(T^2 / 2): count the tiles the key loops visit.
  def tiles(seq_len, window):
    cfg = gpu._prepare(*[jnp.zeros((1, seq_len, 1, 16))] * 3, True, window, None, None, True,
                       64, 64, None, None, None, None)[-1]
    return sum(int(hi) - int(lo) for qb in range(seq_len // 64)
               for lo, hi in gpu._key_ranges(qb, 64, 64, cfg))
  for seq_len in (2048, 4096):
    # A 64-row query block sees 256 / 64 + 1 key blocks, except the first four.
    assert tiles(seq_len, 256) == 5 * (seq_len // 64) - (4 + 3 + 2 + 1)
    blocks = seq_len // 64
    assert tiles(seq_len, None) == blocks * (blocks + 1) // 2


def test_bad_inputs_raise_clear_errors():
  q = jnp.zeros((1, 64, 2, 64))
  with pytest.raises(ValueError, match="batch, seq, heads, head_dim"):
    gpu.attention(q, q[:, :32], q, interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    gpu.attention(q, q, q, block_q=48, interpret=True)
  with pytest.raises(ValueError, match="segment_ids"):
    gpu.attention(q, q, q, segment_ids=jnp.zeros((1, 32), jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="window"):
    gpu.attention(q, q, q, window=0, interpret=True)
  with pytest.raises(ValueError, match="float32/bfloat16"):
    gpu.attention(q.astype(jnp.int32), q.astype(jnp.int32), q.astype(jnp.int32))


def test_lowers_to_triton():
  """Forward and both backward kernels lower to Triton IR for CUDA, every mask kind."""
  q = jnp.zeros((2, 200, 2, 80), jnp.bfloat16)
  segment_ids = jnp.zeros((2, 200), jnp.int32)
  for causal, window, segments in [(True, None, None), (True, 64, segment_ids),
                                   (False, None, segment_ids)]:
    def loss(q, k, v):
      out = gpu.attention(q, k, v, causal=causal, window=window, segment_ids=segments)
      return out.astype(jnp.float32).sum()
    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(q, q, q).lower(
        lowering_platforms=("cuda",))
    text = lowered.as_text()
    calls = text.count("__gpu$xla.gpu.triton") + text.count("triton_kernel_call")
    assert calls >= 3, (causal, window)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU: compiles and runs the Triton kernels")
@pytest.mark.parametrize("dtype,seq_len,head_dim,window,segments,blocks", CASES,
                         ids=[f"{d.__name__}-T{t}-D{h}-W{w}-seg{s}" for d, t, h, w, s, _ in CASES])
def test_compiled_on_gpu(dtype, seq_len, head_dim, window, segments, blocks):
  # The same cases with the default (larger) tiles on a longer sequence, compiled.
  scale = 8
  window = None if window is None else window * scale
  tolerance = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}[dtype]
  _compare(dtype, seq_len * scale, head_dim, window=window, segments=segments,
           interpret=False, tolerance=tolerance)
  _compare(dtype, seq_len * scale, head_dim, window=window, segments=segments,
           interpret=False, tolerance=tolerance, **blocks)
