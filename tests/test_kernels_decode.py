"""kernels.decode_attention (the decode engine's attention over per-row caches): the
Pallas TPU kernel (interpret mode), the Triton kernel (interpret mode) and the XLA
path against jax.nn.dot_product_attention over the whole sequence with the
training mask, for a dense cache and a banded ring buffer, at lengths 1, W - 1, W,
W + 1 and the full cache; blocks past a row's length are never used."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import kernels
from kernels import masks

BATCH_HEADS, HEAD_DIM = 2, 16
WINDOW, FULL = 16, 64  # the ring's slots; the dense cache's
# Out-of-bounds block reads raise, scratch starts as NaN so a missing init shows.
TPU = dict(backend="tpu", interpret=pltpu.InterpretParams(out_of_bounds_reads="raise",
                                                          uninitialized_memory="nan"))
BACKENDS = {"tpu": TPU, "gpu": dict(backend="gpu", interpret=True),
            "xla": dict(backend="reference")}
# Query positions: lengths 1, W - 1, W, W + 1 and the full cache, one per row.
POSITIONS = np.array([0, WINDOW - 2, WINDOW - 1, WINDOW, FULL - 1])


def _sequence(dtype, seed=0):
  """q, k, v [rows, FULL, heads, head_dim]: each row's whole sequence."""
  keys = jax.random.split(jax.random.key(seed), 3)
  shape = (len(POSITIONS), FULL, BATCH_HEADS, HEAD_DIM)
  return [jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys]


def _caches(k, v, window):
  """The engine's caches [rows, heads, slots, head_dim] after each row wrote positions
  0..t (its query's position): slot i (dense) or i % W (ring) holds position i."""
  slots = FULL if window is None else window
  k_cache = np.zeros((k.shape[0], k.shape[2], slots, k.shape[3]), np.float32)
  v_cache = np.zeros_like(k_cache)
  for row, t in enumerate(POSITIONS):
    for position in range(t + 1):  # in order: a ring keeps the latest W
      k_cache[row, :, position % slots] = k[row, position]
      v_cache[row, :, position % slots] = v[row, position]
  return jnp.asarray(k_cache, k.dtype), jnp.asarray(v_cache, v.dtype), slots


def _want(q, k, v, window):
  """Each row's query at its position, attending as training does (jax.nn)."""
  local = None if window is None else (window - 1, 0)
  out = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                     v.astype(jnp.float32), is_causal=True,
                                     local_window_size=local)
  return np.asarray(out)[np.arange(len(POSITIONS)), POSITIONS]


@pytest.mark.parametrize("dtype, tol", [("float32", 2e-6), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("window", [None, WINDOW], ids=["dense", "ring"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_decode_attention_equals_the_training_mask(backend, window, dtype, tol):
  q, k, v = _sequence(dtype)
  k_cache, v_cache, slots = _caches(k, v, window)
  lengths = masks.cached_keys(jnp.asarray(POSITIONS + 1, jnp.int32), slots)
  query = q[jnp.arange(len(POSITIONS)), POSITIONS]  # [rows, heads, head_dim]
  got = jax.jit(functools.partial(kernels.decode_attention, block_k=8, **BACKENDS[backend]))(
      query, k_cache, v_cache, lengths)
  assert got.shape == query.shape and got.dtype == query.dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), _want(q, k, v, window), atol=tol,
                             rtol=0)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_pallas_kernels_never_use_the_blocks_past_a_row(backend):
  q, k, v = _sequence("float32", seed=1)
  k_cache, v_cache, _ = _caches(k, v, None)
  lengths = jnp.asarray([1, 8, 9, 40, 0], jnp.int32)
  blocks = np.asarray(masks.cached_key_blocks(lengths, 8))
  poisoned = [np.array(x) for x in (k_cache, v_cache)]
  for row, n in enumerate(blocks):  # NaN in every block past the row's last one
    for x in poisoned:
      x[row, :, n * 8:] = np.nan
  query = q[:, 0]
  clean = kernels.decode_attention(query, k_cache, v_cache, lengths, block_k=8,
                                   **BACKENDS[backend])
  got = kernels.decode_attention(query, *map(jnp.asarray, poisoned), lengths, block_k=8,
                                 **BACKENDS[backend])
  np.testing.assert_array_equal(got, clean)
  assert np.isfinite(np.asarray(got)).all() and not np.asarray(got[4]).any()  # length 0: 0


def test_xla_path_gives_a_row_the_same_bits_beside_longer_rows():
  q, k, v = _sequence("float32", seed=2)
  k_cache, v_cache, _ = _caches(k, v, None)
  query = q[:, 0]
  alone = kernels.decode_attention(query[:1], k_cache[:1], v_cache[:1], jnp.asarray([5]),
                                   backend="reference", block_k=8)
  beside = kernels.decode_attention(query, k_cache, v_cache, jnp.asarray([5, 64, 30, 9, 1]),
                                    backend="reference", block_k=8)
  np.testing.assert_array_equal(beside[:1], alone)


def test_bad_shapes_are_refused():
  q, k, v = _sequence("float32")
  with pytest.raises(ValueError, match="q \\[batch, heads, head_dim\\]"):
    kernels.decode_attention(q, k, v, jnp.ones(5, jnp.int32))
