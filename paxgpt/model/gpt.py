"""The GPT-3 decoder (Brown et al. 2020) in Flax, with logical axis names.

Token + learned position embeddings, pre-LayerNorm blocks of causal
self-attention and a GELU MLP (d_ff = 4 d_model), a final LayerNorm, and
logits tied to the token embedding. Layers alternate dense and locally banded
causal attention following `attention_pattern`. With `scan_layers` (the default)
the stack is an `nn.scan` over *periods* of that pattern, so the scanned body is
homogeneous and compile time does not grow with depth; its parameters sit under
'layers' with a leading period axis. Without it the periods are unrolled as
'layers_0', 'layers_1', ... (no per-step slicing of stacked weights: what the
sampler decodes with). `stack_layers` / `unstack_layers` convert a parameter or
cache tree between the two layouts exactly; checkpoints hold the layout of the
config that wrote them.

Every parameter carries logical axis names (see paxgpt/model/sharding.py) and every
activation at a layer boundary is constrained by name.

Decoding (paxgpt/decoding/) adds a 'cache' variable collection of keys and
values: `decode="prefill"` runs the prompt through the same attention kernels
as training and fills the cache, `decode="step"` feeds one token per row and
attends over the cache. Dense layers keep `cache_length` positions; banded
layers keep only the last W in a ring buffer (position i in slot i % W).
The cache is laid out [batch, heads, slots, head_dim] (CACHE_AXES), the order
the attention's batched matmuls read, so a step never transposes it. Two
layouts of the rows: the static sampler left-pads its prompts, so every row
writes the same slot each step (CacheIndex with `key_start`); the decode engine
keeps every row at its own position from slot 0 (`key_start=None`): a row
writes at its position (mod W in a ring) and attends over its own
`kernels.masks.cached_keys` only, through `kernels.decode_attention`.
`decode="pack"` is the engine's prefill: prompts packed several to a row
(segment ids, positions from each prompt's start), every layer keeping all of
the row's keys and values, logits only at `logits_at`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

import kernels
from paxgpt.model import sharding
from paxgpt.config.checks import check_types
from paxgpt.errors import ConfigError

ATTENTION_KINDS = ("dense", "banded")
# What a layer's backward pass keeps instead of recomputing (MaxText's names):
# "full" keeps only each layer's input; "save_qkv_proj" also the q/k/v
# projections; "save_dot_except_mlpwi" every projection but the MLP's first;
# "dots_saveable" every matmul output (JAX's policy); "none" does not remat.
REMAT_POLICIES = ("none", "full", "save_qkv_proj", "save_dot_except_mlpwi", "dots_saveable")
# What one remat wraps: each block ("layer", MaxText's granularity: the recompute
# skips every block's last matmul) or each period of the attention pattern
# ("period": one saved input per period, so less memory and more recompute).
REMAT_SCOPES = ("layer", "period")
# Logit for the embedding's padding rows: never the argmax, never sampled,
# and finite so that cross-entropy and temperature scaling stay NaN-free.
PADDING_LOGIT = -1e9

BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")
BATCH_LENGTH_HEADS_KV = ("activation_batch", "activation_length", "activation_heads",
                         "activation_kv")
CACHE_AXES = ("cache_batch", "cache_heads", "cache_length", "cache_kv")
DECODE_MODES = (None, "prefill", "step", "pack")


class CacheIndex(NamedTuple):
  """Where a decode step writes. Left-padded rows (the static sampler): `index`
  is the buffer position of the fed token, the same for every row, and
  `key_start` [batch] each row's first non-padding position. Per-row positions
  (the engine): `index` [batch] is each row's position and `key_start` None."""
  index: jax.Array
  key_start: jax.Array | None


