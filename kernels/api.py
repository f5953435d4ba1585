"""`attention(q, k, v, ...)`: the one function the model calls."""
from __future__ import annotations

import jax

from kernels import masks, reference

BACKENDS = ("tpu", "gpu", "cudnn", "reference")


def default_backend():
  """The best backend for the platform JAX runs on."""
  platform = jax.devices()[0].platform
  if platform == "tpu":
    return "tpu"
  if platform == "gpu":
    return "gpu"
  return "reference"


def attention(q, k, v, *, causal=True, window=None, segment_ids=None, sm_scale=None,
              backend=None, interpret=False, forward_only=False, **block_sizes):
  """Causal self-attention over [batch, seq, heads, head_dim].

  window=None is dense causal; window=W is banded causal (key j visible from
  query i iff j <= i and i - j < W). segment_ids [batch, seq] keeps packed
  documents apart. `interpret` runs the Pallas kernels in interpret mode
  (True, or a `pltpu.InterpretParams` for the TPU kernels) so they run on CPU.
  forward_only (the decoders' prefill): the reference backend then skips the key
  blocks the mask leaves empty, as the kernels do (no gradient through it).
  """
  if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
    raise ValueError(f"q, k, v must all be [batch, seq, heads, head_dim]; got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if not causal and window is not None:
    raise ValueError("window requires causal=True")
  masks.check_window(window)
  if window is not None and window >= q.shape[1]:
    window = None  # a band as wide as the sequence is the dense causal mask
  if segment_ids is not None:
    # one [batch, seq] array, or a (query ids, key ids) pair of them
    pair = segment_ids if isinstance(segment_ids, tuple) else (segment_ids,)
    if any(s.shape != q.shape[:2] for s in pair):
      raise ValueError(f"segment_ids must be [batch, seq] = {q.shape[:2]} (or a pair of "
                       f"them), got {[s.shape for s in pair]}")
  backend = backend or default_backend()
  if backend not in BACKENDS:
    raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
  if backend == "reference":
    fn = reference.attention_by_blocks if forward_only else reference.attention
    return fn(q, k, v, causal=causal, window=window, segment_ids=segment_ids, sm_scale=sm_scale)
  if backend == "cudnn":
    return _cudnn(q, k, v, causal, window, segment_ids, sm_scale)
  if backend == "tpu":
    from kernels import tpu
    return tpu.attention(q, k, v, causal=causal, window=window, segment_ids=segment_ids,
                         sm_scale=sm_scale, interpret=interpret, **block_sizes)
  from kernels import gpu
  return gpu.attention(q, k, v, causal=causal, window=window, segment_ids=segment_ids,
                       sm_scale=sm_scale, interpret=interpret, **block_sizes)


def _cudnn(q, k, v, causal, window, segment_ids, sm_scale):
  mask = None
  if segment_ids is not None:
    # cuDNN has no mask type for packed segments: a dense [batch, 1, q, k] mask
    # (a bias inside cuDNN), so it costs memory the Pallas kernels do not.
    q_ids, k_ids = segment_ids if isinstance(segment_ids, tuple) else (segment_ids,) * 2
    mask = q_ids[:, None, :, None] == k_ids[:, None, None, :]
  local = None if window is None else (window - 1, 0)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=sm_scale, is_causal=causal,
                                      local_window_size=local, implementation="cudnn")


def decode_attention(q, k, v, lengths, *, sm_scale=None, backend=None, interpret=False,
                     block_k=None):
  """One decode query per row against its KV cache, reading only the cache it holds.

  q [batch, heads, head_dim]; k, v [batch, heads, slots, head_dim] (the cache's
  layout); row b attends over slots [0, lengths[b]) (`masks.cached_keys`: a dense
  cache's first t + 1 slots, or a banded ring's W). The Pallas kernels skip each
  row's blocks past its own length; the XLA path ("reference", "cudnn", and the
  Triton kernel's non-power-of-two head dims) loops over blocks up to the longest
  row, except on CPU, where its one block is the whole cache: XLA's CPU backend
  copies each dynamically sliced block before its dot, which costs more than
  reading the rest of the buffer (GPT-2 shape, 32 slots: 192 against 119 ms per
  decode step). A row's result does not depend on the other rows.
  """
  if q.ndim != 3 or k.ndim != 4 or v.shape != k.shape or q.shape != k.shape[:2] + k.shape[3:]:
    raise ValueError(f"decode attention takes q [batch, heads, head_dim] and k, v [batch, "
                     f"heads, slots, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
  backend = backend or default_backend()
  if backend not in BACKENDS:
    raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
  options = {} if block_k is None else {"block_k": block_k}
  if backend == "tpu":
    from kernels import decode_tpu
    return decode_tpu.decode_attention(q, k, v, lengths, sm_scale=sm_scale,
                                       interpret=interpret, **options)
  if backend == "gpu":
    from kernels import decode_gpu
    if decode_gpu.supports(q.shape[-1]):
      return decode_gpu.decode_attention(q, k, v, lengths, sm_scale=sm_scale,
                                         interpret=bool(interpret), **options)
  if block_k is None and jax.default_backend() == "cpu":
    options = {"block_k": k.shape[2]}
  return reference.decode_attention(q, k, v, lengths, sm_scale=sm_scale, **options)
