"""The numbers users compare: parameters, FLOPs per token, bytes per device,
MFU. `paxgpt info`, `paxgpt plan`, the trainer's logs and the benchmarks all
take them from here so they agree.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np

import kernels.masks
from paxgpt.model import sharding

# Peak dense bf16 FLOP/s and HBM bytes per chip (vendor figures); for the GPUs
# (SXM parts) also the HBM bandwidth in bytes/s, the decode roofline's figure.
CHIPS = {
    "v4": {"peak_flops": 275e12, "hbm_bytes": 32 * 2**30},
    "v5e": {"peak_flops": 197e12, "hbm_bytes": 16 * 2**30},
    "v5p": {"peak_flops": 459e12, "hbm_bytes": 95 * 10**9},
    "v6e": {"peak_flops": 918e12, "hbm_bytes": 32 * 2**30},
    "h100": {"peak_flops": 989e12, "hbm_bytes": 80 * 2**30, "hbm_bandwidth": 3.35e12},
    "h200": {"peak_flops": 989e12, "hbm_bytes": 141 * 10**9, "hbm_bandwidth": 4.8e12},
}

EMBEDDING_PARAMS = ("token_embedding", "position_embedding")


def chip_of(device):
  """The CHIPS key for a jax device, or None where its peak is unknown (CPU)."""
  kind = getattr(device, "device_kind", "").lower()
  for key, needle in (("v5p", "v5p"), ("v5e", "v5 lite"), ("v5e", "v5e"), ("v6e", "v6"),
                      ("v4", "v4"), ("h100", "h100"), ("h200", "h200")):
    if needle in kind:
      return key
  return None


def param_count(params):
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def param_counts(abstract_variables):
  """(total, non-embedding) parameter counts from `model.abstract_variables`."""
  params = nn.unbox(abstract_variables)["params"]
  total = param_count(params)
  embedding = sum(param_count(params[name]) for name in EMBEDDING_PARAMS)
  return total, total - embedding


def attention_pairs_per_token(config, seq_len):
  """Average number of visible keys per query, summed over all layers."""
  total = 0.0
  for kind in config.attention_pattern:
    pairs = kernels.masks.visible_pairs(seq_len, config.layer_window(kind))
    total += config.num_periods * pairs / seq_len
  return total


def flops_per_token(config, params_non_embedding, seq_len=None):
  """Training FLOPs per token: 6N for the weights plus attention.

  N counts every weight multiplied per token: the non-embedding parameters and
  the (tied) output projection onto the padded vocabulary. Attention adds
  2·2·(heads·head_dim) FLOPs per visible query-key pair forward (scores and
  values), times 3 for forward plus backward; banded layers see at most W keys.
  """
  seq_len = seq_len or config.max_len
  matmul_params = params_non_embedding + config.padded_vocab_size * config.d_model
  attn_width = config.num_heads * config.head_dim
  return 6 * matmul_params + 12 * attn_width * attention_pairs_per_token(config, seq_len)


def bytes_per_device(abstract_variables, axis_sizes, rules=sharding.LOGICAL_AXIS_RULES,
                     collection="params"):
  """(bytes per device, fraction of bytes replicated on every device) for a
  boxed variable tree under a mesh of `axis_sizes`, by arithmetic on shapes."""
  tree = abstract_variables[collection]
  per_device = replicated = total = 0
  for leaf, spec in sharding.logical_leaves(tree):
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    local = math.prod(sharding.local_shape(leaf.shape, tuple(spec), axis_sizes, rules))
    per_device += local * np.dtype(leaf.dtype).itemsize
    total += nbytes
    if local == math.prod(leaf.shape):
      replicated += nbytes
  return per_device, (replicated / total if total else 0.0)


def mfu(tokens_per_sec, flops_per_tok, chip, num_chips):
  """Model FLOPs utilisation, or None where the chip's peak is unknown."""
  if chip not in CHIPS:
    return None
  return tokens_per_sec * flops_per_tok / (CHIPS[chip]["peak_flops"] * num_chips)