@gin.configurable
@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Shape and numerics of a GPT-3 decoder (GPT-3 Table 2.1 sizes in gin/models)."""
  vocab_size: int = 50257
  num_layers: int = 12
  d_model: int = 768
  num_heads: int = 12
  head_dim: int | None = None  # default d_model // num_heads
  d_ff: int | None = None  # default 4 * d_model
  max_len: int = 2048
  vocab_pad_multiple: int = 128
  attention_pattern: tuple = ("dense", "banded")
  window: int = 256
  dropout_rate: float = 0.0
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  remat_policy: str = "none"
  remat_scope: str = "layer"
  attention_backend: str | None = None
  attention_interpret: bool = False
  layer_norm_epsilon: float = 1e-5
  init_std: float = 0.02
  scan_layers: bool = True  # nn.scan over periods; False unrolls them (see the docstring)
  # Imported models (paxgpt/interop/hf.py) need these to be exact: GPT-Neo does not
  # scale q.k (attention_scale=1.0; None: 1/sqrt(head_dim)) and has no q/k/v
  # biases; `masked_ids` are ids with no trained embedding row (the padding id 0
  # of an imported vocabulary), whose logits are PADDING_LOGIT like the padded rows.
  attention_scale: float | None = None
  qkv_bias: bool = True
  masked_ids: tuple = ()

  def __post_init__(self):
    check_types(self)
    pattern = tuple(self.attention_pattern)
    object.__setattr__(self, "attention_pattern", pattern)
    object.__setattr__(self, "masked_ids", tuple(int(i) for i in self.masked_ids))
    if any(not 0 <= i < self.vocab_size for i in self.masked_ids):
      raise ValueError(f"masked_ids={self.masked_ids} must lie in [0, vocab_size="
                       f"{self.vocab_size})")
    if self.head_dim is None:
      if self.d_model % self.num_heads:
        raise ConfigError(f"GPTConfig.d_model={self.d_model} is not divisible by num_heads="
                          f"{self.num_heads}; set head_dim")
      object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
    if self.d_ff is None:
      object.__setattr__(self, "d_ff", 4 * self.d_model)
    bad = [k for k in pattern if k not in ATTENTION_KINDS]
    if not pattern or bad:
      raise ConfigError(f"GPTConfig.attention_pattern={pattern!r}: each entry must be one "
                        f"of {ATTENTION_KINDS}")
    if self.num_layers % len(pattern):
      raise ConfigError(f"GPTConfig.num_layers={self.num_layers} is not a multiple of the "
                        f"attention pattern's length {len(pattern)} ({pattern})")
    if self.remat_policy not in REMAT_POLICIES:
      raise ConfigError(f"GPTConfig.remat_policy={self.remat_policy!r} is not one of "
                        f"{REMAT_POLICIES}")
    if self.remat_scope not in REMAT_SCOPES:
      raise ConfigError(f"GPTConfig.remat_scope={self.remat_scope!r} is not one of "
                        f"{REMAT_SCOPES}")
    if self.attention_backend not in (None,) + kernels.BACKENDS:
      raise ConfigError(f"GPTConfig.attention_backend={self.attention_backend!r} is not one "
                        f"of {kernels.BACKENDS} or None")
    if self.window < 1:
      raise ConfigError(f"GPTConfig.window={self.window} must be positive")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError:
        raise ConfigError(f"GPTConfig.{name}={getattr(self, name)!r} is not a dtype "
                          f"(e.g. 'float32', 'bfloat16')") from None

  @property
  def padded_vocab_size(self):
    m = self.vocab_pad_multiple
    return -(-self.vocab_size // m) * m

  @property
  def num_periods(self):
    return self.num_layers // len(self.attention_pattern)

  def layer_window(self, kind):
    return self.window if kind == "banded" else None


def _init(std, axes):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros, axes)


def _ones(axes):
  return nn.with_logical_partitioning(nn.initializers.ones, axes)


def _constrain(x, names):
  return nn.with_logical_constraint(x, names)


def _gathered(w, names):
  """A weight as a matmul reads it, its embed axis whole (the FSDP all-gather made
  explicit) where the batch is split over more than one mesh axis. There, left to
  XLA's SPMD partitioner, a matmul between the tensor-split residual stream and an
  fsdp-split weight swaps the rows of the devices whose data and fsdp indices
  differ (jax 0.10 and 0.12, seen running on the CPU compiler). Elsewhere the
  partitioner is right and, left alone, keeps less gathered (0.4 GiB per chip for
  175B on fsdp 64 x tensor 4)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return w
  batch_axes = nn.logical_to_mesh_axes(("activation_batch",))[0] or ()
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
  if sum(mesh.shape[a] > 1 for a in batch_axes) < 2:
    return w
  return _constrain(w, tuple(None if n == "embed" else n for n in names))


def _gathered_dot(names):
  """nn.Dense's dot_general for a kernel of logical `names`: see _gathered."""
  def dot_general(lhs, rhs, *args, **kwargs):
    return jax.lax.dot_general(lhs, _gathered(rhs, names), *args, **kwargs)
  return dot_general


def layer_norm(cfg, name):
  return nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, scale_init=_ones(("embed",)),
                      bias_init=_zeros(("embed",)), name=name)


