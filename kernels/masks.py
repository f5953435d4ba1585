"""The one definition of the attention masks, element-wise and per block.

Every backend (reference, Pallas TPU, Pallas GPU) takes its mask from here:
  dense causal:          query i sees key j iff j <= i
  banded causal, W:      query i sees key j iff j <= i and i - j < W
  segment ids (packed):  additionally seg[i] == seg[j]
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2


def visible(q_pos, k_pos, window=None):
  """Boolean mask, broadcasting q_pos against k_pos (e.g. [:, None] vs [None, :])."""
  ok = k_pos <= q_pos
  if window is not None:
    ok = ok & (q_pos - k_pos < window)
  return ok


def dense_mask(q_len, k_len, window=None):
  q = jnp.arange(q_len)[:, None]
  k = jnp.arange(k_len)[None, :]
  return visible(q, k, window)


def check_window(window):
  if window is None:
    return
  if int(window) != window or window < 1:
    raise ValueError(f"window must be a positive integer or None, got {window!r}")


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Which key blocks each query block touches, for square tiles of a causal mask.

  Only the causal triangle or the band is listed: kernels iterate over
  `key_blocks(q)` and never compute (or, on TPU, copy in) any other block.
  """
  seq_len: int
  block_q: int
  block_k: int
  window: int | None = None

  def __post_init__(self):
    check_window(self.window)
    for name in ("block_q", "block_k"):
      b = getattr(self, name)
      if self.seq_len % b:
        raise ValueError(
            f"sequence length {self.seq_len} is not a multiple of {name}={b}; "
            "pad the sequence or choose a block size that divides it")

  @property
  def num_q_blocks(self):
    return self.seq_len // self.block_q

  @property
  def num_k_blocks(self):
    return self.seq_len // self.block_k

  def key_range(self, q_block):
    """First and last (inclusive) key block with any visible pair for q_block."""
    q_first = q_block * self.block_q
    q_last = q_first + self.block_q - 1
    k_hi = q_last // self.block_k
    if self.window is None:
      k_lo = 0
    else:
      k_lo = max(0, q_first - self.window + 1) // self.block_k
    return k_lo, k_hi

  def kind(self, q_block, k_block):
    """EMPTY, PARTIAL or FULL (every pair visible) for one tile."""
    q_first = q_block * self.block_q
    q_last = q_first + self.block_q - 1
    k_first = k_block * self.block_k
    k_last = k_first + self.block_k - 1
    if k_first > q_last:
      return EMPTY
    if self.window is not None and q_first - k_last >= self.window:
      return EMPTY
    full = k_last <= q_first
    if self.window is not None:
      full = full and (q_last - k_first < self.window)
    return FULL if full else PARTIAL

  def max_key_blocks(self):
    """Most key blocks any query block visits (the inner grid extent)."""
    return max(hi - lo + 1 for lo, hi in map(self.key_range, range(self.num_q_blocks)))

  def tables(self):
    """Per query block: first key block and count (int32 numpy), for scalar prefetch."""
    ranges = [self.key_range(i) for i in range(self.num_q_blocks)]
    first = np.array([lo for lo, _ in ranges], np.int32)
    count = np.array([hi - lo + 1 for lo, hi in ranges], np.int32)
    return first, count

  def transposed_tables(self):
    """Per key block: first query block and count of query blocks that see it."""
    firsts, counts = [], []
    for kb in range(self.num_k_blocks):
      qs = [qb for qb in range(self.num_q_blocks) if self.kind(qb, kb) != EMPTY]
      firsts.append(qs[0] if qs else 0)
      counts.append(len(qs))
    return np.array(firsts, np.int32), np.array(counts, np.int32)


def visible_pairs(seq_len, window=None):
  """Number of (i, j) pairs inside the mask (for FLOP counts): sum_i min(i+1, W)."""
  if window is None or window >= seq_len:
    return seq_len * (seq_len + 1) // 2
  w = int(window)
  return w * (w + 1) // 2 + (seq_len - w) * w


def key_block_bounds(q_block, block_q, block_k, window=None):
  """[first, last] key block for a query block; works on traced ints in kernels.

  The same arithmetic as `BlockLayout.key_range`, for loop bounds computed
  from `program_id` inside a kernel.
  """
  q_first = q_block * block_q
  last = (q_first + block_q - 1) // block_k
  if window is None:
    return 0 * last, last
  first = jnp.maximum(q_first - window + 1, 0) // block_k
  return first, last


def query_block_bounds(k_block, block_q, block_k, num_q_blocks, window=None):
  """[first, last] query block that sees any key of k_block (for dK/dV loops)."""
  k_first = k_block * block_k
  k_last = k_first + block_k - 1
  first = k_first // block_q
  if window is None:
    return first, num_q_blocks - 1 + 0 * first
  last = jnp.minimum((k_last + window - 1) // block_q, num_q_blocks - 1)
  return first, last


def tile_is_full(q_block, k_block, block_q, block_k, window=None):
  """True where every pair of the tile is visible, so the kernel can skip masking."""
  q_first = q_block * block_q
  q_last = q_first + block_q - 1
  k_first = k_block * block_k
  k_last = k_first + block_k - 1
  full = k_last <= q_first
  if window is not None:
    full = full & (q_last - k_first < window)
  return full


def full_key_block_bounds(q_block, block_q, block_k, window=None):
  """[first, last] key block whose tile with q_block is FULL (no masking needed).

  The full tiles of a query block are contiguous: the band's lower edge and the
  diagonal are the only partial tiles. The range is empty (first > last) when
  no tile is full; works on traced ints in kernels (all operands non-negative).
  """
  q_first = q_block * block_q
  q_last = q_first + block_q - 1
  last = (q_first + 1) // block_k - 1  # k_last <= q_first
  if window is None:
    return 0 * last, last
  first = jnp.maximum(q_last - window + block_k, 0) // block_k  # q_last - k_first < window
  return first, last


def full_query_block_bounds(k_block, block_q, block_k, num_q_blocks, window=None):
  """[first, last] query block whose tile with k_block is FULL (may be empty)."""
  k_first = k_block * block_k
  k_last = k_first + block_k - 1
  first = (k_last + block_q - 1) // block_q  # q_first >= k_last
  if window is None:
    return first, num_q_blocks - 1 + 0 * first
  last = jnp.minimum((k_first + window) // block_q - 1, num_q_blocks - 1)  # q_last - k_first < window
  return first, last


def cached_keys(lengths, slots):
  """Decode attention over a per-row KV cache (the decode engine's layout): the
  number of cache slots a row's query sees, always a prefix [0, n) of its slots.

  A row whose query sits at position t has lengths = t + 1 tokens. A dense layer's
  cache holds position i in slot i, so it sees slots [0, t + 1). A banded layer's
  ring buffer of W = slots holds position i in slot i % W: while t < W it holds
  positions 0..t in slots 0..t, and from then on positions t - W + 1 .. t in all
  W slots, exactly the keys `visible(t, j, W)` allows. Softmax attention does not
  depend on the order of the keys, so the ring needs no other mask.
  """
  return jnp.minimum(lengths, slots)


def cached_key_blocks(visible_keys, block_k):
  """Key blocks of `block_k` slots that hold a row's `cached_keys` (0 for none);
  lax.div, as the operands are non-negative (Mosaic lowers no floor division)."""
  return lax.div(visible_keys + block_k - 1, block_k)
