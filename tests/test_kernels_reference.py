"""kernels/reference.py's block-skipping forward (the decoders' prefill on CPU) equals
the full-matrix reference and jax.nn.dot_product_attention: causal and banded,
packed prompts, left padding, arbitrary segment ids, lengths that are no multiple
of the block."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import reference


def _segments(kind, batch, length, rng):
  if kind is None:
    return None
  if kind == "packed":  # three prompts and trailing padding (segment 0), as the engine packs
    cuts = np.sort(rng.choice(np.arange(1, length - 5), 2, replace=False))
    ids = np.searchsorted(cuts, np.arange(length), side="right") + 1
    ids[length - 5:] = 0
    return np.tile(ids, (batch, 1)).astype(np.int32)
  if kind == "left_padded":  # the static sampler's prefill
    ids = np.ones((batch, length), np.int32)
    for row in range(batch):
      ids[row, :rng.integers(0, length)] = 0
    return ids
  return rng.integers(0, 3, (batch, length)).astype(np.int32)  # not contiguous runs


@pytest.mark.parametrize("batch,length,window,segments", [
    (1, 96, None, "packed"), (2, 75, 16, "packed"), (3, 50, None, "left_padded"),
    (2, 64, 24, "random"), (1, 33, None, None), (2, 7, 3, None)])
def test_attention_by_blocks_equals_the_full_softmax(batch, length, window, segments):
  rng = np.random.default_rng(length)
  q, k, v = (jnp.asarray(rng.standard_normal((batch, length, 2, 8)), jnp.float32)
             for _ in range(3))
  seg = _segments(segments, batch, length, rng)
  seg = None if seg is None else jnp.asarray(seg)
  got = reference.attention_by_blocks(q, k, v, window=window, segment_ids=seg, block=16)
  want = reference.attention(q, k, v, window=window, segment_ids=seg)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-6)
  # The independent reference (every query sees at least itself).
  mask = jnp.tril(jnp.ones((length, length), bool))
  if window is not None:
    mask &= ~jnp.tril(jnp.ones((length, length), bool), -window)
  mask = mask[None, None]
  if seg is not None:
    mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
  expected = jax.nn.dot_product_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(got, expected, atol=2e-6, rtol=2e-6)


def test_attention_by_blocks_skips_blocks_other_prompts_hold():
  """A packed prompt's queries never read the blocks of the prompts before it: NaN
  keys there change nothing."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 64, 2, 8)), jnp.float32) for _ in range(3))
  seg = jnp.asarray(np.repeat([1, 2], 32)[None], jnp.int32)
  poisoned = k.at[:, :32].set(jnp.nan), v.at[:, :32].set(jnp.nan)
  clean = reference.attention_by_blocks(q, k, v, segment_ids=seg, block=16)
  got = reference.attention_by_blocks(q, *poisoned, segment_ids=seg, block=16)
  np.testing.assert_array_equal(got[:, 32:], clean[:, 32:])
  assert bool(jnp.isnan(got[:, :32]).all())