def attend(q, k, v, segment_ids, *, window, backend, interpret, scale=None, forward_only=False):
  """Causal attention through kernels/, one shard per device for the Pallas backends.
  forward_only: a decoder's prefill (see kernels.attention)."""
  call = functools.partial(kernels.attention, causal=True, window=window, backend=backend,
                           interpret=interpret, sm_scale=scale, forward_only=forward_only)
  if backend in ("tpu", "gpu"):
    if segment_ids is None:
      fn = sharding.shard_map_logical(lambda q, k, v: call(q, k, v), (BATCH_LENGTH_HEADS_KV,) * 3,
                                      BATCH_LENGTH_HEADS_KV)
      return fn(q, k, v)
    fn = sharding.shard_map_logical(
        lambda q, k, v, s: call(q, k, v, segment_ids=s),
        (BATCH_LENGTH_HEADS_KV,) * 3 + (("activation_batch", "activation_length"),),
        BATCH_LENGTH_HEADS_KV)
    return fn(q, k, v, segment_ids)
  return call(q, k, v, segment_ids=segment_ids)


class SelfAttention(nn.Module):
  config: GPTConfig
  kind: str  # 'dense' or 'banded'
  deterministic: bool = True
  decode: str | None = None  # None (training), 'prefill', 'step' or 'pack'
  cache_length: int = 0  # positions a dense layer's cache holds (prefill and pack)

  @nn.compact
  def __call__(self, x, segment_ids, cache_index=None):
    cfg = self.config
    heads = (cfg.num_heads, cfg.head_dim)

    def project(name):
      w = self.param(f"{name}_kernel", _init(cfg.init_std, ("embed", "heads", "kv")),
                     (cfg.d_model,) + heads, cfg.param_dtype)
      w = _gathered(w.astype(cfg.dtype), ("embed", "heads", "kv"))
      y = jnp.einsum("bld,dhk->blhk", x, w)
      if cfg.qkv_bias:
        b = self.param(f"{name}_bias", _zeros(("heads", "kv")), heads, cfg.param_dtype)
        y = y + b.astype(cfg.dtype)
      return checkpoint_name(_constrain(y, BATCH_LENGTH_HEADS_KV), f"{name}_proj")

    q, k, v = project("query"), project("key"), project("value")
    window = cfg.layer_window(self.kind)
    if self.decode == "step":
      out = self._attend_cache(q, k, v, window, cache_index)
    else:
      out = attend(q, k, v, segment_ids, window=window, backend=cfg.attention_backend,
                   interpret=cfg.attention_interpret, scale=cfg.attention_scale,
                   forward_only=self.decode is not None)
      if self.decode in ("prefill", "pack"):  # pack: every layer keeps every position
        self._fill_cache(k, v, window if self.decode == "prefill" else None)
    out = _constrain(out, BATCH_LENGTH_HEADS_KV)
    # GPT-2 init: residual output projections scaled by 1/sqrt(2 * num_layers).
    w = self.param("out_kernel", _init(cfg.init_std / math.sqrt(2 * cfg.num_layers),
                                       ("heads", "kv", "embed")),
                   heads + (cfg.d_model,), cfg.param_dtype)
    b = self.param("out_bias", _zeros(("embed",)), (cfg.d_model,), cfg.param_dtype)
    w = _gathered(w.astype(cfg.dtype), ("heads", "kv", "embed"))
    out = _constrain(jnp.einsum("blhk,hkd->bld", out, w), BATCH_LENGTH_EMBED)
    out = checkpoint_name(out + b.astype(cfg.dtype), "out_proj")
    return nn.Dropout(cfg.dropout_rate)(out, deterministic=self.deterministic)

  def _cache(self, batch, window):
    cfg = self.config
    slots = self.cache_length if window is None else min(window, self.cache_length)
    init = nn.with_logical_partitioning(jnp.zeros, CACHE_AXES)
    shape = (batch, cfg.num_heads, slots, cfg.head_dim)
    return (self.variable("cache", "key", init, shape, jnp.dtype(cfg.dtype)),
            self.variable("cache", "value", init, shape, jnp.dtype(cfg.dtype)))

  def _fill_cache(self, k, v, window):
    """Store the prompt's keys/values: all of them (dense) or the last W (banded)."""
    prompt = k.shape[1]
    if prompt > self.cache_length:
      raise ValueError(f"prompt length {prompt} exceeds cache_length={self.cache_length}")
    cached_k, cached_v = self._cache(k.shape[0], window)
    slots = cached_k.value.shape[2]
    for var, new in ((cached_k, k), (cached_v, v)):
      new = jnp.swapaxes(new, 1, 2)  # [batch, heads, prompt, head_dim]
      if prompt <= slots:  # every position i lands in slot i (i < slots)
        new = jnp.pad(new, ((0, 0), (0, 0), (0, slots - prompt), (0, 0)))
      else:  # ring buffer: the last `slots` positions, position i in slot i % slots
        new = jnp.roll(new[:, :, prompt - slots:], (prompt - slots) % slots, axis=2)
      var.value = _constrain(new.astype(var.value.dtype), CACHE_AXES)

  def _attend_cache(self, q, k, v, window, cache_index):
    """One query per row against the cache, after writing this step's key/value."""
    cached_k, cached_v = self._cache(k.shape[0], window)
    if cache_index.key_start is None:
      return self._attend_own_cache(q, k, v, cached_k, cached_v, cache_index.index)
    slots = cached_k.value.shape[2]
    t = cache_index.index
    slot = t if window is None else t % slots
    for var, new in ((cached_k, k), (cached_v, v)):
      new = jnp.swapaxes(new, 1, 2).astype(var.value.dtype)  # [batch, heads, 1, head_dim]
      var.value = _constrain(jax.lax.dynamic_update_slice_in_dim(var.value, new, slot, axis=2),
                             CACHE_AXES)
    s = jnp.arange(slots)
    # The buffer position each slot holds: itself (dense), or the latest i <= t
    # with i % slots == s (ring). Slots not written yet map below key_start.
    position = s if window is None else t - (t - s) % slots
    ok = (position[None, :] <= t) & (position[None, :] >= cache_index.key_start[:, None])
    if window is not None:
      ok &= t - position[None, :] < window
    return masked_attention(q, cached_k.value, cached_v.value, ok, self.config.attention_scale)

  def _attend_own_cache(self, q, k, v, cached_k, cached_v, t):
    """Per-row positions t [batch]: each row writes at t % slots (t itself in a
    dense cache) and sees its own first min(t + 1, slots) slots."""
    cfg = self.config
    slots = cached_k.value.shape[2]
    rows = jnp.arange(k.shape[0])
    for var, new in ((cached_k, k), (cached_v, v)):
      new = new[:, 0].astype(var.value.dtype)  # [batch, heads, head_dim]
      var.value = _constrain(var.value.at[rows, :, t % slots].set(new), CACHE_AXES)
    lengths = kernels.masks.cached_keys(t + 1, slots)
    call = functools.partial(kernels.decode_attention, sm_scale=cfg.attention_scale,
                             backend=cfg.attention_backend, interpret=cfg.attention_interpret)
    if (cfg.attention_backend or kernels.default_backend()) in ("tpu", "gpu"):
      rows_heads = ("activation_batch", "activation_heads", "activation_kv")
      call = sharding.shard_map_logical(call, (rows_heads, CACHE_AXES, CACHE_AXES,
                                               ("activation_batch",)), rows_heads)
    return call(q[:, 0], cached_k.value, cached_v.value, lengths)[:, None]


def masked_attention(q, k, v, visible, scale=None):
  """Softmax attention of q [b, 1, h, d] over k, v [b, h, s, d] (the cache's
  layout) where visible [b, s] is True; float32 inside like kernels/reference.py.
  scale: of q.k (None: 1/sqrt(head_dim))."""
  scores = jnp.einsum("bqhd,bhkd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
  scores = scores * (q.shape[-1] ** -0.5 if scale is None else scale)
  scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bhqk,bhkd->bqhd", probs, v.astype(jnp.float32))
  return out.astype(q.dtype)


class Mlp(nn.Module):
  config: GPTConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    h = nn.Dense(cfg.d_ff, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                 kernel_init=_init(cfg.init_std, ("embed", "mlp")),
                 bias_init=_zeros(("mlp",)), dot_general=_gathered_dot(("embed", "mlp")),
                 name="wi")(x)
    h = checkpoint_name(h, "mlpwi")
    h = _constrain(nn.gelu(h), ("activation_batch", "activation_length", "activation_mlp"))
    out = nn.Dense(cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                   kernel_init=_init(cfg.init_std / math.sqrt(2 * cfg.num_layers),
                                     ("mlp", "embed")),
                   bias_init=_zeros(("embed",)), dot_general=_gathered_dot(("mlp", "embed")),
                   name="wo")(h)
    out = checkpoint_name(_constrain(out, BATCH_LENGTH_EMBED), "mlpwo")
    return nn.Dropout(cfg.dropout_rate)(out, deterministic=self.deterministic)


class Block(nn.Module):
  """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""
  config: GPTConfig
  kind: str
  deterministic: bool = True
  decode: str | None = None
  cache_length: int = 0

  @nn.compact
  def __call__(self, x, segment_ids, cache_index=None):
    cfg = self.config
    x = x + SelfAttention(cfg, self.kind, self.deterministic, self.decode, self.cache_length,
                          name="attention")(
        layer_norm(cfg, "ln_attention")(x), segment_ids, cache_index)
    x = _constrain(x, BATCH_LENGTH_EMBED)
    x = x + Mlp(cfg, self.deterministic, name="mlp")(layer_norm(cfg, "ln_mlp")(x))
    return _constrain(x, BATCH_LENGTH_EMBED)


class Period(nn.Module):
  """One period of the attention pattern (by default a dense and a banded block).

  Training remats each block on its own (`GPTConfig.remat_policy`, with
  remat_scope "layer"): the backward pass keeps every block's input and
  recomputes inside one block at a time, so the recompute skips each block's last
  matmul (whose output only the residual sum reads), as MaxText's per-layer remat
  does. With remat_scope "period" GPT remats the whole period instead."""
  config: GPTConfig
  deterministic: bool = True
  decode: str | None = None
  cache_length: int = 0

  @nn.compact
  def __call__(self, x, segment_ids, cache_index=None):
    block = _remat(Block, _remat_policy(self.config, self.decode, "layer"),
                   scanned=self.config.scan_layers)
    for i, kind in enumerate(self.config.attention_pattern):
      x = block(self.config, kind, self.deterministic, self.decode, self.cache_length,
                name=f"{i}_{kind}")(x, segment_ids, cache_index)
    return x, None


_SAVED_NAMES = {"save_qkv_proj": ("query_proj", "key_proj", "value_proj"),
                "save_dot_except_mlpwi": ("query_proj", "key_proj", "value_proj", "out_proj",
                                          "mlpwo")}


def _remat_policy(config, decode, scope):
  """The remat policy of a module of `scope`: decoding keeps no activations for a
  backward pass, so it never remats; only the configured scope remats."""
  return config.remat_policy if not decode and config.remat_scope == scope else "none"


def _remat(module_cls, policy, scanned):
  if policy == "none":
    return module_cls
  if policy in _SAVED_NAMES:
    saveable = jax.checkpoint_policies.save_only_these_names(*_SAVED_NAMES[policy])
  else:
    saveable = {"full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable}[policy]
  # Inside a scan the recompute cannot be merged with the forward pass, so CSE may
  # stay on; unrolled, XLA would fold the recompute back into the forward pass.
  return nn.remat(module_cls, policy=saveable, prevent_cse=not scanned)


class GPT(nn.Module):
  """The decoder: tokens [batch, length] -> float32 logits [batch, length, padded_vocab].

  Decoding (apply with mutable=['cache']): decode='prefill' takes left-padded
  prompts (segment_ids 1 on tokens, 0 on padding; positions counted from each
  row's first token), creates the cache for `cache_length` buffer positions and
  returns the logits of the last position only ([batch, 1, vocab]);
  decode='step' takes one token per row [batch, 1], its positions and a
  CacheIndex, and returns its logits. decode='pack' takes packed prompts
  (segment ids and positions per prompt), keeps every layer's keys and values
  of all positions in the cache and returns the logits at `logits_at` [batch, k].
  """
  config: GPTConfig
  # The pipeline's hook (paxgpt/model/pipeline.py runs the periods itself, stage by
  # stage): "embed" returns the input of the periods; "head" maps their output,
  # `hidden`, to the logits. None: the whole decoder.
  part: str | None = None

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, deterministic=True,
               decode=None, cache_length=0, cache_index=None, logits_at=None, hidden=None):
    cfg = self.config
    if decode not in DECODE_MODES:
      raise ValueError(f"decode={decode!r} is not one of {DECODE_MODES}")
    if self.part not in (None, "embed", "head"):
      raise ValueError(f"part={self.part!r} is not one of None, 'embed', 'head'")
    if decode == "step" and (cache_index is None or positions is None
                             or tokens.shape[-1] != 1):
      raise ValueError("decode='step' takes tokens [batch, 1], positions and a cache_index")
    if decode == "prefill" and cache_length < tokens.shape[-1]:
      raise ValueError(f"cache_length={cache_length} is shorter than the prompt "
                       f"({tokens.shape[-1]} positions)")
    if decode != "step" and tokens.shape[-1] > cfg.max_len:
      raise ValueError(f"sequence length {tokens.shape[-1]} exceeds max_len={cfg.max_len}")
    if (decode == "pack") != (logits_at is not None):
      raise ValueError("logits_at goes with decode='pack' (and only with it)")
    if decode == "pack":
      cache_length = tokens.shape[-1]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
    embedding = self.param("token_embedding", _init(cfg.init_std, ("vocab", "embed")),
                           (cfg.padded_vocab_size, cfg.d_model), cfg.param_dtype)
    pos_embedding = self.param("position_embedding", _init(cfg.init_std, ("length", "embed")),
                               (cfg.max_len, cfg.d_model), cfg.param_dtype)
    # Gather from tables whose embed axis is whole (as FSDP gathers any weight
    # before use); a gather from an embed-sharded table makes XLA replicate. The
    # tables are cast first, so the FSDP all-gather moves (and keeps) the compute
    # dtype, and the token table is the same array the logits read.
    compute_table = embedding.astype(cfg.dtype)
    table = _constrain(compute_table, ("vocab", "activation_embed"))
    pos_table = _constrain(pos_embedding.astype(cfg.dtype), ("length", "activation_embed"))
    x = jnp.take(table, tokens, axis=0) + jnp.take(pos_table, positions, axis=0)
    x = _constrain(x, BATCH_LENGTH_EMBED)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    if self.part == "embed":
      return x

    period = _remat(Period, _remat_policy(cfg, decode, "period"), scanned=cfg.scan_layers)
    if self.part == "head":  # the embedding above is dead code, which jit drops
      x = hidden
    elif cfg.scan_layers:
      stack = nn.scan(period, variable_axes={"params": 0, "cache": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=nn.broadcast,
                      length=cfg.num_periods,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(cfg, deterministic, decode, cache_length, name="layers")(
          x, segment_ids, cache_index)
    else:
      for i in range(cfg.num_periods):
        x, _ = period(cfg, deterministic, decode, cache_length, name=f"layers_{i}")(
            x, segment_ids, cache_index)

    if decode == "prefill":  # left padding: every row's last prompt token is last
      x = x[:, -1:]
    elif decode == "pack":
      x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
    x = layer_norm(cfg, "ln_final")(x)
    logits = jnp.einsum("bld,vd->blv", x, _gathered(compute_table, ("vocab", "embed")))
    logits = _constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
    logits = logits.astype(jnp.float32)
    if cfg.padded_vocab_size > cfg.vocab_size or cfg.masked_ids:
      ids = jnp.arange(cfg.padded_vocab_size)
      real = ids < cfg.vocab_size
      for i in cfg.masked_ids:
        real &= ids != i
      logits = jnp.where(real, logits, PADDING_LOGIT)
    return logits


def lm_loss(logits, targets, weights, z_loss=0.0):
  """Mean token cross-entropy over weighted (non-padding) targets.

  Returns (loss, aux) where aux has the weighted sums for metrics. The
  optional z-loss (PaLM) adds z_loss * log(Z)^2 to keep the logits' softmax
  normaliser near 1.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = log_z - target_logit
  weights = weights.astype(jnp.float32)
  total_weight = jnp.sum(weights)
  denom = jnp.maximum(total_weight, 1.0)
  loss = jnp.sum(nll * weights) / denom
  z_term = jnp.sum(jnp.square(log_z) * weights) / denom
  return loss + z_loss * z_term, {"nll_sum": jnp.sum(nll * weights),
                                  "weight_sum": total_weight, "z_loss": z_term}


def unstack_layers(tree, num_periods):
  """A params (or cache) tree of the scanned layout -> the unrolled one: the
  'layers' subtree's leading period axis becomes 'layers_0' ... 'layers_{n-1}'."""
  tree = dict(tree)
  stacked = tree.pop("layers")
  for i in range(num_periods):
    tree[f"layers_{i}"] = jax.tree.map(lambda x: x[i], stacked)
  return tree


def stack_layers(tree, num_periods):
  """The inverse of unstack_layers (an unrolled tree -> the scanned layout)."""
  tree = dict(tree)
  periods = [tree.pop(f"layers_{i}") for i in range(num_periods)]
  tree["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *periods)
  return tree


def abstract_variables(config, batch=1, length=None):
  """Parameter shapes and logical boxes without allocating anything."""
  length = length or min(config.max_len, 8)
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  return jax.eval_shape(lambda t: GPT(config).init(jax.random.key(0), t), tokens)
